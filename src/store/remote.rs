//! What the store keeps for a registry: the blob each layer was pushed or pulled as, which
//! layers of a remote version this node lacks, and taking a pulled version as HEAD.

use std::path::PathBuf;

use super::head::{now_unix, Head};
use super::history::Origin;
use super::layer::{LayerKind, LayerRecord};
use super::layout::{CacheKey, LayerId};
use super::{atomic, Store, StoreError};
use crate::registry::{Blob, RemoteLayer, RemoteVersion};

/// A layer unpacked into scratch space, waiting to be named by a HEAD.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The layer's id.
    pub id: LayerId,
    /// Where it was unpacked (in `tmp/`).
    pub dir: PathBuf,
    /// Its blob.
    pub blob: Blob,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries.
    pub files: u64,
}

/// What taking a remote version did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adopted {
    /// HEAD is now the remote version.
    Head(u64),
    /// This node's HEAD is as new or newer (same lineage): left as it is.
    Kept(u64),
}

impl Store {
    /// Records the blob a layer was pushed as.
    pub fn set_layer_blob(&self, id: &LayerId, blob: &Blob) -> Result<(), StoreError> {
        let path = self.layout.layer_record(id);
        let Some(mut record) = self.layer(id)? else {
            return Err(StoreError::io("read", path, std::io::ErrorKind::NotFound.into()));
        };
        if record.blob.as_ref() == Some(blob) {
            return Ok(());
        }
        record.blob = Some(blob.clone());
        atomic::write_json(&path, &record)
    }

    /// A new scratch path in `tmp/` (same filesystem as `layers/`, so a rename publishes it).
    pub fn scratch_path(&self, what: &str) -> PathBuf {
        self.layout.tmp_dir().join(format!("{what}-{}", LayerId::generate()))
    }

    /// The layers of `remote` this node does not hold. A local layer stands in for a remote one
    /// only when it was pushed or pulled as the same blob: an id alone proves nothing.
    pub fn missing_layers(&self, key: &CacheKey, remote: &RemoteVersion) -> Result<Vec<RemoteLayer>, StoreError> {
        let mut missing = Vec::new();
        for layer in &remote.layers {
            match self.layer(&layer.id)? {
                Some(record) if self.layout.layer_dir(&layer.id).exists() => match &record.blob {
                    Some(blob) if blob.digest == layer.blob.digest => {}
                    other => {
                        return Err(StoreError::LayerMismatch {
                            cache: key.clone(),
                            layer: layer.id.clone(),
                            remote: layer.blob.digest.clone(),
                            local: other.as_ref().map_or_else(|| "not from a registry".into(), |b| b.digest.clone()),
                        })
                    }
                },
                _ => missing.push(layer.clone()),
            }
        }
        Ok(missing)
    }

    /// Moves the staged layers into `layers/` and makes `remote` this node's HEAD unless the
    /// node's own is as new (same lineage, same or higher version). Another lifetime's version
    /// always wins: the registry is where lifetimes begin and end. The caller holds the state
    /// lock shared since before it staged (gc sweeps `tmp/`).
    pub fn adopt_remote(
        &self,
        key: &CacheKey,
        remote: &RemoteVersion,
        manifest: &str,
        staged: Vec<Staged>,
    ) -> Result<Adopted, StoreError> {
        let _pin = self.state_lock(false)?;
        // Durable before anything names them (a crash leaves scratch), and before the head lock,
        // which a commit's HEAD write waits for.
        for layer in &staged {
            crate::store::durable::sync_tree(&layer.dir)?;
        }
        let _heads = self.head_lock(key)?;
        if let Some(head) = self.head(key)? {
            if head.lineage == remote.lineage && head.version >= remote.version {
                // Nothing would name them: scratch goes, not orphan layers for gc.
                for layer in &staged {
                    let _ = super::tree::remove_tree(&layer.dir);
                }
                return Ok(Adopted::Kept(head.version));
            }
        }
        for layer in staged {
            let target = self.layout.layer_dir(&layer.id);
            if target.exists() {
                // Another pull of the same version got there first; missing_layers vouched for it.
                let _ = super::tree::remove_tree(&layer.dir);
                continue;
            }
            let record = LayerRecord {
                id: layer.id.clone(),
                cache: key.clone(),
                kind: LayerKind::Pull,
                bytes: layer.bytes,
                files: layer.files,
                created_unix: now_unix(),
                from_volume: None,
                blob: Some(layer.blob.clone()),
            };
            atomic::write_json(&self.layout.layer_record(&layer.id), &record)?;
            std::fs::rename(&layer.dir, &target).map_err(|e| StoreError::io("rename", &layer.dir, e))?;
        }
        atomic::sync_dir(&self.layout.layers_dir())?;
        for layer in &remote.layers {
            if !self.layout.layer_dir(&layer.id).exists() {
                let path = self.layout.layer_dir(&layer.id);
                return Err(StoreError::MissingLayer { cache: key.clone(), layer: layer.id.clone(), path });
            }
        }
        let head = Head {
            version: remote.version,
            layers: remote.layers.iter().map(|l| l.id.clone()).collect(),
            updated_unix: now_unix(),
            lineage: remote.lineage.clone(),
        };
        self.record_version(key, &head, Origin::Pull { manifest: manifest.to_string() }, self.keep_versions)?;
        atomic::write_json(&self.layout.head_path(key), &head)?;
        Ok(Adopted::Head(head.version))
    }
}
