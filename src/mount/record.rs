//! A [`Mounter`] for unit tests: it records every call, keeps a table of what it has
//! "mounted" so look-ups and unmounts answer like the kernel would, and fails on demand.
//!
//! It is injected explicitly wherever a `&dyn Mounter` is taken; nothing switches on
//! `cfg!(test)`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{sys, MountEntry, MountError, Mounter, OverlaySpec, Unmounted};

/// One recorded call, in the order it was made (failed calls included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`Mounter::overlay`].
    Overlay { spec: OverlaySpec, target: PathBuf },
    /// [`Mounter::bind`].
    Bind { source: PathBuf, target: PathBuf, readonly: bool },
    /// [`Mounter::unmount`].
    Unmount { target: PathBuf },
    /// [`Mounter::image`].
    Image { file: PathBuf, target: PathBuf },
    /// [`Mounter::grow_image`].
    GrowImage { target: PathBuf, bytes: u64 },
}

/// Which operation an injected failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// [`Mounter::overlay`].
    Overlay,
    /// [`Mounter::bind`].
    Bind,
    /// [`Mounter::unmount`].
    Unmount,
    /// [`Mounter::image`].
    Image,
    /// [`Mounter::mount_at`], which is not recorded (it changes nothing) but can fail.
    MountAt,
}

/// The device and filesystem the double pretends every unmounted path lives on.
const HOST_DEVICE: &str = "253:1";
const HOST_FSTYPE: &str = "ext4";
const HOST_SOURCE: &str = "/dev/vda1";

/// A mount the double pretends to hold.
#[derive(Debug, Clone)]
struct Fake {
    id: u32,
    major_minor: String,
    root: PathBuf,
    fstype: String,
    source: String,
    super_options: String,
    readonly: bool,
    flags: Vec<&'static str>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Call>,
    /// Mounts by mount point, bottom first, so stacked mounts come off top first.
    mounted: HashMap<PathBuf, Vec<Fake>>,
    failures: HashMap<CallKind, (usize, i32)>,
    next_id: u32,
}

impl State {
    /// Takes one injected failure for `kind`, if any is left.
    fn take_failure(&mut self, kind: CallKind) -> Option<io::Error> {
        let (left, errno) = self.failures.get_mut(&kind)?;
        if *left == 0 {
            return None;
        }
        *left -= 1;
        Some(io::Error::from_raw_os_error(*errno))
    }

    fn new_id(&mut self) -> u32 {
        self.next_id += 1;
        // Ids the real table would not reuse, clear of the root's low numbers.
        1000 + self.next_id
    }

    fn top(&self, path: &Path) -> Option<&Fake> {
        self.mounted.get(path).and_then(|stack| stack.last())
    }

    fn push(&mut self, target: &Path, fake: Fake) {
        self.mounted.entry(target.to_path_buf()).or_default().push(fake);
    }
}

/// Records calls instead of mounting; see the module docs.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    state: Mutex<State>,
}

impl RecordingMounter {
    /// A double with nothing mounted and no failures planned.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked holding the lock must not hide its own failure behind ours.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes the next `n` calls of `kind` fail with `errno` (EBUSY on unmount is
    /// [`MountError::Busy`]); replaces any failure planned for that kind.
    pub fn fail_next(&self, kind: CallKind, n: usize, errno: i32) {
        self.state().failures.insert(kind, (n, errno));
    }

    /// The calls made so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The calls made so far, forgetting them.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    /// The mount points that hold at least one mount, sorted.
    pub fn mounted(&self) -> Vec<PathBuf> {
        let mut points: Vec<PathBuf> = self.state().mounted.keys().cloned().collect();
        points.sort();
        points
    }
}

impl Mounter for RecordingMounter {
    fn overlay(&self, spec: &OverlaySpec, target: &Path) -> Result<(), MountError> {
        let mut state = self.state();
        state.calls.push(Call::Overlay { spec: spec.clone(), target: target.to_path_buf() });
        // Refuse what the real one refuses before it reaches the kernel.
        let opts = sys::overlay_options(spec, target)?;
        if let Some(source) = state.take_failure(CallKind::Overlay) {
            return Err(MountError::Overlay { target: target.to_path_buf(), source });
        }
        let readonly = spec.upper.is_none();
        let id = state.new_id();
        let fake = Fake {
            id,
            major_minor: format!("0:{id}"),
            root: PathBuf::from("/"),
            fstype: "overlay".to_owned(),
            source: "overlay".to_owned(),
            super_options: format!("{},{opts}", if readonly { "ro" } else { "rw" }),
            readonly,
            flags: spec.flags.names(),
        };
        state.push(target, fake);
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
        let mut state = self.state();
        state.calls.push(Call::Bind { source: source.to_path_buf(), target: target.to_path_buf(), readonly });
        if let Some(err) = state.take_failure(CallKind::Bind) {
            return Err(MountError::Bind {
                source_path: source.to_path_buf(),
                target: target.to_path_buf(),
                source: err,
            });
        }
        // Like the kernel, a bind shows the filesystem the source lives on and the
        // source's place inside it, so callers can match a bind to its origin.
        let origin = source.ancestors().find_map(|dir| state.top(dir).map(|fake| (dir, fake.clone())));
        let id = state.new_id();
        let fake = match origin {
            Some((point, under)) => {
                Fake { id, root: under.root.join(source.strip_prefix(point).unwrap_or(source)), readonly, ..under }
            }
            None => Fake {
                id,
                major_minor: HOST_DEVICE.to_owned(),
                root: source.to_path_buf(),
                fstype: HOST_FSTYPE.to_owned(),
                source: HOST_SOURCE.to_owned(),
                super_options: "rw".to_owned(),
                readonly,
                flags: Vec::new(),
            },
        };
        state.push(target, fake);
        Ok(())
    }

    fn image(&self, file: &Path, target: &Path) -> Result<(), MountError> {
        let mut state = self.state();
        state.calls.push(Call::Image { file: file.to_path_buf(), target: target.to_path_buf() });
        if let Some(source) = state.take_failure(CallKind::Image) {
            return Err(MountError::Image { op: "mount image on", path: target.to_path_buf(), source });
        }
        let id = state.new_id();
        let fake = Fake {
            id,
            major_minor: format!("7:{id}"),
            root: PathBuf::from("/"),
            fstype: "ext4".to_owned(),
            source: format!("/dev/loop{id}"),
            super_options: "rw,errors=remount-ro".to_owned(),
            readonly: false,
            flags: vec!["nosuid", "nodev"],
        };
        state.push(target, fake);
        Ok(())
    }

    fn grow_image(&self, target: &Path, bytes: u64) -> Result<(), MountError> {
        let mut state = self.state();
        state.calls.push(Call::GrowImage { target: target.to_path_buf(), bytes });
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<Unmounted, MountError> {
        let mut state = self.state();
        state.calls.push(Call::Unmount { target: target.to_path_buf() });
        if let Some(source) = state.take_failure(CallKind::Unmount) {
            return Err(match source.raw_os_error() {
                Some(libc::EBUSY) => MountError::Busy { target: target.to_path_buf() },
                _ => MountError::Unmount { target: target.to_path_buf(), source },
            });
        }
        if state.top(target).is_none() {
            return Ok(Unmounted::NotMounted);
        }
        // The kernel refuses to unmount a mount with others beneath its mount point.
        let has_children = state.mounted.keys().any(|point| point != target && point.starts_with(target));
        if has_children {
            return Err(MountError::Busy { target: target.to_path_buf() });
        }
        if let Some(stack) = state.mounted.get_mut(target) {
            stack.pop();
            if stack.is_empty() {
                state.mounted.remove(target);
            }
        }
        Ok(Unmounted::Done)
    }

    fn mount_at(&self, path: &Path) -> Result<Option<MountEntry>, MountError> {
        let mut state = self.state();
        if let Some(source) = state.take_failure(CallKind::MountAt) {
            return Err(MountError::MountInfo { path: PathBuf::from(super::info::MOUNTINFO_PATH), source });
        }
        let Some(fake) = state.top(path) else {
            return Ok(None);
        };
        let stack = &state.mounted[path];
        let parent_id = match stack.len() {
            0 | 1 => 1,
            n => stack[n - 2].id,
        };
        let access = if fake.readonly { "ro" } else { "rw" };
        Ok(Some(MountEntry {
            mount_id: fake.id,
            parent_id,
            major_minor: fake.major_minor.clone(),
            root: fake.root.clone(),
            mount_point: path.to_path_buf(),
            mount_options: [access]
                .into_iter()
                .chain(fake.flags.iter().copied())
                .chain(["relatime"])
                .collect::<Vec<_>>()
                .join(","),
            fstype: fake.fstype.clone(),
            source: fake.source.clone(),
            super_options: fake.super_options.clone(),
        }))
    }

    fn mounts_of_upper(&self, upper: &Path) -> Result<Vec<PathBuf>, MountError> {
        let mut state = self.state();
        if let Some(source) = state.take_failure(CallKind::MountAt) {
            return Err(MountError::MountInfo { path: PathBuf::from(super::info::MOUNTINFO_PATH), source });
        }
        let ours = format!("upperdir={}", upper.display());
        let mut out: Vec<PathBuf> = state
            .mounted
            .iter()
            .filter(|(_, stack)| {
                stack.iter().any(|f| f.fstype == "overlay" && f.super_options.split(',').any(|o| o == ours))
            })
            .map(|(p, _)| p.clone())
            .collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::UpperDirs;
    use super::*;

    fn rw_spec() -> OverlaySpec {
        OverlaySpec {
            readonly: false,
            lower: vec!["/l/b".into(), "/l/a".into()],
            upper: Some(UpperDirs { upper: "/v/upper".into(), work: "/v/work".into() }),
            flags: super::super::MountOptions::default(),
        }
    }

    #[test]
    fn records_and_answers_like_the_kernel() {
        let m = RecordingMounter::new();
        let (staging, target) = (Path::new("/stage"), Path::new("/pod/target"));
        m.overlay(&rw_spec(), staging).expect("overlay");
        m.bind(staging, target, true).expect("bind");

        let staged = m.mount_at(staging).expect("mount_at").expect("staged");
        assert_eq!((staged.fstype.as_str(), staged.is_readonly()), ("overlay", false));
        assert!(staged.super_options.contains("lowerdir=/l/b:/l/a"), "{staged:?}");
        let published = m.mount_at(target).expect("mount_at").expect("published");
        assert!(published.is_readonly(), "{published:?}");
        assert_eq!(published.fstype, "overlay");
        assert_eq!((&published.major_minor, &published.root), (&staged.major_minor, &staged.root));

        assert!(matches!(m.unmount(Path::new("/")), Ok(Unmounted::NotMounted)));
        assert_eq!(m.unmount(target).expect("unmount"), Unmounted::Done);
        assert_eq!(m.unmount(target).expect("again"), Unmounted::NotMounted);
        assert_eq!(m.unmount(staging).expect("unmount"), Unmounted::Done);
        assert!(m.mounted().is_empty());

        assert_eq!(
            m.take_calls(),
            vec![
                Call::Overlay { spec: rw_spec(), target: staging.into() },
                Call::Bind { source: staging.into(), target: target.into(), readonly: true },
                Call::Unmount { target: "/".into() },
                Call::Unmount { target: target.into() },
                Call::Unmount { target: target.into() },
                Call::Unmount { target: staging.into() },
            ]
        );
        assert!(m.calls().is_empty());
    }

    #[test]
    fn bind_of_a_plain_directory_shows_the_host_filesystem() {
        let m = RecordingMounter::new();
        m.bind(Path::new("/data/x"), Path::new("/t"), false).expect("bind");
        let entry = m.mount_at(Path::new("/t")).expect("mount_at").expect("mounted");
        assert_eq!((entry.fstype.as_str(), entry.root.as_path()), (HOST_FSTYPE, Path::new("/data/x")));
        assert!(!entry.is_readonly());
        // A subdirectory of a fake overlay is rooted inside it.
        m.overlay(&rw_spec(), Path::new("/ov")).expect("overlay");
        m.bind(Path::new("/ov/sub"), Path::new("/t2"), false).expect("bind");
        let entry = m.mount_at(Path::new("/t2")).expect("mount_at").expect("mounted");
        assert_eq!((entry.fstype.as_str(), entry.root.as_path()), ("overlay", Path::new("/sub")));
    }

    #[test]
    fn injected_failures() {
        let m = RecordingMounter::new();
        m.fail_next(CallKind::Overlay, 1, libc::ENOSPC);
        let err = m.overlay(&rw_spec(), Path::new("/a")).expect_err("injected");
        assert!(matches!(&err, MountError::Overlay { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)));
        m.overlay(&rw_spec(), Path::new("/a")).expect("only one failure was planned");

        m.fail_next(CallKind::Unmount, 2, libc::EBUSY);
        for _ in 0..2 {
            assert!(matches!(m.unmount(Path::new("/a")), Err(MountError::Busy { .. })));
        }
        assert_eq!(m.mounted(), [PathBuf::from("/a")], "a failed unmount keeps the mount");
        m.fail_next(CallKind::Unmount, 1, libc::EIO);
        assert!(matches!(m.unmount(Path::new("/a")), Err(MountError::Unmount { .. })));
        assert_eq!(m.unmount(Path::new("/a")).expect("unmount"), Unmounted::Done);

        m.fail_next(CallKind::Bind, 1, libc::EPERM);
        assert!(matches!(m.bind(Path::new("/a"), Path::new("/b"), true), Err(MountError::Bind { .. })));
        assert!(m.mount_at(Path::new("/b")).expect("mount_at").is_none());

        m.fail_next(CallKind::MountAt, 1, libc::EIO);
        assert!(matches!(m.mount_at(Path::new("/b")), Err(MountError::MountInfo { .. })));
        // Every mutating call is recorded, failed or not; look-ups are not.
        assert_eq!(m.calls().len(), 7);
    }

    #[test]
    fn refuses_what_the_real_one_refuses() {
        let m = RecordingMounter::new();
        let spec = OverlaySpec {
            readonly: false,
            lower: vec!["/l/a:b".into()],
            upper: None,
            flags: super::super::MountOptions::NONE,
        };
        assert!(matches!(m.overlay(&spec, Path::new("/t")), Err(MountError::UnsafePath { .. })));
        assert!(m.mounted().is_empty());
    }

    #[test]
    fn stacked_mounts_come_off_top_first() {
        let m = RecordingMounter::new();
        let t = Path::new("/t");
        m.bind(Path::new("/a"), t, false).expect("bind a");
        m.bind(Path::new("/b"), t, true).expect("bind b");
        let top = m.mount_at(t).expect("mount_at").expect("top");
        assert!(top.is_readonly());
        assert_eq!(m.unmount(t).expect("unmount"), Unmounted::Done);
        let next = m.mount_at(t).expect("mount_at").expect("a");
        assert_eq!((next.root.as_path(), next.is_readonly()), (Path::new("/a"), false));
        assert_ne!(top.parent_id, 1, "the top mount sits on the one below");

        // A mount with another beneath its mount point is busy, like in the kernel.
        m.bind(Path::new("/c"), Path::new("/t/sub"), false).expect("bind c");
        assert!(matches!(m.unmount(t), Err(MountError::Busy { .. })));
        assert_eq!(m.unmount(Path::new("/t/sub")).expect("unmount sub"), Unmounted::Done);
        assert_eq!(m.unmount(t).expect("unmount a"), Unmounted::Done);
    }
}
