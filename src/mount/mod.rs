//! Overlay and bind mounts, mount-point look-ups from mountinfo, and the start-up probe.
//!
//! Everything that calls mount(2)/umount2(2) sits behind [`Mounter`] so handlers can be
//! unit-tested on a recording double that asserts the exact mount sequence.

pub mod image;
pub mod info;
pub mod probe;
#[cfg(test)]
pub mod record;
pub mod sys;

use std::io;
use std::path::{Path, PathBuf};

pub use info::MountEntry;
pub use sys::SysMounter;

/// What to stack in an overlay mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySpec {
    /// Read-only lower layers, top first (the order `lowerdir=` takes).
    pub lower: Vec<PathBuf>,
    /// Writable upper and work directories; `None` mounts a read-only overlay.
    pub upper: Option<UpperDirs>,
    /// Mount read-only even with an upper (MS_RDONLY): the mount still names its upper, so
    /// it can be recognised, but nothing can be written through it.
    pub readonly: bool,
    /// Per-mount flags (nosuid, nodev, ...); binds of the mount inherit them.
    pub flags: MountOptions,
}

/// The per-mount flags a volume's overlay gets. A cache is written by one job and executed by
/// the next, so set-uid binaries and device nodes in it are refused unless a class opts out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MountOptions {
    /// MS_NOSUID.
    pub nosuid: bool,
    /// MS_NODEV.
    pub nodev: bool,
    /// MS_NOEXEC.
    pub noexec: bool,
    /// MS_NOATIME.
    pub noatime: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self { nosuid: true, nodev: true, noexec: false, noatime: false }
    }
}

/// The mount flags a volume may ask for (StorageClass `mountOptions`).
pub const ALLOWED_MOUNT_FLAGS: &[&str] = &["suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime"];

impl MountOptions {
    /// None of the flags: what squash's private read-only view and the probes use.
    pub const NONE: Self = Self { nosuid: false, nodev: false, noexec: false, noatime: false };

    /// The defaults changed by `flags`, in order; the first flag not in
    /// [`ALLOWED_MOUNT_FLAGS`] is returned as the error.
    pub fn parse<S: AsRef<str>>(flags: &[S]) -> Result<Self, String> {
        let mut out = Self::default();
        for flag in flags {
            match flag.as_ref() {
                "suid" => out.nosuid = false,
                "nosuid" => out.nosuid = true,
                "dev" => out.nodev = false,
                "nodev" => out.nodev = true,
                "exec" => out.noexec = false,
                "noexec" => out.noexec = true,
                "atime" => out.noatime = false,
                "noatime" => out.noatime = true,
                other => return Err(other.to_string()),
            }
        }
        Ok(out)
    }

    /// The flags as mountinfo's per-mount options name them, in its order.
    pub fn names(&self) -> Vec<&'static str> {
        [(self.nosuid, "nosuid"), (self.nodev, "nodev"), (self.noexec, "noexec"), (self.noatime, "noatime")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
    }
}

/// The writable half of an overlay mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpperDirs {
    /// Where changes land.
    pub upper: PathBuf,
    /// Overlay's scratch directory, on the same filesystem as `upper`.
    pub work: PathBuf,
}

/// The result of an unmount that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Something was mounted there and now is not.
    Done,
    /// Nothing was mounted there (a repeated teardown).
    NotMounted,
}

/// Mount errors, each naming the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// mount(2) of an overlay failed.
    #[error("mount overlay on {target}: {source}")]
    Overlay { target: PathBuf, source: io::Error },
    /// The overlay option string does not fit in the one page mount(2) accepts.
    #[error("overlay options for {target} take {len} bytes, over the {limit}-byte limit of mount(2): squash the cache or use a shorter state dir")]
    OptionsTooLong { target: PathBuf, len: usize, limit: usize },
    /// A path cannot be used in overlay options (`,` `:` `\` or a NUL in it).
    #[error("path {path} cannot be used as an overlay directory: it contains ',', ':', '\\' or NUL")]
    UnsafePath { path: PathBuf },
    /// mount(2) of a bind mount, or its read-only remount, failed.
    #[error("bind mount {source_path} on {target}: {source}")]
    Bind { source_path: PathBuf, target: PathBuf, source: io::Error },
    /// The mount is still in use; the caller should retry once it is closed.
    #[error("unmount {target}: busy, a process still uses it; retry once it is closed")]
    Busy { target: PathBuf },
    /// umount2(2) failed for another reason.
    #[error("unmount {target}: {source}")]
    Unmount { target: PathBuf, source: io::Error },
    /// /proc/self/mountinfo could not be read.
    #[error("read {path}: {source}")]
    MountInfo { path: PathBuf, source: io::Error },
    /// A cache image could not be attached, mounted or grown.
    #[error("{op} {path}: {source}")]
    Image { op: &'static str, path: PathBuf, source: io::Error },
    /// A path to look up could not be resolved.
    #[error("resolve {path}: {source}")]
    Resolve { path: PathBuf, source: io::Error },
}

/// The mount operations jobcachefs needs; the real one is [`SysMounter`].
pub trait Mounter: Send + Sync {
    /// Mounts an overlay of `spec` on `target`.
    fn overlay(&self, spec: &OverlaySpec, target: &Path) -> Result<(), MountError>;
    /// Bind-mounts `source` on `target`, read-only when asked (bind, then remount read-only;
    /// the bind is undone if the remount fails).
    fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<(), MountError>;
    /// Unmounts `target` without forcing or detaching; a busy mount is [`MountError::Busy`].
    fn unmount(&self, target: &Path) -> Result<Unmounted, MountError>;
    /// Attaches the ext4 image `file` to a loop device and mounts it on `target`.
    fn image(&self, file: &Path, target: &Path) -> Result<(), MountError>;
    /// Grows the image mounted on `target`, whose file the caller extended to `bytes`.
    fn grow_image(&self, target: &Path, bytes: u64) -> Result<(), MountError>;
    /// The mount whose mount point is exactly `path` (the topmost one), if any.
    fn mount_at(&self, path: &Path) -> Result<Option<MountEntry>, MountError>;
    /// Every mount point whose overlay writes to `upper` (the volume's mount and its binds).
    fn mounts_of_upper(&self, upper: &Path) -> Result<Vec<PathBuf>, MountError>;
}

/// Whether a mount is an overlay writing to `upper`.
pub fn writes_to(entry: &MountEntry, upper: &Path) -> bool {
    let ours = format!("upperdir={}", upper.display());
    entry.fstype == "overlay" && entry.super_options.split(',').any(|o| o == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_flags_parse_against_the_allow_list() {
        assert_eq!(MountOptions::parse::<&str>(&[]).unwrap().names(), ["nosuid", "nodev"]);
        assert_eq!(MountOptions::parse(&["suid"]).unwrap().names(), ["nodev"]);
        assert_eq!(MountOptions::parse(&["dev", "suid", "noatime"]).unwrap().names(), ["noatime"]);
        assert_eq!(MountOptions::parse(&["noexec"]).unwrap().names(), ["nosuid", "nodev", "noexec"]);
        assert_eq!(MountOptions::parse(&["suid", "nosuid"]).unwrap().names(), ["nosuid", "nodev"], "last wins");
        for bad in ["loop", "uid=0", "", "rw,suid", "NOSUID"] {
            assert_eq!(MountOptions::parse(&["noatime", bad]).unwrap_err(), bad);
        }
    }
}
