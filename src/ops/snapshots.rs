//! Named content: snapshots of volumes, clones, rollback, and the listings the CSI
//! controller serves. Each runs in a task the engine owns, like every volume operation.

use std::path::PathBuf;

use super::{blocking, Engine, OpsError};
use crate::store::snapshot::{RolledBack, SnapshotRecord};
use crate::store::{CacheKey, VolumeId, VolumeRecord};

/// A volume as the controller lists it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its record.
    pub record: VolumeRecord,
    /// Where it is mounted on this node (staged, published).
    pub mounted_at: Vec<PathBuf>,
    /// Why it is not healthy, if it is not (a layer it reads from is missing).
    pub abnormal: Option<String>,
}

impl Engine {
    /// A volume mounted writable may change while it is copied: it is refused rather than
    /// copied torn (even with nothing in its upper yet: a job may start writing at once).
    /// The caller holds the volume's in-flight guard, so it cannot be staged meanwhile.
    fn check_copyable(&self, record: &VolumeRecord) -> Result<(), OpsError> {
        if !record.policy.read_only {
            if let Some(at) = self.mounts_of(record)?.into_iter().next() {
                return Err(OpsError::MountedWritable { volume: record.id.clone(), at });
            }
        }
        Ok(())
    }

    /// Snapshots volume `source` as `id` (named `name`): its base plus a copy of its change.
    /// A repeat with the same name and source answers the same snapshot.
    pub async fn create_snapshot(
        &self,
        source: &VolumeId,
        id: VolumeId,
        name: &str,
    ) -> Result<SnapshotRecord, OpsError> {
        let this = self.clone();
        let (source, name) = (source.clone(), name.to_string());
        // The source volume's own guard: it cannot be staged (and written) while copied.
        let key = source.to_string();
        self.owned(&key, "create snapshot", async move {
            blocking(move || {
                if let Some(existing) = this.store.snapshot(&id)? {
                    if existing.source_volume != source || existing.name != name {
                        return Err(OpsError::SnapshotNameTaken { name, volume: existing.source_volume });
                    }
                    return Ok(existing);
                }
                let record = this.existing(&source)?;
                this.check_copyable(&record)?;
                Ok(this.store.snapshot_volume(&record, id, &name)?)
            })
            .await
        })
        .await
    }

    /// Deletes a snapshot; `false` when it was already gone.
    pub async fn delete_snapshot(&self, id: &VolumeId) -> Result<bool, OpsError> {
        let this = self.clone();
        let sid = id.clone();
        self.owned(&format!("snapshot {id}"), "delete snapshot", async move {
            blocking(move || Ok(this.store.delete_snapshot(&sid)?)).await
        })
        .await
    }

    /// Every snapshot, by id.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, OpsError> {
        let this = self.clone();
        blocking(move || Ok(this.store.snapshots()?)).await
    }

    /// Refuses to clone a volume that is mounted writable with changes (see `check_copyable`).
    pub(super) fn check_clone_source(&self, source: &VolumeId) -> Result<(), OpsError> {
        let record = self.existing(source)?;
        self.check_copyable(&record)
    }

    /// Makes kept version `to` of `cache` its next version, under the cache's publish lock.
    pub async fn rollback(&self, cache: &CacheKey, to: u64) -> Result<RolledBack, OpsError> {
        let this = self.clone();
        let key = cache.clone();
        self.under_cache_lock(cache, move || Ok(this.store.rollback(&key, to)?)).await
    }

    /// The volumes an orchestrator made (not inline or command-line ones), by id, with where
    /// they are mounted and whether they are healthy.
    pub async fn listed_volumes(&self) -> Result<Vec<Listed>, OpsError> {
        let this = self.clone();
        blocking(move || {
            let mut out = Vec::new();
            for record in this.store.volumes()? {
                if record.request.as_ref().is_none_or(|r| r.ephemeral) {
                    continue;
                }
                let mounted_at = this.mounts_of(&record)?;
                let abnormal = record
                    .base
                    .layers
                    .iter()
                    .find(|l| !this.store.layer_present(l))
                    .map(|l| format!("layer {l} of cache {} is missing", record.base.from));
                out.push(Listed { record, mounted_at, abnormal });
            }
            out.sort_by(|a, b| a.record.id.cmp(&b.record.id));
            Ok(out)
        })
        .await
    }

    /// Bytes still free on the state filesystem, where uppers and layers grow.
    pub async fn available_bytes(&self) -> Result<u64, OpsError> {
        let root = self.store.layout().root().to_path_buf();
        blocking(move || {
            let fs = nix::sys::statvfs::statvfs(&root)
                .map_err(|e| OpsError::Store(crate::store::StoreError::io("statvfs", &root, e.into())))?;
            Ok(fs.blocks_available() as u64 * fs.fragment_size() as u64)
        })
        .await
    }
}
