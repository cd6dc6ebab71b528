//! Restore and release: the one place the commit protocol is put together from the store,
//! the mounter and the publish lock. The command line and the CSI services both call it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tracing::Span;

use crate::lock::{LockError, PublishLock};
use crate::mount::{MountError, Mounter, OverlaySpec, UpperDirs};
use crate::store::commit::{Advanced, NotPublished, Prepared};
use crate::store::gc::GcReport;
use crate::store::squash::SquashOutcome;
use crate::store::tree::TreeStats;
use crate::store::{CacheKey, LayerId, NewVolume, Store, StoreError, VolumeId, VolumeRecord};

/// Errors of a restore or release, with the volume they concern.
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
    #[error("volume {volume}: {target} already has {found} mounted on it")]
    ForeignMount { volume: VolumeId, target: std::path::PathBuf, found: String },
    /// A restore was asked without a place to mount.
    #[error("volume {0}: no mount path given")]
    NoMountPath(VolumeId),
    /// A blocking task died.
    #[error("internal: blocking task failed: {0}")]
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
    /// HEAD had moved past the volume's base; the delta was dropped.
    Stale { base: u64, current: u64 },
    /// Nothing was published.
    NotPublished { why: NotPublished },
}

impl std::fmt::Display for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Released::Committed { version, bytes, files, .. } => {
                write!(f, "published v{version} ({}, {files} files)", bytesize::ByteSize(*bytes).display().iec())
            }
            Released::Stale { base, current } => {
                write!(f, "not published: skipped: base {base} is stale, current is {current}")
            }
            Released::NotPublished { why: NotPublished::NotAllowed } => {
                write!(f, "not published: publishing is not allowed for this volume")
            }
            Released::NotPublished { why: NotPublished::Unchanged } => write!(f, "not published: nothing changed"),
            Released::NotPublished { why: NotPublished::NoSpace } => {
                write!(f, "not published: the cache's filesystem is full; the change was dropped to free it")
            }
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

/// Tries of a busy unmount before reporting it.
const BUSY_RETRIES: u32 = 5;

impl Engine {
    /// Wires an engine.
    pub fn new(store: Store, mounter: Arc<dyn Mounter>, lock: Arc<dyn PublishLock>, lock_timeout: Duration) -> Self {
        Self { store, mounter, lock, lock_timeout, publish_deadline: None }
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

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Pins the cache's current version in a new volume and mounts it at `req.mount_path`.
    /// Repeating it for a volume already mounted there changes nothing.
    pub async fn restore(&self, req: NewVolume) -> Result<Restored, OpsError> {
        let this = self.clone();
        blocking(move || {
            let target = req.mount_path.clone().ok_or_else(|| OpsError::NoMountPath(req.id.clone()))?;
            let existed = this.store.volume(&req.id)?.is_some();
            let record = this.store.create_volume(&req)?;
            if let Err(err) = this.mount_volume(&record, &target) {
                if !existed {
                    // Nothing of ours is mounted: the new volume would only pin layers forever.
                    this.store.drop_volume(&req.id)?;
                }
                return Err(err);
            }
            let (mut files, mut bytes) = (0, 0);
            for layer in &record.base.layers {
                if let Some(rec) = this.store.layer(layer)? {
                    files += rec.files;
                    bytes += rec.bytes;
                }
            }
            tracing::info!(cache.namespace = %record.cache.namespace, cache.name = %record.cache.name,
                head.version = record.base.version, layers = record.base.layers.len(), "restored");
            Ok(Restored { volume: record, files, bytes })
        })
        .await
    }

    /// Creates (pins) a volume without mounting it yet; idempotent for the same request.
    pub async fn create(&self, req: NewVolume) -> Result<VolumeRecord, OpsError> {
        let this = self.clone();
        blocking(move || Ok(this.store.create_volume(&req)?)).await
    }

    /// Mounts an existing volume's overlay at `target` (again, after a reboot); a repeat is a no-op.
    pub async fn attach(&self, id: &VolumeId, target: &Path) -> Result<VolumeRecord, OpsError> {
        let this = self.clone();
        let (id, target) = (id.clone(), target.to_path_buf());
        blocking(move || {
            let record = this.store.set_mount_path(&id, Some(&target))?;
            this.mount_volume(&record, &target)?;
            Ok(record)
        })
        .await
    }

    /// Unmounts a volume's overlay from `target` and keeps its upper for a later release.
    pub async fn detach(&self, id: &VolumeId, target: &Path) -> Result<(), OpsError> {
        let this = self.clone();
        let (id, target) = (id.clone(), target.to_path_buf());
        blocking(move || {
            let Some(record) = this.store.volume(&id)? else { return Ok(()) };
            // Only this volume's own overlay comes down: an id cannot unmount another volume.
            if this.is_mounted_at(&record, &target)? {
                unmount_patiently(this.mounter.as_ref(), &target)
                    .map_err(|source| OpsError::Mount { volume: id.clone(), source })?;
            }
            if record.mount_path.as_deref() == Some(target.as_path()) {
                // Only bookkeeping (a release unmounts a path that is no longer mounted as a no-op),
                // so a full disk must not make the unstage fail.
                if let Err(e) = this.store.set_mount_path(&id, None) {
                    tracing::warn!(error = %e, "could not record the unstage; continuing");
                }
            }
            Ok(())
        })
        .await
    }

    /// Whether `path` has this volume's overlay (or a bind of it) mounted on it.
    pub fn is_mounted_at(&self, record: &VolumeRecord, path: &Path) -> Result<bool, OpsError> {
        let found =
            self.mounter.mount_at(path).map_err(|source| OpsError::Mount { volume: record.id.clone(), source })?;
        Ok(found.is_some_and(|m| self.is_ours(record, &m)))
    }

    fn is_ours(&self, record: &VolumeRecord, m: &crate::mount::MountEntry) -> bool {
        let ours = format!("upperdir={}", self.store.layout().upper_dir(&record.id).display());
        m.fstype == "overlay" && m.super_options.split(',').any(|o| o == ours)
    }

    /// The mounter, for bind mounts of a mounted volume.
    pub fn mounter(&self) -> &dyn Mounter {
        self.mounter.as_ref()
    }

    fn mount_volume(&self, record: &VolumeRecord, target: &Path) -> Result<(), OpsError> {
        let mounted =
            self.mounter.mount_at(target).map_err(|source| OpsError::Mount { volume: record.id.clone(), source })?;
        match mounted {
            // Already ours: a repeated restore changes nothing.
            Some(m) if self.is_ours(record, &m) => Ok(()),
            Some(m) => Err(OpsError::ForeignMount {
                volume: record.id.clone(),
                target: target.to_path_buf(),
                found: format!("{} from {}", m.fstype, m.source),
            }),
            None => self
                .mounter
                .overlay(&self.overlay_spec(record), target)
                .map_err(|source| OpsError::Mount { volume: record.id.clone(), source }),
        }
    }

    fn overlay_spec(&self, record: &VolumeRecord) -> OverlaySpec {
        let layout = self.store.layout();
        OverlaySpec {
            readonly: record.policy.read_only,
            lower: self.store.lower_dirs(record),
            upper: Some(UpperDirs { upper: layout.upper_dir(&record.id), work: layout.work_dir(&record.id) }),
        }
    }

    /// Unmounts a volume and publishes its changes if allowed (`allow` is the caller's veto),
    /// then drops it. `Ok(None)` when the volume does not exist (already released).
    pub async fn release(&self, id: &VolumeId, allow: bool) -> Result<Option<Released>, OpsError> {
        let this = self.clone();
        let vid = id.clone();
        let prepared = blocking(move || {
            let Some(record) = this.store.volume(&vid)? else { return Ok(None) };
            if let Some(path) = &record.mount_path {
                unmount_patiently(this.mounter.as_ref(), path)
                    .map_err(|source| OpsError::Mount { volume: vid.clone(), source })?;
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
            Prepared::Publish(p) => p,
        };
        let started = std::time::Instant::now();
        let guard = match self.lock.acquire(&record.cache, self.lock_timeout).await {
            Ok(guard) => guard,
            Err(source) => return self.give_up_or_retry(id, &promoted.layer, source).await,
        };
        let this = self.clone();
        let rec = record.clone();
        let pro = promoted.clone();
        let held = guard.ensure_held().map_err(|source| OpsError::Lock { volume: id.clone(), source });
        let advanced = match held {
            Ok(()) => blocking(move || Ok(this.store.advance_head(&rec, &pro)?)).await,
            Err(e) => Err(e),
        };
        let released = guard.release().await;
        let advanced = advanced?;
        released.map_err(|source| OpsError::Lock { volume: id.clone(), source })?;
        tracing::info!(layer.id = %promoted.layer, locked_ms = started.elapsed().as_millis() as u64, outcome = ?advanced, "commit");
        let this = self.clone();
        let vid = id.clone();
        blocking(move || Ok(this.store.drop_volume(&vid)?)).await?;
        Ok(Some(match advanced {
            Advanced::Committed { version, depth } => {
                Released::Committed { version, depth, bytes: promoted.stats.bytes, files: promoted.stats.files }
            }
            Advanced::Stale { base, current } => Released::Stale { base, current },
        }))
    }

    /// Past the publish deadline (counted from the layer's promotion) the change is dropped and the
    /// release succeeds; before it, the caller is told to retry and the promoted layer is kept.
    async fn give_up_or_retry(
        &self,
        id: &VolumeId,
        layer: &LayerId,
        source: LockError,
    ) -> Result<Option<Released>, OpsError> {
        let retry = OpsError::Lock { volume: id.clone(), source };
        let Some(deadline) = self.publish_deadline else { return Err(retry) };
        let this = self.clone();
        let (id, layer) = (id.clone(), layer.clone());
        blocking(move || {
            let promoted = this.store.layer(&layer)?.map_or(0, |r| r.created_unix);
            let age = crate::store::head::now_unix().saturating_sub(promoted);
            if age < deadline.as_secs() {
                return Err(retry);
            }
            tracing::warn!(layer.id = %layer, age_secs = age, "publish deadline passed; change dropped");
            // Volume first: a crash in between leaves an orphan layer for gc, not a dangling pin.
            this.store.drop_volume(&id)?;
            this.store.remove_layer(&layer)?;
            Ok(Some(Released::NotPublished { why: NotPublished::DeadlinePassed { after_secs: deadline.as_secs() } }))
        })
        .await
    }

    /// Flattens a cache deeper than `max_depth` into one layer, then swaps it in under the lock.
    pub async fn squash(
        &self,
        key: &CacheKey,
        max_depth: usize,
        progress: Box<dyn FnMut(&TreeStats) + Send>,
    ) -> Result<SquashOutcome, OpsError> {
        let this = self.clone();
        let k = key.clone();
        let mut progress = progress;
        let built =
            blocking(move || Ok(this.store.squash_build(&k, max_depth, this.mounter.as_ref(), &mut *progress)?))
                .await?;
        let squashed = match built {
            Ok(s) => s,
            Err(outcome) => return Ok(outcome),
        };
        let lock_err = |source| OpsError::CacheLock { cache: key.clone(), source };
        let guard = self.lock.acquire(key, self.lock_timeout).await.map_err(lock_err)?;
        let this = self.clone();
        let finished = match guard.ensure_held() {
            Ok(()) => blocking(move || Ok(this.store.squash_finish(squashed)?)).await,
            Err(e) => Err(lock_err(e)),
        };
        let _ = guard.release().await;
        finished
    }

    /// Removes caches idle past `max_idle` or beyond `budget` bytes (least recently used first),
    /// then collects garbage.
    pub async fn collect(
        &self,
        max_idle: Option<Duration>,
        budget: Option<u64>,
    ) -> Result<(Vec<CacheKey>, GcReport), OpsError> {
        let this = self.clone();
        let candidates =
            blocking(move || Ok(this.store.eviction_candidates(max_idle.map(|d| d.as_secs()), budget)?)).await?;
        let mut evicted = Vec::new();
        for key in candidates {
            // A cache being published right now is in use: leave it for the next run.
            let Ok(guard) = self.lock.acquire(&key, Duration::from_millis(200)).await else { continue };
            let this = self.clone();
            let k = key.clone();
            let removed = blocking(move || Ok(this.store.remove_cache(&k)?)).await;
            let _ = guard.release().await;
            if removed? {
                evicted.push(key);
            }
        }
        let this = self.clone();
        let report = blocking(move || Ok(this.store.collect(this.mounter.as_ref(), &mut |_| {})?)).await?;
        Ok((evicted, report))
    }

    /// Removes a cache's HEAD under its lock; its layers go at the next collection.
    pub async fn remove_cache(&self, key: &CacheKey) -> Result<bool, OpsError> {
        let guard = self
            .lock
            .acquire(key, self.lock_timeout)
            .await
            .map_err(|source| OpsError::CacheLock { cache: key.clone(), source })?;
        let this = self.clone();
        let k = key.clone();
        let removed = blocking(move || Ok(this.store.remove_cache(&k)?)).await;
        let _ = guard.release().await;
        removed
    }

    /// The volume mounted at `path`.
    pub async fn volume_at(&self, path: &Path) -> Result<Option<VolumeRecord>, OpsError> {
        let this = self.clone();
        let path = path.to_path_buf();
        blocking(move || Ok(this.store.volume_at(&path)?)).await
    }
}
