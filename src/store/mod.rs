//! The cache store: HEADs, layers and volumes in a state dir. Blocking and concrete;
//! no gRPC and no Kubernetes. The commit is split into phases so the caller can take
//! the publish lock between them (see [`commit`]).

pub mod atomic;
pub mod boot;
pub mod commit;
pub mod durable;
pub mod gc;
pub mod head;
pub mod history;
pub mod image;
pub mod layer;
pub mod layout;
pub mod merge;
pub mod remote;
pub mod root;
pub mod snapshot;
pub mod squash;
pub mod tree;
pub mod volume;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub use head::Head;
pub use layer::{LayerKind, LayerRecord};
pub use layout::{CacheKey, LayerId, Layout, Name, NameError, VolumeId};
pub use root::RootSpec;
pub use volume::{Base, Decision, OnStale, Owner, PodUse, Policy, PublishWhen, VolumeRecord, VolumeRequest};

use head::now_unix;

/// Store errors, each with the cache, volume or path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name broke the naming rule.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The state dir path is unusable.
    #[error(transparent)]
    StateDir(#[from] layout::StateDirError),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// A state file does not parse; it is left in place for a person to look at.
    #[error("{path} is corrupt ({source}); fix it or remove the cache with `jobcachefs cache rm`")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    /// A HEAD names a layer that is not on disk.
    #[error("cache {cache}: head names layer {layer}, which is missing from {path}")]
    MissingLayer { cache: CacheKey, layer: LayerId, path: PathBuf },
    /// No such volume.
    #[error("volume {0} not found")]
    VolumeNotFound(VolumeId),
    /// A volume of that id exists with another cache or policy.
    #[error("volume {id} already exists for cache {existing} with different parameters")]
    VolumeConflict { id: VolumeId, existing: CacheKey },
    /// No such snapshot.
    #[error("snapshot {0} not found")]
    SnapshotNotFound(VolumeId),
    /// The cache has no version to act on.
    #[error("cache {0} has no version")]
    NoVersion(CacheKey),
    /// A rollback named a version the cache no longer keeps.
    #[error("cache {cache} does not keep version {version} (kept: {kept:?}); --keep-versions sets how many are kept")]
    VersionNotKept { cache: CacheKey, version: u64, kept: Vec<u64> },
    /// A rollback to the version HEAD already is.
    #[error("cache {cache}: version {version} is already the current version")]
    AlreadyCurrent { cache: CacheKey, version: u64 },
    /// Another cache's image has the tag this cache's would get (a hash collision).
    #[error("cache {cache}: image {tag} already holds cache {holder}")]
    ImageTaken { cache: CacheKey, holder: CacheKey, tag: layout::ImageTag },
    /// A cache size below what an ext4 image with a journal needs.
    #[error("cache {cache}: cacheSize {bytes} is too small: must be at least 16Mi")]
    CacheSizeTooSmall { cache: CacheKey, bytes: u64 },
    /// A volume's image is not mounted where its upper should be (the caller mounts it first).
    #[error("image {tag} is not mounted at {path}")]
    ImageNotMounted { tag: layout::ImageTag, path: PathBuf },
    /// A layer tree could not be measured, copied or removed.
    #[error(transparent)]
    Tree(#[from] tree::TreeError),
    /// A registry's version names a layer id this node holds with other content.
    #[error("cache {cache}: the registry's layer {layer} is {remote}, but this node's layer {layer} is {local}")]
    LayerMismatch { cache: CacheKey, layer: LayerId, remote: String, local: String },
}

impl StoreError {
    /// Whether the filesystem ran out of space somewhere in this error's chain.
    pub fn is_no_space(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if e.downcast_ref::<io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC)) {
                return true;
            }
            cause = e.source();
        }
        false
    }

    /// An I/O error with the operation and path it concerns.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io { op, path: path.into(), source }
    }
}

/// A held state-wide lock: shared while pinning or publishing, exclusive while collecting.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] Flock<File>);

/// Opens (creating) `path` and flocks it, waiting for other holders.
pub(crate) fn flock_file(path: &Path, arg: FlockArg) -> Result<Flock<File>, StoreError> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io("open", path, e))?;
    Flock::lock(file, arg).map_err(|(_, errno)| StoreError::io("flock", path, errno.into()))
}

/// The cache store over one state dir.
#[derive(Debug, Clone)]
pub struct Store {
    layout: Layout,
    keep_versions: usize,
}

/// What to create a volume from.
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// The volume's id.
    pub id: VolumeId,
    /// The cache to restore and publish to.
    pub cache: CacheKey,
    /// Publish policy.
    pub policy: Policy,
    /// Caches to restore from, in order, while `cache` has no version.
    pub fallbacks: Vec<CacheKey>,
    /// Where the overlay will be mounted.
    pub mount_path: Option<PathBuf>,
    /// The process that owns the volume, if its lifetime is tied to one.
    pub owner: Option<Owner>,
    /// The orchestrator's request, compared on a repeated create.
    pub request: Option<VolumeRequest>,
    /// The flags its overlay is mounted with.
    pub flags: crate::mount::MountOptions,
    /// Owner and mode its root gets over the version's (owner parameters).
    pub root: RootSpec,
    /// Content to start from instead of HEAD (CSI `volume_content_source`).
    pub content: Option<Content>,
    /// The cache's size: its layers and this volume's upper live in an image of that size.
    pub cache_size: Option<u64>,
}

impl NewVolume {
    /// A volume of `cache` mounted at `mount_path`, with every other choice at its default:
    /// no fallbacks, owner, request, content or size, the default flags and root.
    pub fn new(id: VolumeId, cache: CacheKey, policy: Policy, mount_path: Option<PathBuf>) -> Self {
        Self {
            id,
            cache,
            policy,
            fallbacks: Vec::new(),
            mount_path,
            owner: None,
            request: None,
            flags: crate::mount::MountOptions::default(),
            root: RootSpec::default(),
            content: None,
            cache_size: None,
        }
    }
}

/// Where a new volume's content comes from instead of its cache's HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A snapshot's layers.
    Snapshot(VolumeId),
    /// Another volume's content: its base plus a copy of its change (a clone).
    Volume(VolumeId),
}

/// One pin file read back: the volume, its cache (when recorded) and the layers it pins.
type PinEntry = (String, Option<CacheKey>, Vec<LayerId>);

/// `pins/<volume>.json` on a shared store: which layers one node's volume keeps alive, and
/// for which cache, so gc and eviction on every node see the volumes of every other.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum PinFile {
    /// What this version writes.
    Cache { cache: CacheKey, layers: Vec<LayerId> },
    /// What earlier versions wrote: the layers alone.
    Layers(Vec<LayerId>),
}

/// What a cache holds right now, for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheInfo {
    /// Which cache.
    pub cache: CacheKey,
    /// HEAD version (0: none).
    pub version: u64,
    /// Layers, bottom to top.
    pub layers: Vec<LayerId>,
    /// Bytes in its layers' regular files (a file replaced in a later layer counts twice).
    pub bytes: u64,
    /// Entries in its layers.
    pub files: u64,
    /// Seconds since the epoch of the last restore or publish.
    pub last_used_unix: u64,
    /// Volumes of this cache that exist now.
    pub volumes: usize,
}

/// The whole store at a glance, for the metrics gauges; sizes come from [`Store::cache_info`],
/// as `cache ls` prints them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreSummary {
    /// Caches with a version.
    pub caches: u64,
    /// Layers HEADs name (each counted once, even when caches share it).
    pub layers: u64,
    /// Bytes of those layers.
    pub bytes: u64,
    /// Volumes on this node.
    pub volumes: u64,
    /// Layers of the deepest cache.
    pub deepest: u64,
    /// Seconds the oldest promoted change has waited for its HEAD (0: none waiting).
    pub oldest_pending_secs: u64,
}

impl Store {
    /// Opens (and creates) the store at `layout`'s root.
    pub fn open(layout: Layout) -> Result<Self, StoreError> {
        for dir in [
            layout.root().to_path_buf(),
            layout.caches_dir(),
            layout.layers_dir(),
            layout.volumes_dir(),
            layout.tmp_dir(),
            layout.empty_layer(),
            layout.pins_dir(),
            layout.snapshots_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        }
        Ok(Self { layout, keep_versions: history::DEFAULT_KEEP_VERSIONS })
    }

    /// Keeps the last `keep` versions of every cache (at least one: HEAD).
    pub fn with_keep_versions(mut self, keep: usize) -> Self {
        self.keep_versions = keep.max(1);
        self
    }

    /// How many versions a cache keeps by default.
    pub fn keep_versions(&self) -> usize {
        self.keep_versions
    }

    /// The layout this store uses.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Takes the state-wide lock shared (pinning, publishing) or exclusive (collecting).
    pub fn state_lock(&self, exclusive: bool) -> Result<StateLock, StoreError> {
        let arg = if exclusive { FlockArg::LockExclusive } else { FlockArg::LockShared };
        flock_file(&self.layout.gc_lock_path(), arg).map(StateLock)
    }

    /// Serialises this node's HEAD writes of `key` (a commit and a pulled version) across
    /// processes; held for a few file writes only.
    pub fn head_lock(&self, key: &CacheKey) -> Result<StateLock, StoreError> {
        atomic::create_dir_durable(&self.layout.cache_dir(key))?;
        flock_file(&self.layout.head_lock_path(key), FlockArg::LockExclusive).map(StateLock)
    }

    /// The cache's HEAD, `None` when it has no version.
    pub fn head(&self, key: &CacheKey) -> Result<Option<Head>, StoreError> {
        atomic::read_json(&self.layout.head_path(key))
    }

    /// A volume's record, `None` when there is no such volume.
    pub fn volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, StoreError> {
        atomic::read_json(&self.layout.volume_record(id))
    }

    /// A layer's record, `None` when it is gone.
    pub fn layer(&self, id: &LayerId) -> Result<Option<LayerRecord>, StoreError> {
        atomic::read_json(&self.layout.layer_record(id))
    }

    /// Pins the cache's current version (or a fallback's) in a new volume record and
    /// creates its upper and work directories. Idempotent for the same id and request.
    pub fn create_volume(&self, req: &NewVolume) -> Result<VolumeRecord, StoreError> {
        let _pin = self.state_lock(false)?;
        if let Some(existing) = self.volume(&req.id)? {
            if existing.cache != req.cache
                || existing.policy != req.policy
                || existing.request != req.request
                || existing.root != req.root
            {
                return Err(StoreError::VolumeConflict { id: req.id.clone(), existing: existing.cache });
            }
            self.create_volume_dirs(&existing)?;
            return Ok(existing);
        }
        let base = self.choose_base(req)?;
        let record = VolumeRecord {
            id: req.id.clone(),
            cache: req.cache.clone(),
            base,
            policy: req.policy.clone(),
            mount_path: req.mount_path.clone(),
            owner: req.owner,
            pending: None,
            created_unix: now_unix(),
            request: req.request.clone(),
            decision: None,
            pods: Vec::new(),
            flags: req.flags,
            root: req.root,
            mount_group: None,
            image: None,
            images: Vec::new(),
            // Mounted right away (a restore) in this boot: recorded now, so the mount need not
            // write the record a second time. A volume staged later records its boot then.
            boot: req.mount_path.as_ref().and_then(|_| boot::boot_id()),
            torn: false,
        };
        let mut record = record;
        // A cache with an image keeps every volume's upper in it, sized or not: the size
        // belongs to the cache. The caller has made and mounted it.
        if let Some(image) = self.image(&req.cache)? {
            record.image = Some(image.tag);
        }
        record.images = self.images_of(&record.base.layers).into_iter().chain(record.image.clone()).collect();
        record.images.sort();
        record.images.dedup();
        atomic::create_dir_durable(&self.layout.volume_dir(&req.id))?;
        // The record goes down before any mount so the layers are pinned from the first moment.
        atomic::write_json(&self.layout.volume_record(&req.id), &record)?;
        self.write_pin(&record)?;
        self.create_volume_dirs(&record)?;
        self.touch_used(&record.base.from);
        Ok(record)
    }

    fn create_volume_dirs(&self, record: &VolumeRecord) -> Result<(), StoreError> {
        let id = &record.id;
        if let Some(tag) = &record.image {
            // Never on the state dir's own disk through an empty mount point.
            self.check_image_mounted(tag)?;
            atomic::create_dir_durable(&self.layout.volume_data_dir(id, Some(tag)))?;
        }
        let image = record.image.as_ref();
        let work = self.layout.work_dir(id, image);
        match std::fs::create_dir(&work) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io("create directory", &work, e)),
        }
        let upper = self.layout.upper_dir(id, image);
        if upper.exists() {
            return Ok(());
        }
        // Built under another name and renamed, so an upper never exists with the driver's
        // own root attributes instead of the version's (a crash in between leaves only debris).
        let new = self.layout.new_upper_dir(id, image);
        if let Err(e) = std::fs::remove_dir(&new) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(StoreError::io("remove", &new, e));
            }
        }
        std::fs::create_dir(&new).map_err(|e| StoreError::io("create directory", &new, e))?;
        let template = self.root_template(record)?;
        root::prepare(&new, template.as_deref(), &record.root)?;
        if let Some(gid) = record.mount_group {
            root::give_to_group(&new, gid)?;
        }
        std::fs::rename(&new, &upper).map_err(|e| StoreError::io("rename", &new, e))?;
        // A volume whose upper vanished in a power cut could never be staged again.
        atomic::sync_dir(&self.layout.volume_data_dir(id, image))
    }

    /// Readies a volume's upper and work directories for a `volatile` overlay mount: records
    /// this boot (an upper last mounted in an earlier boot is marked torn: the crash may have
    /// cut its writes short), then removes the marker the kernel leaves in the work directory,
    /// without which it refuses to mount the pair again. Within one boot nothing is lost by
    /// that: the unsynced writes are still in the page cache.
    pub fn prepare_volatile_mount(&self, record: &VolumeRecord) -> Result<VolumeRecord, StoreError> {
        let boot = boot::boot_id();
        let mut record = record.clone();
        if record.boot != boot {
            record.torn |= record.boot.is_some();
            record.boot = boot;
            atomic::write_json(&self.layout.volume_record(&record.id), &record)?;
        }
        // The marker is a directory holding an empty `dirty` file.
        tree::remove_tree(&self.layout.volatile_marker(&record.id, record.image.as_ref()))?;
        Ok(record)
    }

    /// Whether a volume's upper may hold writes a crash cut short: it was mounted (volatile) in
    /// an earlier boot than this one.
    pub fn upper_torn(&self, record: &VolumeRecord) -> bool {
        record.torn || (record.boot.is_some() && record.boot != boot::boot_id())
    }

    /// Makes the volume's upper and work directories again if they are missing and nothing
    /// was promoted from them (a power cut right after the volume was created).
    pub fn ensure_volume_dirs(&self, record: &VolumeRecord) -> Result<(), StoreError> {
        if record.pending.is_none() && record.decision.is_none() {
            let _pin = self.state_lock(false)?;
            self.create_volume_dirs(record)?;
        }
        Ok(())
    }

    /// The directory whose root attributes a new volume's root copies: the top layer of what
    /// it restores, or for a fresh start the cache's current top layer (a fresh start drops
    /// the content, not who owns the cache).
    fn root_template(&self, record: &VolumeRecord) -> Result<Option<PathBuf>, StoreError> {
        let top = match record.base.layers.last() {
            Some(top) => Some(top.clone()),
            None if record.policy.fresh => self.head(&record.cache)?.and_then(|h| h.layers.last().cloned()),
            None => None,
        };
        let Some(top) = top else { return Ok(None) };
        // In an image that is not mounted the root would look like a bare mount point: the
        // caller mounts the images the record names and asks again.
        if let Some(tag) = self.layer_image(&top) {
            self.check_image_mounted(&tag)?;
        }
        Ok(Some(self.layer_tree(&top)))
    }

    /// Gives a volume's root to a pod's fsGroup (recorded first, so a repeat re-applies it).
    /// Only the root changes: new entries inherit the group through setgid. While the volume
    /// is mounted the change goes through the mount (`merged`): overlay keeps the root's
    /// attributes from mount time and would not see a change made to the upper beneath it.
    pub fn set_mount_group(&self, id: &VolumeId, gid: u32, merged: Option<&Path>) -> Result<VolumeRecord, StoreError> {
        let record = self.update_volume(id, |r| r.mount_group = Some(gid))?;
        let root = merged.map_or_else(|| self.upper_of(&record), Path::to_path_buf);
        root::give_to_group(&root, gid)?;
        Ok(record)
    }

    fn choose_base(&self, req: &NewVolume) -> Result<Base, StoreError> {
        let own = self.head(&req.cache)?;
        let own_version = own.as_ref().map_or(Head::NONE, |h| h.version);
        if let Some(content) = &req.content {
            // Stale protection still counts from HEAD as it is now.
            let lineage = own.map(|h| h.lineage).unwrap_or_default();
            let (layers, from, from_version, what) = match content {
                Content::Snapshot(id) => {
                    let snap = self.snapshot(id)?.ok_or_else(|| StoreError::SnapshotNotFound(id.clone()))?;
                    (snap.layers, snap.cache, snap.base_version, format!("snapshot {id}"))
                }
                Content::Volume(id) => {
                    let source = self.volume(id)?.ok_or_else(|| StoreError::VolumeNotFound(id.clone()))?;
                    let mut layers = source.base.layers.clone();
                    layers.extend(self.copy_upper_layer(&source)?);
                    (layers, source.base.from.clone(), source.base.from_version, format!("volume {id}"))
                }
            };
            for layer in &layers {
                if !self.layer_present(layer) {
                    let path = self.layout.layer_dir(layer);
                    return Err(StoreError::MissingLayer { cache: from.clone(), layer: layer.clone(), path });
                }
            }
            return Ok(Base { version: own_version, layers, from, from_version, lineage, content: Some(what) });
        }
        if req.policy.fresh {
            let lineage = own.map(|h| h.lineage).unwrap_or_default();
            return Ok(Base {
                version: own_version,
                layers: Vec::new(),
                from: req.cache.clone(),
                from_version: 0,
                lineage,
                content: None,
            });
        }
        if let Some(head) = own {
            self.check_layers(&req.cache, &head)?;
            return Ok(Base {
                version: head.version,
                layers: head.layers,
                from: req.cache.clone(),
                from_version: head.version,
                lineage: head.lineage,
                content: None,
            });
        }
        for fallback in &req.fallbacks {
            if let Some(head) = self.head(fallback)? {
                self.check_layers(fallback, &head)?;
                return Ok(Base {
                    version: Head::NONE,
                    layers: head.layers,
                    from: fallback.clone(),
                    from_version: head.version,
                    lineage: String::new(),
                    content: None,
                });
            }
        }
        Ok(Base {
            version: Head::NONE,
            layers: Vec::new(),
            from: req.cache.clone(),
            from_version: 0,
            lineage: String::new(),
            content: None,
        })
    }

    fn check_layers(&self, cache: &CacheKey, head: &Head) -> Result<(), StoreError> {
        for layer in &head.layers {
            if !self.layer_present(layer) {
                let path = self.layout.layer_dir(layer);
                return Err(StoreError::MissingLayer { cache: cache.clone(), layer: layer.clone(), path });
            }
        }
        Ok(())
    }

    /// Where a volume's changes land (in its cache's image, when it has one).
    pub fn upper_of(&self, record: &VolumeRecord) -> PathBuf {
        self.layout.upper_dir(&record.id, record.image.as_ref())
    }

    /// A volume's overlay work directory, on the same filesystem as its upper.
    pub fn work_of(&self, record: &VolumeRecord) -> PathBuf {
        self.layout.work_dir(&record.id, record.image.as_ref())
    }

    /// The overlay lower directories of a volume, top first; the shared empty layer when none.
    pub fn lower_dirs(&self, record: &VolumeRecord) -> Vec<PathBuf> {
        if record.base.layers.is_empty() {
            return vec![self.layout.empty_layer()];
        }
        record.base.layers.iter().rev().map(|l| self.layout.layer_dir(l)).collect()
    }

    /// Records where a volume is mounted.
    pub fn set_mount_path(&self, id: &VolumeId, path: Option<&Path>) -> Result<VolumeRecord, StoreError> {
        self.update_volume(id, |r| r.mount_path = path.map(Path::to_path_buf))
    }

    /// Changes a volume's record with `change` and writes it (durably) if that changed anything.
    pub fn update_volume(
        &self,
        id: &VolumeId,
        change: impl FnOnce(&mut VolumeRecord),
    ) -> Result<VolumeRecord, StoreError> {
        let _pin = self.state_lock(false)?;
        let mut record = self.volume(id)?.ok_or_else(|| StoreError::VolumeNotFound(id.clone()))?;
        let before = record.clone();
        change(&mut record);
        if record != before {
            atomic::write_json(&self.layout.volume_record(id), &record)?;
        }
        Ok(record)
    }

    /// The volume mounted at `path`, by its record.
    pub fn volume_at(&self, path: &Path) -> Result<Option<VolumeRecord>, StoreError> {
        Ok(self.volumes()?.into_iter().find(|v| v.mount_path.as_deref() == Some(path)))
    }

    /// Every volume record; unreadable entries are skipped by the listing and reported by gc.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        let dir = self.layout.volumes_dir();
        let mut out = Vec::new();
        for entry in read_dir(&dir)? {
            let Ok(id) = VolumeId::new(entry.to_string_lossy()) else { continue };
            if let Some(record) = self.volume(&id)? {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Removes a volume's directory (upper included). Missing is fine.
    pub fn drop_volume(&self, id: &VolumeId) -> Result<(), StoreError> {
        // Shared, so gc never sweeps the trash while it is being deleted here.
        let _pin = self.state_lock(false)?;
        // The part inside an image goes first: once the record is gone nothing names it.
        if let Some(tag) = self.volume(id).ok().flatten().and_then(|r| r.image) {
            let data = self.layout.volume_data_dir(id, Some(&tag));
            let trash = data.with_file_name(format!(".trash-{}", LayerId::generate()));
            match std::fs::rename(&data, &trash) {
                Ok(()) => tree::remove_tree(&trash)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("move to trash", &data, e)),
            }
        }
        let dir = self.layout.volume_dir(id);
        let trash = self.layout.tmp_dir().join(format!("trash-{}", LayerId::generate()));
        // One rename drops the record and the tree together; a crash leaves only scratch.
        match std::fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("move to trash", &dir, e)),
        }
        atomic::sync_dir(&self.layout.volumes_dir())?;
        self.remove_pin(id)?;
        tree::remove_tree(&trash)?;
        Ok(())
    }

    /// On a shared store, records on the shared filesystem which layers this node's volume
    /// keeps alive, so gc on any node sees them. Local stores read the volume records instead.
    pub(crate) fn write_pin(&self, record: &VolumeRecord) -> Result<(), StoreError> {
        if !self.layout.is_shared() {
            return Ok(());
        }
        let pin = PinFile::Cache { cache: record.cache.clone(), layers: record.pinned().cloned().collect() };
        atomic::write_json(&self.layout.pin_path(&record.id), &pin)
    }

    fn remove_pin(&self, id: &VolumeId) -> Result<(), StoreError> {
        match std::fs::remove_file(self.layout.pin_path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("remove", self.layout.pin_path(id), e)),
        }
    }

    /// Layers pinned through the shared pin files (empty for a local store).
    pub(crate) fn shared_pins(&self) -> Result<Vec<LayerId>, StoreError> {
        Ok(self.pin_files()?.into_iter().flat_map(|(_, _, layers)| layers).collect())
    }

    /// The shared pin files as (volume, cache if recorded, layers).
    fn pin_files(&self) -> Result<Vec<PinEntry>, StoreError> {
        let dir = self.layout.pins_dir();
        let mut out = Vec::new();
        for name in read_dir(&dir)? {
            let text = name.to_string_lossy();
            let Some(volume) = text.strip_suffix(".json") else { continue };
            match atomic::read_json::<PinFile>(&dir.join(&name))? {
                Some(PinFile::Cache { cache, layers }) => out.push((volume.to_string(), Some(cache), layers)),
                Some(PinFile::Layers(layers)) => out.push((volume.to_string(), None, layers)),
                None => {}
            }
        }
        Ok(out)
    }

    /// Volumes of `key` that live now, on this node and (through the pins of a shared store)
    /// on every other; a pin of the old form counts when it holds one of `layers`.
    pub fn live_volumes(&self, key: &CacheKey, layers: &[LayerId]) -> Result<usize, StoreError> {
        let mut ids: std::collections::BTreeSet<String> =
            self.volumes()?.into_iter().filter(|v| &v.cache == key).map(|v| v.id.to_string()).collect();
        if self.layout.is_shared() {
            for (volume, cache, pinned) in self.pin_files()? {
                let ours = match cache {
                    Some(cache) => &cache == key,
                    None => pinned.iter().any(|l| layers.contains(l)),
                };
                if ours {
                    ids.insert(volume);
                }
            }
        }
        Ok(ids.len())
    }

    /// Every cache that has a directory, sorted.
    pub fn caches(&self) -> Result<Vec<CacheKey>, StoreError> {
        let mut out = Vec::new();
        for ns in read_dir(&self.layout.caches_dir())? {
            let Ok(namespace) = Name::new(ns.to_string_lossy()) else { continue };
            for name in read_dir(&self.layout.namespace_dir(&namespace))? {
                let Ok(name) = Name::new(name.to_string_lossy()) else { continue };
                out.push(CacheKey { namespace: namespace.clone(), name });
            }
        }
        out.sort();
        Ok(out)
    }

    /// Counts for the metrics: caches, layers and bytes from the same layer records `cache ls`
    /// sums.
    pub fn summary(&self) -> Result<StoreSummary, StoreError> {
        let mut out = StoreSummary::default();
        let mut seen = std::collections::BTreeSet::new();
        for key in self.caches()? {
            // HEAD alone: counting each cache's live volumes (as cache_info does) would read
            // every volume record once per cache on every scrape.
            let Some(head) = self.head(&key)? else { continue };
            out.caches += 1;
            out.deepest = out.deepest.max(head.layers.len() as u64);
            let new: Vec<LayerId> = head.layers.into_iter().filter(|l| seen.insert(l.clone())).collect();
            out.layers += new.len() as u64;
            out.bytes += self.layers_size(&new)?.0;
        }
        let now = now_unix();
        for volume in self.volumes()? {
            out.volumes += 1;
            if let Some(layer) = volume.pending.filter(|_| volume.decision.is_none()) {
                let created = self.layer(&layer)?.map_or(now, |r| r.created_unix);
                out.oldest_pending_secs = out.oldest_pending_secs.max(now.saturating_sub(created));
            }
        }
        Ok(out)
    }

    /// Bytes and entries of `layers`, by their records: the one place a size is computed,
    /// for listings, metrics, Events and snapshots alike.
    pub fn layers_size(&self, layers: &[LayerId]) -> Result<(u64, u64), StoreError> {
        let (mut bytes, mut files) = (0, 0);
        for layer in layers {
            if let Some(rec) = self.layer(layer)? {
                bytes += rec.bytes;
                files += rec.files;
            }
        }
        Ok((bytes, files))
    }

    /// HEAD, sizes, last use and live volumes of one cache.
    pub fn cache_info(&self, key: &CacheKey) -> Result<CacheInfo, StoreError> {
        let head = self.head(key)?;
        let (version, layers) = head.map_or((0, Vec::new()), |h| (h.version, h.layers));
        let (bytes, files) = self.layers_size(&layers)?;
        let volumes = self.live_volumes(key, &layers)?;
        Ok(CacheInfo {
            cache: key.clone(),
            version,
            layers,
            bytes,
            files,
            last_used_unix: self.last_used(key),
            volumes,
        })
    }

    /// Seconds since the epoch of the last restore or publish of `key`; 0 if never.
    pub fn last_used(&self, key: &CacheKey) -> u64 {
        std::fs::metadata(self.layout.used_path(key))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    }

    /// Marks a cache as used now; best effort, it only steers eviction.
    pub fn touch_used(&self, key: &CacheKey) {
        let path = self.layout.used_path(key);
        let dir = self.layout.cache_dir(key);
        // Durably, though rare (a cache's first use): its HEAD will later live here, and a
        // directory entry never synced could take a first version with it in a power cut.
        if dir.exists() || atomic::create_dir_durable(&dir).is_ok() {
            let _ = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        }
    }
}

/// Names in a directory; a missing directory has none.
pub(crate) fn read_dir(dir: &Path) -> Result<Vec<std::ffi::OsString>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("read directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        out.push(entry.map_err(|e| StoreError::io("read directory", dir, e))?.file_name());
    }
    Ok(out)
}
