//! Squash: make a deep stack shallow again, off the hot path. The version does not change
//! (the content is the same); HEAD's layers are replaced only if they are still there.
//!
//! Which layers a squash rewrites, LSM-like: a layer is *big* when it holds more bytes than all
//! the layers above it together. The layers above the deepest big layer are merged into one
//! ([`super::merge`]: overlay form, hard links, time proportional to the entries merged), and
//! the layers below it stay as they are. A cache seeded once and then changed a little by
//! every job keeps its big bottom layer and gets one merged layer of changes on top of it.
//! The whole stack is flattened through a read-only view instead (time proportional to the
//! cache's bytes) when no merge brings the stack within the limit (no big layer with at least
//! two layers above it low enough) or when the layers above the bottom one hide more than
//! [`FLATTEN_HIDDEN_SHARE`] of its bytes: a flatten gives those bytes back.

use super::head::{now_unix, Head};
use super::layer::{LayerKind, LayerRecord};
use super::layout::{CacheKey, ImageTag, LayerId};
use super::merge;
use super::tree::{self, CopyOptions, TreeStats};
use super::{atomic, StateLock, Store, StoreError};
use std::path::PathBuf;

use crate::failpoint;

/// Default depth past which a cache is squashed.
pub const DEFAULT_MAX_DEPTH: usize = 8;

/// The share of the bottom layer's bytes (numerator, denominator) the layers above may hide
/// before a squash flattens the whole stack to give them back.
pub const FLATTEN_HIDDEN_SHARE: (u64, u64) = (1, 4);

/// How a squash chooses what to rewrite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SquashMode {
    /// Merge the layers above the deepest big layer; flatten only when needed (see the module).
    #[default]
    Auto,
    /// Flatten the whole stack into one layer, whatever it holds.
    Flatten,
}

/// A layer built from a run of HEAD's layers, waiting to replace it.
#[derive(Debug)]
pub struct Squashed {
    /// The cache.
    pub cache: CacheKey,
    /// The new layer.
    pub layer: LayerId,
    /// The layers it replaces, bottom to top.
    pub run: Vec<LayerId>,
    /// Where the run starts in HEAD's layers (0 for a flatten).
    pub at: usize,
    /// What the new layer holds.
    pub stats: TreeStats,
    // Held until HEAD names the layer, so gc cannot take it first.
    _pin: StateLock,
}

/// How a squash ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum SquashOutcome {
    /// `replaced` layers became one; HEAD is now `depth` layers deep.
    Squashed { version: u64, replaced: usize, depth: usize },
    /// The stack was not deeper than the limit.
    Shallow { depth: usize },
    /// HEAD lost the squashed layers meanwhile (replaced or evicted); the layer was dropped.
    Lost,
}

/// The read-only overlay view of the whole stack a flatten copies, which the caller mounts.
#[derive(Debug, Clone)]
pub struct View {
    /// Lower directories, top first.
    pub lower: Vec<PathBuf>,
    /// The mount point.
    pub path: PathBuf,
}

/// A squash under way: the run of HEAD's layers it replaces and how the new layer is built.
#[derive(Debug)]
pub struct SquashPlan {
    /// The cache.
    pub cache: CacheKey,
    /// The id the new layer will get.
    pub layer: LayerId,
    /// The layers to replace, bottom to top.
    pub run: Vec<LayerId>,
    /// Where the run starts in HEAD's layers.
    pub at: usize,
    /// For a flatten, the view to mount before [`Store::squash_copy`]; None for a merge, which
    /// reads the layer directories themselves.
    pub view: Option<View>,
    sources: Vec<PathBuf>,
    scratch: PathBuf,
    flat: PathBuf,
    // The cache's image, where `flat` is built and the layer will live.
    image: Option<ImageTag>,
    // Held until HEAD names the layer, so gc cannot take it first.
    pin: StateLock,
}

/// Where the run to merge starts: above the deepest big layer (more bytes than all the layers
/// above it together), if that leaves at least two layers to merge and a stack within
/// `max_depth`; None when only a flatten will do.
pub fn merge_start(bytes: &[u64], max_depth: usize) -> Option<usize> {
    let mut above: u64 = bytes.iter().sum();
    for (i, &b) in bytes.iter().enumerate() {
        above -= b;
        if b > above {
            let at = i + 1;
            return (bytes.len() >= at + 2 && at < max_depth).then_some(at);
        }
    }
    None
}

impl Store {
    /// Plans a squash of HEAD's layers if HEAD is deeper than `max_depth`: chooses the run to
    /// replace, pins the layers, and for a flatten makes the scratch directory with an empty
    /// mount point for the view.
    pub fn squash_plan(
        &self,
        key: &CacheKey,
        max_depth: usize,
        mode: SquashMode,
    ) -> Result<Result<SquashPlan, SquashOutcome>, StoreError> {
        let pin = self.state_lock(false)?;
        let Some(head) = self.head(key)? else { return Ok(Err(SquashOutcome::Lost)) };
        if head.layers.len() <= max_depth.max(1) {
            return Ok(Err(SquashOutcome::Shallow { depth: head.layers.len() }));
        }
        let layer = LayerId::generate();
        let scratch = self.layout.tmp_dir().join(format!("squash-{layer}"));
        // Built beside the layers (a shared filesystem, maybe) so it can be renamed into place
        // and hard-link theirs; gc sweeps such dot-names only under its exclusive lock, which
        // our shared pin excludes. A cache with a size builds inside its image: the squashed
        // bytes count against that size like every other layer of the cache.
        // On a shared store layers live there for every node, whatever the image holds.
        let image = if self.layout.is_shared() { None } else { self.image(key)?.map(|r| r.tag) };
        let flat = match &image {
            Some(tag) => {
                self.check_image_mounted(tag)?;
                self.layout.image_layers_dir(tag).join(format!(".squash-{layer}"))
            }
            None => self.layout.layers_dir().join(format!(".squash-{layer}")),
        };
        // The real trees: the merge opens directories without following links.
        let dirs: Vec<PathBuf> = head.layers.iter().map(|l| self.layer_tree(l)).collect();
        if let Some(at) = self.merge_run(&head.layers, &dirs, max_depth, mode)? {
            // Hard links cannot cross filesystems: a run from elsewhere (a fallback's layers in
            // another image, layers from before the cache had a size) is flattened instead.
            if head.layers[at..].iter().all(|l| self.layer_image(l) == image) {
                let (run, sources) = (head.layers[at..].to_vec(), dirs[at..].to_vec());
                return Ok(Ok(SquashPlan {
                    cache: key.clone(),
                    layer,
                    run,
                    at,
                    view: None,
                    sources,
                    scratch,
                    flat,
                    image,
                    pin,
                }));
            }
        }
        let view = View { lower: dirs.into_iter().rev().collect(), path: scratch.join("view") };
        atomic::create_dir_durable(&view.path)?;
        Ok(Ok(SquashPlan {
            cache: key.clone(),
            layer,
            run: head.layers,
            at: 0,
            view: Some(view),
            sources: Vec::new(),
            scratch,
            flat,
            image,
            pin,
        }))
    }

    /// Where the run to merge starts in `layers`, or None to flatten them all.
    fn merge_run(
        &self,
        layers: &[LayerId],
        dirs: &[PathBuf],
        max_depth: usize,
        mode: SquashMode,
    ) -> Result<Option<usize>, StoreError> {
        if mode == SquashMode::Flatten {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(layers.len());
        for layer in layers {
            bytes.push(self.layer(layer)?.map_or(0, |r| r.bytes));
        }
        let Some(at) = merge_start(&bytes, max_depth) else { return Ok(None) };
        // Measured over every layer above the bottom one: those below the run hide bytes too.
        let hidden = merge::hidden_bytes(&dirs[0], &dirs[1..])?;
        let (num, den) = FLATTEN_HIDDEN_SHARE;
        Ok((hidden.saturating_mul(den) <= bytes[0].saturating_mul(num)).then_some(at))
    }

    /// Builds the new layer: merges the run's layer directories, or for a flatten copies the
    /// view the caller mounted. Holds no publish lock while it works. On failure the partial
    /// layer is removed.
    pub fn squash_copy(
        &self,
        plan: &SquashPlan,
        progress: &mut dyn FnMut(&TreeStats),
    ) -> Result<TreeStats, StoreError> {
        let built = match &plan.view {
            None => merge::merge_layers(&plan.sources, &plan.flat, progress),
            // Overlay hides whiteouts and opaque markers in its merged view: the copy is flat.
            Some(view) => tree::copy_tree(&view.path, &plan.flat, CopyOptions { keep_overlay_xattrs: false }, progress),
        };
        match built {
            Ok(stats) => Ok(stats),
            Err(e) => {
                // Give the space back now (a full disk is the usual cause), not at the next gc.
                let _ = tree::remove_tree(&plan.flat);
                Err(e.into())
            }
        }
    }

    /// Drops a squash whose build or view failed; the scratch stays for gc while the view may
    /// still be mounted.
    pub fn squash_abandon(&self, plan: SquashPlan, view_unmounted: bool) {
        let _ = tree::remove_tree(&plan.flat);
        if view_unmounted {
            let _ = tree::remove_tree(&plan.scratch);
        }
    }

    /// Makes the built (and, for a flatten, unmounted) layer a layer: renamed into place and
    /// recorded.
    pub fn squash_record(&self, plan: SquashPlan, stats: TreeStats) -> Result<Squashed, StoreError> {
        failpoint::hit("squash.after-copy");
        // The copy went through the page cache (a merge's links and directories too): put its
        // data and inodes on disk before a name in layers/ (and then HEAD, which lets gc take
        // the layers it replaces) can point at it. One syncfs covers the whole tree, however
        // many files it holds.
        atomic::sync_filesystem(&plan.flat)?;
        let dest = match &plan.image {
            Some(tag) => self.layout.image_layer_dir(tag, &plan.layer),
            None => self.layout.layer_dir(&plan.layer),
        };
        std::fs::rename(&plan.flat, &dest).map_err(|e| StoreError::io("rename squashed layer", &plan.flat, e))?;
        if let Some(tag) = &plan.image {
            atomic::sync_dir(&self.layout.image_layers_dir(tag))?;
            self.link_layer(tag, &plan.layer)?;
        }
        let record = LayerRecord {
            id: plan.layer.clone(),
            cache: plan.cache.clone(),
            kind: LayerKind::Squash,
            bytes: stats.bytes,
            files: stats.files,
            created_unix: now_unix(),
            from_volume: None,
            blob: None,
        };
        atomic::write_json(&self.layout.layer_record(&plan.layer), &record)?;
        atomic::sync_dir(&self.layout.layers_dir())?;
        tree::remove_tree(&plan.scratch)?;
        failpoint::hit("squash.after-layer");
        Ok(Squashed { cache: plan.cache, layer: plan.layer, run: plan.run, at: plan.at, stats, _pin: plan.pin })
    }

    /// Replaces the squashed run of HEAD with the new layer if HEAD still holds that run at the
    /// same position. The caller must hold the cache's publish lock.
    pub fn squash_finish(&self, squashed: Squashed) -> Result<SquashOutcome, StoreError> {
        let key = &squashed.cache;
        let (at, end) = (squashed.at, squashed.at + squashed.run.len());
        // A version pulled from a registry may replace HEAD without the publish lock.
        let _heads = self.head_lock(key)?;
        let current = self.head(key)?;
        let Some(current) = current.filter(|h| h.layers.get(at..end) == Some(&squashed.run[..])) else {
            self.remove_layer(&squashed.layer)?;
            return Ok(SquashOutcome::Lost);
        };
        let mut layers = current.layers[..at].to_vec();
        layers.push(squashed.layer.clone());
        layers.extend_from_slice(&current.layers[end..]);
        let head = Head { version: current.version, layers, updated_unix: now_unix(), lineage: current.lineage };
        // The kept versions that hold the run hold the new layer before HEAD does, so gc never
        // sees the old run unnamed while a version still needs it.
        self.squash_history(key, at, &squashed.run, &squashed.layer)?;
        failpoint::hit("squash.before-head");
        atomic::write_json(&self.layout.head_path(key), &head)?;
        failpoint::hit("squash.after-head");
        Ok(SquashOutcome::Squashed { version: head.version, replaced: squashed.run.len(), depth: head.layers.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::merge_start;

    #[test]
    fn the_run_starts_above_the_deepest_big_layer() {
        let mib = 1 << 20;
        let cases: &[(&[u64], usize, Option<usize>)] = &[
            // A big seed and eight small commits: merge the commits.
            (&[500 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib], 8, Some(1)),
            // The seed is outgrown by an earlier merge: that one is the deepest big layer.
            (&[100 * mib, 300 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib, 5 * mib], 8, Some(2)),
            // Equal layers: only the top is big, and nothing is above it: flatten.
            (&[1, 1, 1], 2, None),
            // The merged stack would still be too deep.
            (&[500 * mib, 5 * mib, 5 * mib], 1, None),
            // Only one layer above the deepest big one: a merge would change nothing.
            (&[1, 2, 3, 100, 1], 2, None),
            (&[0, 0, 0], 1, None),
            (&[], 8, None),
        ];
        for (bytes, max_depth, want) in cases {
            assert_eq!(merge_start(bytes, *max_depth), *want, "{bytes:?} within {max_depth}");
        }
    }
}
