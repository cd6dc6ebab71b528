//! Squash: flatten a deep stack into one layer, off the hot path. The version does not
//! change (the content is the same); HEAD's prefix is replaced only if it is still there.

use super::head::{now_unix, Head};
use super::layer::{LayerKind, LayerRecord};
use super::layout::{CacheKey, LayerId};
use super::tree::{self, CopyOptions, TreeStats};
use super::{atomic, StateLock, Store, StoreError};
use crate::failpoint;
use crate::mount::{Mounter, OverlaySpec};

/// Default depth past which a cache is squashed.
pub const DEFAULT_MAX_DEPTH: usize = 8;

/// A flat layer built from a prefix of HEAD, waiting to replace it.
#[derive(Debug)]
pub struct Squashed {
    /// The cache.
    pub cache: CacheKey,
    /// The new flat layer.
    pub layer: LayerId,
    /// The layers it replaces, bottom to top.
    pub prefix: Vec<LayerId>,
    /// What the flat layer holds.
    pub stats: TreeStats,
    // Held until HEAD names the layer, so gc cannot take it first.
    _pin: StateLock,
}

/// How a squash ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum SquashOutcome {
    /// HEAD is now `depth` layers deep.
    Squashed { version: u64, replaced: usize, depth: usize },
    /// The stack was not deeper than the limit.
    Shallow { depth: usize },
    /// HEAD lost the squashed prefix meanwhile (replaced or evicted); the layer was dropped.
    Lost,
}

impl Store {
    /// Builds a flat copy of HEAD's layers if HEAD is deeper than `max_depth`.
    /// Takes time proportional to the cache's size; holds no publish lock while it works.
    pub fn squash_build(
        &self,
        key: &CacheKey,
        max_depth: usize,
        mounter: &dyn Mounter,
        progress: &mut dyn FnMut(&TreeStats),
    ) -> Result<Result<Squashed, SquashOutcome>, StoreError> {
        let pin = self.state_lock(false)?;
        let Some(head) = self.head(key)? else { return Ok(Err(SquashOutcome::Lost)) };
        if head.layers.len() <= max_depth.max(1) {
            return Ok(Err(SquashOutcome::Shallow { depth: head.layers.len() }));
        }
        let layer = LayerId::generate();
        let scratch = self.layout.tmp_dir().join(format!("squash-{layer}"));
        let view = scratch.join("view");
        // Built beside the layers (a shared filesystem, maybe) so it can be renamed into place;
        // gc sweeps such dot-names only under its exclusive lock, which our shared pin excludes.
        let flat = self.layout.layers_dir().join(format!(".squash-{layer}"));
        atomic::create_dir_durable(&view)?;
        let spec = OverlaySpec {
            readonly: false,
            lower: head.layers.iter().rev().map(|l| self.layout.layer_dir(l)).collect(),
            upper: None,
        };
        let mount_err = |source| StoreError::SquashMount { cache: key.clone(), source };
        mounter.overlay(&spec, &view).map_err(mount_err)?;
        // Overlay hides whiteouts and opaque markers in its merged view: the copy is flat.
        let copied = tree::copy_tree(&view, &flat, CopyOptions { keep_overlay_xattrs: false }, progress);
        let unmounted = mounter.unmount(&view).map_err(mount_err);
        let stats = match (copied, unmounted) {
            (Ok(stats), Ok(_)) => stats,
            (copied, unmounted) => {
                // Give the space back now (a full disk is the usual cause), not at the next gc;
                // with the view still mounted, leave the scratch for gc, which unmounts first.
                let _ = tree::remove_tree(&flat);
                if unmounted.is_ok() {
                    let _ = tree::remove_tree(&scratch);
                }
                return Err(copied
                    .err()
                    .map(StoreError::from)
                    .or(unmounted.err())
                    .unwrap_or_else(|| StoreError::io("squash", &scratch, std::io::Error::other("copy failed"))));
            }
        };
        failpoint::hit("squash.after-copy");
        let dest = self.layout.layer_dir(&layer);
        std::fs::rename(&flat, &dest).map_err(|e| StoreError::io("rename squashed layer", &flat, e))?;
        let record = LayerRecord {
            id: layer.clone(),
            cache: key.clone(),
            kind: LayerKind::Squash,
            bytes: stats.bytes,
            files: stats.files,
            created_unix: now_unix(),
            from_volume: None,
        };
        atomic::write_json(&self.layout.layer_record(&layer), &record)?;
        atomic::sync_dir(&self.layout.layers_dir())?;
        tree::remove_tree(&scratch)?;
        failpoint::hit("squash.after-layer");
        Ok(Ok(Squashed { cache: key.clone(), layer, prefix: head.layers, stats, _pin: pin }))
    }

    /// Replaces the squashed prefix of HEAD with the flat layer if HEAD still starts with it.
    /// The caller must hold the cache's publish lock.
    pub fn squash_finish(&self, squashed: Squashed) -> Result<SquashOutcome, StoreError> {
        let key = &squashed.cache;
        let current = self.head(key)?;
        let Some(current) = current.filter(|h| h.layers.starts_with(&squashed.prefix)) else {
            self.remove_layer(&squashed.layer)?;
            return Ok(SquashOutcome::Lost);
        };
        let mut layers = vec![squashed.layer.clone()];
        layers.extend_from_slice(&current.layers[squashed.prefix.len()..]);
        let head = Head { version: current.version, layers, updated_unix: now_unix() };
        failpoint::hit("squash.before-head");
        atomic::write_json(&self.layout.head_path(key), &head)?;
        Ok(SquashOutcome::Squashed { version: head.version, replaced: squashed.prefix.len(), depth: head.layers.len() })
    }
}
