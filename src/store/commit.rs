//! The commit protocol's store phases: promote a released upper to a layer, then (under
//! the caller's publish lock) advance HEAD if it still points at the volume's base.

use std::io;

use serde::Serialize;

use super::head::{now_unix, Head};
use super::layer::{LayerKind, LayerRecord};
use super::layout::{CacheKey, LayerId, VolumeId};
use super::tree::{self, TreeStats};
use super::volume::{Decision, OnStale, VolumeRecord};
use super::{atomic, durable, Store, StoreError};
use crate::failpoint;

/// Why a released volume publishes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum NotPublished {
    /// The volume's policy or the caller forbids publishing.
    NotAllowed,
    /// `publishWhen=on-success`, and a pod that used the volume did not succeed (or its
    /// outcome could not be read).
    JobFailed,
    /// The job changed nothing.
    Unchanged,
    /// The delta is bigger than the volume's `maxBytes`.
    TooBig { bytes: u64, max_bytes: u64 },
    /// The publish lock stayed busy past the publish deadline; the delta was dropped.
    DeadlinePassed { after_secs: u64 },
    /// The state dir's filesystem is full; the delta was dropped to give the space back.
    NoSpace,
    /// The cache's image was (nearly) full when the volume was released: the job ran into the
    /// cache's size, and what it wrote may be cut short.
    CacheFull { size_bytes: u64 },
    /// The node went down while the volume was mounted: its upper (mounted `volatile`) may
    /// hold writes cut short.
    NodeRestarted,
    /// The publish lock could not be used at all (RBAC, a missing namespace) until the
    /// publish deadline; the delta was dropped.
    LockUnusable { message: String },
    /// The registry could not take the version (down, refusing, too slow) until the publish
    /// deadline; the delta was dropped.
    RegistryFailed { message: String },
}

/// An upper directory that became a layer and waits for HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The new layer.
    pub layer: LayerId,
    /// What it holds.
    pub stats: TreeStats,
}

/// The outcome of the promote phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// A layer is ready for HEAD.
    Publish(Promoted),
    /// Nothing to publish, and why.
    Nothing(NotPublished),
    /// A decision an earlier attempt recorded and did not finish; [`Store::settle`] finishes it.
    Decided(Decision),
}

/// What the HEAD phase will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHead {
    /// Nothing to write: already done (a retry), or stale.
    Decided(Advanced),
    /// Write this HEAD.
    Write(Head),
}

/// The outcome of the HEAD phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Advanced {
    /// HEAD now points at `version`, `depth` layers deep.
    Committed { version: u64, depth: usize },
    /// HEAD moved while the volume was in use (or the cache was removed and began a new
    /// lifetime: `other_lifetime`); the delta was dropped.
    Stale { base: u64, current: u64, other_lifetime: bool },
}

impl Store {
    /// Turns a released (unmounted) volume's upper into a layer without copying it.
    /// `allow` is the caller's veto (a failed job); resumes a promote a crash interrupted.
    pub fn promote(&self, id: &VolumeId, allow: bool) -> Result<Prepared, StoreError> {
        let mut record = self.volume(id)?.ok_or_else(|| StoreError::VolumeNotFound(id.clone()))?;
        if let Some(decision) = &record.decision {
            return Ok(Prepared::Decided(decision.clone()));
        }
        let upper = self.upper_of(&record);
        if let Some(layer) = &record.pending {
            if let Some(done) = self.layer(layer)? {
                return Ok(Prepared::Publish(Promoted {
                    layer: layer.clone(),
                    stats: TreeStats { bytes: done.bytes, files: done.files },
                }));
            }
            let dest = self.layout.layer_dir(layer);
            if let Some(tag) = record.image.as_ref().filter(|_| !dest.is_dir() && !self.layout.is_shared()) {
                // A crash between the rename inside the image and the link naming it.
                if self.layout.image_layer_dir(tag, layer).is_dir() {
                    self.link_layer(tag, layer)?;
                }
            }
            if dest.is_dir() {
                // A crash between the rename and the layer record: finish the record.
                let stats = tree::measure(&self.layer_tree(layer))?;
                return self.record_layer(&record, layer.clone(), stats);
            }
            if !upper.exists() {
                // Neither the upper nor its layer: the layer was dropped by a decision that a full
                // disk kept from being recorded, the only way a pending layer goes without one.
                return Ok(Prepared::Nothing(NotPublished::NoSpace));
            }
        }
        if !(record.policy.publish && allow) {
            return Ok(Prepared::Nothing(NotPublished::NotAllowed));
        }
        if self.upper_torn(&record) {
            return Ok(Prepared::Nothing(NotPublished::NodeRestarted));
        }
        if let Some(tag) = &record.image {
            // A job that ran into the size may have files cut short: never publish those.
            let used = self.image_use(tag)?;
            if used.is_full() {
                return Ok(Prepared::Nothing(NotPublished::CacheFull { size_bytes: used.size_bytes }));
            }
        }
        // A volume restored from a snapshot or cloned publishes its content even unchanged:
        // that content is what the cache is meant to become (a rollback over CSI).
        if tree::is_empty_dir(&upper)? && record.base.content.is_none() {
            return Ok(Prepared::Nothing(NotPublished::Unchanged));
        }
        let stats = tree::measure(&upper)?;
        if let Some(max_bytes) = record.policy.max_bytes {
            if stats.bytes > max_bytes {
                return Ok(Prepared::Nothing(NotPublished::TooBig { bytes: stats.bytes, max_bytes }));
            }
        }
        // Only this delta, not the filesystem: other jobs' dirty pages are not this commit's to pay.
        durable::sync_tree(&upper)?;

        let _pin = self.state_lock(false)?;
        match self.promote_pinned(&mut record, &upper, stats) {
            // A job that filled the disk must still be able to go: drop its change (a cache never
            // fails a job), and the caller drops the volume, which gives the space back.
            Err(e) if e.is_no_space() => {
                if let Some(layer) = &record.pending {
                    // Recorded first when there is room for it; when there is not, a resume
                    // recognises the missing layer and upper (see above).
                    let why = NotPublished::NoSpace;
                    if let Err(e) = self.decide(id, Decision::Abandoned { why }) {
                        tracing::warn!(error = %e, "could not record dropping the change on a full disk");
                    }
                    self.remove_layer(layer)?;
                }
                Ok(Prepared::Nothing(NotPublished::NoSpace))
            }
            other => other,
        }
    }

    fn promote_pinned(
        &self,
        record: &mut VolumeRecord,
        upper: &std::path::Path,
        stats: TreeStats,
    ) -> Result<Prepared, StoreError> {
        let id = record.id.clone();
        let upper = upper.to_path_buf();
        let layer = match &record.pending {
            Some(layer) => layer.clone(),
            None => {
                let layer = LayerId::generate();
                record.pending = Some(layer.clone());
                // Pin the id before the rename so gc never sees the new layer unreferenced.
                atomic::write_json(&self.layout.volume_record(&id), &*record)?;
                self.write_pin(record)?;
                layer
            }
        };
        failpoint::hit("commit.after-pending");
        let dest = self.layout.layer_dir(&layer);
        if self.layout.is_shared() {
            // Every node reads layers from the shared store, never from this node's image: the
            // image bounds what the job writes, the shared store keeps what it published.
            self.copy_to_shared(&upper, &layer)?;
        } else if let Some(tag) = &record.image {
            // Inside the cache's image: still a rename, then a link in layers/ names the layer.
            self.check_image_mounted(tag)?;
            let real = self.layout.image_layer_dir(tag, &layer);
            std::fs::rename(&upper, &real).map_err(|e| StoreError::io("rename upper to layer", &upper, e))?;
            atomic::sync_dir(&self.layout.image_layers_dir(tag))?;
            atomic::sync_dir(&self.layout.volume_data_dir(&id, Some(tag)))?;
            self.link_layer(tag, &layer)?;
        } else {
            std::fs::rename(&upper, &dest).map_err(|e| StoreError::io("rename upper to layer", &upper, e))?;
        }
        failpoint::hit("commit.after-rename");
        self.record_layer(record, layer, stats)
    }

    /// A shared store is another filesystem: copy the upper (O(delta)) under a scratch name that
    /// gc sweeps, make it durable there, then rename it into place.
    fn copy_to_shared(&self, upper: &std::path::Path, layer: &LayerId) -> Result<(), StoreError> {
        let incoming = self.layout.layers_dir().join(format!(".incoming-{layer}"));
        tree::remove_tree(&incoming)?;
        // Whiteouts and opaque markers are the delta's deletions: they must travel with it.
        tree::copy_tree(upper, &incoming, tree::CopyOptions { keep_overlay_xattrs: true }, &mut |_| {})?;
        durable::sync_tree(&incoming)?;
        let dest = self.layout.layer_dir(layer);
        std::fs::rename(&incoming, &dest).map_err(|e| StoreError::io("rename incoming layer", &incoming, e))?;
        atomic::sync_dir(&self.layout.layers_dir())
    }

    fn record_layer(&self, volume: &VolumeRecord, layer: LayerId, stats: TreeStats) -> Result<Prepared, StoreError> {
        let layer_record = LayerRecord {
            id: layer.clone(),
            cache: volume.cache.clone(),
            kind: LayerKind::Commit,
            bytes: stats.bytes,
            files: stats.files,
            created_unix: now_unix(),
            from_volume: Some(volume.id.clone()),
            blob: None,
        };
        atomic::write_json(&self.layout.layer_record(&layer), &layer_record)?;
        atomic::sync_dir(&self.layout.volume_dir(&volume.id))?;
        failpoint::hit("commit.after-layer-record");
        Ok(Prepared::Publish(Promoted { layer, stats }))
    }

    /// Records a release's decision in the volume's record, before anything acts on it.
    pub fn decide(&self, id: &VolumeId, decision: Decision) -> Result<(), StoreError> {
        self.update_volume(id, |r| r.decision = Some(decision)).map(drop)
    }

    /// Carries out a recorded decision: a dropped change's layer goes (never one a HEAD names),
    /// then the volume. Repeating it after a crash anywhere in it is safe.
    pub fn settle(&self, id: &VolumeId) -> Result<Option<Decision>, StoreError> {
        let Some(record) = self.volume(id)? else { return Ok(None) };
        if let (Some(Decision::Stale { .. } | Decision::Abandoned { .. }), Some(layer)) =
            (&record.decision, &record.pending)
        {
            // A layer something else names (HEAD, a kept version, a snapshot) is not ours to
            // drop; gc takes it once nothing does.
            if !self.layer_named(&record.cache, layer)? {
                self.remove_layer(layer)?;
            }
        }
        failpoint::hit("commit.settle-before-drop");
        self.drop_volume(id)?;
        Ok(record.decision)
    }

    /// Whether this volume's `layer` was already committed (a retry after the HEAD write):
    /// HEAD names it, or a kept version this volume published does — HEAD may have moved on
    /// since (a squash, a rollback, later publishes). The answer carries the version it made.
    pub fn head_names(&self, record: &VolumeRecord, layer: &LayerId) -> Result<Option<Advanced>, StoreError> {
        let published = self.versions(&record.cache)?.into_iter().find(|v| {
            v.layers.contains(layer)
                && matches!(&v.origin, super::history::Origin::Publish { volume, .. } if volume == record.id.as_str())
        });
        if let Some(v) = published {
            return Ok(Some(Advanced::Committed { version: v.version, depth: v.layers.len() }));
        }
        Ok(self
            .head(&record.cache)?
            .filter(|h| h.layers.contains(layer))
            .map(|h| Advanced::Committed { version: h.version, depth: h.layers.len() }))
    }

    /// Whether HEAD, a kept version of `cache` or any snapshot names `layer`.
    fn layer_named(&self, cache: &CacheKey, layer: &LayerId) -> Result<bool, StoreError> {
        if self.head(cache)?.is_some_and(|h| h.layers.contains(layer)) {
            return Ok(true);
        }
        if self.versions(cache)?.iter().any(|v| v.layers.contains(layer)) {
            return Ok(true);
        }
        Ok(self.snapshots()?.iter().any(|s| s.layers.contains(layer)))
    }

    /// Points HEAD at base + the promoted layer if HEAD is still the volume's base (same version
    /// and same lineage). The caller must hold the cache's publish lock. A stale result changes
    /// nothing: the caller records it, then [`Store::settle`]s.
    pub fn advance_head(&self, record: &VolumeRecord, promoted: &Promoted) -> Result<Advanced, StoreError> {
        let _pin = self.state_lock(false)?;
        let _heads = self.head_lock(&record.cache)?;
        match self.next_head(record, promoted)? {
            NextHead::Decided(advanced) => Ok(advanced),
            NextHead::Write(head) => self.write_next_head(record, &head),
        }
    }

    /// What [`Store::advance_head`] would do, writing nothing: a registry publish puts the
    /// manifest of the new version before this node's HEAD names it.
    pub fn next_head(&self, record: &VolumeRecord, promoted: &Promoted) -> Result<NextHead, StoreError> {
        let key = &record.cache;
        let current = self.head(key)?;
        let current_version = current.as_ref().map_or(Head::NONE, |h| h.version);
        // A retry after a crash that came after the HEAD write: the commit already happened.
        if let Some(done) = self.head_names(record, &promoted.layer)? {
            return Ok(NextHead::Decided(done));
        }
        let base = record.base.version;
        let current_lineage = current.as_ref().map_or("", |h| h.lineage.as_str());
        // A version number of another lifetime of the cache (removed, and maybe begun again,
        // since) is no base at all: its change is never stacked onto unrelated content or onto
        // nothing. A volume that began from no version of its own has no lifetime to confuse.
        let had_base = base != Head::NONE;
        let other_lifetime = had_base && (current.is_none() || current_lineage != record.base.lineage);
        let same_base = current_version == base && current_lineage == record.base.lineage;
        let below: Vec<LayerId> = if same_base {
            match (&current, record.policy.fresh) {
                (_, true) => Vec::new(),
                // Content from a snapshot or a clone replaces HEAD's (a rollback over CSI).
                (_, false) if record.base.content.is_some() => record.base.layers.clone(),
                // Same version, maybe squashed since: its layers hold the same content.
                (Some(head), false) => head.layers.clone(),
                // No version yet: what was restored (a fallback's layers, or nothing).
                (None, false) => record.base.layers.clone(),
            }
        } else if record.policy.on_stale == OnStale::Stack
            && !record.policy.fresh
            && !other_lifetime
            && record.base.content.is_none()
        {
            current.as_ref().map(|h| h.layers.clone()).unwrap_or_default()
        } else {
            return Ok(NextHead::Decided(Advanced::Stale { base, current: current_version, other_lifetime }));
        };
        let mut layers = below;
        layers.push(promoted.layer.clone());
        // A cache without a HEAD starts a new lifetime; every later version keeps its lineage
        // (one written before lineages existed gets one now).
        let lineage =
            current.as_ref().map(|h| h.lineage.clone()).filter(|l| !l.is_empty()).unwrap_or_else(Head::new_lineage);
        Ok(NextHead::Write(Head { version: current_version + 1, layers, updated_unix: now_unix(), lineage }))
    }

    /// Writes the HEAD [`Store::next_head`] planned (history first). The caller holds the
    /// publish lock, the state lock shared and [`Store::head_lock`].
    pub fn write_next_head(&self, record: &VolumeRecord, head: &Head) -> Result<Advanced, StoreError> {
        let key = &record.cache;
        atomic::create_dir_durable(&self.layout.cache_dir(key))?;
        let pod = record
            .request
            .as_ref()
            .and_then(|r| r.pod.clone())
            .or_else(|| record.pods.first().map(|p| (p.namespace.clone(), p.name.clone())));
        let origin = super::history::Origin::Publish {
            volume: record.id.to_string(),
            pod: pod.map(|(namespace, name)| format!("{namespace}/{name}")),
        };
        let keep = record.policy.keep_versions.map_or(self.keep_versions, |k| k.min(self.keep_versions));
        self.record_version(key, head, origin, keep)?;
        failpoint::hit("commit.before-head");
        atomic::write_json(&self.layout.head_path(key), head)?;
        failpoint::hit("commit.after-head");
        self.touch_used(key);
        Ok(Advanced::Committed { version: head.version, depth: head.layers.len() })
    }

    /// Deletes a layer no HEAD names (a stale delta, a lost squash, an abandoned publish).
    pub fn remove_layer(&self, layer: &LayerId) -> Result<(), StoreError> {
        tree::remove_tree(&self.layout.layer_dir(layer))?;
        match std::fs::remove_file(self.layout.layer_record(layer)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("remove", self.layout.layer_record(layer), e)),
        }
    }
}
