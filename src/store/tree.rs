//! Directory-tree work on layer trees: measure, copy (for squash and shared layers), remove.
//!
//! Layer content is written by build jobs and is untrusted. Every walk therefore goes
//! through directory file descriptors (`*at` calls on names read from the directory),
//! never follows a symlink, and never resolves a path longer than one name below a
//! directory it already holds open, so a tree can neither lead the walk outside its root
//! nor defeat it with paths longer than `PATH_MAX`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstat, fstatat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, FileStat, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// A failed tree operation: the system call, the path it was about, and why.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A path the operation needed does not exist.
    #[error("{op} {}: {source}", path.display())]
    NotFound { op: &'static str, path: PathBuf, source: io::Error },
    /// A path the operation would create already exists.
    #[error("{op} {}: {source}", path.display())]
    Exists { op: &'static str, path: PathBuf, source: io::Error },
    /// Any other failure.
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: io::Error },
}

impl TreeError {
    pub(super) fn new(op: &'static str, path: PathBuf, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => Self::NotFound { op, path, source },
            io::ErrorKind::AlreadyExists => Self::Exists { op, path, source },
            _ => Self::Io { op, path, source },
        }
    }
}

/// Attaches the operation and (lazily built) path to a system call's error.
pub(super) trait Context<T> {
    fn ctx(self, op: &'static str, path: impl FnOnce() -> PathBuf) -> Result<T, TreeError>;
}

impl<T, E: Into<io::Error>> Context<T> for Result<T, E> {
    fn ctx(self, op: &'static str, path: impl FnOnce() -> PathBuf) -> Result<T, TreeError> {
        self.map_err(|e| TreeError::new(op, path(), e.into()))
    }
}

/// Sizes of a tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Sum of the sizes of regular files, counted once per name (hard links included).
    pub bytes: u64,
    /// Entries below the root of any type: files, directories, symlinks, devices...
    pub files: u64,
}

impl TreeStats {
    fn add(&mut self, st: &FileStat) {
        self.files += 1;
        if kind(st) == SFlag::S_IFREG {
            self.bytes += size(st);
        }
    }
}

/// Options for copy_tree.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// Keep `trusted.overlay.*` xattrs (opaque markers, redirects); a flattened copy drops them.
    pub keep_overlay_xattrs: bool,
}

/// Measures a tree without following symlinks.
pub fn measure(root: &Path) -> Result<TreeStats, TreeError> {
    let mut dirs = DirStack::open(root)?;
    let mut stats = TreeStats::default();
    let mut pending = vec![list(&dirs.top).ctx("readdir", || dirs.path())?];
    while let Some(names) = pending.last_mut() {
        let Some(name) = names.pop() else {
            pending.pop();
            if !pending.is_empty() {
                dirs.pop()?;
            }
            continue;
        };
        let st =
            fstatat(dirs.fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ctx("lstat", || dirs.child(&name))?;
        stats.add(&st);
        if kind(&st) == SFlag::S_IFDIR {
            let dir = dirs.open_child(&name, &st)?;
            let names = list(&dir).ctx("readdir", || dirs.child(&name))?;
            dirs.push(name, id(&st), dir);
            pending.push(names);
        }
    }
    Ok(stats)
}

/// Whether `path` is a directory with no entries; a missing path is an error.
pub fn is_empty_dir(path: &Path) -> Result<bool, TreeError> {
    let dir = open_dir(path)?;
    let names = list(&dir).ctx("readdir", || path.to_path_buf())?;
    Ok(names.is_empty())
}

/// Copies the tree at `src` to a new directory `dst`, preserving everything overlay needs.
pub fn copy_tree(
    src: &Path,
    dst: &Path,
    opts: CopyOptions,
    progress: &mut dyn FnMut(&TreeStats),
) -> Result<TreeStats, TreeError> {
    let from = DirStack::open(src)?;
    std::fs::DirBuilder::new().mode(0o700).create(dst).ctx("mkdir", || dst.to_path_buf())?;
    let copied = DirStack::open(dst).and_then(|to| {
        let mut copier =
            Copier { opts, stats: TreeStats::default(), links: HashMap::new(), dst_root: to.top_id, progress };
        copier.run(from, to)
    });
    if copied.is_err() {
        // The half-built copy is ours alone; leaving it would only make scratch for gc.
        let _ = remove_tree(dst);
    }
    copied
}

/// Removes a tree without following symlinks; a missing path is not an error.
pub fn remove_tree(path: &Path) -> Result<(), TreeError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return ignore_missing(std::fs::remove_file(path)).ctx("unlink", || path.into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TreeError::new("lstat", path.into(), e)),
    }
    let mut dirs = match DirStack::open(path) {
        Ok(dirs) => dirs,
        Err(TreeError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut pending = vec![list(&dirs.top).ctx("readdir", || dirs.path())?];
    while let Some(names) = pending.last_mut() {
        let Some(name) = names.pop() else {
            pending.pop();
            if pending.is_empty() {
                break;
            }
            let done = dirs.top_name.clone();
            dirs.pop()?;
            ignore_missing(unlinkat(dirs.fd(), done.as_os_str(), UnlinkatFlags::RemoveDir))
                .ctx("rmdir", || dirs.child(&done))?;
            continue;
        };
        // Linux answers EISDIR for a directory: one call per file, a second only for directories.
        match unlinkat(dirs.fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::EISDIR) => {
                let st = fstatat(dirs.fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .ctx("lstat", || dirs.child(&name))?;
                let dir = dirs.open_child(&name, &st)?;
                let names = list(&dir).ctx("readdir", || dirs.child(&name))?;
                dirs.push(name, id(&st), dir);
                pending.push(names);
            }
            Err(e) => return Err(TreeError::new("unlink", dirs.child(&name), e.into())),
        }
    }
    drop(dirs);
    ignore_missing(std::fs::remove_dir(path)).ctx("rmdir", || path.into())
}

fn ignore_missing<E: Into<io::Error>>(result: Result<(), E>) -> io::Result<()> {
    match result.map_err(Into::into) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// (st_dev, st_ino): what makes two names the same file.
pub(super) type Id = (libc::dev_t, libc::ino_t);

pub(super) fn id(st: &FileStat) -> Id {
    (st.st_dev, st.st_ino)
}

pub(super) fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

pub(super) fn perms(st: &FileStat) -> Mode {
    Mode::from_bits_truncate(st.st_mode & 0o7777)
}

pub(super) fn size(st: &FileStat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

pub(super) fn times(st: &FileStat) -> (TimeSpec, TimeSpec) {
    (TimeSpec::new(st.st_atime, st.st_atime_nsec), TimeSpec::new(st.st_mtime, st.st_mtime_nsec))
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

fn open_dir(path: &Path) -> Result<File, TreeError> {
    let fd = nix::fcntl::open(path, DIR_FLAGS, Mode::empty()).ctx("open", || path.into())?;
    Ok(File::from(fd))
}

pub(super) fn open_dir_at(parent: BorrowedFd<'_>, name: &OsStr) -> nix::Result<File> {
    openat(parent, name, DIR_FLAGS, Mode::empty()).map(File::from)
}

/// The names in a directory, without `.` and `..`, read in full so the walk can close it.
pub(super) fn list(dir: &File) -> io::Result<Vec<OsString>> {
    // A duplicate shares the offset, which nothing else here uses: `*at` calls ignore it.
    let mut stream = Dir::from_fd(OwnedFd::from(dir.try_clone()?))?;
    let mut names = Vec::new();
    for entry in stream.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

fn changed() -> io::Error {
    io::Error::other("the tree changed during the walk")
}

/// Directories above the current one that the walk keeps open, at most; deeper trees
/// reopen ancestors on the way back up instead of running out of descriptors.
const OPEN_ANCESTORS: usize = 64;

/// One directory on the way from the root to the current one.
struct Level {
    name: OsString,
    id: Id,
    // None once closed to stay under OPEN_ANCESTORS.
    dir: Option<File>,
}

/// The open directories from a root to where a walk is, by descriptor.
pub(super) struct DirStack {
    root_path: PathBuf,
    pub(super) top: File,
    top_name: OsString,
    top_id: Id,
    // The root first, when the walk is below it; the root is never closed.
    ancestors: Vec<Level>,
    // ancestors[open_from..] are open, and so is ancestors[0].
    open_from: usize,
}

impl DirStack {
    pub(super) fn open(root: &Path) -> Result<Self, TreeError> {
        let top = open_dir(root)?;
        let st = fstat(top.as_fd()).ctx("fstat", || root.into())?;
        Ok(Self {
            root_path: root.to_path_buf(),
            top,
            top_name: OsString::new(),
            top_id: id(&st),
            ancestors: Vec::new(),
            open_from: 1,
        })
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.top.as_fd()
    }

    /// The path of ancestors[..upto] plus `tail`, for messages only.
    fn path_with(&self, upto: usize, tail: &[&OsStr]) -> PathBuf {
        let mut path = self.root_path.clone();
        for level in self.ancestors.iter().take(upto).skip(1) {
            path.push(&level.name);
        }
        for name in tail {
            path.push(name);
        }
        path
    }

    pub(super) fn path(&self) -> PathBuf {
        match self.ancestors.len() {
            0 => self.root_path.clone(),
            n => self.path_with(n, &[&self.top_name]),
        }
    }

    pub(super) fn child(&self, name: &OsStr) -> PathBuf {
        let mut path = self.path();
        path.push(name);
        path
    }

    /// The names leading from the root to `name` in the current directory.
    pub(super) fn rel(&self, name: &OsStr) -> Box<[OsString]> {
        let mut rel: Vec<OsString> = self.ancestors.iter().skip(1).map(|l| l.name.clone()).collect();
        if !self.ancestors.is_empty() {
            rel.push(self.top_name.clone());
        }
        rel.push(name.to_os_string());
        rel.into_boxed_slice()
    }

    /// Opens the subdirectory `name` that `st` described, refusing a swapped-in replacement.
    pub(super) fn open_child(&self, name: &OsStr, st: &FileStat) -> Result<File, TreeError> {
        let dir = open_dir_at(self.fd(), name).ctx("open", || self.child(name))?;
        let now = fstat(dir.as_fd()).ctx("fstat", || self.child(name))?;
        if id(&now) != id(st) {
            return Err(TreeError::new("open", self.child(name), changed()));
        }
        Ok(dir)
    }

    pub(super) fn push(&mut self, name: OsString, id: Id, dir: File) {
        let parent = Level {
            name: mem::replace(&mut self.top_name, name),
            id: mem::replace(&mut self.top_id, id),
            dir: Some(mem::replace(&mut self.top, dir)),
        };
        self.ancestors.push(parent);
        if self.ancestors.len().saturating_sub(self.open_from) > OPEN_ANCESTORS {
            self.ancestors[self.open_from].dir = None;
            self.open_from += 1;
        }
    }

    /// Moves up to the parent; returns the directory left.
    pub(super) fn pop(&mut self) -> Result<File, TreeError> {
        let Some(parent) = self.ancestors.pop() else {
            return Err(TreeError::new("pop", self.root_path.clone(), changed()));
        };
        let dir = match parent.dir {
            Some(dir) => dir,
            None => self.reopen(&parent)?,
        };
        self.top_name = parent.name;
        self.top_id = parent.id;
        self.open_from = self.open_from.clamp(1, self.ancestors.len().max(1));
        Ok(mem::replace(&mut self.top, dir))
    }

    /// Opens `level`, a closed child of the last ancestor, walking down one name at a time
    /// from the nearest open ancestor and checking each directory is still the one left.
    fn reopen(&mut self, level: &Level) -> Result<File, TreeError> {
        let k = self.ancestors.len();
        let lost = |stack: &Self| TreeError::new("reopen", stack.path_with(k, &[&level.name]), changed());
        let Some(start) = self.ancestors.iter().rposition(|l| l.dir.is_some()) else {
            return Err(lost(self));
        };
        let keep_from = k.saturating_sub(OPEN_ANCESTORS).max(1);
        let mut unkept: Option<File> = None;
        for j in start + 1..=k {
            let parent = match (&unkept, &self.ancestors[j - 1].dir) {
                (Some(dir), _) | (None, Some(dir)) => dir.as_fd(),
                (None, None) => return Err(lost(self)),
            };
            let (name, want) = match self.ancestors.get(j) {
                Some(l) => (&l.name, l.id),
                None => (&level.name, level.id),
            };
            let path = || self.path_with(j, &[name]);
            let dir = open_dir_at(parent, name).ctx("open", path)?;
            let st = fstat(dir.as_fd()).ctx("fstat", path)?;
            if id(&st) != want {
                return Err(TreeError::new("reopen", path(), changed()));
            }
            if j == k {
                self.open_from = keep_from.max(start + 1);
                return Ok(dir);
            }
            if j >= keep_from {
                self.ancestors[j].dir = Some(dir);
                unkept = None;
            } else {
                unkept = Some(dir);
            }
        }
        Err(lost(self))
    }

    /// Opens the directory holding `rel` (names from the root), one name at a time;
    /// None when that is the root itself.
    pub(super) fn open_parent_of(&self, rel: &[OsString]) -> Result<Option<File>, TreeError> {
        let root = self.root_fd()?;
        let mut dir: Option<File> = None;
        let mut path = self.root_path.clone();
        for name in rel.iter().take(rel.len().saturating_sub(1)) {
            path.push(name);
            let parent = dir.as_ref().map_or(root, |d| d.as_fd());
            dir = Some(open_dir_at(parent, name).ctx("open", || path.clone())?);
        }
        Ok(dir)
    }

    pub(super) fn root_fd(&self) -> Result<BorrowedFd<'_>, TreeError> {
        match self.ancestors.first() {
            None => Ok(self.top.as_fd()),
            Some(Level { dir: Some(dir), .. }) => Ok(dir.as_fd()),
            Some(_) => Err(TreeError::new("open", self.root_path.clone(), changed())),
        }
    }
}

/// A directory being copied: what is left to copy and what to apply once it is done.
struct Pending {
    names: Vec<OsString>,
    st: FileStat,
    xattrs: Xattrs,
}

/// The first copy of a file with several names, for the names that follow.
struct FirstLink {
    rel: Box<[OsString]>,
    bytes: u64,
}

struct Copier<'a> {
    opts: CopyOptions,
    stats: TreeStats,
    links: HashMap<Id, FirstLink>,
    dst_root: Id,
    progress: &'a mut dyn FnMut(&TreeStats),
}

impl Copier<'_> {
    fn run(&mut self, mut from: DirStack, mut to: DirStack) -> Result<TreeStats, TreeError> {
        let st = fstat(from.fd()).ctx("fstat", || from.path())?;
        let names = list(&from.top).ctx("readdir", || from.path())?;
        let xattrs = self.read_xattrs(Node::File(&from.top), || from.path())?;
        let mut pending = vec![Pending { names, st, xattrs }];
        while let Some(dir) = pending.last_mut() {
            if let Some(name) = dir.names.pop() {
                if let Some(sub) = self.entry(&mut from, &mut to, name)? {
                    pending.push(sub);
                }
                continue;
            }
            let Some(done) = pending.pop() else { break };
            // After its contents: writing entries would bump the times, and a read-only
            // mode or a default ACL would get in the way of (or leak into) the children.
            set_owner_fd(&to.top, &done.st).ctx("lchown", || to.path())?;
            self.write_xattrs(Node::File(&to.top), &done.xattrs, || to.path())?;
            fchmod(to.fd(), perms(&done.st)).ctx("chmod", || to.path())?;
            let (atime, mtime) = times(&done.st);
            futimens(to.fd(), &atime, &mtime).ctx("utimensat", || to.path())?;
            if !pending.is_empty() {
                from.pop()?;
                to.pop()?;
            }
        }
        (self.progress)(&self.stats);
        Ok(self.stats)
    }

    /// Copies one entry of the current directory; a directory is entered, not finished.
    fn entry(&mut self, from: &mut DirStack, to: &mut DirStack, name: OsString) -> Result<Option<Pending>, TreeError> {
        let st =
            fstatat(from.fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ctx("lstat", || from.child(&name))?;
        let kind = kind(&st);
        if kind == SFlag::S_IFDIR {
            if id(&st) == self.dst_root {
                // The destination sits inside the source: copying it would never end.
                return Ok(None);
            }
            let src = from.open_child(&name, &st)?;
            mkdirat(to.fd(), name.as_os_str(), Mode::from_bits_truncate(0o700)).ctx("mkdir", || to.child(&name))?;
            let dst = open_dir_at(to.fd(), &name).ctx("open", || to.child(&name))?;
            let dst_id = id(&fstat(dst.as_fd()).ctx("fstat", || to.child(&name))?);
            let names = list(&src).ctx("readdir", || from.child(&name))?;
            let xattrs = self.read_xattrs(Node::File(&src), || from.child(&name))?;
            from.push(name.clone(), id(&st), src);
            to.push(name, dst_id, dst);
            self.count(&st, 0);
            return Ok(Some(Pending { names, st, xattrs }));
        }
        let copied = [SFlag::S_IFREG, SFlag::S_IFLNK, SFlag::S_IFCHR, SFlag::S_IFBLK, SFlag::S_IFIFO];
        if !copied.contains(&kind) {
            // A socket is only meaningful to the process that bound it.
            return Ok(None);
        }
        let shared = st.st_nlink > 1;
        if shared {
            if let Some(bytes) = self.link(to, &name, &st)? {
                self.count(&st, bytes);
                return Ok(None);
            }
        }
        let bytes = if kind == SFlag::S_IFREG {
            self.file(from, to, &name, &st)?
        } else if kind == SFlag::S_IFLNK {
            self.symlink(from, to, &name, &st)?;
            0
        } else {
            self.node(from, to, &name, &st, kind)?;
            0
        };
        if shared {
            self.links.insert(id(&st), FirstLink { rel: to.rel(&name), bytes });
        }
        self.count(&st, bytes);
        Ok(None)
    }

    fn count(&mut self, st: &FileStat, bytes: u64) {
        self.stats.files += 1;
        if kind(st) == SFlag::S_IFREG {
            self.stats.bytes += bytes;
        }
        if self.stats.files.is_multiple_of(1000) {
            (self.progress)(&self.stats);
        }
    }

    /// Links `name` to an earlier copy of the same source file; None if there is none yet,
    /// or the earlier copy is out of links and `name` should start a new one.
    fn link(&self, to: &DirStack, name: &OsStr, st: &FileStat) -> Result<Option<u64>, TreeError> {
        let Some(first) = self.links.get(&id(st)) else { return Ok(None) };
        let Some(old_name) = first.rel.last() else { return Ok(None) };
        let parent = to.open_parent_of(&first.rel)?;
        let old_dir = match &parent {
            Some(dir) => dir.as_fd(),
            None => to.root_fd()?,
        };
        match linkat(old_dir, old_name.as_os_str(), to.fd(), name, AtFlags::empty()) {
            Ok(()) => Ok(Some(first.bytes)),
            Err(Errno::EMLINK) => Ok(None),
            Err(e) => Err(TreeError::new("link", to.child(name), e.into())),
        }
    }

    fn file(&self, from: &DirStack, to: &DirStack, name: &OsStr, st: &FileStat) -> Result<u64, TreeError> {
        // O_NONBLOCK: should a FIFO be swapped in after the lstat, opening it must not hang.
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let src = File::from(openat(from.fd(), name, flags, Mode::empty()).ctx("open", || from.child(name))?);
        let now = fstat(src.as_fd()).ctx("fstat", || from.child(name))?;
        if id(&now) != id(st) || kind(&now) != SFlag::S_IFREG {
            return Err(TreeError::new("open", from.child(name), changed()));
        }
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let dst = openat(to.fd(), name, flags, Mode::from_bits_truncate(0o600)).ctx("create", || to.child(name))?;
        let dst = File::from(dst);
        // std picks copy_file_range (reflinks where the filesystem can) and falls back itself.
        let bytes = io::copy(&mut &src, &mut &dst).ctx("copy", || to.child(name))?;
        // Owner before mode and xattrs: chown clears setuid/setgid and security.capability.
        set_owner_fd(&dst, st).ctx("lchown", || to.child(name))?;
        let xattrs = self.read_xattrs(Node::File(&src), || from.child(name))?;
        self.write_xattrs(Node::File(&dst), &xattrs, || to.child(name))?;
        fchmod(dst.as_fd(), perms(st)).ctx("chmod", || to.child(name))?;
        let (atime, mtime) = times(st);
        futimens(dst.as_fd(), &atime, &mtime).ctx("utimensat", || to.child(name))?;
        Ok(bytes)
    }

    fn symlink(&self, from: &DirStack, to: &DirStack, name: &OsStr, st: &FileStat) -> Result<(), TreeError> {
        let target = readlinkat(from.fd(), name).ctx("readlink", || from.child(name))?;
        symlinkat(target.as_os_str(), to.fd(), name).ctx("symlink", || to.child(name))?;
        self.finish_at(from, to, name, st, false)
    }

    fn node(&self, from: &DirStack, to: &DirStack, name: &OsStr, st: &FileStat, kind: SFlag) -> Result<(), TreeError> {
        // Overlay whiteouts are char devices 0/0; the same call carries them.
        mknodat(to.fd(), name, kind, perms(st), st.st_rdev).ctx("mknod", || to.child(name))?;
        self.finish_at(from, to, name, st, true)
    }

    /// Owner, xattrs, mode and times for an entry that cannot be opened (symlink, device, FIFO).
    fn finish_at(
        &self,
        from: &DirStack,
        to: &DirStack,
        name: &OsStr,
        st: &FileStat,
        chmod: bool,
    ) -> Result<(), TreeError> {
        let (uid, gid) = (Some(Uid::from_raw(st.st_uid)), Some(Gid::from_raw(st.st_gid)));
        fchownat(to.fd(), name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW).ctx("lchown", || to.child(name))?;
        let src = proc_path(from.fd(), name);
        let xattrs = self.read_xattrs(Node::Path(&src), || from.child(name))?;
        self.write_xattrs(Node::Path(&proc_path(to.fd(), name)), &xattrs, || to.child(name))?;
        if chmod {
            let nofollow = fchmodat(to.fd(), name, perms(st), FchmodatFlags::NoFollowSymlink);
            match nofollow {
                // Older C libraries cannot chmod without following; the name is one this copy
                // has just created with mknod in a directory only it writes to.
                Err(Errno::ENOTSUP) => fchmodat(to.fd(), name, perms(st), FchmodatFlags::FollowSymlink),
                other => other,
            }
            .ctx("chmod", || to.child(name))?;
        }
        let (atime, mtime) = times(st);
        utimensat(to.fd(), name, &atime, &mtime, UtimensatFlags::NoFollowSymlink).ctx("utimensat", || to.child(name))
    }

    fn read_xattrs(&self, node: Node<'_>, path: impl Fn() -> PathBuf) -> Result<Xattrs, TreeError> {
        read_xattrs(node, self.opts.keep_overlay_xattrs, path)
    }

    fn write_xattrs(&self, node: Node<'_>, xattrs: &Xattrs, path: impl Fn() -> PathBuf) -> Result<(), TreeError> {
        write_xattrs(node, xattrs, path)
    }
}

/// The xattrs of `node`, without `trusted.overlay.*` unless `keep_overlay`.
pub(super) fn read_xattrs(node: Node<'_>, keep_overlay: bool, path: impl Fn() -> PathBuf) -> Result<Xattrs, TreeError> {
    let names = match node.list() {
        Ok(names) => names,
        // A filesystem without xattrs has none to copy.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(TreeError::new("llistxattr", path(), e)),
    };
    let mut xattrs = Vec::new();
    for name in names {
        if !keep_overlay && name.as_bytes().starts_with(OVERLAY_XATTRS) {
            continue;
        }
        match node.get(&name) {
            Ok(Some(value)) => xattrs.push((name, value)),
            Ok(None) => {}
            // Labels belong to the node's policy; a copy without one gets the default.
            Err(_) if name == SELINUX => {}
            Err(e) => return Err(TreeError::new("lgetxattr", path(), e)),
        }
    }
    Ok(xattrs)
}

/// Sets `xattrs` on `node` (a label the policy refuses is left to the policy).
pub(super) fn write_xattrs(node: Node<'_>, xattrs: &Xattrs, path: impl Fn() -> PathBuf) -> Result<(), TreeError> {
    for (name, value) in xattrs {
        match node.set(name, value) {
            Ok(()) => {}
            Err(_) if name == SELINUX => {}
            Err(e) => return Err(TreeError::new("lsetxattr", path(), e)),
        }
    }
    Ok(())
}

/// Copies one entry that is not a directory, with its owner, mode, times and xattrs (but not
/// `trusted.overlay.*`): what a merge does with a file it cannot hard-link. Returns its bytes.
pub(super) fn copy_entry(from: &DirStack, to: &DirStack, name: &OsStr, st: &FileStat) -> Result<u64, TreeError> {
    let mut quiet = |_: &TreeStats| {};
    let copier = Copier {
        opts: CopyOptions { keep_overlay_xattrs: false },
        stats: TreeStats::default(),
        links: HashMap::new(),
        dst_root: to.top_id,
        progress: &mut quiet,
    };
    match kind(st) {
        SFlag::S_IFREG => copier.file(from, to, name, st),
        SFlag::S_IFLNK => copier.symlink(from, to, name, st).map(|()| 0),
        other => copier.node(from, to, name, st, other).map(|()| 0),
    }
}

pub(super) fn set_owner_fd(file: &File, st: &FileStat) -> nix::Result<()> {
    fchown(file.as_fd(), Some(Uid::from_raw(st.st_uid)), Some(Gid::from_raw(st.st_gid)))
}

pub(super) type Xattrs = Vec<(OsString, Vec<u8>)>;

pub(super) const OVERLAY_XATTRS: &[u8] = b"trusted.overlay.";
const SELINUX: &str = "security.selinux";

/// Where an entry's xattrs are reached: its open descriptor, or a no-follow path.
pub(super) enum Node<'a> {
    File(&'a File),
    Path(&'a Path),
}

impl Node<'_> {
    fn list(&self) -> io::Result<xattr::XAttrs> {
        use xattr::FileExt;
        match self {
            Node::File(file) => file.list_xattr(),
            Node::Path(path) => xattr::list(path),
        }
    }

    fn get(&self, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
        use xattr::FileExt;
        match self {
            Node::File(file) => file.get_xattr(name),
            Node::Path(path) => xattr::get(path, name),
        }
    }

    fn set(&self, name: &OsStr, value: &[u8]) -> io::Result<()> {
        use xattr::FileExt;
        match self {
            Node::File(file) => file.set_xattr(name, value),
            Node::Path(path) => xattr::set(path, name, value),
        }
    }
}

/// A path naming `name` inside an open directory: the kernel follows the descriptor's link
/// but, with the l* calls, not `name`, and the path stays short at any depth.
pub(super) fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut path = OsString::from(format!("/proc/self/fd/{}/", dir.as_raw_fd()));
    path.push(name);
    PathBuf::from(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::{lchown, symlink, FileTypeExt, MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixListener;

    use nix::fcntl::AT_FDCWD;
    use nix::sys::stat::{makedev, mknod};
    use tempfile::TempDir;

    const KEEP: CopyOptions = CopyOptions { keep_overlay_xattrs: true };
    const FLAT: CopyOptions = CopyOptions { keep_overlay_xattrs: false };

    fn need_root(what: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(std::env::var_os("CI").is_none(), "{what} needs root, and CI is set");
        eprintln!("skipping: {what} needs root");
        false
    }

    fn tmp() -> TempDir {
        tempfile::tempdir().unwrap()
    }

    fn write(path: &Path, content: &str, mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mkdir(path: &Path, mode: u32) {
        fs::create_dir(path).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn set_times(path: &Path, secs: i64, nsec: i64) {
        let atime = TimeSpec::new(secs - 100, 7);
        let mtime = TimeSpec::new(secs, nsec);
        utimensat(AT_FDCWD, path, &atime, &mtime, UtimensatFlags::NoFollowSymlink).unwrap();
    }

    fn copy(src: &Path, dst: &Path, opts: CopyOptions) -> TreeStats {
        copy_tree(src, dst, opts, &mut |_| {}).unwrap()
    }

    /// Everything a copy must keep about one entry, except atime (reading changes it).
    #[derive(Debug, PartialEq, Eq)]
    struct Entry {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: (i64, i64),
        rdev: u64,
        content: Option<Vec<u8>>,
        target: Option<PathBuf>,
        xattrs: BTreeMap<OsString, Vec<u8>>,
    }

    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
        let mut out = BTreeMap::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).unwrap();
            let mut xattrs = BTreeMap::new();
            for name in xattr::list(&path).unwrap() {
                if name != SELINUX {
                    xattrs.insert(name.clone(), xattr::get(&path, &name).unwrap().unwrap());
                }
            }
            let kind = meta.file_type();
            if kind.is_dir() {
                for entry in fs::read_dir(&path).unwrap() {
                    todo.push(rel.join(entry.unwrap().file_name()));
                }
            }
            let entry = Entry {
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                rdev: meta.rdev(),
                content: kind.is_file().then(|| fs::read(&path).unwrap()),
                target: kind.is_symlink().then(|| fs::read_link(&path).unwrap()),
                xattrs,
            };
            out.insert(rel, entry);
        }
        out
    }

    /// A tree holding every kind of entry a layer can hold, with unusual metadata.
    fn rich_tree(src: &Path, outside: &Path) {
        write(&outside.join("secret"), "outside the tree", 0o644);

        write(&src.join("plain"), "hello", 0o644);
        set_times(&src.join("plain"), 1_600_000_000, 123_456_789);
        write(&src.join("suid"), "#!/bin/sh\n", 0o755);
        lchown(src.join("suid"), Some(1234), Some(5678)).unwrap();
        fs::set_permissions(src.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        write(&src.join("sgid"), "", 0o2711);
        mkdir(&src.join("sticky"), 0o1777);
        write(&src.join("sticky/inner"), "x", 0o600);
        mkdir(&src.join("owned"), 0o750);
        lchown(src.join("owned"), Some(1234), Some(5678)).unwrap();
        mkdir(&src.join("ro"), 0o755);
        write(&src.join("ro/file"), "read only", 0o444);
        fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        let odd = OsString::from_vec(b"bad\xff\nname \x01".to_vec());
        write(&src.join(&odd), "odd name", 0o640);

        symlink("/etc/passwd", src.join("passwd")).unwrap();
        lchown(src.join("passwd"), Some(1234), Some(5678)).unwrap();
        xattr::set(src.join("passwd"), "trusted.sym", b"1").unwrap();
        set_times(&src.join("passwd"), 1_500_000_000, 42);
        symlink("/nonexistent/abs", src.join("abs")).unwrap();
        symlink("missing/target", src.join("dangling")).unwrap();
        symlink(outside, src.join("outside")).unwrap();

        mknod(&src.join("wh"), SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).unwrap();
        mknod(&src.join("blk"), SFlag::S_IFBLK, Mode::from_bits_truncate(0o660), makedev(7, 200)).unwrap();
        lchown(src.join("blk"), Some(0), Some(6)).unwrap();
        nix::unistd::mkfifo(&src.join("pipe"), Mode::from_bits_truncate(0o640)).unwrap();

        mkdir(&src.join("opaque"), 0o755);
        xattr::set(src.join("opaque"), "trusted.overlay.opaque", b"y").unwrap();
        xattr::set(src.join("opaque"), "user.foo", b"bar").unwrap();
        xattr::set(src.join("opaque"), "trusted.other", b"1").unwrap();
        write(&src.join("opaque/kept"), "k", 0o644);
        xattr::set(src.join("opaque/kept"), "user.file", b"value").unwrap();

        mkdir(&src.join("sub"), 0o755);
        write(&src.join("h1"), "shared", 0o640);
        fs::hard_link(src.join("h1"), src.join("sub/h2")).unwrap();

        for dir in ["sticky", "owned", "ro", "opaque", "sub", ""] {
            set_times(&src.join(dir), 1_700_000_000, 987_654_321);
        }
    }

    #[test]
    fn measure_counts_entries_and_bytes() {
        let t = tmp();
        let root = t.path().join("root");
        mkdir(&root, 0o755);
        write(&root.join("a"), "12345", 0o644);
        mkdir(&root.join("d"), 0o755);
        write(&root.join("d/b"), "0123456789", 0o644);
        mkdir(&root.join("d/e"), 0o755);
        symlink("/etc/passwd", root.join("d/passwd")).unwrap();
        symlink(t.path(), root.join("up")).unwrap();
        fs::hard_link(root.join("a"), root.join("d/a2")).unwrap();
        // a, d, d/b, d/e, d/passwd, up, d/a2; the links' targets are not counted.
        assert_eq!(measure(&root).unwrap(), TreeStats { bytes: 20, files: 7 });
        assert_eq!(measure(&root.join("d/e")).unwrap(), TreeStats::default());
        assert!(matches!(measure(&t.path().join("missing")), Err(TreeError::NotFound { op: "open", .. })));
        assert!(matches!(measure(&root.join("up")), Err(TreeError::Io { op: "open", .. })));
    }

    #[test]
    fn copy_round_trip_keeps_everything() {
        if !need_root("copying owners, devices and trusted xattrs") {
            return;
        }
        let (t, outside) = (tmp(), tmp());
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o751);
        rich_tree(&src, outside.path());
        let before = snapshot(&src);
        // The snapshot read the file and so moved its atime.
        set_times(&src.join("plain"), 1_600_000_000, 123_456_789);

        let stats = copy(&src, &dst, KEEP);

        let meta = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap();
        // Before anything reads the copy, which moves atime.
        assert_eq!((meta("plain").atime(), meta("plain").atime_nsec()), (1_599_999_900, 7));
        assert_eq!(snapshot(&dst), before);
        assert_eq!(snapshot(&src), before, "the source is left alone");
        assert_eq!(stats, measure(&dst).unwrap());
        assert_eq!(stats, measure(&src).unwrap());

        assert_eq!(meta("suid").mode() & 0o7777, 0o4755);
        assert_eq!((meta("suid").uid(), meta("suid").gid()), (1234, 5678));
        assert_eq!(meta("sgid").mode() & 0o7777, 0o2711);
        assert_eq!(meta("sticky").mode() & 0o7777, 0o1777);
        assert_eq!(meta("ro").mode() & 0o7777, 0o555);
        assert_eq!((meta("owned").uid(), meta("owned").gid()), (1234, 5678));
        assert_eq!((meta("plain").mtime(), meta("plain").mtime_nsec()), (1_600_000_000, 123_456_789));
        assert_eq!((meta("ro").mtime(), meta("ro").mtime_nsec()), (1_700_000_000, 987_654_321));
        assert_eq!((meta("").mtime(), meta("").mtime_nsec()), (1_700_000_000, 987_654_321));
        assert_eq!(meta("").mode() & 0o7777, 0o751);

        assert!(meta("passwd").file_type().is_symlink(), "a symlink stays a symlink");
        assert_eq!(fs::read_link(dst.join("passwd")).unwrap(), Path::new("/etc/passwd"));
        assert_eq!((meta("passwd").uid(), meta("passwd").gid()), (1234, 5678));
        assert_eq!((meta("passwd").mtime(), meta("passwd").mtime_nsec()), (1_500_000_000, 42));
        assert_eq!(xattr::get(dst.join("passwd"), "trusted.sym").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(fs::read_link(dst.join("abs")).unwrap(), Path::new("/nonexistent/abs"));
        assert_eq!(fs::read_link(dst.join("dangling")).unwrap(), Path::new("missing/target"));
        assert!(meta("outside").file_type().is_symlink());
        assert!(!dst.join("secret").exists() && !dst.join("outside").symlink_metadata().unwrap().is_dir());

        assert!(meta("wh").file_type().is_char_device(), "whiteout");
        assert_eq!(meta("wh").rdev(), 0);
        assert_eq!(meta("blk").rdev(), makedev(7, 200));
        assert!(meta("pipe").file_type().is_fifo());

        let x = |p: &str, n: &str| xattr::get(dst.join(p), n).unwrap();
        assert_eq!(x("opaque", "trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
        assert_eq!(x("opaque", "user.foo").as_deref(), Some(&b"bar"[..]));
        assert_eq!(x("opaque/kept", "user.file").as_deref(), Some(&b"value"[..]));

        assert_eq!(meta("h1").ino(), meta("sub/h2").ino(), "hard links stay hard links");
        assert_eq!(meta("h1").nlink(), 2);
    }

    #[test]
    fn copy_without_overlay_xattrs_drops_only_those() {
        if !need_root("trusted xattrs") {
            return;
        }
        let (t, outside) = (tmp(), tmp());
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o755);
        rich_tree(&src, outside.path());
        xattr::set(src.join("plain"), "trusted.overlay.origin", b"\x00\xfb").unwrap();

        copy(&src, &dst, FLAT);

        let x = |p: &str, n: &str| xattr::get(dst.join(p), n).unwrap();
        assert_eq!(x("opaque", "trusted.overlay.opaque"), None);
        assert_eq!(x("plain", "trusted.overlay.origin"), None);
        assert_eq!(x("opaque", "user.foo").as_deref(), Some(&b"bar"[..]));
        assert_eq!(x("opaque", "trusted.other").as_deref(), Some(&b"1"[..]));
        let mut expected = snapshot(&src);
        for entry in expected.values_mut() {
            entry.xattrs.retain(|name, _| !name.as_bytes().starts_with(OVERLAY_XATTRS));
        }
        assert_eq!(snapshot(&dst), expected);
    }

    #[test]
    fn copy_never_follows_symlinks() {
        let (t, outside) = (tmp(), tmp());
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o755);
        write(&outside.path().join("secret"), "outside the tree", 0o644);
        symlink("/etc/passwd", src.join("passwd")).unwrap();
        symlink(outside.path(), src.join("dir")).unwrap();
        symlink("../../..", src.join("up")).unwrap();

        let stats = copy(&src, &dst, KEEP);

        assert_eq!(stats, TreeStats { bytes: 0, files: 3 });
        for (name, target) in
            [("passwd", Path::new("/etc/passwd")), ("dir", outside.path()), ("up", Path::new("../../.."))]
        {
            assert!(dst.join(name).symlink_metadata().unwrap().file_type().is_symlink());
            assert_eq!(fs::read_link(dst.join(name)).unwrap(), target);
        }
        assert_eq!(measure(&dst).unwrap().bytes, 0, "no file contents were copied");
        // The source root itself must not be a symlink either.
        symlink(&src, t.path().join("alias")).unwrap();
        let err = copy_tree(&t.path().join("alias"), &t.path().join("dst2"), KEEP, &mut |_| {}).unwrap_err();
        assert!(matches!(err, TreeError::Io { op: "open", .. }), "{err}");
        assert!(!t.path().join("dst2").exists());
    }

    #[test]
    fn copy_keeps_hard_links_of_every_kind() {
        let (t, other) = (tmp(), tmp());
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o755);
        mkdir(&src.join("a"), 0o755);
        mkdir(&src.join("a/b"), 0o755);
        write(&src.join("f"), "shared", 0o644);
        fs::hard_link(src.join("f"), src.join("a/f2")).unwrap();
        fs::hard_link(src.join("f"), src.join("a/b/f3")).unwrap();
        symlink("target", src.join("s")).unwrap();
        fs::hard_link(src.join("s"), src.join("a/s2")).unwrap();
        nix::unistd::mkfifo(&src.join("p"), Mode::from_bits_truncate(0o600)).unwrap();
        fs::hard_link(src.join("p"), src.join("a/b/p2")).unwrap();
        write(&src.join("half"), "other half outside", 0o644);
        fs::hard_link(src.join("half"), other.path().join("half")).unwrap();

        let stats = copy(&src, &dst, KEEP);

        let ino = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap().ino();
        let nlink = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap().nlink();
        assert_eq!((ino("f"), ino("f")), (ino("a/f2"), ino("a/b/f3")));
        assert_eq!(nlink("f"), 3);
        assert_eq!(ino("s"), ino("a/s2"));
        assert_eq!(ino("p"), ino("a/b/p2"));
        assert_eq!(nlink("half"), 1);
        assert_eq!(fs::read(dst.join("a/b/f3")).unwrap(), b"shared");
        assert_eq!(stats, measure(&src).unwrap());
        assert_eq!(stats, TreeStats { bytes: 3 * 6 + 18, files: 10 });
    }

    #[test]
    fn copy_keeps_modes_and_times_without_root() {
        let t = tmp();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o755);
        write(&src.join("exe"), "run", 0o4755);
        mkdir(&src.join("tmp"), 0o1777);
        mkdir(&src.join("locked"), 0o755);
        write(&src.join("locked/f"), "f", 0o600);
        xattr::set(src.join("locked/f"), "user.k", b"v").unwrap();
        fs::set_permissions(src.join("locked/f"), fs::Permissions::from_mode(0o400)).unwrap();
        fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o500)).unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o620)).unwrap();
        set_times(&src.join("exe"), 1_234_567_890, 999_999_999);
        set_times(&src.join("locked"), 1_111_111_111, 1);
        let before = snapshot(&src);

        copy(&src, &dst, KEEP);

        assert_eq!(snapshot(&dst), before);
        fs::set_permissions(dst.join("locked"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn copy_skips_sockets() {
        let t = tmp();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o755);
        let _listener = UnixListener::bind(src.join("sock")).unwrap();
        write(&src.join("f"), "f", 0o644);
        assert_eq!(copy(&src, &dst, KEEP), TreeStats { bytes: 1, files: 1 });
        assert!(fs::symlink_metadata(dst.join("sock")).is_err());
    }

    #[test]
    fn copy_refuses_an_existing_destination() {
        let t = tmp();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o755);
        write(&src.join("new"), "new", 0o644);
        mkdir(&dst, 0o755);
        write(&dst.join("old"), "old", 0o644);
        let err = copy_tree(&src, &dst, KEEP, &mut |_| {}).unwrap_err();
        assert!(matches!(&err, TreeError::Exists { op: "mkdir", path, .. } if path == &dst), "{err}");
        assert_eq!(fs::read(dst.join("old")).unwrap(), b"old", "an existing destination is left alone");
        assert!(!dst.join("new").exists());
        // A dangling symlink is there too: mkdir must not create its target.
        symlink(t.path().join("elsewhere"), t.path().join("link")).unwrap();
        assert!(copy_tree(&src, &t.path().join("link"), KEEP, &mut |_| {}).is_err());
        assert!(!t.path().join("elsewhere").exists());
    }

    #[test]
    fn copy_into_the_source_does_not_recurse() {
        let t = tmp();
        let src = t.path().join("src");
        mkdir(&src, 0o755);
        write(&src.join("f"), "f", 0o644);
        let stats = copy(&src, &src.join("copy"), KEEP);
        assert_eq!(stats, TreeStats { bytes: 1, files: 1 });
        assert_eq!(fs::read(src.join("copy/f")).unwrap(), b"f");
        assert!(!src.join("copy/copy").exists());
    }

    #[test]
    fn copy_reports_running_totals() {
        let t = tmp();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o755);
        for i in 0..2500 {
            write(&src.join(format!("f{i}")), "ab", 0o644);
        }
        let mut seen = Vec::new();
        let stats = copy_tree(&src, &dst, KEEP, &mut |s| seen.push(*s)).unwrap();
        assert_eq!(stats, TreeStats { bytes: 5000, files: 2500 });
        assert_eq!(seen, [TreeStats { bytes: 2000, files: 1000 }, TreeStats { bytes: 4000, files: 2000 }, stats],);
    }

    /// Builds a chain of `depth` directories by descriptor: its paths exceed PATH_MAX.
    fn chain(root: &Path, depth: usize) {
        let mut dir = open_dir(root).unwrap();
        for _ in 0..depth {
            mkdirat(dir.as_fd(), CHAIN, Mode::from_bits_truncate(0o755)).unwrap();
            dir = open_dir_at(dir.as_fd(), OsStr::new(CHAIN)).unwrap();
        }
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        let leaf = openat(dir.as_fd(), "leaf", flags, Mode::from_bits_truncate(0o644)).unwrap();
        File::from(leaf).write_all(b"bottom").unwrap();
    }

    const CHAIN: &str = "a-directory-with-a-long-name";

    fn read_leaf(root: &Path, depth: usize) -> Vec<u8> {
        let mut dir = open_dir(root).unwrap();
        for _ in 0..depth {
            dir = open_dir_at(dir.as_fd(), OsStr::new(CHAIN)).unwrap();
        }
        let leaf = openat(dir.as_fd(), "leaf", OFlag::O_RDONLY, Mode::empty()).unwrap();
        let mut out = Vec::new();
        File::from(leaf).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn deep_chains_are_measured_copied_and_removed() {
        let t = tmp();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(&src, 0o755);
        chain(&src, 2000);
        let want = TreeStats { bytes: 6, files: 2001 };
        assert_eq!(measure(&src).unwrap(), want);
        assert_eq!(copy(&src, &dst, KEEP), want);
        assert_eq!(measure(&dst).unwrap(), want);
        assert_eq!(read_leaf(&dst, 2000), b"bottom");
        remove_tree(&src).unwrap();
        remove_tree(&dst).unwrap();
        assert!(!src.exists() && !dst.exists());
    }

    #[test]
    fn deep_walks_keep_few_descriptors_and_notice_swaps() {
        let t = tmp();
        let root = t.path().join("root");
        mkdir(&root, 0o755);
        chain(&root, 300);
        let mut dirs = DirStack::open(&root).unwrap();
        for _ in 0..300 {
            let st = fstatat(dirs.fd(), CHAIN, AtFlags::AT_SYMLINK_NOFOLLOW).unwrap();
            let dir = dirs.open_child(OsStr::new(CHAIN), &st).unwrap();
            dirs.push(CHAIN.into(), id(&st), dir);
            let open = dirs.ancestors.iter().filter(|l| l.dir.is_some()).count();
            assert!(open <= OPEN_ANCESTORS + 1, "{open} directories open");
        }
        for _ in 0..250 {
            dirs.pop().unwrap();
        }
        assert_eq!(dirs.ancestors.len(), 50);
        assert_eq!(fstat(dirs.fd()).unwrap().st_ino, {
            let mut path = root.clone();
            (0..50).for_each(|_| path.push(CHAIN));
            fs::metadata(path).unwrap().ino()
        });
        // Swap a closed ancestor for an impostor: the walk back up must notice.
        fs::rename(root.join(CHAIN), root.join("moved")).unwrap();
        mkdir(&root.join(CHAIN), 0o755);
        chain(&root.join(CHAIN), 60);
        let err = (0..50).try_for_each(|_| dirs.pop().map(drop)).unwrap_err();
        assert!(err.to_string().contains("changed"), "{err}");
    }

    #[test]
    fn is_empty_dir_tells_empty_full_and_missing() {
        let t = tmp();
        mkdir(&t.path().join("empty"), 0o755);
        mkdir(&t.path().join("full"), 0o755);
        write(&t.path().join("full/.hidden"), "", 0o644);
        assert!(is_empty_dir(&t.path().join("empty")).unwrap());
        assert!(!is_empty_dir(&t.path().join("full")).unwrap());
        let missing = t.path().join("missing");
        let err = is_empty_dir(&missing).unwrap_err();
        assert!(matches!(&err, TreeError::NotFound { path, .. } if path == &missing), "{err}");
    }

    #[test]
    fn remove_tree_leaves_symlink_targets_alone() {
        let (t, outside) = (tmp(), tmp());
        write(&outside.path().join("keep"), "keep me", 0o644);
        mkdir(&outside.path().join("sub"), 0o755);
        let root = t.path().join("root");
        mkdir(&root, 0o755);
        mkdir(&root.join("d"), 0o755);
        symlink(outside.path(), root.join("d/link")).unwrap();
        symlink(outside.path().join("keep"), root.join("file-link")).unwrap();
        write(&root.join("d/f"), "f", 0o644);
        mkdir(&root.join("ro"), 0o755);
        write(&root.join("ro/f"), "f", 0o644);
        fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        if !nix::unistd::geteuid().is_root() {
            // Only root may empty a directory it cannot write.
            fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
        }

        remove_tree(&root).unwrap();

        assert!(!root.exists());
        assert_eq!(fs::read(outside.path().join("keep")).unwrap(), b"keep me");
        assert!(outside.path().join("sub").is_dir());

        // A symlink as the root is removed itself, never its target's contents.
        symlink(outside.path(), t.path().join("alias")).unwrap();
        remove_tree(&t.path().join("alias")).unwrap();
        assert!(fs::symlink_metadata(t.path().join("alias")).is_err());
        assert!(outside.path().join("keep").exists());

        remove_tree(&t.path().join("never-was")).unwrap();
    }

    #[test]
    fn errors_name_the_call_and_the_path() {
        let err = measure(Path::new("/nonexistent/tree")).unwrap_err();
        assert_eq!(err.to_string(), format!("open /nonexistent/tree: {}", io::Error::from(Errno::ENOENT)));
    }
}
