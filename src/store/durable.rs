//! Makes one directory tree durable, and nothing else: an fsync of every regular file and of
//! every directory in it (each after its children, so their names are durable too), then of
//! the tree's parent. A `syncfs` would do it in one call but flushes every dirty page of the
//! filesystem, other jobs' included, so a commit would cost what the whole node wrote, not
//! what its own job did.
//!
//! Two passes over the tree: the first only starts the writeback of every file
//! (`sync_file_range`), the second fsyncs, when most of that writeback is done or in flight.
//!
//! Symlinks, whiteouts (character devices 0/0) and fifos cannot be fsynced (or have nothing to
//! flush): the fsync of their directory makes them durable, because ext4 and XFS journal the
//! new inode in the same transaction as its entry (tests/durability.rs cuts both off mid-commit).
//! A filesystem without a journal (ext4 `^has_journal`) gives no such guarantee, nor an atomic
//! rename: a state dir needs a journaling filesystem.
//!
//! The tree is written by a build job and is untrusted, like every layer (see `tree`): the walk
//! goes through directory descriptors (`*at` calls on names read from the directory) and never
//! follows a symlink. Workers share a stack of directories and of batches of file names, so
//! one huge directory is spread over all of them and the fsyncs reach the disk together.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use nix::dir::{Dir, Type};
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};

use super::StoreError;

/// Threads that fsync at once. They mostly wait: every fsync ends in a journal commit or a
/// cache flush of the disk, which concurrent fsyncs share, so far more threads than cores pay
/// off (2,000 files on ext4: 1 thread 660 ms, 8 470 ms, 32 175 ms, 64 105 ms, noisy).
const WORKERS: usize = 32;

/// Files per unit of work: small enough to spread a big directory over every worker.
const BATCH: usize = 64;

/// Directories deeper than this are closed once listed and reopened from the nearest open
/// ancestor when needed, so a pathologically deep tree cannot run out of descriptors.
const KEEP_OPEN_DEPTH: usize = 64;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);
// O_NONBLOCK: a name that became a fifo since it was listed must not hang the walk.
const FILE_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_NOFOLLOW).union(OFlag::O_NONBLOCK).union(OFlag::O_CLOEXEC);

/// Makes the tree at `root` durable, and its name in its parent directory.
pub fn sync_tree(root: &Path) -> Result<(), StoreError> {
    // Queueing every file's writeback before the first fsync waits lets the disk take it all
    // at once and the journal commit it together: the fsyncs that follow mostly find their
    // data written (2,000 files of 10 KiB: half to a third of the time of fsyncs alone).
    walk(root, Pass::StartWriteback)?;
    walk(root, Pass::Fsync)?;
    let parent = root.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    super::atomic::sync_dir(parent)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Queue every file's dirty pages for writeback; no waiting, no directories.
    StartWriteback,
    /// fsync every file, then every directory after its children.
    Fsync,
}

/// A directory of the tree, alive while anything below it is still to be done.
struct Node {
    path: PathBuf,
    name: OsString,
    depth: usize,
    parent: Option<Arc<Node>>,
    /// `None` below [`KEEP_OPEN_DEPTH`]: reopened through the ancestors when needed.
    fd: Option<OwnedFd>,
    /// Units of work below this directory not yet done, plus one for its own listing.
    pending: AtomicUsize,
}

enum Job {
    /// List this directory (a child of `parent`, or the root).
    Dir { parent: Option<Arc<Node>>, name: OsString },
    /// Sync these regular files of `dir`.
    Files { dir: Arc<Node>, names: Vec<OsString> },
}

/// The shared work: a stack (depth first, which bounds the directories held open), the
/// number of jobs being worked on, and the first error.
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

struct QueueState {
    jobs: Vec<Job>,
    busy: usize,
    error: Option<StoreError>,
}

fn walk(root: &Path, pass: Pass) -> Result<(), StoreError> {
    let queue = Queue {
        state: Mutex::new(QueueState {
            jobs: vec![Job::Dir { parent: None, name: OsString::new() }],
            busy: 0,
            error: None,
        }),
        wake: Condvar::new(),
    };
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| work(&queue, root, pass));
        }
    });
    let state = queue.state.into_inner().unwrap_or_else(PoisonError::into_inner);
    state.error.map_or(Ok(()), Err)
}

fn work(queue: &Queue, root: &Path, pass: Pass) {
    loop {
        let job = {
            let mut st = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if st.error.is_some() {
                    return;
                }
                if let Some(job) = st.jobs.pop() {
                    st.busy += 1;
                    break job;
                }
                if st.busy == 0 {
                    return;
                }
                st = queue.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let mut more = Vec::new();
        let result = match job {
            Job::Dir { parent, name } => list_dir(root, parent, name, pass, &mut more),
            Job::Files { dir, names } => sync_files(&dir, &names, pass).and_then(|()| finish(dir, pass)),
        };
        let mut st = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.busy -= 1;
        match result {
            Ok(()) => st.jobs.extend(more),
            Err(e) => {
                st.error.get_or_insert(e);
            }
        }
        drop(st);
        queue.wake.notify_all();
    }
}

/// Opens and lists one directory, queueing its subdirectories and its files in batches.
fn list_dir(
    root: &Path,
    parent: Option<Arc<Node>>,
    name: OsString,
    pass: Pass,
    more: &mut Vec<Job>,
) -> Result<(), StoreError> {
    let (path, depth, fd) = match &parent {
        None => {
            let fd = nix::fcntl::open(root, DIR_FLAGS, Mode::empty())
                .map_err(|e| StoreError::io("open directory", root, e.into()))?;
            (root.to_path_buf(), 0, fd)
        }
        Some(p) => {
            let path = p.path.join(&name);
            let fd = with_fd(p, |pfd| {
                openat(pfd, name.as_os_str(), DIR_FLAGS, Mode::empty())
                    .map_err(|e| StoreError::io("open directory", &path, e.into()))
            })?;
            (path, p.depth + 1, fd)
        }
    };
    let (dirs, files) = entries(&fd).map_err(|e| StoreError::io("read directory", &path, e))?;
    let batches = files.len().div_ceil(BATCH);
    let node = Arc::new(Node {
        path,
        name,
        depth,
        parent,
        fd: (depth <= KEEP_OPEN_DEPTH).then_some(fd),
        pending: AtomicUsize::new(1 + dirs.len() + batches),
    });
    let mut files = files;
    while !files.is_empty() {
        let rest = files.split_off(files.len().saturating_sub(BATCH));
        more.push(Job::Files { dir: Arc::clone(&node), names: rest });
    }
    more.extend(dirs.into_iter().map(|name| Job::Dir { parent: Some(Arc::clone(&node)), name }));
    finish(node, pass)
}

/// The subdirectories and regular files of a directory, by the types its entries carry
/// (asking the inode only where the filesystem does not say).
fn entries(dir: &OwnedFd) -> std::io::Result<(Vec<OsString>, Vec<OsString>)> {
    // A duplicate shares the offset, which nothing else uses: `*at` calls ignore it.
    let mut stream = Dir::from_fd(dir.try_clone()?)?;
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    for entry in stream.iter() {
        let entry = entry?;
        let raw = entry.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let name = OsStr::from_bytes(raw).to_os_string();
        let kind = match entry.file_type() {
            Some(kind) => kind,
            None => {
                let st = fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
                match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
                    SFlag::S_IFDIR => Type::Directory,
                    SFlag::S_IFREG => Type::File,
                    _ => Type::Symlink,
                }
            }
        };
        match kind {
            Type::Directory => dirs.push(name),
            Type::File => files.push(name),
            // No data of their own: the directory's fsync carries them.
            _ => {}
        }
    }
    Ok((dirs, files))
}

fn sync_files(dir: &Node, names: &[OsString], pass: Pass) -> Result<(), StoreError> {
    with_fd(dir, |dfd| {
        for name in names {
            let err = |op, e: nix::Error| StoreError::io(op, dir.path.join(name), e.into());
            let file = openat(dfd, name.as_os_str(), FILE_FLAGS, Mode::empty()).map_err(|e| err("open", e))?;
            match pass {
                Pass::Fsync => nix::unistd::fsync(&file).map_err(|e| err("fsync", e))?,
                Pass::StartWriteback => start_writeback(file.as_fd()).map_err(|e| err("sync_file_range", e))?,
            }
        }
        Ok(())
    })
}

fn start_writeback(file: BorrowedFd<'_>) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor that stays open for its duration.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    nix::errno::Errno::result(rc).map(drop)
}

/// Marks one unit of `node`'s work done; the last one fsyncs the directory (all its
/// children are durable by then) and passes the news up.
fn finish(node: Arc<Node>, pass: Pass) -> Result<(), StoreError> {
    let mut node = node;
    loop {
        if node.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        if pass == Pass::Fsync {
            with_fd(&node, |fd| {
                nix::unistd::fsync(fd).map_err(|e| StoreError::io("fsync directory", &node.path, e.into()))
            })?;
        }
        match &node.parent {
            Some(parent) => node = Arc::clone(parent),
            None => return Ok(()),
        }
    }
}

/// Runs `f` on the directory's descriptor, reopening it through its ancestors when it was
/// closed for depth.
fn with_fd<T>(node: &Node, f: impl FnOnce(BorrowedFd<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
    if let Some(fd) = &node.fd {
        return f(fd.as_fd());
    }
    // Climb to the nearest open ancestor (the root always is), then open the names back down.
    let mut names = vec![node.name.as_os_str()];
    let mut up = node.parent.as_deref();
    let base = loop {
        match up {
            Some(Node { fd: Some(fd), .. }) => break fd,
            Some(n) => {
                names.push(n.name.as_os_str());
                up = n.parent.as_deref();
            }
            None => return Err(StoreError::io("reopen directory", &node.path, nix::Error::EBADF.into())),
        }
    };
    let mut cur = base.try_clone().map_err(|e| StoreError::io("reopen directory", &node.path, e))?;
    for name in names.iter().rev() {
        cur = openat(&cur, *name, DIR_FLAGS, Mode::empty())
            .map_err(|e| StoreError::io("reopen directory", &node.path, e.into()))?;
    }
    f(cur.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn syncs_a_tree_of_every_kind_without_following_links() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("upper");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        for i in 0..(BATCH * 3 + 5) {
            std::fs::write(root.join(format!("a/f{i}")), format!("file {i}")).unwrap();
        }
        std::fs::write(root.join("a/b/deep"), "deep").unwrap();
        // Followed, these would fail (dangling), leave the tree, or block (a fifo).
        symlink("/nonexistent/target", root.join("dangling")).unwrap();
        symlink("/", root.join("to-root")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        symlink(root.join("fifo"), root.join("to-fifo")).unwrap();
        sync_tree(&root).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("a/f7")).unwrap(), "file 7");
        assert_eq!(std::fs::read_to_string(root.join("a/b/deep")).unwrap(), "deep");
    }

    #[test]
    fn a_tree_deeper_than_the_descriptors_kept_open_is_synced() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("upper");
        let mut dir = root.clone();
        for i in 0..(KEEP_OPEN_DEPTH + 20) {
            dir.push(format!("d{i}"));
        }
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("leaf"), "leaf").unwrap();
        std::fs::write(root.join("d0/d1/top"), "top").unwrap();
        sync_tree(&root).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("leaf")).unwrap(), "leaf");
    }

    #[test]
    fn an_error_names_the_path() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("gone");
        let err = sync_tree(&missing).unwrap_err().to_string();
        assert!(err.contains("open directory") && err.contains(&missing.display().to_string()), "{err}");
    }
}
