//! The volume lifecycle: the one place the commit protocol is put together from the store,
//! the mounter and the publish lock. The command line and the CSI services both call it.
//!
//! Every volume operation runs in a task the engine owns, holding the volume's in-flight guard
//! (and, while it publishes, the cache's lock) until the work ends: a caller that gives up
//! (a gRPC deadline drops the request's future) cannot cut it short, and a call that arrives
//! while it runs is refused with [`OpsError::InFlight`] until it is done.

mod images;
mod inflight;
mod node;
pub mod remote;
mod snapshots;
mod upkeep;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tracing::{Instrument, Span};

pub use node::{Unpublished, VolumeStats};
pub use snapshots::Listed;
pub use upkeep::Background;

use crate::cluster::{CacheEvent, Cluster, EventTarget};
use crate::lock::{LockError, PublishLock};
use crate::metrics::{Metrics, RestoreResult};
use crate::mount::{MountError, Mounter, OverlaySpec, UpperDirs};
use crate::store::commit::{Advanced, NotPublished, Prepared};
use crate::store::{CacheKey, Decision, NewVolume, Store, StoreError, VolumeId, VolumeRecord};
use inflight::Inflight;

/// Errors of a volume operation, with the volume they concern.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A mount or unmount failed.
    #[error("volume {volume}: {source}")]
    Mount { volume: VolumeId, source: MountError },
    /// The publish lock could not be had; the volume is kept so a retry resumes.
    #[error("volume {volume}: {source}; the change is kept, retry the release")]
    Lock { volume: VolumeId, source: LockError },
    /// Maintenance could not get a cache's publish lock.
    #[error("cache {cache}: {source}")]
    CacheLock { cache: CacheKey, source: LockError },
    /// Something other than this volume is mounted where it should go.
    #[error("volume {volume}: {target} already has {found} mounted on it; unmount it first")]
    ForeignMount { volume: VolumeId, target: PathBuf, found: String },
    /// A restore was asked without a place to mount.
    #[error("volume {0}: no mount path given")]
    NoMountPath(VolumeId),
    /// Another operation on the volume is still running; the caller retries later.
    #[error("volume {volume}: {running} is still in progress; retry once it is done")]
    InFlight { volume: String, running: &'static str },
    /// The volume's overlay is already mounted elsewhere: one upper is never mounted twice.
    #[error("volume {volume} is already staged at {at}; unstage it there first")]
    StagedElsewhere { volume: VolumeId, at: PathBuf },
    /// The volume is still mounted (a target left behind): its upper cannot become a layer.
    #[error("volume {volume} is still mounted at {at}; unpublish it there first (the change is kept)")]
    StillMounted { volume: VolumeId, at: PathBuf },
    /// A bind was asked of a volume that is not staged there.
    #[error("volume {volume} is not staged at {staging}: call NodeStageVolume first")]
    NotStaged { volume: VolumeId, staging: PathBuf },
    /// The volume is not mounted at the path asked about.
    #[error("volume {volume} is not mounted at {path}")]
    NotMountedAt { volume: VolumeId, path: PathBuf },
    /// A target holds this volume mounted another way (read-only vs read-write).
    #[error("{target} already has volume {volume} mounted {mode}; unpublish it first")]
    MountedOtherwise { volume: VolumeId, target: PathBuf, mode: &'static str },
    /// A volume was asked to mount with flags other than its overlay has.
    #[error("volume {volume} is mounted with flags [{mounted}], not [{asked}]; unstage it first")]
    FlagsDiffer { volume: VolumeId, mounted: String, asked: String },
    /// The volume's root already belongs to another pod's fsGroup.
    #[error(
        "volume {volume}'s root belongs to group {has} (the fsGroup it is mounted with), not {asked}; \
         unpublish it from the pods using it first"
    )]
    GroupDiffers { volume: VolumeId, has: u32, asked: u32 },
    /// A volume mounted writable cannot be snapshotted or cloned consistently: it may change
    /// while it is copied.
    #[error(
        "volume {volume} is mounted writable at {at}: snapshot or clone it once it is unpublished and \
         unstaged (its change is then copied whole)"
    )]
    MountedWritable { volume: VolumeId, at: PathBuf },
    /// A snapshot name already names a snapshot of another volume.
    #[error("snapshot name {name:?} is already used for a snapshot of volume {volume}")]
    SnapshotNameTaken { name: String, volume: VolumeId },
    /// A directory operation of the lifecycle (mount points) failed.
    #[error("volume {volume}: {op} {path}: {source}")]
    Io { volume: VolumeId, op: &'static str, path: PathBuf, source: std::io::Error },
    /// A cache image could not be mounted, grown or unmounted.
    #[error("cache image {image}: {source}")]
    Image { image: crate::store::layout::ImageTag, source: MountError },
    /// Squash could not mount or unmount its read-only view.
    #[error("squash {cache}: {source}")]
    SquashMount { cache: CacheKey, source: MountError },
    /// The registry side of a publish or a pull failed; a publish keeps its change for a retry.
    #[error("cache {cache}: {source}")]
    Remote { cache: CacheKey, source: remote::RemoteError },
    /// A blocking task died.
    #[error("internal: task failed: {0}")]
    Join(String),
}

/// What a restore mounted.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    /// The volume's record.
    pub volume: VolumeRecord,
    /// Entries in the restored layers (by their records).
    pub files: u64,
    /// Bytes in the restored layers.
    pub bytes: u64,
}

/// How a release ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Released {
    /// HEAD advanced to `version`.
    Committed { version: u64, depth: usize, bytes: u64, files: u64 },
    /// HEAD had moved past the volume's base (or the cache began a new lifetime since); the
    /// delta was dropped.
    Stale {
        base: u64,
        current: u64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        other_lifetime: bool,
    },
    /// Nothing was published.
    NotPublished { why: NotPublished },
}

impl Released {
    /// The `outcome` label of the publishes counter; `base` is the volume's base version.
    pub fn outcome(&self, base: u64) -> &'static str {
        match self {
            // One past the base is a plain commit (or a fresh start's replacement); anything
            // higher went on top of a newer HEAD (onStale=stack).
            Released::Committed { version, .. } if *version == base + 1 => "committed",
            Released::Committed { .. } => "stacked",
            Released::Stale { .. } => "stale",
            Released::NotPublished { why } => match why {
                NotPublished::NotAllowed => "not_allowed",
                NotPublished::JobFailed => "job_failed",
                NotPublished::Unchanged => "nothing_changed",
                NotPublished::TooBig { .. } => "over_limit",
                NotPublished::DeadlinePassed { .. } => "deadline_passed",
                NotPublished::LockUnusable { .. } => "failed",
                NotPublished::NoSpace => "no_space",
                NotPublished::CacheFull { .. } => "cache_full",
                NotPublished::NodeRestarted => "node_restarted",
                NotPublished::RegistryFailed { .. } => "registry_failed",
            },
        }
    }
}

impl std::fmt::Display for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Released::Committed { version, bytes, files, .. } => {
                write!(f, "published v{version} ({}, {files} files)", bytesize::ByteSize(*bytes).display().iec())
            }
            Released::Stale { base, current, other_lifetime: false } => {
                write!(f, "not published: skipped: base {base} is stale, current is {current}")
            }
            Released::Stale { base, current, other_lifetime: true } => write!(
                f,
                "not published: skipped: base {base} is from before the cache was removed; \
                 current is {current} of its new lifetime"
            ),
            Released::NotPublished { why: NotPublished::NotAllowed } => {
                write!(f, "not published: publishing is not allowed for this volume")
            }
            Released::NotPublished { why: NotPublished::Unchanged } => write!(f, "not published: nothing changed"),
            Released::NotPublished { why: NotPublished::LockUnusable { message } } => {
                write!(f, "not published: the publish lock cannot be used: {message}")
            }
            Released::NotPublished { why: NotPublished::RegistryFailed { message } } => {
                write!(f, "not published: the registry did not take the version before the publish deadline: {message}")
            }
            Released::NotPublished { why: NotPublished::JobFailed } => {
                write!(f, "not published: a pod that used the volume did not succeed (publishWhen=on-success)")
            }
            Released::NotPublished { why: NotPublished::NoSpace } => {
                write!(f, "not published: the cache's filesystem is full; the change was dropped to free it")
            }
            Released::NotPublished { why: NotPublished::NodeRestarted } => write!(
                f,
                "not published: the node went down while the volume was mounted, so what the job \
                 wrote may be cut short"
            ),
            Released::NotPublished { why: NotPublished::CacheFull { size_bytes } } => write!(
                f,
                "not published: the job ran into the cache's size ({}): what it wrote may be cut short; \
                 raise cacheSize to keep more",
                bytesize::ByteSize(*size_bytes).display().iec()
            ),
            Released::NotPublished { why: NotPublished::DeadlinePassed { after_secs } } => write!(
                f,
                "not published: skipped: the publish lock stayed busy past the {after_secs}s publish deadline"
            ),
            Released::NotPublished { why: NotPublished::TooBig { bytes, max_bytes } } => write!(
                f,
                "not published: {} changed, over maxBytes {}",
                bytesize::ByteSize(*bytes).display().iec(),
                bytesize::ByteSize(*max_bytes).display().iec()
            ),
        }
    }
}

/// The store, a mounter and a publish lock, wired together.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    mounter: Arc<dyn Mounter>,
    lock: Arc<dyn PublishLock>,
    lock_timeout: Duration,
    publish_deadline: Option<Duration>,
    inflight: Inflight,
    pods: Option<Arc<dyn Cluster>>,
    background: upkeep::Squasher,
    metrics: Arc<Metrics>,
    usage: node::UsageCache,
    default_cache_size: Option<u64>,
    remote: Option<Arc<remote::Remote>>,
}

/// Runs blocking store or mount work off the async threads, inside the caller's span.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, OpsError> + Send + 'static) -> Result<T, OpsError> {
    let span = Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f)).await.map_err(|e| OpsError::Join(e.to_string()))?
}

/// Unmounts, riding out the brief EBUSY a process forking elsewhere can cause by holding a
/// copy of an fd inside the mount until it execs. Never lazily: a mount still busy after
/// that is an error the caller retries, with the upper intact.
pub fn unmount_patiently(mounter: &dyn Mounter, path: &Path) -> Result<(), MountError> {
    let mut attempt = 0;
    loop {
        match mounter.unmount(path) {
            Err(MountError::Busy { .. }) if attempt < BUSY_RETRIES => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map(|_| ()),
        }
    }
}

/// The Event a release ends with.
fn release_event(cache: &CacheKey, released: &Released, took: Duration) -> CacheEvent {
    let ms = took.as_millis();
    match released {
        Released::Committed { version, bytes, files, .. } => CacheEvent {
            reason: "CachePublished",
            message: format!(
                "published cache {cache} v{version} ({}, {files} files) in {ms} ms",
                bytesize::ByteSize(*bytes).display().iec()
            ),
            warning: false,
        },
        other => {
            // A change dropped for a reason someone should act on is a Warning.
            let warning = matches!(
                other,
                Released::NotPublished {
                    why: NotPublished::TooBig { .. }
                        | NotPublished::DeadlinePassed { .. }
                        | NotPublished::NoSpace
                        | NotPublished::LockUnusable { .. }
                        | NotPublished::RegistryFailed { .. }
                }
            );
            let why = other.to_string();
            let why = why.strip_prefix("not published: ").unwrap_or(&why);
            CacheEvent { reason: "CachePublishSkipped", message: format!("cache {cache}: {why}"), warning }
        }
    }
}

/// The `kind` label of a lock failure.
fn lock_kind(e: &LockError) -> &'static str {
    match e {
        LockError::Timeout { .. } => "timeout",
        LockError::Lost { .. } => "lost",
        LockError::Api { .. } => "api",
        LockError::Config { .. } => "config",
        LockError::Io { .. } => "io",
    }
}

/// Tries of a busy unmount before reporting it.
const BUSY_RETRIES: u32 = 5;

impl Engine {
    /// Wires an engine.
    pub fn new(store: Store, mounter: Arc<dyn Mounter>, lock: Arc<dyn PublishLock>, lock_timeout: Duration) -> Self {
        Self {
            store,
            mounter,
            lock,
            lock_timeout,
            publish_deadline: None,
            inflight: Inflight::default(),
            pods: None,
            background: upkeep::Squasher::default(),
            metrics: Arc::new(Metrics::default()),
            usage: node::UsageCache::default(),
            default_cache_size: None,
            remote: None,
        }
    }

    /// Gives caches that are used without a size an image of `bytes` (`--default-cache-size`).
    pub fn with_default_cache_size(mut self, bytes: Option<u64>) -> Self {
        self.default_cache_size = bytes;
        self
    }

    /// Counts what happens into `metrics` (the driver's `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The series this engine counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Uses `lock` as the publish lock instead of the one given at construction.
    pub fn with_lock(mut self, lock: Arc<dyn PublishLock>) -> Self {
        self.lock = lock;
        self
    }

    /// After `deadline` of failing to get the lock, a release drops its change and succeeds:
    /// a cache never fails a job. Without one, a release keeps answering "retry".
    pub fn with_publish_deadline(mut self, deadline: Duration) -> Self {
        self.publish_deadline = Some(deadline);
        self
    }

    /// Asks `cluster` how the pods that used a volume ended (`publishWhen`).
    pub fn with_pods(mut self, cluster: Arc<dyn Cluster>) -> Self {
        self.pods = Some(cluster);
        self
    }

    /// How a cache deeper than `max_depth` is squashed after a commit.
    pub fn with_background_squash(mut self, max_depth: usize, how: Background) -> Self {
        self.background = upkeep::Squasher::new(max_depth, how);
        self
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs `work` in a task of its own that holds `key`'s in-flight guard until the work ends,
    /// whatever happens to the caller: a dropped request only stops waiting for it.
    async fn owned<T: Send + 'static>(
        &self,
        key: &str,
        op: &'static str,
        work: impl Future<Output = Result<T, OpsError>> + Send + 'static,
    ) -> Result<T, OpsError> {
        let guard =
            self.inflight.begin(key, op).map_err(|running| OpsError::InFlight { volume: key.to_string(), running })?;
        let task = tokio::spawn(
            async move {
                let _guard = guard;
                work.await
            }
            .instrument(Span::current()),
        );
        task.await.map_err(|e| OpsError::Join(e.to_string()))?
    }

    /// Pins the cache's current version in a new volume and mounts it at `req.mount_path`.
    /// Repeating it for a volume already mounted there changes nothing.
    pub async fn restore(&self, req: NewVolume) -> Result<Restored, OpsError> {
        let this = self.clone();
        let id = req.id.clone();
        self.owned(id.as_str(), "restore", async move { blocking(move || this.restore_now(req, None)).await }).await
    }

    /// Creates the volume if needed, gives its root to `group` (before anything mounts it, or
    /// again on a repeat), and mounts it at the request's mount path.
    fn restore_now(&self, req: NewVolume, group: Option<u32>) -> Result<Restored, OpsError> {
        let started = std::time::Instant::now();
        let target = req.mount_path.clone().ok_or_else(|| OpsError::NoMountPath(req.id.clone()))?;
        let existed = self.store.volume(&req.id)?.is_some();
        if !existed {
            self.sync_for(&req);
        }
        let image = self.open_image(&req.cache, req.cache_size)?;
        let created = self.create_volume(&req, image.as_ref());
        // Held until the record names the image: from then on nothing unmounts it under us.
        drop(image);
        let record = match created {
            Ok(record) => record,
            Err(e) => {
                self.unmount_idle(&[crate::store::layout::ImageTag::of(&req.cache)]);
                return Err(e);
            }
        };
        let mounted = existed && self.is_mounted_at(&record, &target)?;
        let images = record.images.clone();
        let mounted_now = self
            .mount_images(&images, None)
            .and_then(|()| self.apply_group(record, group, mounted, mounted.then_some(target.as_path())))
            .and_then(|record| Ok((self.mount_volume(&record, &target)?, record)));
        let (mounted_now, record) = match mounted_now {
            Ok(done) => done,
            Err(err) => {
                if !existed {
                    // Nothing of ours is mounted: the new volume would only pin layers forever.
                    self.store.drop_volume(&req.id)?;
                    self.unmount_idle(&images);
                }
                return Err(err);
            }
        };
        let (bytes, files) = self.store.layers_size(&record.base.layers)?;
        tracing::info!(cache.namespace = %record.cache.namespace, cache.name = %record.cache.name,
            head.version = record.base.version, layers = record.base.layers.len(), "restored");
        let restored = Restored { volume: record, files, bytes };
        if mounted_now {
            self.restore_seen(&restored.volume, started.elapsed(), Some((bytes, files)));
        }
        Ok(restored)
    }

    /// The store's create_volume, mounting the images of the layers the volume stacks on when
    /// they live in another cache's image (a fallback's): the new root copies the top layer's.
    fn create_volume(&self, req: &NewVolume, own: Option<&images::OpenImage>) -> Result<VolumeRecord, OpsError> {
        match self.store.create_volume(req) {
            // The record is down and names that image, so once mounted nothing unmounts it.
            Err(e @ StoreError::ImageNotMounted { .. }) => match self.store.volume(&req.id)? {
                Some(record) => {
                    self.mount_images(&record.images, own)?;
                    Ok(self.store.create_volume(req)?)
                }
                None => Err(e.into()),
            },
            created => Ok(created?),
        }
    }

    /// Counts a volume that was just mounted (a repeated call mounts nothing and counts
    /// nothing) and tells the user on the PVC or pod; `size` is its base's, when known.
    fn restore_seen(&self, record: &VolumeRecord, took: Duration, size: Option<(u64, u64)>) {
        let result = if record.base.layers.is_empty() {
            RestoreResult::miss
        } else if record.base.from != record.cache {
            RestoreResult::fallback
        } else {
            RestoreResult::hit
        };
        self.metrics.restored(&record.cache, result, took);
        if self.pods.is_none() {
            return;
        }
        let (bytes, files) = match size {
            Some(size) => size,
            None => self.store.layers_size(&record.base.layers).unwrap_or_default(),
        };
        let what = format!(
            "v{} ({} layers, {files} files, {})",
            record.base.from_version,
            record.base.layers.len(),
            bytesize::ByteSize(bytes).display().iec()
        );
        let ms = took.as_millis();
        let event = match result {
            RestoreResult::hit => CacheEvent {
                reason: "CacheRestored",
                message: format!("restored cache {} {what} in {ms} ms", record.cache),
                warning: false,
            },
            RestoreResult::fallback => CacheEvent {
                reason: "CacheFallback",
                message: format!(
                    "cache {} has no version yet: restored {} {what} in {ms} ms",
                    record.cache, record.base.from
                ),
                warning: false,
            },
            RestoreResult::miss if record.policy.fresh => CacheEvent {
                reason: "CacheRestored",
                message: format!(
                    "cache {}: ignoreCache, the volume starts empty and its publish replaces the cache",
                    record.cache
                ),
                warning: false,
            },
            RestoreResult::miss => CacheEvent {
                reason: "CacheRestored",
                message: format!("cache {} has no version yet: the volume starts empty", record.cache),
                warning: false,
            },
        };
        self.emit(record, event);
    }

    /// Sends an Event to the object a user looks at for this volume: its PVC, or the pod of an
    /// inline volume. Never waits.
    fn emit(&self, record: &VolumeRecord, event: CacheEvent) {
        let Some(cluster) = &self.pods else { return };
        let request = record.request.as_ref();
        let target = match (request.and_then(|r| r.pvc.as_ref()), request.and_then(|r| r.pod.as_ref())) {
            (Some((namespace, name)), _) => {
                EventTarget { kind: "PersistentVolumeClaim", namespace: namespace.clone(), name: name.clone() }
            }
            (None, Some((namespace, name))) => {
                EventTarget { kind: "Pod", namespace: namespace.clone(), name: name.clone() }
            }
            (None, None) => match record.pods.first() {
                Some(p) => EventTarget { kind: "Pod", namespace: p.namespace.clone(), name: p.name.clone() },
                None => return,
            },
        };
        cluster.event(target, event);
    }

    /// Creates (pins) a volume without mounting it yet; idempotent for the same request. A
    /// clone's source must not be mounted writable with changes.
    pub async fn create(&self, req: NewVolume) -> Result<VolumeRecord, OpsError> {
        let this = self.clone();
        let id = req.id.clone();
        self.owned(id.as_str(), "create", async move {
            // A clone's source is held too, so it cannot be staged (and written) while copied.
            let _source = match &req.content {
                Some(crate::store::Content::Volume(source)) => Some(
                    this.inflight
                        .begin(source.as_str(), "clone")
                        .map_err(|running| OpsError::InFlight { volume: source.to_string(), running })?,
                ),
                _ => None,
            };
            blocking(move || {
                if let (Some(crate::store::Content::Volume(source)), None) = (&req.content, this.store.volume(&req.id)?)
                {
                    this.check_clone_source(source)?;
                }
                if this.store.volume(&req.id)?.is_none() {
                    this.sync_for(&req);
                }
                let image = this.open_image(&req.cache, req.cache_size)?;
                let record = this.create_volume(&req, image.as_ref())?;
                drop(image);
                // Mounted until the volume is released: a PVC's upper lives in the image from now on.
                this.mount_images(&record.images, None)?;
                Ok(record)
            })
            .await
        })
        .await
    }

    /// Whether `path` has this volume's overlay (or a bind of it) mounted on it.
    fn is_mounted_at(&self, record: &VolumeRecord, path: &Path) -> Result<bool, OpsError> {
        let found = self.mounter.mount_at(path).map_err(|source| self.mount_err(record, source))?;
        Ok(found.is_some_and(|m| crate::mount::writes_to(&m, &self.store.upper_of(record))))
    }

    /// Every mount point of this volume's upper, from mountinfo (the kernel's own guard is off
    /// with `index=off`, so this is what keeps one upper from being mounted twice).
    fn mounts_of(&self, record: &VolumeRecord) -> Result<Vec<PathBuf>, OpsError> {
        let upper = self.store.upper_of(record);
        self.mounter.mounts_of_upper(&upper).map_err(|source| self.mount_err(record, source))
    }

    fn mount_err(&self, record: &VolumeRecord, source: MountError) -> OpsError {
        OpsError::Mount { volume: record.id.clone(), source }
    }

    /// Mounts the volume's overlay at `target` unless it is there already (`Ok(false)`); refuses
    /// a target holding something else and an upper mounted anywhere else.
    fn mount_volume(&self, record: &VolumeRecord, target: &Path) -> Result<bool, OpsError> {
        if let Some(m) = self.mounter.mount_at(target).map_err(|source| self.mount_err(record, source))? {
            if !crate::mount::writes_to(&m, &self.store.upper_of(record)) {
                return Err(OpsError::ForeignMount {
                    volume: record.id.clone(),
                    target: target.to_path_buf(),
                    found: format!("{} from {}", m.fstype, m.source),
                });
            }
            // Already ours: a repeated restore changes nothing, if it asks for the same flags.
            let mounted: Vec<&str> = m.mount_options.split(',').collect();
            let want = record.flags.names();
            let differs = ["nosuid", "nodev", "noexec", "noatime"]
                .iter()
                .any(|flag| mounted.contains(flag) != want.contains(flag));
            if differs {
                return Err(OpsError::FlagsDiffer {
                    volume: record.id.clone(),
                    mounted: m.mount_options.clone(),
                    asked: want.join(","),
                });
            }
            return Ok(false);
        }
        if let Some(at) = self.mounts_of(record)?.into_iter().next() {
            return Err(OpsError::StagedElsewhere { volume: record.id.clone(), at });
        }
        // Writable overlays are mounted volatile (see mount::sys): the pair needs readying.
        let record = self.store.prepare_volatile_mount(record)?;
        self.mounter.overlay(&self.overlay_spec(&record), target).map_err(|source| self.mount_err(&record, source))?;
        Ok(true)
    }

    /// Gives the volume's root to a pod's fsGroup (`volume_mount_group`), unless it has that
    /// group already. While another pod may be using the root (`in_use`), a different group
    /// is refused: the root is one directory, and taking it from that pod's group would take
    /// away its write access.
    /// `mounted` is where the volume's overlay is mounted now, if it is.
    fn apply_group(
        &self,
        record: VolumeRecord,
        group: Option<u32>,
        in_use: bool,
        mounted: Option<&Path>,
    ) -> Result<VolumeRecord, OpsError> {
        let Some(asked) = group else { return Ok(record) };
        match record.mount_group {
            Some(has) if has == asked => Ok(record),
            Some(has) if in_use => Err(OpsError::GroupDiffers { volume: record.id.clone(), has, asked }),
            _ => Ok(self.store.set_mount_group(&record.id, asked, mounted)?),
        }
    }

    fn overlay_spec(&self, record: &VolumeRecord) -> OverlaySpec {
        OverlaySpec {
            readonly: record.policy.read_only,
            lower: self.store.lower_dirs(record),
            upper: Some(UpperDirs { upper: self.store.upper_of(record), work: self.store.work_of(record) }),
            flags: record.flags,
        }
    }

    /// Unmounts a volume and publishes its changes if allowed (`allow` is the caller's veto),
    /// then drops it. `Ok(None)` when the volume does not exist (already released).
    pub async fn release(&self, id: &VolumeId, allow: bool) -> Result<Option<Released>, OpsError> {
        let this = self.clone();
        let vid = id.clone();
        self.owned(id.as_str(), "release", async move { this.release_now(&vid, allow, false).await }).await
    }

    /// The commit protocol, counted. `pods_vetoed`: `allow` is false because a pod that used
    /// the volume did not succeed (`publishWhen`), which the outcome then says. Runs inside an
    /// owned task: nothing here may rely on the caller.
    async fn release_now(&self, id: &VolumeId, allow: bool, pods_vetoed: bool) -> Result<Option<Released>, OpsError> {
        let started = std::time::Instant::now();
        let (this, vid) = (self.clone(), id.clone());
        // Only for counting and telling the user: an unreadable record is the commit's to report.
        let record = blocking(move || Ok(this.store.volume(&vid).ok().flatten())).await?;
        let may_publish = record.as_ref().is_some_and(|r| r.policy.publish && !r.policy.read_only);
        let cache = record.as_ref().map(|r| (r.cache.clone(), r.base.version));
        let released = self.commit(id, allow).await;
        if released.is_ok() {
            self.usage.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
            if let Some(images) = record.as_ref().map(|r| r.images.clone()).filter(|i| !i.is_empty()) {
                let this = self.clone();
                blocking(move || {
                    this.unmount_idle(&images);
                    Ok(())
                })
                .await?;
            }
        }
        let released = released.map(|r| {
            r.map(|r| match r {
                Released::NotPublished { why: NotPublished::NotAllowed } if pods_vetoed && may_publish => {
                    Released::NotPublished { why: NotPublished::JobFailed }
                }
                other => other,
            })
        });
        if let Some((cache, base)) = cache {
            let took = started.elapsed();
            match &released {
                Ok(Some(r)) => {
                    let bytes = match r {
                        Released::Committed { bytes, .. } => *bytes,
                        _ => 0,
                    };
                    self.metrics.released(&cache, r.outcome(base), bytes, took);
                    if let Released::Committed { .. } = r {
                        self.metrics.layer_created();
                    }
                    if let Some(record) = &record {
                        self.emit(record, release_event(&cache, r, took));
                    }
                }
                Ok(None) => {}
                // The lock's failures are counted by kind; the caller retries with the change kept
                // (so too after a registry failure, whose drop past the deadline is counted).
                Err(OpsError::Lock { .. } | OpsError::Remote { .. }) => {}
                Err(_) => self.metrics.released(&cache, "failed", 0, took),
            }
        }
        released
    }

    /// The commit protocol.
    async fn commit(&self, id: &VolumeId, allow: bool) -> Result<Option<Released>, OpsError> {
        let this = self.clone();
        let vid = id.clone();
        let prepared = blocking(move || {
            let Some(record) = this.store.volume(&vid)? else { return Ok(None) };
            // After a restart the volume's images may not be mounted yet: its upper is in one.
            this.mount_images(&record.images, None)?;
            // A layer is never made from an upper that is still writable through another mount
            // (a target left behind by a force-deleted pod): refuse before touching anything.
            let elsewhere = |mounts: Vec<PathBuf>| mounts.into_iter().find(|m| Some(m) != record.mount_path.as_ref());
            if let Some(at) = elsewhere(this.mounts_of(&record)?) {
                return Err(OpsError::StillMounted { volume: vid.clone(), at });
            }
            if let Some(path) = &record.mount_path {
                unmount_patiently(this.mounter.as_ref(), path).map_err(|source| this.mount_err(&record, source))?;
            }
            if let Some(at) = this.mounts_of(&record)?.into_iter().next() {
                return Err(OpsError::StillMounted { volume: vid.clone(), at });
            }
            let prepared = this.store.promote(&vid, allow)?;
            if let Prepared::Nothing(_) = prepared {
                this.store.drop_volume(&vid)?;
            }
            Ok(Some((record, prepared)))
        })
        .await?;
        let Some((record, prepared)) = prepared else { return Ok(None) };
        let promoted = match prepared {
            Prepared::Nothing(why) => {
                tracing::info!(outcome = ?why, "nothing to publish");
                return Ok(Some(Released::NotPublished { why }));
            }
            Prepared::Decided(decision) => return self.settle(id, decision).await.map(Some),
            Prepared::Publish(p) => p,
        };
        let this = self.clone();
        let (rec, layer) = (record.clone(), promoted.layer.clone());
        // A retry after the HEAD write (the lock's release failed, or a crash) is already done.
        if let Some(done) = blocking(move || Ok(this.store.head_names(&rec, &layer)?)).await? {
            return self.decide(&record, done, &promoted).await;
        }
        // Content-addressed blobs go up before the lock: only the manifest is put under it.
        if let Err(e) = self.push_layers(&record, &promoted).await {
            return self.give_up_or_retry_remote(id, &promoted.layer, e).await;
        }
        let started = std::time::Instant::now();
        let guard = match self.lock.acquire(&record.cache, self.lock_timeout).await {
            Ok(guard) => guard,
            Err(source) => {
                self.metrics.lock_failed(lock_kind(&source));
                return self.give_up_or_retry(id, &promoted.layer, source).await;
            }
        };
        let waited = started.elapsed();
        let held = guard.ensure_held().map_err(|source| OpsError::Lock { volume: id.clone(), source });
        let advanced = match held {
            Ok(()) => self.advance_remote(&record, &promoted, guard.as_ref()).await,
            Err(e) => Err(e),
        };
        // Released only now that the HEAD write it protects has finished (or failed).
        let released = guard.release().await;
        self.metrics.lock_used(waited, started.elapsed().saturating_sub(waited));
        if let Err(OpsError::Lock { source, .. }) = &advanced {
            self.metrics.lock_failed(lock_kind(source));
        }
        let advanced = match advanced {
            Err(e @ OpsError::Remote { .. }) => return self.give_up_or_retry_remote(id, &promoted.layer, e).await,
            other => other?,
        };
        if let Err(e) = released {
            // HEAD is written; a Lease that could not be cleared expires by itself.
            tracing::warn!(error = %e, "could not release the publish lock after the commit; it will expire");
        }
        tracing::info!(layer.id = %promoted.layer, locked_ms = started.elapsed().as_millis() as u64, outcome = ?advanced, "commit");
        self.decide(&record, advanced, &promoted).await
    }

    /// Records the HEAD phase's outcome, then carries it out.
    async fn decide(
        &self,
        record: &VolumeRecord,
        advanced: Advanced,
        promoted: &crate::store::commit::Promoted,
    ) -> Result<Option<Released>, OpsError> {
        let decision = match advanced {
            Advanced::Committed { version, depth } => Decision::Committed { version, depth },
            Advanced::Stale { base, current, other_lifetime } => Decision::Stale { base, current, other_lifetime },
        };
        let this = self.clone();
        let (id, d) = (record.id.clone(), decision.clone());
        blocking(move || {
            this.store.decide(&id, d)?;
            crate::failpoint::hit("commit.after-decision");
            Ok(())
        })
        .await?;
        let released = self.settle(&record.id, decision).await?;
        if let Released::Committed { depth, .. } = &released {
            self.background.after_commit(self, &record.cache, *depth);
        }
        Ok(Some(match released {
            Released::Committed { version, depth, .. } => {
                Released::Committed { version, depth, bytes: promoted.stats.bytes, files: promoted.stats.files }
            }
            other => other,
        }))
    }

    /// Finishes a recorded decision (drops a dropped change's layer, then the volume).
    async fn settle(&self, id: &VolumeId, decision: Decision) -> Result<Released, OpsError> {
        let this = self.clone();
        let vid = id.clone();
        let pending = blocking(move || {
            let record = this.store.volume(&vid)?;
            let stats = match record.and_then(|r| r.pending) {
                Some(layer) => this.store.layer(&layer)?.map(|l| (l.bytes, l.files)),
                None => None,
            };
            this.store.settle(&vid)?;
            Ok(stats)
        })
        .await?;
        let (bytes, files) = pending.unwrap_or_default();
        Ok(match decision {
            Decision::Committed { version, depth } => Released::Committed { version, depth, bytes, files },
            Decision::Stale { base, current, other_lifetime } => Released::Stale { base, current, other_lifetime },
            Decision::Abandoned { why } => Released::NotPublished { why },
        })
    }

    /// Past the publish deadline (counted from the layer's promotion) the change is dropped and the
    /// release succeeds; before it, the caller is told to retry and the promoted layer is kept.
    async fn give_up_or_retry(
        &self,
        id: &VolumeId,
        layer: &crate::store::LayerId,
        source: LockError,
    ) -> Result<Option<Released>, OpsError> {
        // A lock that cannot be used at all (RBAC, a missing namespace) says so, not "busy".
        let why = match &source {
            LockError::Config { .. } => NotPublished::LockUnusable { message: source.to_string() },
            _ => NotPublished::DeadlinePassed { after_secs: self.publish_deadline.unwrap_or_default().as_secs() },
        };
        let config = matches!(source, LockError::Config { .. });
        let retry = OpsError::Lock { volume: id.clone(), source };
        self.drop_after_deadline(id, layer, retry, why, config).await
    }

    /// A registry that failed the publish: retried until the publish deadline, then dropped.
    async fn give_up_or_retry_remote(
        &self,
        id: &VolumeId,
        layer: &crate::store::LayerId,
        err: OpsError,
    ) -> Result<Option<Released>, OpsError> {
        self.metrics.registry_failed("publish");
        let why = NotPublished::RegistryFailed { message: err.to_string() };
        self.drop_after_deadline(id, layer, err, why, true).await
    }

    /// Before the publish deadline (counted from the layer's promotion) the caller is told to
    /// retry (`retry`) with the layer kept; past it the change is dropped as `why`. `loud`: the
    /// failure needs a person (logged as an error).
    async fn drop_after_deadline(
        &self,
        id: &VolumeId,
        layer: &crate::store::LayerId,
        retry: OpsError,
        why: NotPublished,
        config: bool,
    ) -> Result<Option<Released>, OpsError> {
        let reason = retry.to_string();
        let Some(deadline) = self.publish_deadline else { return Err(retry) };
        let this = self.clone();
        let (vid, layer) = (id.clone(), layer.clone());
        let gave_up = blocking(move || {
            let promoted = this.store.layer(&layer)?.map_or(0, |r| r.created_unix);
            let age = crate::store::head::now_unix().saturating_sub(promoted);
            if age < deadline.as_secs() {
                return Err(retry);
            }
            if config {
                tracing::error!(layer.id = %layer, age_secs = age, error = %reason,
                    "publish deadline passed with the publish lock or registry unusable; change dropped");
            } else {
                tracing::warn!(layer.id = %layer, age_secs = age, error = %reason, "publish deadline passed; change dropped");
            }
            this.store.decide(&vid, Decision::Abandoned { why: why.clone() })?;
            crate::failpoint::hit("commit.after-decision");
            Ok(why)
        })
        .await?;
        self.settle(id, Decision::Abandoned { why: gave_up }).await.map(Some)
    }

    /// The volume mounted at `path`.
    pub async fn volume_at(&self, path: &Path) -> Result<Option<VolumeRecord>, OpsError> {
        let this = self.clone();
        let path = path.to_path_buf();
        blocking(move || Ok(this.store.volume_at(&path)?)).await
    }
}

impl Engine {
    /// A volume's record; [`StoreError::VolumeNotFound`] when there is none.
    pub async fn volume(&self, id: &VolumeId) -> Result<VolumeRecord, OpsError> {
        let this = self.clone();
        let id = id.clone();
        blocking(move || this.existing(&id)).await
    }

    /// Bytes the state dir's filesystem holds: the most a volume could ever grow to.
    pub async fn capacity_bytes(&self) -> Result<u64, OpsError> {
        let root = self.store.layout().root().to_path_buf();
        blocking(move || {
            let fs = nix::sys::statvfs::statvfs(&root)
                .map_err(|e| OpsError::Store(StoreError::io("statvfs", &root, e.into())))?;
            Ok(fs.blocks() as u64 * fs.fragment_size() as u64)
        })
        .await
    }

    /// The store's counts for the metrics gauges.
    pub async fn summary(&self) -> Result<crate::store::StoreSummary, OpsError> {
        let this = self.clone();
        blocking(move || Ok(this.store.summary()?)).await
    }

    /// Whether the state dir can be written (a liveness probe).
    pub async fn check_state_dir(&self) -> Result<(), OpsError> {
        let tmp = self.store.layout().tmp_dir();
        blocking(move || {
            tempfile::tempfile_in(&tmp).map(drop).map_err(|e| OpsError::Store(StoreError::io("write in", &tmp, e)))
        })
        .await
    }
}
