//! Upkeep of the store that needs mounts or locks: squash (through a read-only overlay view the
//! store never mounts itself), garbage collection with the reclaiming of dead volumes,
//! eviction, cache removal, and the one background-squash mechanism the CLI and driver share.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::Instrument;

use super::{blocking, Engine, OpsError};
use crate::mount::{MountOptions, OverlaySpec, Unmounted};
use crate::store::gc::GcReport;
use crate::store::squash::{SquashMode, SquashOutcome, SquashPlan, View, DEFAULT_MAX_DEPTH};
use crate::store::tree::TreeStats;
use crate::store::CacheKey;

/// Where the squash of a cache that got too deep runs.
#[derive(Debug, Clone, Default)]
pub enum Background {
    /// Never after a commit (an explicit `cache squash` still works).
    #[default]
    Off,
    /// A task of this process (the driver, which keeps running).
    InProcess,
    /// A detached `PROGRAM ARGS… cache squash --namespace NS NAME` (the CLI, which exits);
    /// `args` carry the store options (state dir, shared dir, lock timeout).
    Detached { program: PathBuf, args: Vec<OsString> },
}

/// Starts at most one background squash per cache.
#[derive(Clone)]
pub(super) struct Squasher {
    max_depth: usize,
    how: Background,
    busy: Arc<Mutex<HashSet<CacheKey>>>,
}

impl Default for Squasher {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_DEPTH, Background::Off)
    }
}

impl Squasher {
    pub(super) fn new(max_depth: usize, how: Background) -> Self {
        Self { max_depth, how, busy: Arc::default() }
    }

    /// Called after a commit left `cache` `depth` layers deep.
    pub(super) fn after_commit(&self, engine: &Engine, cache: &CacheKey, depth: usize) {
        if depth <= self.max_depth {
            return;
        }
        match &self.how {
            Background::Off => {}
            Background::Detached { program, args } => {
                let spawned = std::process::Command::new(program)
                    .args(args)
                    .args(["cache", "squash", "--namespace", cache.namespace.as_str(), cache.name.as_str()])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn();
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "could not start background squash");
                }
            }
            Background::InProcess => {
                if !self.busy.lock().unwrap_or_else(|p| p.into_inner()).insert(cache.clone()) {
                    return;
                }
                let (engine, cache, busy, max_depth) =
                    (engine.clone(), cache.clone(), self.busy.clone(), self.max_depth);
                let span = tracing::info_span!("squash", cache.namespace = %cache.namespace, cache.name = %cache.name);
                tokio::spawn(
                    async move {
                        match engine.squash(&cache, max_depth, Box::new(|_| {})).await {
                            Ok(outcome) => tracing::info!(?outcome, "squash"),
                            Err(e) => {
                                tracing::warn!(error = %e, "squash failed; the cache stays deep until the next one")
                            }
                        }
                        if let Err(e) = engine.collect(None, None).await {
                            tracing::warn!(error = %e, "gc after squash failed");
                        }
                        busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&cache);
                    }
                    .instrument(span),
                );
            }
        }
    }
}

impl Engine {
    /// Squashes a cache deeper than `max_depth` (see [`crate::store::squash`] for which layers
    /// it rewrites), then swaps the new layer in under the lock.
    pub async fn squash(
        &self,
        key: &CacheKey,
        max_depth: usize,
        progress: Box<dyn FnMut(&TreeStats) + Send>,
    ) -> Result<SquashOutcome, OpsError> {
        self.squash_with(key, max_depth, SquashMode::Auto, progress).await
    }

    /// [`Engine::squash`], choosing how: `SquashMode::Flatten` always flattens the whole stack.
    pub async fn squash_with(
        &self,
        key: &CacheKey,
        max_depth: usize,
        mode: SquashMode,
        progress: Box<dyn FnMut(&TreeStats) + Send>,
    ) -> Result<SquashOutcome, OpsError> {
        let this = self.clone();
        let k = key.clone();
        let mut progress = progress;
        let built = blocking(move || {
            // The layers may live in images; a squash reads them, so they stay mounted meanwhile,
            // and the cache's own image, where the new layer is built.
            let mut images = match this.store.head(&k)? {
                Some(head) => this.store.images_of(&head.layers),
                None => Default::default(),
            };
            images.extend(this.store.image(&k)?.map(|r| r.tag));
            let images: Vec<_> = images.into_iter().collect();
            this.mount_images(&images, None)?;
            let built = this.squash_build(&k, max_depth, mode, &mut *progress);
            this.unmount_idle(&images);
            built
        })
        .await?;
        let squashed = match built {
            Ok(s) => s,
            Err(outcome) => return Ok(outcome),
        };
        let this = self.clone();
        let finished = self.under_cache_lock(key, move || Ok(this.store.squash_finish(squashed)?)).await;
        if let Ok(SquashOutcome::Squashed { .. }) = &finished {
            self.metrics.squashed();
            self.metrics.layer_created();
        }
        finished
    }

    /// Plans and builds a squash's new layer; `Err(outcome)` when there is nothing to squash.
    fn squash_build(
        &self,
        k: &CacheKey,
        max_depth: usize,
        mode: SquashMode,
        progress: &mut (dyn FnMut(&TreeStats) + Send),
    ) -> Result<Result<crate::store::squash::Squashed, SquashOutcome>, OpsError> {
        let plan = match self.store.squash_plan(k, max_depth, mode)? {
            Ok(plan) => plan,
            Err(outcome) => return Ok(Err(outcome)),
        };
        tracing::info!(
            layers = plan.run.len(),
            at = plan.at,
            how = if plan.view.is_some() { "flatten" } else { "merge" },
            "squash planned"
        );
        let built = match plan.view.clone() {
            None => self.store.squash_copy(&plan, &mut *progress).map_err(|e| (e.into(), true)),
            Some(view) => self.flatten_through(&plan, &view, &mut *progress),
        };
        match built {
            Ok(stats) => Ok(Ok(self.store.squash_record(plan, stats)?)),
            Err((e, unmounted)) => {
                // With the view still mounted the scratch stays for gc, which unmounts first.
                self.store.squash_abandon(plan, unmounted);
                Err(e)
            }
        }
    }

    /// Mounts a flatten's read-only view, copies it, unmounts it; on failure also says whether
    /// the view is unmounted.
    fn flatten_through(
        &self,
        plan: &SquashPlan,
        view: &View,
        progress: &mut dyn FnMut(&TreeStats),
    ) -> Result<TreeStats, (OpsError, bool)> {
        let mount_err = |source| OpsError::SquashMount { cache: plan.cache.clone(), source };
        let spec = OverlaySpec { readonly: true, lower: view.lower.clone(), upper: None, flags: MountOptions::NONE };
        if let Err(e) = self.mounter.overlay(&spec, &view.path) {
            return Err((mount_err(e), true));
        }
        let copied = self.store.squash_copy(plan, progress);
        let unmounted = self.mounter.unmount(&view.path);
        match (copied, unmounted) {
            (Ok(stats), Ok(_)) => Ok(stats),
            (Err(e), unmounted) => Err((e.into(), unmounted.is_ok())),
            (Ok(_), Err(e)) => Err((mount_err(e), false)),
        }
    }

    /// Runs blocking `work` that writes `cache`'s HEAD while holding its publish lock, released
    /// only once the write it protects is done.
    pub(super) async fn under_cache_lock<T: Send + 'static>(
        &self,
        cache: &CacheKey,
        work: impl FnOnce() -> Result<T, OpsError> + Send + 'static,
    ) -> Result<T, OpsError> {
        let lock_err = |source| OpsError::CacheLock { cache: cache.clone(), source };
        let guard = match self.lock.acquire(cache, self.lock_timeout).await {
            Ok(guard) => guard,
            Err(e) => {
                self.metrics.lock_failed(super::lock_kind(&e));
                return Err(lock_err(e));
            }
        };
        let done = match guard.ensure_held() {
            Ok(()) => blocking(work).await,
            Err(e) => Err(lock_err(e)),
        };
        if let Err(e) = guard.release().await {
            tracing::warn!(error = %e, "could not release the publish lock; it will expire");
        }
        done
    }

    /// Removes caches idle past `max_idle` or beyond `budget` bytes (least recently used first),
    /// reclaims the volumes of dead `run` processes, then collects garbage.
    pub async fn collect(
        &self,
        max_idle: Option<Duration>,
        budget: Option<u64>,
    ) -> Result<(Vec<CacheKey>, GcReport), OpsError> {
        let this = self.clone();
        let candidates =
            blocking(move || Ok(this.store.eviction_candidates(max_idle.map(|d| d.as_secs()), budget)?)).await?;
        let mut evicted = Vec::new();
        let mut warned = false;
        for key in candidates {
            // A cache being published right now is in use: leave it for the next run.
            let guard = match self.lock.acquire(&key, Duration::from_millis(200)).await {
                Ok(guard) => guard,
                Err(crate::lock::LockError::Timeout { .. }) => continue,
                Err(e) => {
                    self.metrics.lock_failed(super::lock_kind(&e));
                    // Once per run: with the lock unusable, nothing would ever be evicted.
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(error = %e, "eviction: cannot take publish locks; caches kept");
                    }
                    continue;
                }
            };
            let this = self.clone();
            let k = key.clone();
            let removed = blocking(move || Ok(this.store.remove_cache(&k)?)).await;
            let _ = guard.release().await;
            if removed? {
                evicted.push(key);
            }
        }
        let this = self.clone();
        let report = blocking(move || {
            // Layers inside images are seen (and freed) only with their image mounted.
            let images = this.mount_all_images()?;
            let (reclaimed, mut deferred) = this.reclaim_dead_volumes()?;
            let mounter = this.mounter.clone();
            let mut release =
                |scratch: &Path| mounter.unmount(&scratch.join("view")).map(drop).map_err(|e| e.to_string());
            let mut report = this.store.collect(&mut release, &mut |_| {})?;
            report.volumes_reclaimed = reclaimed;
            report.deferred.append(&mut deferred);
            for cache in this.remove_unused_images()? {
                tracing::info!(cache.namespace = %cache.namespace, cache.name = %cache.name, "cache image removed");
            }
            this.unmount_idle(&images);
            Ok(report)
        })
        .await?;
        self.metrics.collected(evicted.len(), report.layers_removed.len(), report.bytes_freed);
        Ok((evicted, report))
    }

    /// Unmounts and drops the volumes whose `run` process is gone (the volume is not in use by
    /// anything else: its owner held it).
    fn reclaim_dead_volumes(&self) -> Result<(Vec<crate::store::VolumeId>, Vec<String>), OpsError> {
        let (mut reclaimed, mut deferred) = (Vec::new(), Vec::new());
        for record in self.store.dead_volumes()? {
            // Another task of this process may be releasing it right now.
            let Ok(_guard) = self.inflight.begin(record.id.as_str(), "reclaim") else { continue };
            if let Some(path) = &record.mount_path {
                match self.mounter.unmount(path) {
                    Ok(Unmounted::Done | Unmounted::NotMounted) => {}
                    Err(e) => {
                        deferred.push(format!("volume {}: {e}", record.id));
                        continue;
                    }
                }
            }
            self.store.drop_volume(&record.id)?;
            reclaimed.push(record.id);
        }
        Ok((reclaimed, deferred))
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
}
