//! Caches between nodes through an OCI registry: pull a newer version before a restore (and in
//! the background, prefetch), push a commit's layer before its lock and its manifest under it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{blocking, Engine, OpsError};
use crate::registry::archive::{self, Limits};
use crate::registry::client::ClientError;
use crate::registry::{Blob, Registry, RemoteLayer, RemoteVersion};
use crate::store::commit::{Advanced, NextHead, Promoted};
use crate::store::head::Head;
use crate::store::remote::{Adopted, Staged};
use crate::store::{CacheKey, LayerId, VolumeRecord};

/// The tag that names a cache's newest version.
pub const HEAD_TAG: &str = "head";

/// How long a restore waits for the registry when prefetch last found its version current.
const PREFETCHED_WAIT: Duration = Duration::from_millis(250);

/// How this node uses a registry.
#[derive(Clone)]
pub struct RemoteConfig {
    /// The client.
    pub registry: Registry,
    /// How long a restore waits to learn the registry's `head` before using the local version.
    pub restore_timeout: Duration,
    /// Versions kept tagged (`--registry-keep`).
    pub keep: usize,
    /// What a pulled layer may hold.
    pub limits: Limits,
    /// How often held caches are polled for new versions; `None`: no prefetch.
    pub prefetch: Option<Duration>,
}

/// The registry, and what this node last learned of each cache's remote `head`.
pub(crate) struct Remote {
    pub(crate) config: RemoteConfig,
    seen: Mutex<HashMap<CacheKey, Seen>>,
}

/// A remote `head` as last read.
#[derive(Clone)]
struct Seen {
    digest: String,
    version: u64,
    lineage: String,
    at: Instant,
}

impl Remote {
    pub(crate) fn new(config: RemoteConfig) -> Self {
        Remote { config, seen: Mutex::new(HashMap::new()) }
    }

    fn seen(&self, key: &CacheKey) -> Option<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    fn saw(&self, key: &CacheKey, digest: &str, v: &RemoteVersion) {
        let seen =
            Seen { digest: digest.to_string(), version: v.version, lineage: v.lineage.clone(), at: Instant::now() };
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), seen);
    }
}

/// What a sync with the registry found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The registry has no version of the cache.
    NoRemote,
    /// This node's version is the registry's (or newer).
    Current(u64),
    /// The registry's version was pulled and is now this node's HEAD.
    Pulled {
        /// The version.
        version: u64,
        /// Layers downloaded.
        layers: usize,
        /// Compressed bytes downloaded.
        bytes: u64,
    },
}

/// Why the registry side of a publish or a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A registry call failed.
    #[error(transparent)]
    Registry(#[from] ClientError),
    /// A layer could not be written as a blob.
    #[error("layer {layer}: {source}")]
    Export { layer: LayerId, source: archive::ArchiveError },
    /// A pulled layer could not be unpacked.
    #[error("layer {layer} ({digest}): {source}")]
    Import { layer: LayerId, digest: String, source: archive::ArchiveError },
    /// A layer of the new version has no blob: it was never pushed.
    #[error("layer {0} has not been pushed")]
    NotPushed(LayerId),
    /// `cache push` of a version the registry already has a newer one of (or another lifetime).
    #[error("the registry's head is v{remote} (lineage {lineage}), not behind this node's v{local}: pull it instead")]
    RegistryAhead { remote: u64, lineage: String, local: u64 },
    /// The command needs a registry.
    #[error("no registry configured: give --registry")]
    NoRegistry,
    /// The registry did not answer in time (a restore does not wait longer).
    #[error("the registry did not answer within {after:?}")]
    NoAnswer { after: Duration },
}

/// What `cache push` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// The registry already had this version.
    Already(u64),
    /// The registry's `head` is now this version.
    Head { version: u64, digest: String },
}

impl Engine {
    /// Uses `config`'s registry to share caches with other nodes.
    pub fn with_registry(mut self, config: RemoteConfig) -> Self {
        self.remote = Some(Arc::new(Remote::new(config)));
        self
    }

    /// The registry, when one is configured.
    pub fn registry(&self) -> Option<&Registry> {
        self.remote.as_ref().map(|r| &r.config.registry)
    }

    /// Starts prefetch: every interval (jittered by up to a fifth either way, so nodes do not
    /// poll in step) each cache this node holds is synced with the registry in the background.
    pub fn spawn_prefetch(&self) -> Option<tokio::task::JoinHandle<()>> {
        let interval = self.remote.as_ref()?.config.prefetch?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(jittered(interval)).await;
                this.prefetch_once().await;
            }
        }))
    }

    /// One prefetch round over the caches this node holds; returns what each sync found.
    pub async fn prefetch_once(&self) -> Vec<(CacheKey, Result<Synced, String>)> {
        let this = self.clone();
        let held = blocking(move || {
            let mut held = Vec::new();
            for key in this.store.caches()? {
                if this.store.head(&key)?.is_some() {
                    held.push(key);
                }
            }
            Ok(held)
        })
        .await;
        let held = match held {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "prefetch: cannot list caches");
                return Vec::new();
            }
        };
        let mut found = Vec::new();
        for key in held {
            let synced = self.sync_cache(&key).await.map_err(|e| {
                self.metrics.registry_failed("prefetch");
                e.to_string()
            });
            match &synced {
                Ok(Synced::Pulled { version, layers, bytes }) => tracing::info!(cache.namespace = %key.namespace,
                    cache.name = %key.name, version, layers, bytes, "prefetched a new version"),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(cache.namespace = %key.namespace, cache.name = %key.name, %error, "prefetch failed")
                }
            }
            found.push((key, synced));
        }
        found
    }

    /// The registry's `head` of `key` (version and manifest digest), for `cache ls|show`.
    pub async fn remote_head(&self, key: &CacheKey) -> Result<Option<(RemoteVersion, String)>, OpsError> {
        let Some(remote) = self.remote.clone() else { return Err(no_registry(key)) };
        remote.config.registry.read_version(key, HEAD_TAG).await.map_err(|e| remote_err(key, e))
    }

    /// Puts this node's current version of `key` into the registry (`cache push`): its layers,
    /// then under the cache's lock its manifest, unless the registry has it or a newer one.
    pub async fn push_cache(&self, key: &CacheKey) -> Result<Pushed, OpsError> {
        let Some(remote) = self.remote.clone() else { return Err(no_registry(key)) };
        let (this, k) = (self.clone(), key.clone());
        let local = blocking(move || this.store.head(&k)?.ok_or(crate::store::StoreError::NoVersion(k).into())).await?;
        let mut layers = Vec::new();
        for id in &local.layers {
            let blob = self.push_layer(&remote, key, id, &[]).await?;
            layers.push(RemoteLayer { id: id.clone(), blob });
        }
        let guard = self
            .lock
            .acquire(key, self.lock_timeout)
            .await
            .map_err(|source| OpsError::CacheLock { cache: key.clone(), source })?;
        let put = async {
            let registry = &remote.config.registry;
            if let Some((current, _)) = registry.read_version(key, HEAD_TAG).await.map_err(|e| remote_err(key, e))? {
                if current.lineage == local.lineage && current.version == local.version {
                    return Ok(Pushed::Already(local.version));
                }
                if current.lineage != local.lineage || current.version > local.version {
                    return Err(OpsError::Remote {
                        cache: key.clone(),
                        source: RemoteError::RegistryAhead {
                            remote: current.version,
                            lineage: current.lineage,
                            local: local.version,
                        },
                    });
                }
            }
            let version = RemoteVersion { version: local.version, lineage: local.lineage.clone(), layers };
            let tags = [format!("v{}", local.version), HEAD_TAG.to_string()];
            guard.ensure_held().map_err(|source| OpsError::CacheLock { cache: key.clone(), source })?;
            let digest = registry.put_version(key, &version, &tags).await.map_err(|e| remote_err(key, e))?;
            remote.saw(key, &digest, &version);
            Ok(Pushed::Head { version: local.version, digest })
        }
        .await;
        if let Err(e) = guard.release().await {
            tracing::warn!(error = %e, "could not release the cache's lock after a push; it will expire");
        }
        put
    }

    /// Brings this node's HEAD of `key` up to the registry's `head`, pulling missing layers.
    pub async fn sync_cache(&self, key: &CacheKey) -> Result<Synced, OpsError> {
        self.sync_within(key, None).await
    }

    /// [`Engine::sync_cache`], each question about `head` bounded by `wait` (a pull once begun
    /// is waited for: its reads time out on their own). A conditional poll: the manifest is
    /// read only when `head`'s digest is not the one last seen with this node current.
    async fn sync_within(&self, key: &CacheKey, wait: Option<Duration>) -> Result<Synced, OpsError> {
        let Some(remote) = self.remote.clone() else { return Err(no_registry(key)) };
        let registry = &remote.config.registry;
        let local = {
            let (this, key) = (self.clone(), key.clone());
            blocking(move || Ok(this.store.head(&key)?)).await?
        };
        let Some(digest) = within(key, wait, registry.tag_digest(key, HEAD_TAG)).await? else {
            return Ok(Synced::NoRemote);
        };
        if let (Some(seen), Some(local)) = (remote.seen(key), &local) {
            if seen.digest == digest && is_current(local, seen.version, &seen.lineage) {
                return Ok(Synced::Current(local.version));
            }
        }
        let Some((version, digest)) = within(key, wait, registry.read_version(key, HEAD_TAG)).await? else {
            return Ok(Synced::NoRemote);
        };
        remote.saw(key, &digest, &version);
        if let Some(local) = &local {
            if is_current(local, version.version, &version.lineage) {
                return Ok(Synced::Current(local.version));
            }
        }
        self.pull_version(key, &version, &digest).await
    }

    /// Pulls the layers of `version` this node lacks (in parallel, each streamed through zstd
    /// and tar into scratch space) and makes it HEAD.
    async fn pull_version(&self, key: &CacheKey, version: &RemoteVersion, digest: &str) -> Result<Synced, OpsError> {
        let Some(remote) = self.remote.clone() else { return Ok(Synced::NoRemote) };
        let started = Instant::now();
        let (this, k, v) = (self.clone(), key.clone(), version.clone());
        // Held until the pulled layers are named by HEAD: gc sweeps scratch space otherwise.
        let (pin, missing) = blocking(move || {
            let pin = this.store.state_lock(false)?;
            Ok((pin, this.store.missing_layers(&k, &v)?))
        })
        .await?;
        let pulls = missing.iter().map(|layer| self.pull_layer(&remote, key, layer));
        let results = futures_util::future::join_all(pulls).await;
        let mut staged = Vec::new();
        let mut failed = None;
        for result in results {
            match result {
                Ok(s) => staged.push(s),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(err) = failed {
            let dirs: Vec<_> = staged.iter().map(|s| s.dir.clone()).collect();
            blocking(move || {
                for dir in dirs {
                    let _ = crate::store::tree::remove_tree(&dir);
                }
                Ok(())
            })
            .await?;
            return Err(err);
        }
        let bytes = staged.iter().map(|s| s.blob.size).sum();
        let layers = staged.len();
        self.metrics.registry_moved("pulled", bytes);
        let (this, k, v, d) = (self.clone(), key.clone(), version.clone(), digest.to_string());
        let adopted = blocking(move || {
            let adopted = this.store.adopt_remote(&k, &v, &d, staged);
            drop(pin);
            Ok(adopted?)
        })
        .await?;
        tracing::info!(cache.namespace = %key.namespace, cache.name = %key.name, remote.version = version.version,
            layers, bytes, took_ms = started.elapsed().as_millis() as u64, outcome = ?adopted, "pulled");
        Ok(match adopted {
            Adopted::Head(version) => Synced::Pulled { version, layers, bytes },
            Adopted::Kept(version) => Synced::Current(version),
        })
    }

    async fn pull_layer(&self, remote: &Remote, key: &CacheKey, layer: &RemoteLayer) -> Result<Staged, OpsError> {
        let reader = remote.config.registry.open_blob(key, &layer.blob).await.map_err(|e| remote_err(key, e))?;
        let (this, layer, limits, key) = (self.clone(), layer.clone(), remote.config.limits.clone(), key.clone());
        blocking(move || {
            let dir = this.store.scratch_path(&format!("pull-{}", layer.id));
            let imported = archive::import_layer(reader, &dir, &limits).map_err(|source| OpsError::Remote {
                cache: key.clone(),
                source: RemoteError::Import { layer: layer.id.clone(), digest: layer.blob.digest.clone(), source },
            })?;
            Ok(Staged { id: layer.id, dir, blob: layer.blob, bytes: imported.bytes, files: imported.files })
        })
        .await
    }

    /// Before a new volume pins a version: the registry's newer one of its cache (or, while the
    /// cache has none anywhere, of its first fallback that has one). Nothing for content that
    /// is not HEAD's; after the registry failed once, nothing more is asked of it.
    pub(crate) fn sync_for(&self, req: &crate::store::NewVolume) {
        if self.remote.is_none() || req.content.is_some() || req.policy.fresh {
            return;
        }
        if !self.sync_before_restore(&req.cache) || !matches!(self.store.head(&req.cache), Ok(None)) {
            return;
        }
        for fallback in &req.fallbacks {
            if !self.sync_before_restore(fallback) || !matches!(self.store.head(fallback), Ok(None)) {
                return;
            }
        }
    }

    /// Before a restore: the registry's newer version when it answers in time, else this
    /// node's (said in the log); whether the registry answered. When prefetch found this
    /// node's version current within its interval, the answer is waited for only briefly:
    /// the restore is a mount unless another node published since.
    fn sync_before_restore(&self, key: &CacheKey) -> bool {
        let Some(remote) = self.remote.clone() else { return false };
        let local = self.store.head(key).ok().flatten();
        let fresh = remote.seen(key).is_some_and(|seen| {
            remote.config.prefetch.is_some_and(|interval| seen.at.elapsed() < interval)
                && local.as_ref().is_some_and(|l| is_current(l, seen.version, &seen.lineage))
        });
        let wait = match fresh {
            true => remote.config.restore_timeout.min(PREFETCHED_WAIT),
            false => remote.config.restore_timeout,
        };
        match tokio::runtime::Handle::current().block_on(self.sync_within(key, Some(wait))) {
            Ok(synced) => {
                tracing::debug!(outcome = ?synced, "registry checked before restore");
                true
            }
            Err(error) => {
                self.metrics.registry_failed("restore");
                tracing::warn!(cache.namespace = %key.namespace, cache.name = %key.name,
                    local.version = local.as_ref().map_or(Head::NONE, |h| h.version), %error,
                    "registry not usable before restore; restoring this node's newest version");
                false
            }
        }
    }

    /// Before the commit's lock: the new layer's blob (and, when the registry lacks this
    /// node's base, the base's) is pushed. Content-addressed, so no lock is needed.
    pub(crate) async fn push_layers(&self, record: &VolumeRecord, promoted: &Promoted) -> Result<(), OpsError> {
        let Some(remote) = self.remote.clone() else { return Ok(()) };
        let key = &record.cache;
        let registry = &remote.config.registry;
        let peek = registry.read_version(key, HEAD_TAG).await.map_err(|e| remote_err(key, e))?;
        let (this, k) = (self.clone(), key.clone());
        let local = blocking(move || Ok(this.store.head(&k)?)).await?;
        let mut layers = vec![promoted.layer.clone()];
        let registry_has_base = peek.as_ref().is_some_and(|(v, _)| {
            v.lineage == record.base.lineage && v.version >= record.base.version && record.base.version != Head::NONE
        });
        if !registry_has_base || record.base.content.is_some() {
            layers.extend(record.base.layers.iter().cloned());
            layers.extend(local.iter().flat_map(|h| h.layers.iter().cloned()));
        }
        layers.dedup();
        let also_in: Vec<CacheKey> =
            if record.base.from != record.cache { vec![record.base.from.clone()] } else { vec![] };
        for layer in layers {
            self.push_layer(&remote, key, &layer, &also_in).await?;
        }
        Ok(())
    }

    /// Pushes one layer's blob, writing it first when this node never did.
    async fn push_layer(
        &self,
        remote: &Remote,
        key: &CacheKey,
        layer: &LayerId,
        also_in: &[CacheKey],
    ) -> Result<Blob, OpsError> {
        let registry = &remote.config.registry;
        let (this, id) = (self.clone(), layer.clone());
        let recorded = blocking(move || Ok(this.store.layer(&id)?.and_then(|r| r.blob))).await?;
        // Pushed or pulled before: present in this repository or mountable from another, with
        // no need to write the layer as a blob again.
        if let Some(blob) = recorded {
            if registry.place_blob(key, &blob, also_in).await.map_err(|e| remote_err(key, e))?.is_some() {
                return Ok(blob);
            }
        }
        let (this, id, k) = (self.clone(), layer.clone(), key.clone());
        let (path, blob) = blocking(move || {
            let path = this.store.scratch_path(&format!("push-{id}"));
            let dir = this.store.layout().layer_dir(&id);
            let exported = archive::export_layer(&dir, &path).map_err(|source| {
                let _ = std::fs::remove_file(&path);
                OpsError::Remote { cache: k.clone(), source: RemoteError::Export { layer: id.clone(), source } }
            })?;
            this.store.set_layer_blob(&id, &exported.blob)?;
            Ok((path, exported.blob))
        })
        .await?;
        let pushed = registry.push_blob(key, &path, &blob, also_in).await;
        let _ = tokio::fs::remove_file(&path).await;
        let how = pushed.map_err(|e| remote_err(key, e))?;
        if how == crate::registry::client::BlobPush::Uploaded {
            self.metrics.registry_moved("pushed", blob.size);
        }
        tracing::info!(layer.id = %layer, blob.digest = %blob.digest, blob.size = blob.size, how = ?how, "layer pushed");
        Ok(blob)
    }

    /// Under the cache's lock: compares the registry's `head` with the volume's base, puts the
    /// new version's manifest and moves `head`, then writes this node's HEAD.
    pub(crate) async fn advance_remote(
        &self,
        record: &VolumeRecord,
        promoted: &Promoted,
        guard: &dyn crate::lock::LockGuard,
    ) -> Result<Advanced, OpsError> {
        let Some(remote) = self.remote.clone() else {
            let (this, rec, pro) = (self.clone(), record.clone(), promoted.clone());
            return blocking(move || Ok(this.store.advance_head(&rec, &pro)?)).await;
        };
        let key = &record.cache;
        let registry = &remote.config.registry;
        let read = registry.read_version(key, HEAD_TAG).await.map_err(|e| remote_err(key, e))?;
        let (current, current_digest) = read.map_or((None, None), |(v, d)| (Some(v), Some(d)));
        let (this, rec, pro) = (self.clone(), record.clone(), promoted.clone());
        let (local, next) =
            blocking(move || Ok((this.store.head(&rec.cache)?, this.store.next_head(&rec, &pro)?))).await?;
        let step = plan(record, &promoted.layer, local.as_ref(), current.as_ref(), &next);
        let (number, lineage, ids, write_local) = match step {
            Step::Done(advanced) => return Ok(advanced),
            Step::Published { version, depth } => {
                // An earlier attempt put the manifest and stopped before this node's HEAD: the
                // change is published; this node takes the registry's version when it can.
                if let (Some(current), Some(digest)) = (current, current_digest) {
                    let (this, k) = (self.clone(), key.clone());
                    let adopted =
                        blocking(move || Ok(this.store.adopt_remote(&k, &current, &digest, Vec::new())?)).await;
                    tracing::info!(outcome = ?adopted.map_err(|e| e.to_string()), "already in the registry");
                }
                return Ok(Advanced::Committed { version, depth });
            }
            Step::Push { version, lineage, layers, write_local } => (version, lineage, layers, write_local),
        };
        let mut layers = Vec::new();
        for id in &ids {
            layers.push(self.remote_layer(key, current.as_ref(), id).await?);
        }
        let manifest = RemoteVersion { version: number, lineage, layers };
        let tags = [format!("v{number}"), HEAD_TAG.to_string()];
        // The registry calls above may have outlasted a Lease whose renewals failed: a lost
        // lock never moves head (another node may be moving it now).
        guard.ensure_held().map_err(|source| OpsError::Lock { volume: record.id.clone(), source })?;
        let digest = registry.put_version(key, &manifest, &tags).await.map_err(|e| remote_err(key, e))?;
        remote.saw(key, &digest, &manifest);
        tracing::info!(remote.version = number, manifest.digest = %digest, "registry head moved");
        let (this, rec) = (self.clone(), record.clone());
        let advanced = blocking(move || {
            let NextHead::Write(head) = next else {
                return Ok(Advanced::Committed { version: manifest.version, depth: manifest.layers.len() });
            };
            if !write_local {
                // Stacked on another node's version: this node takes it once it holds its layers.
                let adopted = this.store.adopt_remote(&rec.cache, &manifest, &digest, Vec::new());
                tracing::debug!(outcome = ?adopted.map_err(|e| e.to_string()), "stacked version taken locally");
                return Ok(Advanced::Committed { version: manifest.version, depth: manifest.layers.len() });
            }
            let _pin = this.store.state_lock(false)?;
            let _heads = this.store.head_lock(&rec.cache)?;
            Ok(this.store.write_next_head(&rec, &head)?)
        })
        .await?;
        self.forget_old_versions(key, number);
        Ok(advanced)
    }

    /// The registry layer for a layer id of the new version: the registry's own descriptor when
    /// its `head` has that layer, else the blob this node pushed.
    async fn remote_layer(
        &self,
        key: &CacheKey,
        current: Option<&RemoteVersion>,
        id: &LayerId,
    ) -> Result<RemoteLayer, OpsError> {
        if let Some(layer) = current.and_then(|c| c.layers.iter().find(|l| &l.id == id)) {
            return Ok(layer.clone());
        }
        let (this, lid) = (self.clone(), id.clone());
        let blob = blocking(move || Ok(this.store.layer(&lid)?.and_then(|r| r.blob))).await?;
        match blob {
            Some(blob) => Ok(RemoteLayer { id: id.clone(), blob }),
            None => Err(OpsError::Remote { cache: key.clone(), source: RemoteError::NotPushed(id.clone()) }),
        }
    }

    /// Untags versions older than the retention, in the background: the publish is done.
    fn forget_old_versions(&self, key: &CacheKey, newest: u64) {
        let Some(remote) = self.remote.clone() else { return };
        let key = key.clone();
        tokio::spawn(async move {
            let registry = &remote.config.registry;
            let keep = remote.config.keep.max(1) as u64;
            let tags = match registry.tags(&key).await {
                Ok(tags) => tags,
                Err(e) => return tracing::debug!(error = %e, "could not list tags for retention"),
            };
            for tag in tags {
                let Some(n) = tag.strip_prefix('v').and_then(|n| n.parse::<u64>().ok()) else { continue };
                if n + keep <= newest {
                    if let Err(e) = registry.delete_tag(&key, &tag).await {
                        tracing::warn!(tag, error = %e, "could not untag an old version");
                    }
                }
            }
        });
    }
}

/// `interval` scaled by a random factor in [0.8, 1.2).
fn jittered(interval: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let r = if getrandom::fill(&mut byte).is_ok() { byte[0] } else { 128 };
    interval.mul_f64(0.8 + 0.4 * f64::from(r) / 256.0)
}

/// A registry call bounded by `wait` (when given), its failure as the engine's error.
async fn within<T>(
    key: &CacheKey,
    wait: Option<Duration>,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, OpsError> {
    let Some(wait) = wait else { return call.await.map_err(|e| remote_err(key, e)) };
    match tokio::time::timeout(wait, call).await {
        Ok(answer) => answer.map_err(|e| remote_err(key, e)),
        Err(_) => Err(OpsError::Remote { cache: key.clone(), source: RemoteError::NoAnswer { after: wait } }),
    }
}

fn no_registry(key: &CacheKey) -> OpsError {
    OpsError::Remote { cache: key.clone(), source: RemoteError::NoRegistry }
}

fn remote_err(key: &CacheKey, source: ClientError) -> OpsError {
    OpsError::Remote { cache: key.clone(), source: RemoteError::Registry(source) }
}

/// Whether this node's HEAD already is (or is newer than) a remote version.
fn is_current(local: &Head, version: u64, lineage: &str) -> bool {
    local.lineage == lineage && local.version >= version
}

/// What the registry side of a commit does.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Nothing to put: done already, or stale.
    Done(Advanced),
    /// The registry's `head` already holds the change, as version `version` (a retry after the
    /// manifest went up).
    Published { version: u64, depth: usize },
    /// Put version `version` of these layers; `write_local`: this node's HEAD becomes the
    /// plan's (else the version stacks on another node's, which this node takes when it can).
    Push { version: u64, lineage: String, layers: Vec<LayerId>, write_local: bool },
}

/// Decides the commit against the registry's `head` (`current`) when it is ahead of this
/// node, and against this node's HEAD (the plan `next`) when the registry has nothing newer.
fn plan(
    record: &VolumeRecord,
    layer: &LayerId,
    local: Option<&Head>,
    current: Option<&RemoteVersion>,
    next: &NextHead,
) -> Step {
    let head = match next {
        // A retry after this node's HEAD was written: the manifest went up before it.
        NextHead::Decided(done @ Advanced::Committed { .. }) => return Step::Done(done.clone()),
        NextHead::Decided(stale) => Err(stale),
        NextHead::Write(head) => Ok(head),
    };
    // Every version adds one layer on top, so the change's version is head's minus the layers
    // above it.
    if let Some(c) = current {
        if let Some(at) = c.layers.iter().position(|l| &l.id == layer) {
            let above = (c.layers.len() - at - 1) as u64;
            return Step::Published { version: c.version.saturating_sub(above), depth: at + 1 };
        }
    }
    let ahead = match (current, local) {
        (None, _) => None,
        (Some(c), None) => Some(c),
        (Some(c), Some(l)) => (c.lineage != l.lineage || c.version > l.version).then_some(c),
    };
    let Some(current) = ahead else {
        return match head {
            Err(stale) => Step::Done(stale.clone()),
            Ok(head) => {
                let same = current.zip(local).is_some_and(|(c, l)| c.version == l.version && c.lineage == l.lineage);
                let on_local = local
                    .is_some_and(|l| head.layers.len() == l.layers.len() + 1 && head.layers.starts_with(&l.layers));
                // The registry's layers hold the same content as this node's (maybe squashed
                // here since): the manifest keeps the registry's.
                let layers = match current {
                    Some(c) if same && on_local => {
                        c.layers.iter().map(|l| l.id.clone()).chain(head.layers.last().cloned()).collect()
                    }
                    _ => head.layers.clone(),
                };
                Step::Push { version: head.version, lineage: head.lineage.clone(), layers, write_local: true }
            }
        };
    };
    let base = record.base.version;
    let other_lifetime = base != Head::NONE && current.lineage != record.base.lineage;
    let stack = record.policy.on_stale == crate::store::OnStale::Stack
        && !record.policy.fresh
        && !other_lifetime
        && record.base.content.is_none();
    match head {
        Ok(head) if stack => Step::Push {
            version: current.version + 1,
            lineage: current.lineage.clone(),
            layers: current.layers.iter().map(|l| l.id.clone()).chain(head.layers.last().cloned()).collect(),
            write_local: false,
        },
        _ => Step::Done(Advanced::Stale { base, current: current.version, other_lifetime }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{OnStale, Policy};

    fn id(s: &str) -> LayerId {
        LayerId::new(s).unwrap()
    }

    fn remote(version: u64, lineage: &str, layers: &[&str]) -> RemoteVersion {
        let layers = layers
            .iter()
            .map(|l| RemoteLayer {
                id: id(l),
                blob: Blob { digest: format!("sha256:{:0>64}", l), size: 1, diff_id: format!("sha256:{:0>64}", l) },
            })
            .collect();
        RemoteVersion { version, lineage: lineage.into(), layers }
    }

    fn head(version: u64, lineage: &str, layers: &[&str]) -> Head {
        Head { version, layers: layers.iter().map(|l| id(l)).collect(), updated_unix: 0, lineage: lineage.into() }
    }

    fn record(base: u64, lineage: &str, on_stale: OnStale) -> VolumeRecord {
        let policy = Policy { publish: true, on_stale, ..Policy::default() };
        serde_json::from_value(serde_json::json!({
            "id": "v1",
            "cache": {"namespace": "ci", "name": "m2"},
            "base": {"version": base, "layers": [], "from": {"namespace": "ci", "name": "m2"},
                     "from_version": base, "lineage": lineage},
            "policy": serde_json::to_value(policy).unwrap(),
            "created_unix": 0,
        }))
        .unwrap()
    }

    /// `plan` for a change whose promoted layer is `new` (the tests' naming).
    fn plan_for(record: &VolumeRecord, local: Option<&Head>, current: Option<&RemoteVersion>, next: &NextHead) -> Step {
        plan(record, &id("new"), local, current, next)
    }

    fn push(version: u64, layers: &[&str], write_local: bool) -> Step {
        Step::Push { version, lineage: "l1".into(), layers: layers.iter().map(|l| id(l)).collect(), write_local }
    }

    #[test]
    fn a_first_publish_puts_version_one_of_its_layer() {
        let next = NextHead::Write(head(1, "l1", &["new"]));
        assert_eq!(plan_for(&record(0, "", OnStale::Skip), None, None, &next), push(1, &["new"], true));
    }

    #[test]
    fn a_current_base_keeps_the_registrys_layers_under_a_local_squash() {
        let local = head(3, "l1", &["sq"]);
        let current = remote(3, "l1", &["a", "b"]);
        let next = NextHead::Write(head(4, "l1", &["sq", "new"]));
        let step = plan_for(&record(3, "l1", OnStale::Skip), Some(&local), Some(&current), &next);
        assert_eq!(step, push(4, &["a", "b", "new"], true));
    }

    #[test]
    fn a_registry_ahead_makes_the_change_stale_or_stacks_it() {
        let local = head(3, "l1", &["a"]);
        let current = remote(4, "l1", &["a", "c"]);
        let next = NextHead::Write(head(4, "l1", &["a", "new"]));
        let stale = plan_for(&record(3, "l1", OnStale::Skip), Some(&local), Some(&current), &next);
        assert_eq!(stale, Step::Done(Advanced::Stale { base: 3, current: 4, other_lifetime: false }));
        let stacked = plan_for(&record(3, "l1", OnStale::Stack), Some(&local), Some(&current), &next);
        assert_eq!(stacked, push(5, &["a", "c", "new"], false));
    }

    #[test]
    fn another_lifetime_in_the_registry_is_never_stacked_on() {
        let local = head(3, "l1", &["a"]);
        let current = remote(1, "l2", &["z"]);
        let next = NextHead::Write(head(4, "l1", &["a", "new"]));
        let step = plan_for(&record(3, "l1", OnStale::Stack), Some(&local), Some(&current), &next);
        assert_eq!(step, Step::Done(Advanced::Stale { base: 3, current: 1, other_lifetime: true }));
    }

    #[test]
    fn a_registry_behind_this_node_catches_up_with_its_layers() {
        let local = head(3, "l1", &["a", "b"]);
        let current = remote(2, "l1", &["a"]);
        let next = NextHead::Write(head(4, "l1", &["a", "b", "new"]));
        let step = plan_for(&record(3, "l1", OnStale::Skip), Some(&local), Some(&current), &next);
        assert_eq!(step, push(4, &["a", "b", "new"], true));
    }

    #[test]
    fn a_retry_after_the_manifest_went_up_is_committed_not_stale() {
        // The registry took v4 with the change; this node's HEAD is still v3.
        let local = head(3, "l1", &["a"]);
        let current = remote(4, "l1", &["a", "new"]);
        let next = NextHead::Write(head(4, "l1", &["a", "new"]));
        let step = plan_for(&record(3, "l1", OnStale::Skip), Some(&local), Some(&current), &next);
        assert_eq!(step, Step::Published { version: 4, depth: 2 });
        // And another node has published on top of it since.
        let later = remote(5, "l1", &["a", "new", "c"]);
        let step = plan_for(&record(3, "l1", OnStale::Skip), Some(&local), Some(&later), &next);
        assert_eq!(step, Step::Published { version: 4, depth: 2 });
    }

    #[test]
    fn a_retry_after_this_nodes_head_was_written_is_done() {
        let done = Advanced::Committed { version: 4, depth: 2 };
        let current = remote(4, "l1", &["a", "new"]);
        let step = plan_for(&record(3, "l1", OnStale::Skip), None, Some(&current), &NextHead::Decided(done.clone()));
        assert_eq!(step, Step::Done(done));
    }
}
