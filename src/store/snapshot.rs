//! Snapshots (CSI CreateSnapshot) and rollback: content a cache had, kept by name.
//!
//! A snapshot records layers — a volume's base, plus a copy of its upper when it changed
//! something — and pins them until it is deleted. A volume restored from a snapshot, or a
//! clone of a volume, starts from such layers instead of HEAD; `cache rollback` makes a kept
//! version's layers the next version.

use serde::{Deserialize, Serialize};

use super::head::{now_unix, Head};
use super::history::Origin;
use super::layer::{LayerKind, LayerRecord};
use super::layout::{CacheKey, LayerId, VolumeId};
use super::{atomic, read_dir, tree, Store, StoreError, VolumeRecord};

/// `snapshots/<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The snapshot's id (validated like a volume id).
    pub id: VolumeId,
    /// The orchestrator's name for it; a repeat with the same name is the same snapshot.
    pub name: String,
    /// The volume it was taken of.
    pub source_volume: VolumeId,
    /// The cache that volume belongs to.
    pub cache: CacheKey,
    /// Its content, bottom to top.
    pub layers: Vec<LayerId>,
    /// The cache version the volume started from.
    pub base_version: u64,
    /// Bytes in its layers (by their records).
    pub bytes: u64,
    /// Seconds since the epoch.
    pub created_unix: u64,
}

/// A rollback's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolledBack {
    /// The new version, whose content is `to`'s.
    pub version: u64,
    /// The version brought back.
    pub to: u64,
    /// Its depth.
    pub depth: usize,
}

impl Store {
    /// A snapshot's record, if it exists.
    pub fn snapshot(&self, id: &VolumeId) -> Result<Option<SnapshotRecord>, StoreError> {
        atomic::read_json(&self.layout.snapshot_record(id))
    }

    /// Every snapshot, by id.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut out = Vec::new();
        for name in read_dir(&self.layout.snapshots_dir())? {
            let text = name.to_string_lossy();
            let Some(id) = text.strip_suffix(".json").and_then(|i| VolumeId::new(i).ok()) else { continue };
            if let Some(record) = self.snapshot(&id)? {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Layers snapshots pin: garbage collection keeps them.
    pub(crate) fn snapshot_layers(&self) -> Result<Vec<LayerId>, StoreError> {
        Ok(self.snapshots()?.into_iter().flat_map(|s| s.layers).collect())
    }

    /// Records a snapshot of `volume` (which must not be mounted writable: the caller checks).
    /// Its content is the volume's base plus, when the upper holds changes, a copy of the
    /// upper made into a layer of its own; the volume itself is untouched.
    pub fn snapshot_volume(
        &self,
        volume: &VolumeRecord,
        id: VolumeId,
        name: &str,
    ) -> Result<SnapshotRecord, StoreError> {
        let _pin = self.state_lock(false)?;
        let mut layers = volume.base.layers.clone();
        layers.extend(self.copy_upper_layer(volume)?);
        let bytes = self.layers_size(&layers)?.0;
        let record = SnapshotRecord {
            id,
            name: name.to_string(),
            source_volume: volume.id.clone(),
            cache: volume.cache.clone(),
            layers,
            base_version: volume.base.version,
            bytes,
            created_unix: now_unix(),
        };
        // The record names the layer only once it is durable; from then on it pins it.
        atomic::write_json(&self.layout.snapshot_record(&record.id), &record)?;
        Ok(record)
    }

    /// A durable copy of a volume's upper as a layer of its own, when it holds changes; the
    /// volume is untouched. The caller holds the state lock (shared) and keeps the layer
    /// named (a snapshot record, a volume's base) before releasing it.
    pub(crate) fn copy_upper_layer(&self, volume: &VolumeRecord) -> Result<Option<LayerId>, StoreError> {
        let upper = self.upper_of(volume);
        if upper.exists() && !tree::is_empty_dir(&upper)? {
            let layer = LayerId::generate();
            let incoming = self.layout.layers_dir().join(format!(".incoming-{layer}"));
            tree::remove_tree(&incoming)?;
            // Whiteouts and opaque markers are the change's deletions: they are part of it.
            let stats =
                tree::copy_tree(&upper, &incoming, tree::CopyOptions { keep_overlay_xattrs: true }, &mut |_| {})?;
            super::durable::sync_tree(&incoming)?;
            std::fs::rename(&incoming, self.layout.layer_dir(&layer))
                .map_err(|e| StoreError::io("rename snapshot layer", &incoming, e))?;
            let record = LayerRecord {
                id: layer.clone(),
                cache: volume.cache.clone(),
                kind: LayerKind::Snapshot,
                bytes: stats.bytes,
                files: stats.files,
                created_unix: now_unix(),
                from_volume: Some(volume.id.clone()),
                blob: None,
            };
            atomic::write_json(&self.layout.layer_record(&layer), &record)?;
            atomic::sync_dir(&self.layout.layers_dir())?;
            return Ok(Some(layer));
        }
        Ok(None)
    }

    /// Deletes a snapshot's record; its layers go at the next gc unless something else names
    /// them. `false` when there was none.
    pub fn delete_snapshot(&self, id: &VolumeId) -> Result<bool, StoreError> {
        let path = self.layout.snapshot_record(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                atomic::sync_dir(&self.layout.snapshots_dir())?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("remove", &path, e)),
        }
    }

    /// Makes kept version `to`'s content the cache's next version (the number only moves
    /// forward; the lifetime stays). The caller holds the cache's publish lock, so a job that
    /// started from the version being replaced finds its base stale when it publishes.
    pub fn rollback(&self, key: &CacheKey, to: u64) -> Result<RolledBack, StoreError> {
        let _pin = self.state_lock(false)?;
        let _heads = self.head_lock(key)?;
        let head = self.head(key)?.ok_or_else(|| StoreError::NoVersion(key.clone()))?;
        let kept = self.versions(key)?;
        let Some(target) = kept.iter().find(|v| v.version == to) else {
            return Err(StoreError::VersionNotKept {
                cache: key.clone(),
                version: to,
                kept: kept.iter().map(|v| v.version).collect(),
            });
        };
        if to == head.version {
            return Err(StoreError::AlreadyCurrent { cache: key.clone(), version: to });
        }
        for layer in &target.layers {
            if !self.layer_present(layer) {
                let path = self.layout.layer_dir(layer);
                return Err(StoreError::MissingLayer { cache: key.clone(), layer: layer.clone(), path });
            }
        }
        let next = Head {
            version: head.version + 1,
            layers: target.layers.clone(),
            updated_unix: now_unix(),
            lineage: head.lineage.clone(),
        };
        self.record_version(key, &next, Origin::Rollback { to }, self.keep_versions)?;
        atomic::write_json(&self.layout.head_path(key), &next)?;
        self.touch_used(key);
        Ok(RolledBack { version: next.version, to, depth: next.layers.len() })
    }
}
