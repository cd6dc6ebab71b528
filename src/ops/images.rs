//! Cache images in use: made, mounted and grown before a volume needs them, unmounted once no
//! volume needs them. Each step runs under the image's file lock, so two processes sharing a
//! state dir never mount one image twice or unmount it under a volume being created.

use std::collections::BTreeSet;

use super::{Engine, OpsError};
use crate::mount::{MountError, Unmounted};
use crate::store::image::{ImageLock, ImageRecord};
use crate::store::layout::ImageTag;
use crate::store::{atomic, CacheKey};

/// A cache's image, mounted, with its lock held.
#[derive(Debug)]
pub(super) struct OpenImage {
    /// The image.
    pub record: ImageRecord,
    _lock: ImageLock,
}

impl Engine {
    fn image_err(&self, tag: &ImageTag, source: MountError) -> OpsError {
        OpsError::Image { image: tag.clone(), source }
    }

    /// Makes `key`'s image when a size is asked (`size`, or the driver's default) and it has
    /// none, grows it when a larger size is asked, and mounts it. A cache without an image and
    /// without a size keeps its volumes on the state dir's disk. The image's lock is returned
    /// held: the caller keeps it until a volume record names the image, so nothing unmounts or
    /// deletes it in between.
    pub(super) fn open_image(&self, key: &CacheKey, size: Option<u64>) -> Result<Option<OpenImage>, OpsError> {
        let size = size.or(self.default_cache_size);
        let existing = self.store.image(key)?;
        if existing.is_none() && size.is_none() {
            return Ok(None);
        }
        let tag = ImageTag::of(key);
        let lock = self.store.lock_image(&tag)?;
        let mut record = match existing {
            Some(record) => record,
            None => {
                let made = self.store.create_image(&lock, key, size.unwrap_or_default())?;
                tracing::info!(cache.namespace = %key.namespace, cache.name = %key.name, image = %made.tag,
                    size_bytes = made.size_bytes, "cache image created");
                made
            }
        };
        let point = self.store.layout().image_mount(&tag);
        let mounted = self.mounter.mount_at(&point).map_err(|e| self.image_err(&tag, e))?.is_some();
        match size {
            Some(asked) if asked > record.size_bytes && !mounted => {
                record = self.store.grow_image_offline(&lock, &record, asked)?;
                tracing::info!(cache.namespace = %key.namespace, cache.name = %key.name, image = %tag,
                    size_bytes = asked, "cache image grown");
            }
            Some(asked) if asked > record.size_bytes => {
                // In use by another volume: grow online (the kernel needs CAP_SYS_RESOURCE for it).
                self.store.extend_image(&lock, &record, asked)?;
                match self.mounter.grow_image(&point, asked) {
                    Ok(()) => {
                        record = self.store.record_image_size(&lock, &record, asked)?;
                        tracing::info!(cache.namespace = %key.namespace, cache.name = %key.name, image = %tag,
                            size_bytes = asked, "cache image grown online");
                    }
                    Err(e) => tracing::warn!(cache.namespace = %key.namespace, cache.name = %key.name, image = %tag,
                        error = %e, size_bytes = record.size_bytes, asked_bytes = asked,
                        "cannot grow the cache image while it is in use; it grows once no volume uses it"),
                }
            }
            Some(asked) if asked < record.size_bytes => {
                // Shrinking a filesystem in use is not possible online: the larger size stays.
                tracing::info!(cache.namespace = %key.namespace, cache.name = %key.name, image = %tag,
                    asked_bytes = asked, size_bytes = record.size_bytes, "cache keeps its larger size");
            }
            _ => {}
        }
        self.mount_locked(&tag)?;
        Ok(Some(OpenImage { record, _lock: lock }))
    }

    /// Mounts every image of `tags` that is not mounted (a volume's own and its lower layers'),
    /// but for `held`, whose lock the caller has (and which is mounted).
    pub(super) fn mount_images<'a>(
        &self,
        tags: impl IntoIterator<Item = &'a ImageTag>,
        held: Option<&OpenImage>,
    ) -> Result<(), OpsError> {
        for tag in tags {
            // Mounted already (the usual case on restore and commit): no lock, no mountinfo
            // read. Whoever calls this has a record naming the image or holds it otherwise, so
            // an idle unmount cannot take it between this look and its use.
            if held.is_some_and(|h| h.record.tag == *tag) {
                continue;
            }
            if self.store.image_mounted(tag) {
                // Its top directories, in case a crash came between its mount and their mkdir.
                self.store.prepare_image(tag)?;
                continue;
            }
            let _lock = self.store.lock_image(tag)?;
            self.mount_locked(tag)?;
        }
        Ok(())
    }

    fn mount_locked(&self, tag: &ImageTag) -> Result<(), OpsError> {
        let point = self.store.layout().image_mount(tag);
        if self.mounter.mount_at(&point).map_err(|e| self.image_err(tag, e))?.is_none() {
            atomic::create_dir_durable(&point)?;
            let file = self.store.layout().image_file(tag);
            self.mounter.image(&file, &point).map_err(|e| self.image_err(tag, e))?;
            tracing::debug!(image = %tag, "cache image mounted");
        }
        self.store.prepare_image(tag)?;
        Ok(())
    }

    /// Unmounts those of `tags` that no volume needs any more. Best effort: an image still busy
    /// (a squash reading it) stays mounted until the next look.
    pub(super) fn unmount_idle<'a>(&self, tags: impl IntoIterator<Item = &'a ImageTag>) {
        let tags: BTreeSet<&ImageTag> = tags.into_iter().collect();
        if tags.is_empty() {
            return;
        }
        if let Err(e) = self.try_unmount_idle(&tags) {
            tracing::warn!(error = %e, "could not unmount idle cache images; they stay mounted");
        }
    }

    fn try_unmount_idle(&self, tags: &BTreeSet<&ImageTag>) -> Result<(), OpsError> {
        for tag in tags {
            let _lock = self.store.lock_image(tag)?;
            // Read under the lock: a volume being created takes it before its record names the image.
            let needed = self.store.volumes()?.iter().any(|v| v.images.contains(tag));
            if needed {
                continue;
            }
            let point = self.store.layout().image_mount(tag);
            match self.mounter.unmount(&point) {
                Ok(Unmounted::Done) => tracing::debug!(image = %tag, "idle cache image unmounted"),
                Ok(Unmounted::NotMounted) => {}
                Err(MountError::Busy { .. }) => tracing::debug!(image = %tag, "idle cache image still busy"),
                Err(e) => return Err(self.image_err(tag, e)),
            }
        }
        Ok(())
    }

    /// Mounts every image (gc and eviction need to see every layer), returning their tags.
    pub(super) fn mount_all_images(&self) -> Result<Vec<ImageTag>, OpsError> {
        let tags: Vec<ImageTag> = self.store.images()?.into_iter().map(|r| r.tag).collect();
        self.mount_images(&tags, None)?;
        Ok(tags)
    }

    /// Deletes the images of caches that have no version and no volume (evicted or removed):
    /// their space goes back to the node at once.
    pub(super) fn remove_unused_images(&self) -> Result<Vec<CacheKey>, OpsError> {
        let mut removed = Vec::new();
        for image in self.store.images()? {
            if self.store.head(&image.cache)?.is_some() {
                continue;
            }
            let lock = self.store.lock_image(&image.tag)?;
            if self.store.volumes()?.iter().any(|v| v.images.contains(&image.tag)) {
                continue;
            }
            let point = self.store.layout().image_mount(&image.tag);
            match self.mounter.unmount(&point) {
                Ok(_) => {}
                Err(MountError::Busy { .. }) => continue,
                Err(e) => return Err(self.image_err(&image.tag, e)),
            }
            self.store.remove_image(&lock, &image.tag)?;
            removed.push(image.cache);
        }
        Ok(removed)
    }
}
