//! The node half of a volume's life as typed operations: stage, bind-publish, unpublish,
//! unstage, delete and stats. Each runs in an owned task (see [`Engine::owned`]).

use std::path::{Path, PathBuf};

use super::{blocking, unmount_patiently, Engine, OpsError, Released};
use crate::mount::MountOptions;
use crate::store::{NewVolume, PodUse, StoreError, VolumeId, VolumeRecord};

/// How an unpublish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unpublished {
    /// An inline volume's unpublish is its release.
    Released(Option<Released>),
    /// A bind of a persistent volume came down (or was already gone).
    Unbound,
}

/// Usage of a mounted volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    /// Bytes the volume added (its upper).
    pub used_bytes: u64,
    /// Entries the volume added.
    pub used_files: u64,
    /// Size of the filesystem holding the upper.
    pub total_bytes: u64,
    /// Bytes still available there.
    pub available_bytes: u64,
    /// Inodes of that filesystem.
    pub total_inodes: u64,
    /// Inodes still available.
    pub available_inodes: u64,
    /// Why the volume is not healthy (a layer missing, its mount gone); `None` when it is.
    pub abnormal: Option<String>,
}

/// How long a measured usage is served before it is measured again in the background:
/// kubelet asks every minute per volume, and a walk of a big upper must not follow each ask.
pub(super) const USAGE_TTL: std::time::Duration = std::time::Duration::from_secs(120);

/// A volume's last measured usage.
#[derive(Debug, Clone, Copy)]
pub(super) struct Usage {
    at: std::time::Instant,
    stats: crate::store::tree::TreeStats,
    refreshing: bool,
}

/// Measured usage by volume, shared by the engine's clones.
pub(super) type UsageCache = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<VolumeId, Usage>>>;

fn io_err(volume: &VolumeId, op: &'static str, path: &Path, source: std::io::Error) -> OpsError {
    OpsError::Io { volume: volume.clone(), op, path: path.to_path_buf(), source }
}

fn create_dir(volume: &VolumeId, path: &Path) -> Result<(), OpsError> {
    std::fs::create_dir_all(path).map_err(|e| io_err(volume, "create directory", path, e))
}

/// Removes an unmounted target directory; never recursively, so a mount that did not come off
/// cannot lose its data.
fn remove_target(volume: &VolumeId, path: &Path) -> Result<(), OpsError> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(volume, "remove target directory", path, e)),
    }
}

impl Engine {
    pub(super) fn existing(&self, id: &VolumeId) -> Result<VolumeRecord, OpsError> {
        self.store.volume(id)?.ok_or_else(|| StoreError::VolumeNotFound(id.clone()).into())
    }

    /// Mounts an existing volume's overlay at `staging` (again, after a reboot); a repeat is a
    /// no-op. Refused while the volume is mounted at another staging path.
    /// With `group` (a pod's fsGroup), the volume's root is given to that group first.
    pub async fn stage(
        &self,
        id: &VolumeId,
        staging: &Path,
        flags: MountOptions,
        group: Option<u32>,
    ) -> Result<VolumeRecord, OpsError> {
        let this = self.clone();
        let (id, staging) = (id.clone(), staging.to_path_buf());
        let key = id.to_string();
        self.owned(&key, "stage", async move {
            blocking(move || {
                let started = std::time::Instant::now();
                let record = this.existing(&id)?;
                let mounted = this.is_mounted_at(&record, &staging)?;
                // Mounted anywhere but here (staged elsewhere, or a bind left behind): a second
                // overlay on the same upper would corrupt it.
                if !mounted {
                    let at = this.mounts_of(&record)?.into_iter().next();
                    if let Some(at) = record.mount_path.clone().filter(|p| Some(p) == at.as_ref()).or(at) {
                        return Err(OpsError::StagedElsewhere { volume: id.clone(), at });
                    }
                }
                create_dir(&id, &staging)?;
                this.mount_images(&record.images, None)?;
                this.store.ensure_volume_dirs(&record)?;
                this.apply_group(record, group, mounted, mounted.then_some(staging.as_path()))?;
                let record = this.store.update_volume(&id, |r| {
                    r.mount_path = Some(staging.clone());
                    r.flags = flags;
                })?;
                if this.mount_volume(&record, &staging)? {
                    this.restore_seen(&record, started.elapsed(), None);
                }
                Ok(record)
            })
            .await
        })
        .await
    }

    /// Unmounts a volume's overlay from `staging` and keeps its upper for a later release.
    pub async fn unstage(&self, id: &VolumeId, staging: &Path) -> Result<(), OpsError> {
        let this = self.clone();
        let (id, staging) = (id.clone(), staging.to_path_buf());
        let key = id.to_string();
        self.owned(&key, "unstage", async move {
            blocking(move || {
                let Some(record) = this.store.volume(&id)? else { return Ok(()) };
                // Only this volume's own overlay comes down: an id cannot unmount another volume.
                if this.is_mounted_at(&record, &staging)? {
                    unmount_patiently(this.mounter.as_ref(), &staging).map_err(|s| this.mount_err(&record, s))?;
                }
                if record.mount_path.as_deref() == Some(staging.as_path()) {
                    // Only bookkeeping (a release unmounts a path that is no longer mounted as a
                    // no-op), so a full disk must not make the unstage fail.
                    if let Err(e) = this.store.set_mount_path(&id, None) {
                        tracing::warn!(error = %e, "could not record the unstage; continuing");
                    }
                }
                Ok(())
            })
            .await
        })
        .await
    }

    /// Bind-mounts a staged volume at `target` (read-only when asked) and records the pod that
    /// uses it, so `publishWhen` can later ask how the pod ended.
    pub async fn publish(
        &self,
        id: &VolumeId,
        staging: &Path,
        target: &Path,
        readonly: bool,
        pod: Option<(String, String)>,
        group: Option<u32>,
    ) -> Result<(), OpsError> {
        let this = self.clone();
        let (id, staging, target) = (id.clone(), staging.to_path_buf(), target.to_path_buf());
        let key = id.to_string();
        self.owned(&key, "publish", async move {
            blocking(move || {
                let record = this.existing(&id)?;
                if !this.is_mounted_at(&record, &staging)? {
                    return Err(OpsError::NotStaged { volume: id.clone(), staging });
                }
                // Another pod has it published somewhere else: its group stays.
                let others = this.mounts_of(&record)?.into_iter().any(|m| m != staging && m != target);
                let record = this.apply_group(record, group, others, Some(staging.as_path()))?;
                create_dir(&id, &target)?;
                match this.mounter.mount_at(&target).map_err(|s| this.mount_err(&record, s))? {
                    Some(m) if this.is_mounted_at(&record, &target)? => {
                        if m.is_readonly() != readonly {
                            let mode = if m.is_readonly() { "read-only" } else { "read-write" };
                            return Err(OpsError::MountedOtherwise { volume: id.clone(), target, mode });
                        }
                    }
                    Some(m) => {
                        return Err(OpsError::ForeignMount {
                            volume: id.clone(),
                            target,
                            found: format!("{} from {}", m.fstype, m.source),
                        })
                    }
                    None => this.mounter.bind(&staging, &target, readonly).map_err(|s| this.mount_err(&record, s))?,
                }
                this.remember_pod(&id, pod, &target)
            })
            .await
        })
        .await
    }

    /// Records a pod using the volume, when the engine can later ask how it ended.
    fn remember_pod(&self, id: &VolumeId, pod: Option<(String, String)>, target: &Path) -> Result<(), OpsError> {
        let (Some((namespace, name)), Some(_)) = (pod, &self.pods) else { return Ok(()) };
        let use_ = PodUse { namespace, name, target: target.to_path_buf(), outcome: None };
        self.store
            .update_volume(id, |r| {
                if !r.pods.iter().any(|p| p.namespace == use_.namespace && p.name == use_.name) {
                    r.pods.push(use_);
                }
            })
            .map(drop)
            .map_err(OpsError::from)
    }

    /// Mounts an inline volume (restore) and records its pod.
    pub async fn publish_inline(
        &self,
        req: NewVolume,
        pod: Option<(String, String)>,
        group: Option<u32>,
    ) -> Result<(), OpsError> {
        let this = self.clone();
        let id = req.id.clone();
        self.owned(id.as_str(), "publish", async move {
            blocking(move || {
                let target = req.mount_path.clone().ok_or_else(|| OpsError::NoMountPath(req.id.clone()))?;
                let id = req.id.clone();
                create_dir(&id, &target)?;
                this.restore_now(req, group)?;
                this.remember_pod(&id, pod, &target)
            })
            .await
        })
        .await
    }

    /// Asks how the pods that used the volume at `target` ended and records the answers. No
    /// answer is recorded as `unknown`, which `on-success` does not publish.
    async fn record_pod_outcomes(&self, record: &VolumeRecord, target: &Path) -> Result<(), OpsError> {
        let Some(cluster) = &self.pods else { return Ok(()) };
        let mut answers = Vec::new();
        for pod in record.pods.iter().filter(|p| p.target == target && p.outcome.is_none()) {
            let outcome = match cluster.pod_outcome(&pod.namespace, &pod.name).await {
                Ok(outcome) => format!("{outcome:?}").to_lowercase(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tell how the pod ended: its change will not publish");
                    "unknown".to_string()
                }
            };
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), outcome, "pod outcome");
            answers.push((pod.namespace.clone(), pod.name.clone(), outcome));
        }
        if answers.is_empty() {
            return Ok(());
        }
        let this = self.clone();
        let id = record.id.clone();
        blocking(move || {
            this.store.update_volume(&id, |r| {
                for p in r.pods.iter_mut() {
                    if let Some((_, _, o)) = answers.iter().find(|(ns, n, _)| *ns == p.namespace && *n == p.name) {
                        p.outcome = Some(o.clone());
                    }
                }
            })?;
            Ok(())
        })
        .await
    }

    /// Takes down what `id` has at `target`: an inline volume is released (committed), a bind
    /// of a persistent volume is unmounted. Then the target directory goes, unless something
    /// (not ours) is still mounted there. An unknown or invalid id unmounts nothing.
    pub async fn unpublish(&self, id: Option<&VolumeId>, target: &Path) -> Result<Unpublished, OpsError> {
        let this = self.clone();
        let target = target.to_path_buf();
        let Some(id) = id.cloned() else {
            let nobody = VolumeId::new("unknown").map_err(StoreError::from)?;
            return blocking(move || this.remove_unmounted_target(&nobody, &target).map(|_| Unpublished::Unbound))
                .await;
        };
        let key = id.to_string();
        self.owned(&key, "unpublish", async move {
            let (t, vid) = (target.clone(), id.clone());
            let engine = this.clone();
            let record = blocking(move || Ok(engine.store.volume(&vid)?)).await?;
            let done = match record {
                Some(rec) => {
                    this.record_pod_outcomes(&rec, &t).await?;
                    let ephemeral = rec.request.as_ref().is_some_and(|r| r.ephemeral);
                    if ephemeral && rec.mount_path.as_deref() == Some(t.as_path()) {
                        let engine = this.clone();
                        let vid = id.clone();
                        let rec = blocking(move || engine.existing(&vid)).await?;
                        let allow = rec.policy.publish_when.allows(&rec.pods);
                        Unpublished::Released(this.release_now(&id, allow, !allow).await?)
                    } else {
                        let engine = this.clone();
                        let tt = t.clone();
                        blocking(move || {
                            // Only if it really is this volume's, so an id naming another volume
                            // cannot unmount someone else's target.
                            if engine.is_mounted_at(&rec, &tt)? {
                                unmount_patiently(engine.mounter.as_ref(), &tt)
                                    .map_err(|s| engine.mount_err(&rec, s))?;
                            }
                            Ok(())
                        })
                        .await?;
                        Unpublished::Unbound
                    }
                }
                None => Unpublished::Unbound,
            };
            let engine = this.clone();
            blocking(move || engine.remove_unmounted_target(&id, &target)).await?;
            Ok(done)
        })
        .await
    }

    fn remove_unmounted_target(&self, id: &VolumeId, target: &Path) -> Result<(), OpsError> {
        // Whatever is still mounted there is not ours to remove.
        match self.mounter.mount_at(target) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => remove_target(id, target),
            // A path that cannot even be resolved has nothing of ours to remove.
            Err(_) => Ok(()),
        }
    }

    /// DeleteVolume: releases a persistent volume, publishing if its policy and its pods'
    /// outcomes allow it. `Ok(None)` when it is already gone.
    pub async fn delete(&self, id: &VolumeId) -> Result<Option<Released>, OpsError> {
        let this = self.clone();
        let id = id.clone();
        let key = id.to_string();
        self.owned(&key, "delete", async move {
            let (engine, vid) = (this.clone(), id.clone());
            let Some(record) = blocking(move || Ok(engine.store.volume(&vid)?)).await? else { return Ok(None) };
            let allow = record.policy.publish_when.allows(&record.pods);
            if !allow {
                tracing::info!(pods = ?record.pods, "publishWhen: not every pod that used the volume succeeded");
            }
            this.release_now(&id, allow, !allow).await
        })
        .await
    }

    /// Usage and health of volume `id` at `path`. Usage comes from a measurement at most
    /// [`USAGE_TTL`] old (refreshed in the background), so a poll never walks the upper;
    /// free space is the state filesystem's, where the upper lives.
    pub async fn stats(&self, id: &VolumeId, path: &Path) -> Result<VolumeStats, OpsError> {
        let this = self.clone();
        let (id, path): (VolumeId, PathBuf) = (id.clone(), path.to_path_buf());
        blocking(move || {
            let record = this.existing(&id)?;
            // A path that cannot even be resolved is certainly not where the volume is.
            let mounted = this.is_mounted_at(&record, &path).unwrap_or(false);
            let ours =
                record.mount_path.as_deref() == Some(path.as_path()) || record.pods.iter().any(|p| p.target == path);
            if !mounted && !ours {
                return Err(OpsError::NotMountedAt { volume: id.clone(), path });
            }
            let upper = this.store.upper_of(&record);
            let fs = nix::sys::statvfs::statvfs(&upper).map_err(|e| io_err(&id, "statvfs", &upper, e.into()))?;
            let used = this.usage_of(&id, &upper)?;
            let frsize = fs.fragment_size() as u64;
            let missing = record.base.layers.iter().find(|l| !this.store.layer_present(l));
            let mut problems = Vec::new();
            if !mounted {
                problems.push(format!(
                    "the volume is no longer mounted at {}: it was unmounted behind the driver's back",
                    path.display()
                ));
            }
            if let Some(layer) = missing {
                problems.push(format!(
                    "layer {layer} of cache {} v{} is missing from {}: the volume reads from a deleted layer; \
                     recreate it",
                    record.base.from,
                    record.base.from_version,
                    this.store.layout().layer_dir(layer).display()
                ));
            }
            let abnormal = (!problems.is_empty()).then(|| problems.join("; "));
            Ok(VolumeStats {
                used_bytes: used.bytes,
                used_files: used.files,
                total_bytes: fs.blocks() as u64 * frsize,
                available_bytes: fs.blocks_available() as u64 * frsize,
                total_inodes: fs.files() as u64,
                available_inodes: fs.files_available() as u64,
                abnormal,
            })
        })
        .await
    }

    /// The upper's usage: measured on the first ask, then served from the cache and measured
    /// again in the background once older than [`USAGE_TTL`].
    fn usage_of(&self, id: &VolumeId, upper: &Path) -> Result<crate::store::tree::TreeStats, OpsError> {
        let cached = {
            // One look under the lock decides, so two polls never start two walks.
            let mut cache = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            cache.get_mut(id).map(|u| {
                let refresh = u.at.elapsed() >= USAGE_TTL && !u.refreshing;
                u.refreshing |= refresh;
                (u.stats, refresh)
            })
        };
        match cached {
            Some((stats, false)) => Ok(stats),
            Some((stats, true)) => {
                let (cache, id, upper) = (self.usage.clone(), id.clone(), upper.to_path_buf());
                tokio::task::spawn_blocking(move || {
                    let measured = crate::store::tree::measure(&upper);
                    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                    // A volume released meanwhile was forgotten: it stays forgotten.
                    match (measured, cache.contains_key(&id)) {
                        (Ok(stats), true) => {
                            cache.insert(id, Usage { at: std::time::Instant::now(), stats, refreshing: false });
                        }
                        _ => {
                            cache.remove(&id);
                        }
                    }
                });
                Ok(stats)
            }
            None => {
                let stats = crate::store::tree::measure(upper).map_err(StoreError::from)?;
                let usage = Usage { at: std::time::Instant::now(), stats, refreshing: false };
                self.usage.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), usage);
                Ok(stats)
            }
        }
    }
}
