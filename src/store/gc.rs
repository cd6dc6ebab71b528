//! Garbage collection and eviction. A layer lives while any HEAD or volume record names
//! it; the state lock (exclusive here, shared while pinning) keeps a concurrent restore
//! from pinning a layer collection is about to delete.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;

use serde::Serialize;

use super::head::now_unix;
use super::layout::{CacheKey, LayerId, VolumeId};
use super::volume::VolumeRecord;
use super::{read_dir, tree, Store, StoreError};
use crate::failpoint;

/// What a collection freed and what it had to leave.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Volumes of dead `run` processes, unmounted and removed.
    pub volumes_reclaimed: Vec<VolumeId>,
    /// Layers no HEAD or volume named.
    pub layers_removed: Vec<LayerId>,
    /// Bytes those layers held, by their records.
    pub bytes_freed: u64,
    /// Scratch entries and half-written files from interrupted work.
    pub scratch_removed: usize,
    /// Things that could not be removed now, with why; the next run tries again.
    pub deferred: Vec<String>,
}

impl Store {
    /// Collects unreferenced layers and scratch left by crashes. `release_scratch` is asked to
    /// let go of a scratch directory (a squash killed mid-copy leaves its view mounted there)
    /// before it is deleted; an error leaves it for the next run.
    pub fn collect(
        &self,
        release_scratch: &mut dyn FnMut(&std::path::Path) -> Result<(), String>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();

        let mut doomed: Vec<PathBuf> = Vec::new();
        {
            let _exclusive = self.state_lock(true)?;
            let mut live: HashSet<LayerId> = HashSet::new();
            for volume in self.volume_dirs()? {
                match self.volume(&volume) {
                    Ok(Some(record)) => live.extend(record.pinned().cloned()),
                    // Created but never recorded (a crash in create_volume): nothing pins it.
                    Ok(None) => doomed.push(self.move_to_trash(&self.layout.volume_dir(&volume))?),
                    Err(e) => {
                        // A record we cannot read might pin anything: keep every layer this run.
                        report.deferred.push(format!("volume {volume}: {e}; no layers collected"));
                        return Ok(report);
                    }
                }
            }
            match self.shared_pins() {
                Ok(pins) => live.extend(pins),
                Err(e) => {
                    report.deferred.push(format!("pins: {e}; no layers collected"));
                    return Ok(report);
                }
            }
            for key in self.caches()? {
                let kept = match self.head(&key) {
                    Ok(Some(head)) => {
                        live.extend(head.layers);
                        self.versions(&key)
                    }
                    // A removed cache's versions belong to no lifetime: they go with it.
                    Ok(None) => self.forget_versions(&key).map(|()| Vec::new()),
                    Err(e) => {
                        report.deferred.push(format!("cache {key}: {e}; no layers collected"));
                        return Ok(report);
                    }
                };
                match kept {
                    Ok(versions) => live.extend(versions.into_iter().flat_map(|v| v.layers)),
                    Err(e) => {
                        report.deferred.push(format!("cache {key} versions: {e}; no layers collected"));
                        return Ok(report);
                    }
                }
                report.scratch_removed += self.remove_temp_files(&self.layout.cache_dir(&key))?;
                report.scratch_removed += self.remove_temp_files(&self.layout.versions_dir(&key))?;
            }
            match self.snapshot_layers() {
                Ok(layers) => live.extend(layers),
                Err(e) => {
                    report.deferred.push(format!("snapshots: {e}; no layers collected"));
                    return Ok(report);
                }
            }
            failpoint::hit("gc.after-scan");
            let layers_dir = self.layout.layers_dir();
            for name in read_dir(&layers_dir)? {
                let text = name.to_string_lossy();
                if text.starts_with('.') {
                    // Half-written temp files, copies and squashes whose writer is gone (it
                    // would hold the state lock shared), and trash from an interrupted gc.
                    let path = layers_dir.join(&name);
                    if path.is_dir() {
                        doomed.push(self.move_to_trash(&path)?);
                    } else {
                        remove_file_quiet(&path)?;
                    }
                    report.scratch_removed += 1;
                    continue;
                }
                let Ok(id) = LayerId::new(text.trim_end_matches(".json")) else { continue };
                if live.contains(&id) || text.ends_with(".json") {
                    continue;
                }
                if let Some(tag) = self.layer_image(&id) {
                    // The tree is inside an image: it goes only with its image mounted, else
                    // the link stays so a later run finds it.
                    if !self.image_mounted(&tag) {
                        report.deferred.push(format!("layer {id}: image {tag} is not mounted"));
                        continue;
                    }
                    doomed.push(self.move_to_trash(&self.layout.image_layer_dir(&tag, &id))?);
                }
                report.bytes_freed += self.layer(&id).ok().flatten().map_or(0, |r| r.bytes);
                doomed.push(self.move_to_trash(&self.layout.layer_dir(&id))?);
                remove_file_quiet(&self.layout.layer_record(&id))?;
                report.layers_removed.push(id);
            }
            // Records whose tree is gone (a crash between deleting the two).
            for name in read_dir(&layers_dir)? {
                let text = name.to_string_lossy();
                let Some(stem) = text.strip_suffix(".json") else { continue };
                let Ok(id) = LayerId::new(stem) else { continue };
                // A link into an unmounted image is not a missing tree.
                if !live.contains(&id) && std::fs::symlink_metadata(self.layout.layer_dir(&id)).is_err() {
                    remove_file_quiet(&self.layout.layer_record(&id))?;
                }
            }
            // Nothing else uses tmp/ while we hold the lock exclusively (squash holds it shared).
            for name in read_dir(&self.layout.tmp_dir())? {
                let path = self.layout.tmp_dir().join(name);
                if let Err(e) = release_scratch(&path) {
                    report.deferred.push(format!("{}: {e}", path.display()));
                    continue;
                }
                doomed.push(path);
                report.scratch_removed += 1;
            }
            for name in read_dir(&self.layout.volumes_dir())? {
                if name.to_string_lossy().starts_with('.') {
                    doomed.push(self.move_to_trash(&self.layout.volumes_dir().join(name))?);
                    report.scratch_removed += 1;
                }
            }
            report.scratch_removed += self.collect_images(&live, &mut doomed)?;
            failpoint::hit("gc.after-trash");
        }
        progress("deleting");
        // Deleting big trees happens after the lock is released so mounts are not held up.
        for path in doomed {
            if let Err(e) = tree::remove_tree(&path) {
                report.deferred.push(e.to_string());
            }
        }
        report.layers_removed.sort();
        Ok(report)
    }

    /// Inside each mounted image: layers nothing names (a crash between the rename and the
    /// link), the parts of volumes that are gone, and trash. Returns how many were doomed.
    fn collect_images(&self, live: &HashSet<LayerId>, doomed: &mut Vec<PathBuf>) -> Result<usize, StoreError> {
        let mut removed = 0;
        for image in self.images()? {
            if !self.image_mounted(&image.tag) {
                continue;
            }
            let layers = self.layout.image_layers_dir(&image.tag);
            for name in read_dir(&layers)? {
                let text = name.to_string_lossy();
                let unnamed = match LayerId::new(text.as_ref()) {
                    Ok(id) => !live.contains(&id) && std::fs::symlink_metadata(self.layout.layer_dir(&id)).is_err(),
                    Err(_) => text.starts_with('.'),
                };
                if unnamed {
                    doomed.push(self.move_to_trash(&layers.join(&name))?);
                    removed += 1;
                }
            }
            let volumes = self.layout.image_mount(&image.tag).join("volumes");
            for name in read_dir(&volumes)? {
                let gone = match VolumeId::new(name.to_string_lossy()) {
                    Ok(id) => self.volume(&id)?.is_none_or(|r| r.image.as_ref() != Some(&image.tag)),
                    Err(_) => true,
                };
                if gone {
                    doomed.push(self.move_to_trash(&volumes.join(&name))?);
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn volume_dirs(&self) -> Result<Vec<VolumeId>, StoreError> {
        let mut out = Vec::new();
        for name in read_dir(&self.layout.volumes_dir())? {
            if let Ok(id) = VolumeId::new(name.to_string_lossy()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Volumes made by `jobcachefs run` processes that are gone: the caller unmounts and drops them.
    pub fn dead_volumes(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        Ok(self.volumes()?.into_iter().filter(|r| r.owner.is_some_and(|o| !o.is_alive())).collect())
    }

    /// Renames `path` to a fresh `.trash-*` name beside it (same filesystem, shared or not), so
    /// deleting it later can never reach a directory that reuses its old name.
    fn move_to_trash(&self, path: &std::path::Path) -> Result<PathBuf, StoreError> {
        let parent = path.parent().unwrap_or(self.layout.root());
        let dest = parent.join(format!(".trash-{}", LayerId::generate()));
        match std::fs::rename(path, &dest) {
            Ok(()) => Ok(dest),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(dest),
            Err(e) => Err(StoreError::io("move to trash", path, e)),
        }
    }

    fn remove_temp_files(&self, dir: &std::path::Path) -> Result<usize, StoreError> {
        let mut removed = 0;
        for name in read_dir(dir)? {
            if name.to_string_lossy().ends_with(".tmp") {
                remove_file_quiet(&dir.join(name))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Caches to evict, least recently used first: idle longer than `max_idle_secs`, then
    /// the oldest until the rest fit in `budget_bytes`. Caches with live volumes are kept.
    pub fn eviction_candidates(
        &self,
        max_idle_secs: Option<u64>,
        budget_bytes: Option<u64>,
    ) -> Result<Vec<CacheKey>, StoreError> {
        let now = now_unix();
        let mut infos = Vec::new();
        for key in self.caches()? {
            // An unreadable cache is never evicted blindly; collect() reports it as deferred.
            let Ok(mut info) = self.cache_info(&key) else { continue };
            if let Ok(Some(image)) = self.image(&key) {
                // A cache with an image takes what its image file has allocated on the disk.
                info.bytes = self.image_allocated_bytes(&image.tag);
            }
            if info.version > 0 {
                infos.push(info);
            }
        }
        infos.sort_by_key(|i| (i.last_used_unix, i.cache.clone()));
        let mut total: u64 = infos.iter().map(|i| i.bytes).sum();
        let mut out = Vec::new();
        for info in infos {
            if info.volumes > 0 {
                continue;
            }
            let idle = max_idle_secs.is_some_and(|max| now.saturating_sub(info.last_used_unix) > max);
            let over = budget_bytes.is_some_and(|budget| total > budget);
            if idle || over {
                total -= info.bytes;
                out.push(info.cache);
            }
        }
        Ok(out)
    }

    /// Removes a cache's HEAD so its layers become garbage; the caller holds its publish lock.
    /// The lock file stays: a waiter may hold it open.
    pub fn remove_cache(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let _pin = self.state_lock(false)?;
        let head = self.layout.head_path(key);
        let existed = head.exists();
        failpoint::hit("evict.before-remove");
        remove_file_quiet(&head)?;
        remove_file_quiet(&self.layout.used_path(key))?;
        super::atomic::sync_dir(&self.layout.cache_dir(key)).or_else(|e| match e {
            StoreError::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound => Ok(()),
            e => Err(e),
        })?;
        Ok(existed)
    }
}

fn remove_file_quiet(path: &std::path::Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("remove", path, e)),
    }
}
