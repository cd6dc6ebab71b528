//! Cache image files: one sparse ext4 file per cache that has a size, holding the cache's layers
//! and its volumes' uppers, so a job that writes past the size gets ENOSPC inside its own cache
//! and the node's disk is untouched. Made and grown here; the caller mounts (the store never does).

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::head::now_unix;
use super::layout::{CacheKey, ImageTag, LayerId};
use super::{atomic, Store, StoreError};
use crate::failpoint;

/// The smallest cache size: ext4 with a journal needs a few MiB of its own.
pub const MIN_CACHE_SIZE: u64 = 16 << 20;

/// Below this share of the image free (or 1 MiB, whichever is more), a released volume is
/// taken to have hit the size: its change may be cut short mid-file, so it is not published.
pub const FULL_SHARE: f64 = 0.02;

/// One cache's image: which cache it holds and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The cache whose layers and uppers it holds.
    pub cache: CacheKey,
    /// Its tag (file and mount point name).
    pub tag: ImageTag,
    /// The filesystem's size in bytes.
    pub size_bytes: u64,
    /// Seconds since the epoch.
    pub created_unix: u64,
}

/// A held image lock: mounting, growing and unmounting one image happen one at a time, across
/// processes (the driver and `jobcachefs run` share a state dir).
#[derive(Debug)]
pub struct ImageLock(#[allow(dead_code)] Flock<File>);

/// How full a mounted image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageUse {
    /// The filesystem's size.
    pub size_bytes: u64,
    /// Bytes free.
    pub free_bytes: u64,
}

impl ImageUse {
    /// Whether a job has probably run into the size (see [`FULL_SHARE`]).
    pub fn is_full(&self) -> bool {
        let floor = ((self.size_bytes as f64 * FULL_SHARE) as u64).max(1 << 20);
        self.free_bytes < floor
    }
}

impl Store {
    /// The image of `key`, if the cache has one.
    pub fn image(&self, key: &CacheKey) -> Result<Option<ImageRecord>, StoreError> {
        atomic::read_json(&self.layout.image_record(&ImageTag::of(key)))
    }

    /// The record of the image `tag`.
    pub fn image_by_tag(&self, tag: &ImageTag) -> Result<Option<ImageRecord>, StoreError> {
        atomic::read_json(&self.layout.image_record(tag))
    }

    /// Every image's record.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut out = Vec::new();
        for name in super::read_dir(&self.layout.images_dir())? {
            let text = name.to_string_lossy();
            let Some(stem) = text.strip_suffix(".json") else { continue };
            let Ok(tag) = ImageTag::try_from(stem.to_string()) else { continue };
            if let Some(record) = self.image_by_tag(&tag)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Takes the lock of image `tag`, waiting for another holder.
    pub fn lock_image(&self, tag: &ImageTag) -> Result<ImageLock, StoreError> {
        atomic::create_dir_durable(&self.layout.images_dir())?;
        super::flock_file(&self.layout.image_lock(tag), FlockArg::LockExclusive).map(ImageLock)
    }

    /// Makes `key`'s image of `size_bytes` unless it has one. The caller holds the image lock.
    /// The file is formatted under a temporary name and renamed, then recorded: a crash leaves
    /// either no image or a whole one (the record is rewritten from the file when missing).
    pub fn create_image(&self, _lock: &ImageLock, key: &CacheKey, size_bytes: u64) -> Result<ImageRecord, StoreError> {
        let tag = ImageTag::of(key);
        if let Some(record) = self.image_by_tag(&tag)? {
            if record.cache != *key {
                return Err(StoreError::ImageTaken { cache: key.clone(), holder: record.cache, tag });
            }
            return Ok(record);
        }
        let file = self.layout.image_file(&tag);
        if !file.exists() {
            if size_bytes < MIN_CACHE_SIZE {
                return Err(StoreError::CacheSizeTooSmall { cache: key.clone(), bytes: size_bytes });
            }
            let tmp = self.layout.images_dir().join(format!(".{tag}.img.tmp"));
            let made = make_filesystem(&tmp, size_bytes);
            if let Err(e) = made {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            failpoint::hit("image.after-mkfs");
            std::fs::rename(&tmp, &file).map_err(|e| StoreError::io("rename", &tmp, e))?;
            atomic::sync_dir(&self.layout.images_dir())?;
        }
        let size = std::fs::metadata(&file).map_err(|e| StoreError::io("stat", &file, e))?.len();
        let record = ImageRecord { cache: key.clone(), tag, size_bytes: size, created_unix: now_unix() };
        atomic::write_json(&self.layout.image_record(&record.tag), &record)?;
        failpoint::hit("image.after-record");
        Ok(record)
    }

    /// Extends the image file to `size_bytes` (sparse); the caller then grows the mounted
    /// filesystem and, once it has, records the size ([`Store::record_image_size`]). Never shrinks.
    pub fn extend_image(&self, _lock: &ImageLock, record: &ImageRecord, size_bytes: u64) -> Result<(), StoreError> {
        let file = self.layout.image_file(&record.tag);
        let f = File::options().write(true).open(&file).map_err(|e| StoreError::io("open", &file, e))?;
        if f.metadata().map_err(|e| StoreError::io("stat", &file, e))?.len() < size_bytes {
            f.set_len(size_bytes).map_err(|e| StoreError::io("extend", &file, e))?;
            f.sync_all().map_err(|e| StoreError::io("fsync", &file, e))?;
        }
        Ok(())
    }

    /// Records an image's new size once its filesystem has it.
    pub fn record_image_size(
        &self,
        _lock: &ImageLock,
        record: &ImageRecord,
        size_bytes: u64,
    ) -> Result<ImageRecord, StoreError> {
        let grown = ImageRecord { size_bytes, ..record.clone() };
        atomic::write_json(&self.layout.image_record(&record.tag), &grown)?;
        Ok(grown)
    }

    /// Grows an image that is not mounted: the file, then its filesystem (`e2fsck -f -p` first,
    /// as `resize2fs` insists), then the record. A crash in between leaves a bigger file whose
    /// filesystem the next grow finishes.
    pub fn grow_image_offline(
        &self,
        lock: &ImageLock,
        record: &ImageRecord,
        size_bytes: u64,
    ) -> Result<ImageRecord, StoreError> {
        self.extend_image(lock, record, size_bytes)?;
        let file = self.layout.image_file(&record.tag);
        // e2fsck exits 1 when it fixed something; 2 and up are failures.
        let check = Command::new("e2fsck").args(["-f", "-p"]).arg(&file).output();
        run_tool("e2fsck", &file, check, 1)?;
        let resize = Command::new("resize2fs").arg(&file).output();
        run_tool("resize2fs", &file, resize, 0)?;
        self.record_image_size(lock, record, size_bytes)
    }

    /// Bytes the image file really takes on the node's disk (its allocated blocks).
    pub fn image_allocated_bytes(&self, tag: &ImageTag) -> u64 {
        std::fs::metadata(self.layout.image_file(tag)).map_or(0, |m| m.blocks() * 512)
    }

    /// How full the mounted image `tag` is.
    pub fn image_use(&self, tag: &ImageTag) -> Result<ImageUse, StoreError> {
        let mount = self.layout.image_mount(tag);
        let st = nix::sys::statvfs::statvfs(&mount).map_err(|e| StoreError::io("statvfs", &mount, e.into()))?;
        let block = st.fragment_size();
        Ok(ImageUse { size_bytes: st.blocks() * block, free_bytes: st.blocks_available() * block })
    }

    /// Fails unless something is mounted at the image's mount point (another device than its
    /// parent's), so nothing meant for the image lands on the state dir's disk.
    pub fn check_image_mounted(&self, tag: &ImageTag) -> Result<(), StoreError> {
        if self.image_mounted(tag) {
            Ok(())
        } else {
            Err(StoreError::ImageNotMounted { tag: tag.clone(), path: self.layout.image_mount(tag) })
        }
    }

    /// Whether the image's mount point holds a mount.
    pub fn image_mounted(&self, tag: &ImageTag) -> bool {
        let point = self.layout.image_mount(tag);
        match (std::fs::metadata(&point), std::fs::metadata(self.layout.image_mounts_dir())) {
            (Ok(p), Ok(parent)) => p.dev() != parent.dev(),
            _ => false,
        }
    }

    /// Makes the image's top directories once it is mounted.
    pub fn prepare_image(&self, tag: &ImageTag) -> Result<(), StoreError> {
        atomic::create_dir_durable(&self.layout.image_layers_dir(tag))?;
        atomic::create_dir_durable(&self.layout.image_mount(tag).join("volumes"))
    }

    /// Deletes an image (unmounted by the caller) and its record; the record goes last so a
    /// crash leaves a record gc can finish.
    pub fn remove_image(&self, _lock: &ImageLock, tag: &ImageTag) -> Result<(), StoreError> {
        for path in [self.layout.image_file(tag), self.layout.image_record(tag)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &path, e)),
            }
        }
        atomic::sync_dir(&self.layout.images_dir())
    }

    /// Names a layer that lives in image `tag`: `layers/<id>` becomes a link to it (made durable
    /// by the layer record's write in the same directory). Repeating it is fine.
    pub fn link_layer(&self, tag: &ImageTag, id: &LayerId) -> Result<(), StoreError> {
        let link = self.layout.layer_dir(id);
        match std::os::unix::fs::symlink(self.layout.image_layer_link(tag, id), &link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::io("link layer", &link, e)),
        }
    }

    /// The image a layer lives in, if it lives in one (`layers/<id>` is a link into it).
    pub fn layer_image(&self, id: &LayerId) -> Option<ImageTag> {
        let link = std::fs::read_link(self.layout.layer_dir(id)).ok()?;
        self.layout.image_of_link(&link)
    }

    /// Where a layer's tree really is: inside its image, or `layers/<id>` itself.
    pub fn layer_tree(&self, id: &LayerId) -> std::path::PathBuf {
        match self.layer_image(id) {
            Some(tag) => self.layout.image_layer_dir(&tag, id),
            None => self.layout.layer_dir(id),
        }
    }

    /// Whether a layer is there: its tree, or a link into an image whose tree can be checked
    /// only while the image is mounted (unmounted, the image itself must exist).
    pub fn layer_present(&self, id: &LayerId) -> bool {
        match self.layer_image(id) {
            Some(tag) if !self.image_mounted(&tag) => self.layout.image_file(&tag).is_file(),
            Some(tag) => self.layout.image_layer_dir(&tag, id).is_dir(),
            None => self.layout.layer_dir(id).is_dir(),
        }
    }

    /// The images a stack of layers needs mounted.
    pub fn images_of<'a>(&self, layers: impl IntoIterator<Item = &'a LayerId>) -> BTreeSet<ImageTag> {
        layers.into_iter().filter_map(|l| self.layer_image(l)).collect()
    }
}

/// Writes a sparse file of `size_bytes` at `path` and formats it as ext4 with a journal (so a
/// crash leaves it consistent), no reserved blocks (the size is the job's), and lazy inode
/// tables (formatting a 100 GiB cache takes as long as a 100 MiB one).
fn make_filesystem(path: &std::path::Path, size_bytes: u64) -> Result<(), StoreError> {
    let file = File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io("create", path, e))?;
    file.set_len(size_bytes).map_err(|e| StoreError::io("size", path, e))?;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
        .output();
    run_tool("mkfs.ext4", path, out, 0)?;
    file.sync_all().map_err(|e| StoreError::io("fsync", path, e))
}

/// Checks how an e2fsprogs tool ended: exit codes up to `ok_up_to` are success.
fn run_tool(
    tool: &'static str,
    path: &std::path::Path,
    out: io::Result<std::process::Output>,
    ok_up_to: i32,
) -> Result<(), StoreError> {
    let out = out
        .map_err(|e| StoreError::io(tool, path, io::Error::new(e.kind(), format!("{e} (is e2fsprogs installed?)"))))?;
    match out.status.code() {
        Some(code) if code <= ok_up_to => Ok(()),
        _ => {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(StoreError::io(tool, path, io::Error::other(format!("{}: {why}", out.status))))
        }
    }
}

/// The rule [`parse_size`] checks, for error messages.
pub const SIZE_RULE: &str =
    "must be a size such as 20Gi, 512Mi, 20G or 21474836480 (Kubernetes quantity suffixes Ki Mi Gi Ti, k M G T)";

/// Parses a size as Kubernetes writes quantities (`20Gi`, `500M`) or a plain byte count.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let unit: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_kubernetes_quantities() {
        assert_eq!(parse_size("20Mi"), Some(20 << 20));
        assert_eq!(parse_size("20Gi"), Some(20 << 30));
        assert_eq!(parse_size("5G"), Some(5_000_000_000));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        for bad in ["", "Mi", "20MB", "-1", "1.5Gi", "20 Mi", "99999999999999Ti"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn full_means_under_two_percent_or_a_mebibyte() {
        let mib = 1u64 << 20;
        assert!(ImageUse { size_bytes: 20 * mib, free_bytes: mib - 1 }.is_full());
        assert!(!ImageUse { size_bytes: 20 * mib, free_bytes: mib }.is_full());
        assert!(ImageUse { size_bytes: 1000 * mib, free_bytes: 19 * mib }.is_full());
        assert!(!ImageUse { size_bytes: 1000 * mib, free_bytes: 21 * mib }.is_full());
    }
}
