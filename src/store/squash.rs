//! Squash: flatten a deep stack into one layer, off the hot path. The version does not
//! change (the content is the same); HEAD's prefix is replaced only if it is still there.

use super::head::{now_unix, Head};
use super::layer::{LayerKind, LayerRecord};
use super::layout::{CacheKey, LayerId};
use super::tree::{self, CopyOptions, TreeStats};
use super::{atomic, StateLock, Store, StoreError};
use std::path::PathBuf;

use crate::failpoint;

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

/// A squash under way: HEAD's layers to flatten through a read-only view that the caller
/// mounts (the store never mounts), and where the flat copy goes.
#[derive(Debug)]
pub struct SquashPlan {
    /// The cache.
    pub cache: CacheKey,
    /// The id the flat layer will get.
    pub layer: LayerId,
    /// The layers to flatten, bottom to top.
    pub prefix: Vec<LayerId>,
    /// Lower directories of the view, top first.
    pub lower: Vec<PathBuf>,
    /// Where the caller mounts the read-only view of the stack.
    pub view: PathBuf,
    scratch: PathBuf,
    flat: PathBuf,
    // Held until HEAD names the layer, so gc cannot take it first.
    pin: StateLock,
}

impl Store {
    /// Plans a squash of HEAD's layers if HEAD is deeper than `max_depth`: pins them and makes
    /// the scratch directory with an empty mount point for the view.
    pub fn squash_plan(
        &self,
        key: &CacheKey,
        max_depth: usize,
    ) -> Result<Result<SquashPlan, SquashOutcome>, StoreError> {
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
        let lower = head.layers.iter().rev().map(|l| self.layout.layer_dir(l)).collect();
        Ok(Ok(SquashPlan { cache: key.clone(), layer, prefix: head.layers, lower, view, scratch, flat, pin }))
    }

    /// Copies the mounted view into the flat layer. Takes time proportional to the cache's
    /// size; holds no publish lock while it works. On failure the partial copy is removed.
    pub fn squash_copy(
        &self,
        plan: &SquashPlan,
        progress: &mut dyn FnMut(&TreeStats),
    ) -> Result<TreeStats, StoreError> {
        // Overlay hides whiteouts and opaque markers in its merged view: the copy is flat.
        match tree::copy_tree(&plan.view, &plan.flat, CopyOptions { keep_overlay_xattrs: false }, progress) {
            Ok(stats) => Ok(stats),
            Err(e) => {
                // Give the space back now (a full disk is the usual cause), not at the next gc.
                let _ = tree::remove_tree(&plan.flat);
                Err(e.into())
            }
        }
    }

    /// Drops a squash whose copy or view failed; the scratch stays for gc while the view may
    /// still be mounted.
    pub fn squash_abandon(&self, plan: SquashPlan, view_unmounted: bool) {
        let _ = tree::remove_tree(&plan.flat);
        if view_unmounted {
            let _ = tree::remove_tree(&plan.scratch);
        }
    }

    /// Makes the copied (and unmounted) flat layer a layer: renamed into place and recorded.
    pub fn squash_record(&self, plan: SquashPlan, stats: TreeStats) -> Result<Squashed, StoreError> {
        failpoint::hit("squash.after-copy");
        // The copy went through the page cache: put its data and inodes on disk before a name
        // in layers/ (and then HEAD, which lets gc take the layers it replaces) can point at it.
        // One syncfs covers the whole tree, however many files it holds.
        atomic::sync_filesystem(&plan.flat)?;
        let dest = self.layout.layer_dir(&plan.layer);
        std::fs::rename(&plan.flat, &dest).map_err(|e| StoreError::io("rename squashed layer", &plan.flat, e))?;
        let record = LayerRecord {
            id: plan.layer.clone(),
            cache: plan.cache.clone(),
            kind: LayerKind::Squash,
            bytes: stats.bytes,
            files: stats.files,
            created_unix: now_unix(),
            from_volume: None,
        };
        atomic::write_json(&self.layout.layer_record(&plan.layer), &record)?;
        atomic::sync_dir(&self.layout.layers_dir())?;
        tree::remove_tree(&plan.scratch)?;
        failpoint::hit("squash.after-layer");
        Ok(Squashed { cache: plan.cache, layer: plan.layer, prefix: plan.prefix, stats, _pin: plan.pin })
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
        let head = Head { version: current.version, layers, updated_unix: now_unix(), lineage: current.lineage };
        // The kept versions that share the prefix share the flat layer before HEAD does, so gc
        // never sees the old prefix unnamed while a version still needs it.
        self.squash_history(key, &squashed.prefix, &squashed.layer)?;
        failpoint::hit("squash.before-head");
        atomic::write_json(&self.layout.head_path(key), &head)?;
        failpoint::hit("squash.after-head");
        Ok(SquashOutcome::Squashed { version: head.version, replaced: squashed.prefix.len(), depth: head.layers.len() })
    }
}
