//! The real [`Mounter`]: mount(2) and umount2(2) through sys-mount.
//!
//! We call mount(2) with the whole option string rather than going through fsconfig(2),
//! whose string values stop at 256 bytes and so cap `lowerdir=` at a few layers.

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::statvfs::{statvfs, FsFlags};
use sys_mount::{Mount, MountFlags, UnmountFlags};

use super::{info, MountEntry, MountError, Mounter, OverlaySpec, Unmounted};

/// The longest option string mount(2) takes: it copies one page and overwrites the last
/// byte with a NUL. Past that the kernel silently truncates (seen on 6.18: 4096 bytes gave
/// ENOENT for a cut-off workdir), which could even mount a wrong directory. 4 KiB is the
/// smallest page size Linux runs on, so this holds everywhere.
pub const OPTIONS_LIMIT: usize = 4095;

/// Options every overlay gets, so that layers written by one mount read the same under
/// any other kernel or configuration:
/// - `index=off`: no inode index tied to this particular upper/lower set;
/// - `redirect_dir=off`: a renamed lower directory is copied up instead of leaving a
///   redirect xattr that only this stack can resolve (renames then give EXDEV);
/// - `metacopy=off`: copy-up copies data, so an upper never depends on its lowers.
///
/// Checked on kernel 6.18: accepted with and without an upper. For a lower-only mount the
/// kernel shows `redirect_dir=on` in mountinfo (it only follows redirects there, which is
/// harmless: our layers never contain any).
const FIXED_OPTIONS: &str = "index=off,redirect_dir=off,metacopy=off";

/// Mounts and unmounts for real; needs CAP_SYS_ADMIN.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysMounter;

/// Builds the mount(2) data for `spec`: `lowerdir=<top>:…:<bottom>[,upperdir=…,workdir=…]`
/// followed by the fixed options, refusing paths overlay cannot parse and strings over
/// [`OPTIONS_LIMIT`]. `target` only names the mount in errors.
pub fn overlay_options(spec: &OverlaySpec, target: &Path) -> Result<String, MountError> {
    if spec.lower.is_empty() {
        return Err(MountError::Overlay {
            target: target.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no lower layer given"),
        });
    }
    let mut opts = String::from("lowerdir=");
    for (i, dir) in spec.lower.iter().enumerate() {
        if i > 0 {
            opts.push(':');
        }
        opts.push_str(option_path(dir)?);
    }
    if let Some(upper) = &spec.upper {
        opts.push_str(",upperdir=");
        opts.push_str(option_path(&upper.upper)?);
        opts.push_str(",workdir=");
        opts.push_str(option_path(&upper.work)?);
        // No sync on the job's fsync and syncfs, nor on unmount, which would otherwise flush
        // the whole upper filesystem, every other job's dirty data included. The commit makes
        // exactly the upper's tree durable itself; an upper mounted when the node went down is
        // never published. The kernel leaves work/incompat/volatile behind and refuses the
        // pair until it is removed (the store does, knowing whether the node went down).
        opts.push_str(",volatile");
    }
    opts.push(',');
    opts.push_str(FIXED_OPTIONS);
    if opts.len() > OPTIONS_LIMIT {
        return Err(MountError::OptionsTooLong { target: target.to_path_buf(), len: opts.len(), limit: OPTIONS_LIMIT });
    }
    Ok(opts)
}

/// A path as it may appear in overlay options. Overlay splits on `,` and `:` and treats `\`
/// as an escape; we refuse rather than escape, since our own paths never need them.
/// sys-mount takes the options as `&str`, hence UTF-8 only.
fn option_path(path: &Path) -> Result<&str, MountError> {
    path.to_str()
        .filter(|s| !s.is_empty() && !s.contains([',', ':', '\\', '\0']))
        .ok_or_else(|| MountError::UnsafePath { path: path.to_path_buf() })
}

impl Mounter for SysMounter {
    fn overlay(&self, spec: &OverlaySpec, target: &Path) -> Result<(), MountError> {
        let opts = overlay_options(spec, target)?;
        // Without an upper the overlay is read-only anyway; saying so on the mount makes
        // mountinfo (and so `mount_at`) report it as such.
        let mut flags = if spec.upper.is_none() || spec.readonly { MountFlags::RDONLY } else { MountFlags::empty() };
        for (on, flag) in [
            (spec.flags.nosuid, MountFlags::NOSUID),
            (spec.flags.nodev, MountFlags::NODEV),
            (spec.flags.noexec, MountFlags::NOEXEC),
            (spec.flags.noatime, MountFlags::NOATIME),
        ] {
            if on {
                flags |= flag;
            }
        }
        Mount::builder()
            .fstype("overlay")
            .flags(flags)
            .data(&opts)
            .mount("overlay", target)
            .map(drop)
            .map_err(|source| MountError::Overlay { target: target.to_path_buf(), source })
    }

    fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
        let bind_err = |err: io::Error| MountError::Bind {
            source_path: source.to_path_buf(),
            target: target.to_path_buf(),
            source: err,
        };
        // The fstype is ignored for MS_BIND, but naming none would make sys-mount try
        // every filesystem the kernel knows.
        Mount::builder().fstype("none").flags(MountFlags::BIND).mount(source, target).map_err(bind_err)?;
        if !readonly {
            return Ok(());
        }
        // MS_RDONLY is ignored on the initial bind; it only takes effect on a remount.
        if let Err(err) = remount_readonly(target) {
            // A half-done publish must not leave a writable bind behind. If this unmount
            // fails too there is nothing better to do than report the first error.
            let _ = sys_mount::unmount(target, UnmountFlags::empty());
            return Err(bind_err(err));
        }
        Ok(())
    }

    fn image(&self, file: &Path, target: &Path) -> Result<(), MountError> {
        super::image::mount(file, target)
    }

    fn grow_image(&self, target: &Path, bytes: u64) -> Result<(), MountError> {
        let entry = self.mount_at(target)?.ok_or_else(|| MountError::Image {
            op: "grow",
            path: target.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "no image is mounted there"),
        })?;
        super::image::grow(Path::new(&entry.source), target, bytes)
    }

    fn unmount(&self, target: &Path) -> Result<Unmounted, MountError> {
        match canonical(target) {
            // Nothing mounted exactly there: do not let umount2 act on whatever else the
            // path resolves to.
            Ok(Some(path)) if info::mount_at(&info::read_mountinfo()?, &path).is_none() => {
                return Ok(Unmounted::NotMounted);
            }
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Unmounted::NotMounted),
            // A dead filesystem (ENOTCONN, ESTALE) cannot be resolved but can still be
            // unmounted, so try anyway.
            Err(_) => {}
        }
        match sys_mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => Ok(Unmounted::Done),
            // Someone else unmounted it between the look-up and the call.
            Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(Unmounted::NotMounted),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                Err(MountError::Busy { target: target.to_path_buf() })
            }
            Err(source) => Err(MountError::Unmount { target: target.to_path_buf(), source }),
        }
    }

    fn mount_at(&self, path: &Path) -> Result<Option<MountEntry>, MountError> {
        let Some(path) = canonical(path).map_err(|source| MountError::Resolve { path: path.to_path_buf(), source })?
        else {
            return Ok(None);
        };
        Ok(info::mount_at(&info::read_mountinfo()?, &path).cloned())
    }

    fn mounts_of_upper(&self, upper: &Path) -> Result<Vec<PathBuf>, MountError> {
        Ok(info::read_mountinfo()?.into_iter().filter(|m| super::writes_to(m, upper)).map(|m| m.mount_point).collect())
    }
}

/// Resolves `path` as the kernel lists it in mountinfo; a missing path is `None`.
fn canonical(path: &Path) -> io::Result<Option<PathBuf>> {
    match std::fs::canonicalize(path) {
        Ok(path) => Ok(Some(path)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Makes the bind mount at `target` read-only, keeping its other per-mount flags: a bind
/// remount sets all of them at once, so leaving them out would drop nosuid, nodev and
/// noexec inherited from the source (and is refused where they are locked).
fn remount_readonly(target: &Path) -> io::Result<()> {
    let current = statvfs(target).map_err(io::Error::from)?.flags();
    let kept = [
        (FsFlags::ST_NOSUID, MountFlags::NOSUID),
        (FsFlags::ST_NODEV, MountFlags::NODEV),
        (FsFlags::ST_NOEXEC, MountFlags::NOEXEC),
        (FsFlags::ST_NOATIME, MountFlags::NOATIME),
        (FsFlags::ST_NODIRATIME, MountFlags::NODIRATIME),
        (FsFlags::ST_RELATIME, MountFlags::RELATIME),
    ];
    let flags = kept
        .into_iter()
        .filter(|(st, _)| current.contains(*st))
        .fold(MountFlags::BIND | MountFlags::REMOUNT | MountFlags::RDONLY, |acc, (_, ms)| acc | ms);
    Mount::builder().fstype("none").flags(flags).mount("", target).map(drop)
}

/// Helpers for tests that mount for real, shared with the probe's tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::{Path, PathBuf};
    use std::thread::sleep;
    use std::time::Duration;

    use super::super::{MountError, Mounter, Unmounted};
    use super::SysMounter;

    /// Whether this test may mount; outside CI a test that cannot says so and returns,
    /// under CI it fails.
    pub fn can_mount(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(std::env::var_os("CI").is_none(), "{test}: needs root to mount, and CI is set");
        eprintln!("{test}: skipped, mounting needs root");
        false
    }

    /// Unmounts like [`SysMounter`], waiting out a passing EBUSY. Another test in this
    /// process that spawns a command forks our file table, and until that child execs it
    /// holds copies of whatever files a test has open inside its mount (seen here as a
    /// 1-in-4 failure of a plain unmount).
    pub fn unmount_settled(target: &Path) -> Result<Unmounted, MountError> {
        for _ in 0..100 {
            match SysMounter.unmount(target) {
                Err(MountError::Busy { .. }) => sleep(Duration::from_millis(20)),
                other => return other,
            }
        }
        SysMounter.unmount(target)
    }

    /// Unmounts its path when dropped, so a failing test leaves nothing mounted; declare it
    /// after the temp dir so it drops first.
    pub struct UnmountGuard(pub PathBuf);

    impl UnmountGuard {
        /// Guards `path`.
        pub fn new(path: &Path) -> Self {
            Self(path.to_path_buf())
        }
    }

    impl Drop for UnmountGuard {
        fn drop(&mut self) {
            // Loop to also remove mounts stacked on the same point.
            loop {
                match unmount_settled(&self.0) {
                    Ok(Unmounted::Done) => continue,
                    Ok(Unmounted::NotMounted) => break,
                    Err(err) => {
                        eprintln!("unmount guard: {err}; left mounted");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::ErrorKind;

    use tempfile::TempDir;

    use super::super::UpperDirs;
    use super::test_support::{can_mount, unmount_settled, UnmountGuard};
    use super::*;

    fn spec(lower: &[&str], upper: Option<(&str, &str)>) -> OverlaySpec {
        OverlaySpec {
            readonly: false,
            lower: lower.iter().map(PathBuf::from).collect(),
            upper: upper.map(|(u, w)| UpperDirs { upper: u.into(), work: w.into() }),
            flags: crate::mount::MountOptions::NONE,
        }
    }

    #[test]
    fn builds_options() {
        let target = Path::new("/t");
        let cases = [
            (
                spec(&["/l/top", "/l/mid", "/l/bottom"], Some(("/v/upper", "/v/work"))),
                "lowerdir=/l/top:/l/mid:/l/bottom,upperdir=/v/upper,workdir=/v/work,volatile,\
                 index=off,redirect_dir=off,metacopy=off",
            ),
            (spec(&["/l/only"], None), "lowerdir=/l/only,index=off,redirect_dir=off,metacopy=off"),
            (
                spec(&["/with space/and=equals"], None),
                "lowerdir=/with space/and=equals,index=off,redirect_dir=off,metacopy=off",
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(overlay_options(&spec, target).expect("options"), want);
        }
    }

    #[test]
    fn refuses_unsafe_paths() {
        let target = Path::new("/t");
        for bad in ["/a,b", "/a:b", "/a\\b", "/a\0b", ""] {
            let cases = [
                spec(&["/ok", bad], Some(("/u", "/w"))),
                spec(&["/ok"], Some((bad, "/w"))),
                spec(&["/ok"], Some(("/u", bad))),
            ];
            for spec in cases {
                match overlay_options(&spec, target) {
                    Err(MountError::UnsafePath { path }) => assert_eq!(path, Path::new(bad)),
                    other => panic!("{bad:?} in {spec:?}: got {other:?}"),
                }
            }
        }
    }

    #[test]
    fn refuses_no_lower() {
        let err = overlay_options(&spec(&[], None), Path::new("/t")).expect_err("no lower");
        assert!(matches!(err, MountError::Overlay { .. }), "{err:?}");
        assert!(err.to_string().contains("/t"), "{err}");
    }

    #[test]
    fn keeps_within_one_page() {
        let target = Path::new("/t");
        let tail = ",index=off,redirect_dir=off,metacopy=off".len();
        let head = "lowerdir=".len();
        // One lower of exactly the length that fills the page, then one byte more.
        let fits = format!("/{}", "a".repeat(OPTIONS_LIMIT - head - tail - 1));
        let opts = overlay_options(&spec(&[&fits], None), target).expect("fits");
        assert_eq!(opts.len(), OPTIONS_LIMIT);

        let over = format!("{fits}b");
        match overlay_options(&spec(&[&over], None), target) {
            Err(MountError::OptionsTooLong { target: t, len, limit }) => {
                assert_eq!((t.as_path(), len, limit), (target, OPTIONS_LIMIT + 1, OPTIONS_LIMIT));
            }
            other => panic!("got {other:?}"),
        }

        // Many short layers are fine well past fsconfig's 256 bytes.
        let layers: Vec<String> = (0..100).map(|i| format!("/var/lib/j/layers/{i:08}")).collect();
        let layers: Vec<&str> = layers.iter().map(String::as_str).collect();
        let opts = overlay_options(&spec(&layers, Some(("/u", "/w"))), target).expect("fits");
        assert!(opts.len() > 256 && opts.len() <= OPTIONS_LIMIT, "{}", opts.len());
    }

    /// A temp dir with the given subdirectories created.
    fn dirs(names: &[&str]) -> TempDir {
        let tmp = TempDir::new().expect("tempdir");
        for name in names {
            fs::create_dir_all(tmp.path().join(name)).expect("mkdir");
        }
        tmp
    }

    fn errno(err: &io::Error) -> Option<i32> {
        err.raw_os_error()
    }

    #[test]
    fn overlay_of_forty_layers() {
        if !can_mount("overlay_of_forty_layers") {
            return;
        }
        let tmp = dirs(&["upper", "work", "merged"]);
        let root = tmp.path();
        // Bottom is layer 0, top is layer 39; `lower` wants top first.
        let mut lower = Vec::new();
        for i in 0..40 {
            let layer = root.join(format!("layer-{i:02}"));
            fs::create_dir(&layer).expect("mkdir layer");
            fs::write(layer.join("shared"), format!("{i}")).expect("write shared");
            fs::write(layer.join(format!("only-{i}")), "x").expect("write own");
            lower.insert(0, layer);
        }
        let spec = OverlaySpec {
            readonly: false,
            lower,
            upper: Some(UpperDirs { upper: root.join("upper"), work: root.join("work") }),
            flags: crate::mount::MountOptions::NONE,
        };
        let merged = root.join("merged");
        let opts = overlay_options(&spec, &merged).expect("options");
        assert!(opts.len() > 256, "lowerdir is only {} bytes", opts.len());

        SysMounter.overlay(&spec, &merged).expect("mount 40 layers");
        let _guard = UnmountGuard::new(&merged);

        assert_eq!(fs::read_to_string(merged.join("shared")).expect("read"), "39");
        assert!(merged.join("only-0").exists(), "bottom layer missing");
        assert!(merged.join("only-39").exists(), "top layer missing");
        fs::write(merged.join("shared"), "new").expect("write through");
        assert_eq!(fs::read_to_string(root.join("upper/shared")).expect("read"), "new");
        assert_eq!(fs::read_to_string(root.join("layer-39/shared")).expect("read"), "39");

        let entry = SysMounter.mount_at(&merged).expect("mount_at").expect("mounted");
        assert_eq!(entry.fstype, "overlay");
        assert!(!entry.is_readonly(), "{entry:?}");
        assert_eq!(unmount_settled(&merged).expect("unmount"), Unmounted::Done);
    }

    #[test]
    fn overlay_at_the_page_limit() {
        if !can_mount("overlay_at_the_page_limit") {
            return;
        }
        let tmp = dirs(&["upper", "work", "merged"]);
        let root = tmp.path();
        let merged = root.join("merged");
        let mut spec = OverlaySpec {
            readonly: false,
            lower: Vec::new(),
            upper: Some(UpperDirs { upper: root.join("upper"), work: root.join("work") }),
            flags: crate::mount::MountOptions::NONE,
        };
        let len = |spec: &OverlaySpec| overlay_options(spec, &merged).map_or(usize::MAX, |o| o.len());
        let mut i = 0;
        loop {
            spec.lower.push(root.join(format!("layer-{i:03}")));
            if len(&spec) > OPTIONS_LIMIT {
                spec.lower.pop();
                break;
            }
            i += 1;
        }
        // Pad the bottom layer's name so the string is exactly one page minus its NUL.
        let short = OPTIONS_LIMIT - len(&spec);
        let bottom = spec.lower.pop().expect("layers");
        let mut name = bottom.into_os_string();
        name.push("x".repeat(short));
        spec.lower.push(PathBuf::from(name));
        for layer in &spec.lower {
            fs::create_dir(layer).expect("mkdir layer");
        }
        fs::write(spec.lower[spec.lower.len() - 1].join("bottom"), "b").expect("write");
        assert_eq!(overlay_options(&spec, &merged).expect("fits").len(), OPTIONS_LIMIT);

        SysMounter.overlay(&spec, &merged).expect("mount at the page limit");
        let _guard = UnmountGuard::new(&merged);
        assert!(merged.join("bottom").exists());
        assert_eq!(unmount_settled(&merged).expect("unmount"), Unmounted::Done);
    }

    #[test]
    fn readonly_overlay_rejects_writes() {
        if !can_mount("readonly_overlay_rejects_writes") {
            return;
        }
        let tmp = dirs(&["top", "bottom", "merged"]);
        let root = tmp.path();
        fs::write(root.join("bottom/f"), "bottom").expect("write");
        let merged = root.join("merged");
        let spec = OverlaySpec {
            readonly: false,
            lower: vec![root.join("top"), root.join("bottom")],
            upper: None,
            flags: crate::mount::MountOptions::NONE,
        };

        SysMounter.overlay(&spec, &merged).expect("mount");
        let _guard = UnmountGuard::new(&merged);

        assert_eq!(fs::read_to_string(merged.join("f")).expect("read"), "bottom");
        let err = fs::write(merged.join("g"), "x").expect_err("write to a read-only overlay");
        assert_eq!(errno(&err), Some(libc::EROFS), "{err}");
        let entry = SysMounter.mount_at(&merged).expect("mount_at").expect("mounted");
        assert!(entry.is_readonly(), "{entry:?}");
        assert_eq!(unmount_settled(&merged).expect("unmount"), Unmounted::Done);
    }

    #[test]
    fn overlay_failure_names_the_target() {
        if !can_mount("overlay_failure_names_the_target") {
            return;
        }
        let tmp = dirs(&["merged"]);
        let merged = tmp.path().join("merged");
        let spec = OverlaySpec {
            readonly: false,
            lower: vec![tmp.path().join("missing")],
            upper: None,
            flags: crate::mount::MountOptions::NONE,
        };
        let err = SysMounter.overlay(&spec, &merged).expect_err("missing lower");
        let _guard = UnmountGuard::new(&merged);
        match &err {
            MountError::Overlay { target, source } => {
                assert_eq!(target, &merged);
                assert_eq!(errno(source), Some(libc::ENOENT), "{source}");
            }
            other => panic!("got {other:?}"),
        }
        assert!(err.to_string().contains(&*merged.to_string_lossy()), "{err}");
    }

    #[test]
    fn bind_and_readonly_bind() {
        if !can_mount("bind_and_readonly_bind") {
            return;
        }
        let tmp = dirs(&["src", "rw", "ro"]);
        let root = tmp.path();
        let (src, rw, ro) = (root.join("src"), root.join("rw"), root.join("ro"));
        fs::write(src.join("f"), "hello").expect("write");

        SysMounter.bind(&src, &rw, false).expect("bind");
        let _rw_guard = UnmountGuard::new(&rw);
        SysMounter.bind(&src, &ro, true).expect("read-only bind");
        let _ro_guard = UnmountGuard::new(&ro);

        fs::write(rw.join("g"), "via rw").expect("write through rw bind");
        assert_eq!(fs::read_to_string(src.join("g")).expect("read"), "via rw");
        assert_eq!(fs::read_to_string(ro.join("f")).expect("read"), "hello");
        let err = fs::write(ro.join("h"), "x").expect_err("write to a read-only bind");
        assert_eq!(errno(&err), Some(libc::EROFS), "{err}");

        let rw_entry = SysMounter.mount_at(&rw).expect("mount_at").expect("rw mounted");
        let ro_entry = SysMounter.mount_at(&ro).expect("mount_at").expect("ro mounted");
        assert!(!rw_entry.is_readonly(), "{rw_entry:?}");
        assert!(ro_entry.is_readonly(), "{ro_entry:?}");
        // Both show the same filesystem and subtree: that is how a caller tells the source.
        assert_eq!(rw_entry.major_minor, ro_entry.major_minor);
        assert_eq!(rw_entry.root, ro_entry.root);
        // The source stays writable.
        fs::write(src.join("i"), "x").expect("write to source");

        for target in [&rw, &ro] {
            assert_eq!(unmount_settled(target).expect("unmount"), Unmounted::Done);
        }
    }

    #[test]
    fn readonly_bind_keeps_other_flags() {
        if !can_mount("readonly_bind_keeps_other_flags") {
            return;
        }
        let tmp = dirs(&["fs", "ro"]);
        let (fs_dir, ro) = (tmp.path().join("fs"), tmp.path().join("ro"));
        Mount::builder()
            .fstype("tmpfs")
            .flags(MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC)
            .data("size=1m")
            .mount("tmpfs", &fs_dir)
            .expect("mount tmpfs");
        let _fs_guard = UnmountGuard::new(&fs_dir);

        SysMounter.bind(&fs_dir, &ro, true).expect("read-only bind");
        let _ro_guard = UnmountGuard::new(&ro);
        let entry = SysMounter.mount_at(&ro).expect("mount_at").expect("mounted");
        let opts: Vec<&str> = entry.mount_options.split(',').collect();
        for want in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(opts.contains(&want), "{want} missing from {entry:?}");
        }
        assert_eq!(unmount_settled(&ro).expect("unmount ro"), Unmounted::Done);
        assert_eq!(unmount_settled(&fs_dir).expect("unmount tmpfs"), Unmounted::Done);
    }

    #[test]
    fn bind_of_missing_source_fails_with_both_paths() {
        if !can_mount("bind_of_missing_source_fails_with_both_paths") {
            return;
        }
        let tmp = dirs(&["target"]);
        let (src, target) = (tmp.path().join("missing"), tmp.path().join("target"));
        let err = SysMounter.bind(&src, &target, true).expect_err("missing source");
        let _guard = UnmountGuard::new(&target);
        let msg = err.to_string();
        assert!(msg.contains(&*src.to_string_lossy()), "{msg}");
        assert!(msg.contains(&*target.to_string_lossy()), "{msg}");
        assert!(SysMounter.mount_at(&target).expect("mount_at").is_none());
    }

    #[test]
    fn unmount_twice() {
        if !can_mount("unmount_twice") {
            return;
        }
        let tmp = dirs(&["src", "target"]);
        let (src, target) = (tmp.path().join("src"), tmp.path().join("target"));
        SysMounter.bind(&src, &target, false).expect("bind");
        let _guard = UnmountGuard::new(&target);

        assert_eq!(unmount_settled(&target).expect("first"), Unmounted::Done);
        assert_eq!(unmount_settled(&target).expect("second"), Unmounted::NotMounted);
        assert!(SysMounter.mount_at(&target).expect("mount_at").is_none());
    }

    #[test]
    fn unmount_of_nothing() {
        // Needs no privilege: nothing is mounted, so umount2 must not even be called.
        let tmp = dirs(&["plain"]);
        let cases = [tmp.path().join("plain"), tmp.path().join("missing"), tmp.path().join("missing/deeper")];
        for path in cases {
            assert_eq!(unmount_settled(&path).expect("unmount"), Unmounted::NotMounted, "{path:?}");
            assert!(SysMounter.mount_at(&path).expect("mount_at").is_none(), "{path:?}");
        }
    }

    #[test]
    fn mount_at_cannot_resolve() {
        let tmp = dirs(&[]);
        let file = tmp.path().join("file");
        fs::write(&file, "").expect("write");
        let through_file = file.join("inner");
        match SysMounter.mount_at(&through_file) {
            Err(MountError::Resolve { path, source }) => {
                assert_eq!(path, through_file);
                assert_eq!(errno(&source), Some(libc::ENOTDIR), "{source}");
            }
            other => panic!("want Resolve, got {other:?}"),
        }
    }

    #[test]
    fn busy_unmount_is_busy_and_keeps_the_mount() {
        if !can_mount("busy_unmount_is_busy_and_keeps_the_mount") {
            return;
        }
        let tmp = dirs(&["lower", "upper", "work", "merged"]);
        let root = tmp.path();
        let merged = root.join("merged");
        let spec = OverlaySpec {
            readonly: false,
            lower: vec![root.join("lower")],
            upper: Some(UpperDirs { upper: root.join("upper"), work: root.join("work") }),
            flags: crate::mount::MountOptions::NONE,
        };
        SysMounter.overlay(&spec, &merged).expect("mount");
        let _guard = UnmountGuard::new(&merged);

        let open = fs::File::create(merged.join("held")).expect("open a file inside");
        match SysMounter.unmount(&merged) {
            Err(MountError::Busy { target }) => assert_eq!(target, merged),
            other => panic!("want Busy, got {other:?}"),
        }
        assert!(SysMounter.mount_at(&merged).expect("mount_at").is_some(), "busy mount vanished");
        assert!(merged.join("held").exists());

        drop(open);
        assert_eq!(unmount_settled(&merged).expect("unmount"), Unmounted::Done);
        assert!(SysMounter.mount_at(&merged).expect("mount_at").is_none());
        assert_eq!(fs::metadata(root.join("upper/held")).map(|m| m.is_file()).map_err(|e| e.kind()), Ok(true));
        assert_eq!(fs::metadata(merged.join("held")).map_err(|e| e.kind()).err(), Some(ErrorKind::NotFound));
    }

    #[test]
    fn stacked_mounts_unmount_top_first() {
        if !can_mount("stacked_mounts_unmount_top_first") {
            return;
        }
        let tmp = dirs(&["a", "b", "target"]);
        let root = tmp.path();
        let target = root.join("target");
        fs::write(root.join("a/from-a"), "").expect("write");
        fs::write(root.join("b/from-b"), "").expect("write");
        SysMounter.bind(&root.join("a"), &target, false).expect("bind a");
        let _guard = UnmountGuard::new(&target);
        SysMounter.bind(&root.join("b"), &target, true).expect("bind b over a");

        let top = SysMounter.mount_at(&target).expect("mount_at").expect("mounted");
        assert!(top.is_readonly(), "{top:?}");
        assert!(target.join("from-b").exists());
        assert_eq!(unmount_settled(&target).expect("unmount b"), Unmounted::Done);
        let next = SysMounter.mount_at(&target).expect("mount_at").expect("a still mounted");
        assert!(!next.is_readonly(), "{next:?}");
        assert!(target.join("from-a").exists());
        assert_eq!(unmount_settled(&target).expect("unmount a"), Unmounted::Done);
        assert_eq!(unmount_settled(&target).expect("again"), Unmounted::NotMounted);
    }
}
