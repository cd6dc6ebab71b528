//! Start-up check that the state directory can hold overlay upper directories.
//!
//! A filesystem that cannot (no whiteouts, no trusted xattrs, no d_type, or overlay itself)
//! would otherwise fail at the first volume, or worse, mount and then write layers that
//! read back wrong. Doing every operation a commit relies on once, at start-up, turns
//! that into one clear message.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::dir::Dir;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::{MountError, Mounter, OverlaySpec, SysMounter, UpperDirs};

const NEEDS: &str = "upper directories need ext4, XFS with ftype=1, tmpfs or btrfs";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const BUSY_RETRIES: usize = 10;
const BUSY_PAUSE: Duration = Duration::from_millis(20);

/// Why the scratch directory cannot hold overlay upper directories.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe's own files could not be made, read or removed.
    #[error("overlay probe: {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// The kernel refused the mount for lack of privilege.
    #[error("overlay probe in {path}: mounting overlayfs needs root (CAP_SYS_ADMIN): {source}")]
    NeedsRoot { path: PathBuf, source: io::Error },
    /// The kernel refused the upper directory's filesystem.
    #[error("overlay probe in {path}: the kernel refused an overlay with its upper directory on {fs_type} ({source}): {NEEDS}")]
    UnsupportedFs { path: PathBuf, fs_type: String, source: io::Error },
    /// mount(2) failed for another reason.
    #[error("overlay probe in {path}: {source}")]
    Mount { path: PathBuf, source: MountError },
    /// A change made through the overlay failed.
    #[error("overlay probe in {path}: {step} through an overlay with its upper directory on {fs_type} failed ({source}): {NEEDS}")]
    Step { path: PathBuf, step: &'static str, fs_type: String, source: io::Error },
    /// Deleting a lower file left no whiteout in the upper directory.
    #[error(
        "overlay probe in {path}: deleting a lower file left no whiteout (a 0/0 character device) in the upper directory on {fs_type}: {NEEDS}"
    )]
    NoWhiteout { path: PathBuf, fs_type: String },
    /// Replacing a lower directory left no opaque marker in the upper directory.
    #[error("overlay probe in {path}: replacing a lower directory left no {OPAQUE_XATTR}=y xattr in the upper directory on {fs_type} (no trusted.* xattrs?): {NEEDS}")]
    NoOpaque { path: PathBuf, fs_type: String },
    /// Directory entries carry no file type, which overlay needs to find whiteouts quickly.
    #[error("overlay probe in {path}: directory entries on {fs_type} carry no file type (d_type; XFS formatted with ftype=0?): {NEEDS}")]
    NoFileType { path: PathBuf, fs_type: String },
    /// The probe's overlay could not be unmounted; it and its directory are left in place.
    #[error("overlay probe: {source}; the probe mount and its directory are left in place")]
    Unmount { source: MountError },
}

/// Checks that overlay upper directories work on the filesystem holding `scratch`, an
/// existing directory, by mounting an overlay in a temporary directory inside it and
/// checking the whiteout and opaque directory it must write. Leaves nothing behind.
pub fn check_overlay_support(scratch: &Path) -> Result<(), ProbeError> {
    check_with(&SysMounter, scratch)
}

fn check_with(mounter: &dyn Mounter, scratch: &Path) -> Result<(), ProbeError> {
    let fs_type = filesystem_name(scratch);
    let root = tempfile::Builder::new()
        .prefix(".overlay-probe-")
        .tempdir_in(scratch)
        .map_err(|source| ProbeError::Io { op: "create a directory in", path: scratch.into(), source })?
        // Removal is ours: it must not run while the overlay may still be mounted.
        .keep();
    let dirs = ProbeDirs::new(&root);
    let mut mounted = false;
    let outcome = exercise(mounter, &dirs, scratch, &fs_type, &mut mounted);
    if mounted {
        unmount(mounter, &dirs.merged)?;
    }
    let outcome = outcome.and_then(|()| inspect_upper(&dirs, scratch, &fs_type));
    let cleanup =
        fs::remove_dir_all(&root).map_err(|source| ProbeError::Io { op: "remove", path: root.clone(), source });
    // The first failure explains the most; a cleanup error matters only on success.
    outcome.and(cleanup)
}

/// Unmounts the probe's overlay, never lazily: a detached mount would keep using the
/// directory we are about to remove. Nobody else knows the directory, so EBUSY can only be
/// passing (a process forked while we had a file open in it, until it execs): wait it out
/// briefly.
fn unmount(mounter: &dyn Mounter, merged: &Path) -> Result<(), ProbeError> {
    let mut tries = 0;
    loop {
        match mounter.unmount(merged) {
            Ok(_) => return Ok(()),
            Err(MountError::Busy { .. }) if tries < BUSY_RETRIES => {
                tries += 1;
                std::thread::sleep(BUSY_PAUSE);
            }
            Err(source) => return Err(ProbeError::Unmount { source }),
        }
    }
}

struct ProbeDirs {
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
}

impl ProbeDirs {
    fn new(root: &Path) -> Self {
        Self {
            lower: root.join("lower"),
            upper: root.join("upper"),
            work: root.join("work"),
            merged: root.join("merged"),
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ProbeError + 'a {
    move |source| ProbeError::Io { op, path: path.to_path_buf(), source }
}

/// Mounts the overlay and makes, through it, every kind of change a layer can carry.
fn exercise(
    mounter: &dyn Mounter,
    dirs: &ProbeDirs,
    scratch: &Path,
    fs_type: &str,
    mounted: &mut bool,
) -> Result<(), ProbeError> {
    for dir in [&dirs.lower, &dirs.upper, &dirs.work, &dirs.merged] {
        fs::create_dir(dir).map_err(io_err("create", dir))?;
    }
    let lower_file = dirs.lower.join("file");
    fs::write(&lower_file, "lower").map_err(io_err("write", &lower_file))?;
    let lower_dir = dirs.lower.join("dir");
    fs::create_dir(&lower_dir).map_err(io_err("create", &lower_dir))?;
    let lower_inner = lower_dir.join("inner");
    fs::write(&lower_inner, "lower").map_err(io_err("write", &lower_inner))?;
    check_file_types(&dirs.lower, scratch, fs_type)?;

    let spec = OverlaySpec {
        readonly: false,
        lower: vec![dirs.lower.clone()],
        upper: Some(UpperDirs { upper: dirs.upper.clone(), work: dirs.work.clone() }),
        flags: crate::mount::MountOptions::NONE,
    };
    if let Err(err) = mounter.overlay(&spec, &dirs.merged) {
        return Err(mount_error(err, scratch, fs_type));
    }
    *mounted = true;

    let step = |step: &'static str| {
        move |source| ProbeError::Step { path: scratch.to_path_buf(), step, fs_type: fs_type.to_owned(), source }
    };
    fs::write(dirs.merged.join("new"), "upper").map_err(step("write a new file"))?;
    fs::remove_file(dirs.merged.join("file")).map_err(step("delete a lower file (writes a whiteout)"))?;
    let merged_dir = dirs.merged.join("dir");
    fs::remove_dir_all(&merged_dir).map_err(step("delete a lower directory (needs trusted.* xattrs)"))?;
    fs::create_dir(&merged_dir).map_err(step("re-create a deleted lower directory (needs trusted.* xattrs)"))?;
    let shows_lower = merged_dir.join("inner").symlink_metadata().is_ok();
    if shows_lower {
        return Err(ProbeError::NoOpaque { path: scratch.to_path_buf(), fs_type: fs_type.to_owned() });
    }
    Ok(())
}

/// Checks that readdir reports file types on the filesystem of `dir`: overlay mounts
/// without them but then cannot tell whiteouts apart, so deleting a lower directory fails.
fn check_file_types(dir: &Path, scratch: &Path, fs_type: &str) -> Result<(), ProbeError> {
    // std falls back to stat when d_type is missing, so ask readdir itself.
    let mut listing = Dir::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|errno| ProbeError::Io { op: "open", path: dir.to_path_buf(), source: errno.into() })?;
    for entry in listing.iter() {
        let entry =
            entry.map_err(|errno| ProbeError::Io { op: "list", path: dir.to_path_buf(), source: errno.into() })?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." && entry.file_type().is_none() {
            return Err(ProbeError::NoFileType { path: scratch.to_path_buf(), fs_type: fs_type.to_owned() });
        }
    }
    Ok(())
}

/// Turns a failed probe mount into the advice an operator needs.
fn mount_error(err: MountError, scratch: &Path, fs_type: &str) -> ProbeError {
    let path = scratch.to_path_buf();
    let errno = match &err {
        MountError::Overlay { source, .. } => source.raw_os_error(),
        _ => None,
    };
    match (errno, err) {
        (Some(libc::EPERM), MountError::Overlay { source, .. }) => ProbeError::NeedsRoot { path, source },
        (Some(libc::EINVAL | libc::EOPNOTSUPP), MountError::Overlay { source, .. }) => {
            ProbeError::UnsupportedFs { path, fs_type: fs_type.to_owned(), source }
        }
        (_, source) => ProbeError::Mount { path, source },
    }
}

/// Checks, after unmounting, that the upper directory holds what a layer must carry.
fn inspect_upper(dirs: &ProbeDirs, scratch: &Path, fs_type: &str) -> Result<(), ProbeError> {
    let new = dirs.upper.join("new");
    let content = fs::read(&new).map_err(io_err("read", &new))?;
    if content != b"upper" {
        return Err(ProbeError::Io {
            op: "read back",
            path: new,
            source: io::Error::new(io::ErrorKind::InvalidData, "content differs from what was written"),
        });
    }

    let whiteout = dirs.upper.join("file");
    let is_whiteout = match whiteout.symlink_metadata() {
        Ok(meta) => meta.file_type().is_char_device() && meta.rdev() == 0,
        Err(err) if err.kind() == io::ErrorKind::NotFound => false,
        Err(source) => return Err(ProbeError::Io { op: "stat", path: whiteout, source }),
    };
    if !is_whiteout {
        return Err(ProbeError::NoWhiteout { path: scratch.to_path_buf(), fs_type: fs_type.to_owned() });
    }

    let opaque_dir = dirs.upper.join("dir");
    let opaque = match xattr::get(&opaque_dir, OPAQUE_XATTR) {
        Ok(value) => value.as_deref() == Some(b"y".as_slice()),
        // EOPNOTSUPP: the filesystem has no xattrs at all.
        Err(err) if err.kind() == io::ErrorKind::Unsupported => false,
        Err(source) => return Err(ProbeError::Io { op: "read xattrs of", path: opaque_dir, source }),
    };
    if !opaque {
        return Err(ProbeError::NoOpaque { path: scratch.to_path_buf(), fs_type: fs_type.to_owned() });
    }
    Ok(())
}

/// The name of the filesystem holding `path`, for messages.
fn filesystem_name(path: &Path) -> String {
    match nix::sys::statfs::statfs(path) {
        // f_type is a signed word on some targets; the magic numbers are 32-bit.
        Ok(stat) => magic_name(stat.filesystem_type().0 as u64 as u32),
        Err(_) => "an unknown filesystem".to_owned(),
    }
}

/// Names the filesystems an operator is likely to meet, by statfs(2) magic number.
fn magic_name(magic: u32) -> String {
    let name = match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x0102_1994 => "tmpfs",
        0x9123_683E => "btrfs",
        0x6969 => "nfs",
        0x794C_7630 => "overlay",
        0x8584_58F6 => "ramfs",
        0x4D44 => "vfat",
        0x6573_5546 => "fuse",
        0x2FC1_2FC1 => "zfs",
        0x00C3_6400 => "ceph",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0xF2F5_2010 => "f2fs",
        0x7371_7368 => "squashfs",
        _ => return format!("filesystem type {magic:#x}"),
    };
    name.to_owned()
}

/// Which project quotas the kernel could enforce: ext4's need `CONFIG_QUOTA` (its sysctls exist
/// only then), XFS's `CONFIG_XFS_QUOTA` (`/proc/fs/xfs/xqm` exists only then).
pub fn kernel_quotas() -> (bool, bool) {
    let ext4 = std::path::Path::new("/proc/sys/fs/quota").is_dir();
    let xfs = std::path::Path::new("/proc/fs/xfs/xqm").exists();
    (ext4, xfs)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use nix::sys::stat::SFlag;
    use sys_mount::{Mount, MountFlags};
    use tempfile::TempDir;

    use super::super::record::{Call, CallKind, RecordingMounter};
    use super::super::sys::test_support::{can_mount, UnmountGuard};
    use super::*;

    #[test]
    fn names_filesystems() {
        let cases = [
            (0xEF53, "ext4"),
            (0x5846_5342, "xfs"),
            (0x0102_1994, "tmpfs"),
            (0x9123_683E, "btrfs"),
            (0x6969, "nfs"),
            (0x794C_7630, "overlay"),
            (0x1234, "filesystem type 0x1234"),
        ];
        for (magic, want) in cases {
            assert_eq!(magic_name(magic), want);
        }
    }

    #[test]
    fn mount_errors_become_advice() {
        let overlay_err =
            |errno| MountError::Overlay { target: "/s/merged".into(), source: io::Error::from_raw_os_error(errno) };
        let scratch = Path::new("/s");
        let msg = mount_error(overlay_err(libc::EPERM), scratch, "ext4").to_string();
        assert!(msg.contains("needs root (CAP_SYS_ADMIN)") && msg.contains("/s"), "{msg}");
        for errno in [libc::EINVAL, libc::EOPNOTSUPP] {
            let msg = mount_error(overlay_err(errno), scratch, "vfat").to_string();
            assert!(msg.contains("vfat") && msg.contains(NEEDS) && msg.contains("/s"), "{msg}");
        }
        let err = mount_error(overlay_err(libc::ENOMEM), scratch, "ext4");
        assert!(matches!(err, ProbeError::Mount { .. }), "{err:?}");
    }

    /// Probes `scratch` and checks that it left nothing behind.
    fn probe(scratch: &Path) -> Result<(), ProbeError> {
        let list = || {
            let mut names: Vec<_> =
                fs::read_dir(scratch).expect("list scratch").map(|e| e.expect("entry").file_name()).collect();
            names.sort();
            names
        };
        let before = list();
        let result = check_overlay_support(scratch);
        assert_eq!(list(), before, "probe left something in {scratch:?}");
        result
    }

    /// `name` from PATH or the sbin directories, which root's PATH may lack under CI.
    fn tool(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    }

    #[test]
    fn passes_on_the_temp_dir() {
        if !can_mount("passes_on_the_temp_dir") {
            return;
        }
        let tmp = TempDir::new().expect("tempdir");
        let fs_type = filesystem_name(tmp.path());
        probe(tmp.path()).unwrap_or_else(|err| panic!("probe on {fs_type}: {err}"));
    }

    #[test]
    fn passes_on_tmpfs() {
        if !can_mount("passes_on_tmpfs") {
            return;
        }
        let tmp = TempDir::new().expect("tempdir");
        Mount::builder().fstype("tmpfs").data("size=4m").mount("tmpfs", tmp.path()).expect("mount tmpfs");
        let _guard = UnmountGuard::new(tmp.path());
        assert_eq!(filesystem_name(tmp.path()), "tmpfs");
        probe(tmp.path()).expect("probe on tmpfs");
    }

    #[test]
    fn fails_on_an_overlay() {
        if !can_mount("fails_on_an_overlay") {
            return;
        }
        let tmp = TempDir::new().expect("tempdir");
        let root = tmp.path();
        for dir in ["lower", "upper", "work", "merged"] {
            fs::create_dir(root.join(dir)).expect("mkdir");
        }
        let merged = root.join("merged");
        let spec = OverlaySpec {
            readonly: false,
            lower: vec![root.join("lower")],
            upper: Some(UpperDirs { upper: root.join("upper"), work: root.join("work") }),
            flags: crate::mount::MountOptions::NONE,
        };
        SysMounter.overlay(&spec, &merged).expect("mount the outer overlay");
        let _guard = UnmountGuard::new(&merged);

        let err = probe(&merged).expect_err("an overlay cannot hold uppers");
        assert!(matches!(err, ProbeError::UnsupportedFs { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("overlay") && msg.contains(NEEDS), "{msg}");
        assert!(msg.contains(&*merged.to_string_lossy()), "{msg}");
        eprintln!("on overlay: {msg}");
    }

    #[test]
    fn fails_on_ramfs() {
        if !can_mount("fails_on_ramfs") {
            return;
        }
        let tmp = TempDir::new().expect("tempdir");
        Mount::builder().fstype("ramfs").flags(MountFlags::empty()).mount("ramfs", tmp.path()).expect("mount ramfs");
        let _guard = UnmountGuard::new(tmp.path());

        // ramfs has no xattrs: overlay mounts, but cannot mark a re-created directory opaque.
        let err = probe(tmp.path()).expect_err("ramfs cannot hold uppers");
        let msg = err.to_string();
        assert!(matches!(err, ProbeError::Step { .. } | ProbeError::NoOpaque { .. }), "{err:?}");
        assert!(msg.contains("ramfs") && msg.contains("xattr") && msg.contains(NEEDS), "{msg}");
        assert!(msg.contains(&*tmp.path().to_string_lossy()), "{msg}");
        eprintln!("on ramfs: {msg}");
    }

    #[test]
    fn fails_without_file_types() {
        if !can_mount("fails_without_file_types") {
            return;
        }
        let Some(mkfs) = tool("mkfs.ext4") else {
            assert!(std::env::var_os("CI").is_none(), "fails_without_file_types: mkfs.ext4 is missing, and CI is set");
            eprintln!("fails_without_file_types: skipped, mkfs.ext4 is missing");
            return;
        };
        let tmp = TempDir::new().expect("tempdir");
        let (image, mnt) = (tmp.path().join("nodtype.img"), tmp.path().join("mnt"));
        fs::create_dir(&mnt).expect("mkdir");
        fs::File::create(&image).and_then(|f| f.set_len(32 << 20)).expect("create image");
        // ext4 without the filetype feature stands in for XFS with ftype=0.
        let made =
            Command::new(mkfs).args(["-q", "-F", "-O", "^filetype"]).arg(&image).status().expect("run mkfs.ext4");
        assert!(made.success(), "mkfs.ext4: {made}");
        // sys-mount is built without loop support; mount(8) attaches the loop device with
        // autoclear, so the unmount frees it.
        let mount = tool("mount").expect("mount(8)");
        let mounted = Command::new(mount).args(["-o", "loop"]).arg(&image).arg(&mnt).status().expect("run mount");
        assert!(mounted.success(), "mount -o loop: {mounted}");
        let _guard = UnmountGuard::new(&mnt);

        let err = probe(&mnt).expect_err("no d_type");
        assert!(matches!(err, ProbeError::NoFileType { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("ext4") && msg.contains("ftype") && msg.contains(NEEDS), "{msg}");
        assert!(msg.contains(&*mnt.to_string_lossy()), "{msg}");
        eprintln!("without d_type: {msg}");
    }

    #[test]
    fn inspection_names_what_is_missing() {
        let tmp = TempDir::new().expect("tempdir");
        let dirs = ProbeDirs::new(tmp.path());
        let scratch = Path::new("/scratch");
        fs::create_dir(&dirs.upper).expect("mkdir");
        fs::write(dirs.upper.join("new"), "upper").expect("write");
        fs::write(dirs.upper.join("file"), "not a whiteout").expect("write");
        fs::create_dir(dirs.upper.join("dir")).expect("mkdir");
        let err = inspect_upper(&dirs, scratch, "ext4").expect_err("no whiteout");
        assert!(matches!(err, ProbeError::NoWhiteout { .. }), "{err:?}");
        assert!(err.to_string().contains("whiteout") && err.to_string().contains("/scratch"), "{err}");

        // Making a whiteout and setting trusted.* xattrs both need root.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        fs::remove_file(dirs.upper.join("file")).expect("rm");
        nix::sys::stat::mknod(&dirs.upper.join("file"), SFlag::S_IFCHR, Mode::empty(), 0).expect("mknod");
        let err = inspect_upper(&dirs, scratch, "ext4").expect_err("not opaque");
        assert!(matches!(err, ProbeError::NoOpaque { .. }), "{err:?}");
        assert!(err.to_string().contains(OPAQUE_XATTR), "{err}");

        xattr::set(dirs.upper.join("dir"), OPAQUE_XATTR, b"y").expect("set xattr");
        inspect_upper(&dirs, scratch, "ext4").expect("complete upper");
    }

    #[test]
    fn a_failed_mount_is_not_unmounted() {
        let tmp = TempDir::new().expect("tempdir");
        let m = RecordingMounter::new();
        m.fail_next(CallKind::Overlay, 1, libc::EINVAL);
        let err = check_with(&m, tmp.path()).expect_err("injected");
        assert!(matches!(err, ProbeError::UnsupportedFs { .. }), "{err:?}");
        assert!(matches!(&m.calls()[..], [Call::Overlay { .. }]), "{:?}", m.calls());
        assert_eq!(fs::read_dir(tmp.path()).expect("list").count(), 0, "probe dir left behind");
    }

    #[test]
    fn a_passing_busy_is_waited_out() {
        let tmp = TempDir::new().expect("tempdir");
        let m = RecordingMounter::new();
        m.fail_next(CallKind::Unmount, 2, libc::EBUSY);
        // The double mounts nothing, so the probe fails at its first change through it.
        let err = check_with(&m, tmp.path()).expect_err("nothing mounted");
        assert!(matches!(err, ProbeError::Step { .. }), "{err:?}");
        assert_eq!(m.calls().len(), 1 + 3, "{:?}", m.calls());
        assert_eq!(fs::read_dir(tmp.path()).expect("list").count(), 0, "probe dir left behind");
    }

    #[test]
    fn a_busy_probe_mount_is_left_in_place() {
        let tmp = TempDir::new().expect("tempdir");
        let m = RecordingMounter::new();
        m.fail_next(CallKind::Unmount, BUSY_RETRIES + 1, libc::EBUSY);
        // The double mounts nothing, so the probe fails at its first change; what matters
        // is that it unmounts, and removes nothing while that fails.
        let err = check_with(&m, tmp.path()).expect_err("busy");
        assert!(matches!(err, ProbeError::Unmount { source: MountError::Busy { .. } }), "{err:?}");
        assert!(err.to_string().contains("left in place"), "{err}");
        let calls = m.calls();
        let [Call::Overlay { target: mounted, .. }, unmounts @ ..] = &calls[..] else {
            panic!("unexpected calls {calls:?}");
        };
        assert_eq!(unmounts.len(), BUSY_RETRIES + 1, "{calls:?}");
        assert!(unmounts.iter().all(|c| *c == Call::Unmount { target: mounted.clone() }), "{calls:?}");
        assert!(mounted.exists(), "the probe removed a directory that may still be mounted");
    }

    #[test]
    fn fails_on_a_missing_scratch() {
        let tmp = TempDir::new().expect("tempdir");
        let missing = tmp.path().join("missing");
        let err = check_overlay_support(&missing).expect_err("missing scratch");
        assert!(matches!(err, ProbeError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");
    }
}
