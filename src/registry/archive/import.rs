//! An untrusted OCI layer tar (zstd) unpacked into a new directory in overlay form.
//!
//! Every entry is made by this code with `*at` calls below descriptors of directories this
//! import created itself, opened with O_NOFOLLOW. Before anything is written, a path is
//! checked against the entries already made: no duplicates, no symlink or file on the way,
//! hard links only to earlier non-directory entries. So nothing can land outside `dest`.
//! Content is charged to the byte budget from its declared size before it is read, and the
//! decompressed stream is metered per entry, so neither a decompression bomb nor an endless
//! header can fill the disk or the memory first.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, futimens, makedev, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};
use tar::EntryType;

use super::names::{join, marker, parse_path, Marker, WHITEOUT_PREFIX};
use super::xattrs::{self, Xattrs, OPAQUE_XATTR};
use super::{io_error, ArchiveError, Imported, Limits};

/// Decompressed bytes one entry's headers may take (ustar, PAX and GNU long-name headers),
/// besides twice the longest path: far above what xattrs need, and the tar reader holds
/// these in memory.
const HEADER_BYTES: u64 = 1 << 20;
/// Zero padding allowed after the end-of-archive block (tar(1) pads to 10 KiB records).
const TRAILER_BYTES: u64 = 1 << 20;
const COPY_BUFFER: usize = 128 << 10;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);
const NEW_FILE_FLAGS: OFlag =
    OFlag::O_WRONLY.union(OFlag::O_CREAT).union(OFlag::O_EXCL).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

pub(super) fn import(blob: impl Read, dest: &Path, limits: &Limits) -> Result<Imported, ArchiveError> {
    DirBuilder::new().mode(0o700).create(dest).map_err(io_error("mkdir", dest))?;
    let result = Importer::open(dest, limits).and_then(|mut importer| {
        importer.run(blob)?;
        Ok(Imported { bytes: importer.bytes, files: importer.files })
    });
    if result.is_err() {
        // The import's error is the one to report; removal walks without following links.
        let _ = fs::remove_dir_all(dest);
    }
    result
}

/// What this import made at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A directory; `explicit` once a tar entry named it (not only as a parent).
    Dir {
        explicit: bool,
    },
    File,
    Symlink,
    /// A device node or a FIFO.
    Special,
    Whiteout,
    /// An opaque marker (kept to refuse a second one).
    Marker,
}

/// An entry's attributes from its headers.
struct Meta {
    uid: u32,
    gid: u32,
    mode: Mode,
    mtime: TimeSpec,
    xattrs: Xattrs,
}

/// Counts the decompressed bytes the tar reader takes and fails a read past the allowance.
struct Meter<R> {
    inner: R,
    budget: Rc<Budget>,
}

#[derive(Default)]
struct Budget {
    read: Cell<u64>,
    limit: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Budget {
    /// Allows `n` more bytes from here.
    fn allow(&self, n: u64) {
        self.limit.set(self.read.get().saturating_add(n));
    }
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.budget.limit.get().saturating_sub(self.budget.read.get());
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if want == 0 && !buf.is_empty() {
            // At the limit only the end of the stream may still come.
            if self.inner.read(&mut [0u8; 1])? == 0 {
                return Ok(0);
            }
            self.budget.exceeded.set(true);
            return Err(io::Error::other("the layer tar exceeds its size budget"));
        }
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.read.set(self.budget.read.get() + n as u64);
        Ok(n)
    }
}

struct Importer<'a> {
    dest: &'a Path,
    limits: &'a Limits,
    root: Rc<File>,
    nodes: HashMap<Vec<u8>, Kind>,
    root_named: bool,
    // The directory last looked up: entries come grouped by directory.
    cache: Option<(Vec<u8>, usize, Rc<File>)>,
    // Directory mtimes, set once nothing more is created in them.
    dir_times: Vec<(Vec<u8>, TimeSpec)>,
    // The last entry's path, to place errors in the headers after it.
    last: String,
    buffer: Vec<u8>,
    bytes: u64,
    files: u64,
}

fn refused(entry: &str, rule: impl Into<String>) -> ArchiveError {
    ArchiveError::Refused { entry: entry.to_string(), rule: rule.into() }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl<'a> Importer<'a> {
    fn open(dest: &'a Path, limits: &'a Limits) -> Result<Self, ArchiveError> {
        let root = nix::fcntl::open(dest, DIR_FLAGS, Mode::empty()).map_err(io_error("open", dest))?;
        let root = File::from(root);
        // The root of a layer without a `./` entry: what an implied directory gets.
        fchmod(root.as_fd(), Mode::from_bits_truncate(0o755)).map_err(io_error("chmod", dest))?;
        Ok(Self {
            dest,
            limits,
            root: Rc::new(root),
            nodes: HashMap::new(),
            root_named: false,
            cache: None,
            dir_times: Vec::new(),
            last: String::new(),
            buffer: Vec::new(),
            bytes: 0,
            files: 0,
        })
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        self.dest.join(OsStr::from_bytes(key))
    }

    /// An error reading the stream: the meter's refusal, or the blob's own error (a digest
    /// mismatch surfaces here, at the blob's end), or a malformed tar.
    fn stream_error(&self, e: io::Error, budget: &Budget, what: &str) -> ArchiveError {
        if budget.exceeded.get() {
            let at =
                if self.last.is_empty() { "(the first entry)".to_string() } else { format!("(after {:?})", self.last) };
            return refused(&at, format!("{what} larger than the layer allows"));
        }
        ArchiveError::Io { op: "read layer tar into", path: self.dest.to_path_buf(), source: e }
    }

    fn run(&mut self, blob: impl Read) -> Result<(), ArchiveError> {
        let budget = Rc::new(Budget::default());
        let decoder = zstd::Decoder::new(blob).map_err(io_error("zstd", self.dest))?;
        let mut archive = tar::Archive::new(Meter { inner: decoder, budget: budget.clone() });
        let header_bytes = HEADER_BYTES.saturating_add(2 * self.limits.max_path_bytes as u64);
        budget.allow(header_bytes);
        {
            let mut entries = archive.entries().map_err(|e| self.stream_error(e, &budget, "headers"))?;
            loop {
                budget.allow(header_bytes);
                let entry = match entries.next() {
                    None => break,
                    Some(entry) => entry.map_err(|e| self.stream_error(e, &budget, "an entry's headers are"))?,
                };
                self.entry(entry, &budget)?;
            }
        }
        self.trailer(archive.into_inner(), &budget)?;
        self.set_dir_times()
    }

    /// Reads to the end of the blob: a digest is checked there, and nothing but padding may
    /// hide after the end of the tar.
    fn trailer<R: Read>(
        &self,
        mut meter: Meter<zstd::Decoder<'_, BufReader<R>>>,
        budget: &Budget,
    ) -> Result<(), ArchiveError> {
        budget.allow(TRAILER_BYTES);
        let mut buf = [0u8; 8192];
        loop {
            let n = meter.read(&mut buf).map_err(|e| self.stream_error(e, budget, "the padding after the tar is"))?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                return Err(refused("(after the end of the tar)", "only zero padding may follow the end of the tar"));
            }
        }
        let mut rest = meter.inner.finish();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| self.stream_error(e, budget, "the blob is"))?;
        Ok(())
    }

    fn count(&mut self, shown: &str) -> Result<(), ArchiveError> {
        self.files += 1;
        if self.files > self.limits.max_entries {
            return Err(refused(shown, format!("the layer has more than {} entries", self.limits.max_entries)));
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>, budget: &Budget) -> Result<(), ArchiveError> {
        let raw = entry.path_bytes().into_owned();
        let shown = lossy(&raw);
        self.last.clone_from(&shown);
        self.count(&shown)?;
        let refuse = |rule: String| refused(&shown, rule);
        let kind = entry.header().entry_type();
        let is_file = matches!(kind, EntryType::Regular | EntryType::Continuous);
        if !is_file
            && !matches!(
                kind,
                EntryType::Directory
                    | EntryType::Symlink
                    | EntryType::Link
                    | EntryType::Char
                    | EntryType::Block
                    | EntryType::Fifo
            )
        {
            return Err(refuse(format!(
                "entry type {:?} is not supported (only files, directories, links, devices and FIFOs)",
                kind.as_byte() as char
            )));
        }
        let path = parse_path(&raw, self.limits.max_path_bytes).map_err(refuse)?;
        let size = entry.size();
        if !is_file && size != 0 {
            return Err(refuse("only a regular file may carry content".into()));
        }
        if size > self.limits.max_total_bytes - self.bytes {
            return Err(refuse(format!("content beyond the layer limit of {} bytes", self.limits.max_total_bytes)));
        }
        let meta = read_meta(&mut entry).map_err(refuse)?;
        let Some((&name, parents)) = path.names.split_last() else {
            if kind != EntryType::Directory {
                return Err(refuse("the layer's root ('./') must be a directory".into()));
            }
            if std::mem::replace(&mut self.root_named, true) {
                return Err(refuse("the layer's root ('./') is named twice".into()));
            }
            let root = self.root.clone();
            return self.finish_dir(&root, Vec::new(), meta);
        };
        if parents.iter().any(|p| p.starts_with(WHITEOUT_PREFIX)) {
            return Err(refuse("a whiteout (.wh.*) cannot hold entries".into()));
        }
        if path.slash && kind != EntryType::Directory {
            return Err(refuse("only a directory may be named with a trailing '/'".into()));
        }
        let key = join(&path.names);
        match marker(name).map_err(|r| refuse(r.into()))? {
            Marker::Opaque | Marker::Whiteout(_) if !is_file || size != 0 => {
                Err(refuse("a whiteout or opaque marker (.wh.*) must be an empty regular file".into()))
            }
            Marker::Opaque => {
                let dir = self.dir(parents, &shown)?;
                self.claim(key, Kind::Marker, &shown)?;
                let path = self.path(&join(parents));
                xattrs::set(&xattrs::Node::File(&dir), OsStr::new(OPAQUE_XATTR), b"y", &path)
            }
            Marker::Whiteout(hidden) => {
                let key = join(&[parents, &[hidden]].concat());
                self.node(parents, hidden, key, SFlag::S_IFCHR, 0, meta, &shown, Kind::Whiteout)
            }
            Marker::Plain if is_file => self.file(parents, name, key, meta, &mut entry, size, budget, &shown),
            Marker::Plain => match kind {
                EntryType::Directory => self.directory(parents, name, key, meta, &shown),
                EntryType::Symlink => {
                    let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                    if target.is_empty() {
                        return Err(refuse("a symlink needs a target".into()));
                    }
                    if target.len() > self.limits.max_path_bytes || target.contains(&0) {
                        let max = self.limits.max_path_bytes;
                        return Err(refuse(format!("a symlink target must be at most {max} bytes without NUL")));
                    }
                    let dir = self.dir(parents, &shown)?;
                    self.claim(key.clone(), Kind::Symlink, &shown)?;
                    symlinkat(target.as_slice(), dir.as_fd(), name).map_err(io_error("symlink", &self.path(&key)))?;
                    self.finish_at(dir.as_fd(), name, &key, meta, false)
                }
                EntryType::Link => {
                    let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                    self.hard_link(parents, name, key, &target, &shown)
                }
                EntryType::Fifo => self.node(parents, name, key, SFlag::S_IFIFO, 0, meta, &shown, Kind::Special),
                _ if !self.limits.devices => Err(refuse("device nodes are not allowed".into())),
                _ => {
                    let h = entry.header();
                    let Ok((Some(major), Some(minor))) = h.device_major().and_then(|m| Ok((m, h.device_minor()?)))
                    else {
                        return Err(refuse("a device node needs valid device numbers".into()));
                    };
                    let sflag = if kind == EntryType::Char { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
                    let dev = makedev(major.into(), minor.into());
                    self.node(parents, name, key, sflag, dev, meta, &shown, Kind::Special)
                }
            },
        }
    }

    fn directory(
        &mut self,
        parents: &[&[u8]],
        name: &[u8],
        key: Vec<u8>,
        meta: Meta,
        shown: &str,
    ) -> Result<(), ArchiveError> {
        let dir = self.dir(parents, shown)?;
        let implied = self.nodes.get(&key) == Some(&Kind::Dir { explicit: false });
        self.claim(key.clone(), Kind::Dir { explicit: true }, shown)?;
        let path = self.path(&key);
        if !implied {
            mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o700)).map_err(io_error("mkdir", &path))?;
        }
        let made = open_dir_at(dir.as_fd(), name).map_err(io_error("open", &path))?;
        self.finish_dir(&made, key, meta)
    }

    /// A device node, a FIFO or a whiteout (a character device 0/0).
    #[allow(clippy::too_many_arguments)]
    fn node(
        &mut self,
        parents: &[&[u8]],
        name: &[u8],
        key: Vec<u8>,
        sflag: SFlag,
        dev: libc::dev_t,
        meta: Meta,
        shown: &str,
        kind: Kind,
    ) -> Result<(), ArchiveError> {
        let dir = self.dir(parents, shown)?;
        self.claim(key.clone(), kind, shown)?;
        mknodat(dir.as_fd(), name, sflag, Mode::empty(), dev).map_err(io_error("mknod", &self.path(&key)))?;
        self.finish_at(dir.as_fd(), name, &key, meta, true)
    }

    /// Opens the directory at `names`, through directories this import made and nothing
    /// else, making missing ones as OCI allows (implied parents: root-owned, mode 0755).
    fn dir(&mut self, names: &[&[u8]], shown: &str) -> Result<Rc<File>, ArchiveError> {
        let key = join(names);
        let (mut cur, start) = match &self.cache {
            Some((k, _, dir)) if *k == key => return Ok(dir.clone()),
            Some((k, depth, dir)) if !k.is_empty() && key.starts_with(k) && key.get(k.len()) == Some(&b'/') => {
                (dir.clone(), *depth)
            }
            _ => (self.root.clone(), 0),
        };
        for i in start..names.len() {
            let prefix = join(&names[..=i]);
            let name = names[i];
            match self.nodes.get(&prefix) {
                Some(Kind::Dir { .. }) => {
                    let dir = open_dir_at(cur.as_fd(), name).map_err(io_error("open", &self.path(&prefix)))?;
                    cur = Rc::new(dir);
                }
                Some(Kind::Symlink) => {
                    return Err(refused(shown, format!("the path goes through the symlink {:?}", lossy(&prefix))));
                }
                Some(_) => {
                    return Err(refused(shown, format!("the path goes through {:?}, not a directory", lossy(&prefix))));
                }
                None => {
                    self.count(shown)?;
                    let path = self.path(&prefix);
                    mkdirat(cur.as_fd(), name, Mode::from_bits_truncate(0o755)).map_err(io_error("mkdir", &path))?;
                    let dir = open_dir_at(cur.as_fd(), name).map_err(io_error("open", &path))?;
                    // Explicitly: the umask and a setgid parent would otherwise decide.
                    fchown(dir.as_fd(), Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
                        .map_err(io_error("chown", &path))?;
                    fchmod(dir.as_fd(), Mode::from_bits_truncate(0o755)).map_err(io_error("chmod", &path))?;
                    self.nodes.insert(prefix, Kind::Dir { explicit: false });
                    cur = Rc::new(dir);
                }
            }
        }
        self.cache = Some((key, names.len(), cur.clone()));
        Ok(cur)
    }

    /// Records what this import makes at `key`, refusing a path it already made (but a
    /// directory entry may name a directory made before as an implied parent).
    fn claim(&mut self, key: Vec<u8>, kind: Kind, shown: &str) -> Result<(), ArchiveError> {
        match self.nodes.get(&key) {
            None | Some(Kind::Dir { explicit: false }) if kind == (Kind::Dir { explicit: true }) => {}
            None => {}
            Some(_) => {
                return Err(refused(shown, format!("{:?} is already in the layer (duplicate entry)", lossy(&key))))
            }
        }
        self.nodes.insert(key, kind);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn file<R: Read>(
        &mut self,
        parents: &[&[u8]],
        name: &[u8],
        key: Vec<u8>,
        meta: Meta,
        entry: &mut tar::Entry<'_, R>,
        size: u64,
        budget: &Budget,
        shown: &str,
    ) -> Result<(), ArchiveError> {
        let dir = self.dir(parents, shown)?;
        self.claim(key.clone(), Kind::File, shown)?;
        let path = self.path(&key);
        let fd = openat(dir.as_fd(), name, NEW_FILE_FLAGS, Mode::from_bits_truncate(0o600))
            .map_err(io_error("create", &path))?;
        let mut file = File::from(fd);
        budget.allow(size);
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.resize(COPY_BUFFER, 0);
        let mut written = 0u64;
        let copied = loop {
            let n = match entry.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(self.stream_error(e, budget, "an entry is")),
            };
            written += n as u64;
            if written > size {
                break Err(refused(shown, "content longer than its header says"));
            }
            if let Err(e) = file.write_all(&buffer[..n]) {
                break Err(io_error("write", &path)(e));
            }
        };
        self.buffer = buffer;
        copied?;
        if written != size {
            return Err(ArchiveError::Io {
                op: "read layer tar into",
                path: self.dest.to_path_buf(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, format!("the tar ends inside {shown:?}")),
            });
        }
        self.bytes += written;
        set_owner_mode(file.as_fd(), &meta, &path)?;
        set_xattrs(&xattrs::Node::File(&file), &meta.xattrs, &path)?;
        futimens(file.as_fd(), &meta.mtime, &meta.mtime).map_err(io_error("utimens", &path))
    }

    fn hard_link(
        &mut self,
        parents: &[&[u8]],
        name: &[u8],
        key: Vec<u8>,
        target: &[u8],
        shown: &str,
    ) -> Result<(), ArchiveError> {
        let bad = |rule: &str| refused(shown, format!("hard link target {:?} {rule}", lossy(target)));
        let to = parse_path(target, self.limits.max_path_bytes).map_err(|r| bad(&format!("is invalid: {r}")))?;
        let Some((&to_name, to_parents)) = to.names.split_last() else {
            return Err(bad("is the layer's root"));
        };
        let kind = match self.nodes.get(&join(&to.names)) {
            None => return Err(bad("is not an earlier entry of this layer")),
            Some(Kind::Dir { .. }) => return Err(bad("is a directory")),
            Some(Kind::Whiteout | Kind::Marker) => return Err(bad("is a whiteout")),
            Some(&kind) => kind,
        };
        let from = self.dir(to_parents, shown)?;
        let dir = self.dir(parents, shown)?;
        self.claim(key.clone(), kind, shown)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        linkat(from.as_fd(), to_name, dir.as_fd(), name, AtFlags::empty()).map_err(io_error("link", &self.path(&key)))
    }

    /// Owner, mode and xattrs of a directory now; its mtime once the import is done.
    fn finish_dir(&mut self, dir: &File, key: Vec<u8>, meta: Meta) -> Result<(), ArchiveError> {
        let path = self.path(&key);
        set_owner_mode(dir.as_fd(), &meta, &path)?;
        set_xattrs(&xattrs::Node::File(dir), &meta.xattrs, &path)?;
        self.dir_times.push((key, meta.mtime));
        Ok(())
    }

    /// Owner, mode, xattrs and mtime of a node that is not opened (a symlink, a device,
    /// a FIFO, a whiteout), by name without following it.
    fn finish_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        key: &[u8],
        meta: Meta,
        chmod: bool,
    ) -> Result<(), ArchiveError> {
        let path = self.path(key);
        fchownat(dir, name, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(io_error("chown", &path))?;
        if chmod {
            match fchmodat(dir, name, meta.mode, FchmodatFlags::NoFollowSymlink) {
                // Older C libraries cannot chmod without following; the name is a node this
                // import has just made with mknod in a directory only it writes to.
                Err(Errno::ENOTSUP) => fchmodat(dir, name, meta.mode, FchmodatFlags::FollowSymlink),
                other => other,
            }
            .map_err(io_error("chmod", &path))?;
        }
        set_xattrs(&xattrs::Node::At(dir, OsStr::from_bytes(name)), &meta.xattrs, &path)?;
        utimensat(dir, name, &meta.mtime, &meta.mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(io_error("utimens", &path))
    }

    fn set_dir_times(&mut self) -> Result<(), ArchiveError> {
        for (key, mtime) in std::mem::take(&mut self.dir_times) {
            let path = self.path(&key);
            let names: Vec<&[u8]> = key.split(|&b| b == b'/').collect();
            match names.split_last() {
                Some((name, parents)) if !key.is_empty() => {
                    let dir = self.dir(parents, &lossy(&key))?;
                    utimensat(dir.as_fd(), *name, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
                }
                _ => futimens(self.root.as_fd(), &mtime, &mtime),
            }
            .map_err(io_error("utimens", &path))?;
        }
        Ok(())
    }
}

/// Owner first: a chown clears the setuid and setgid bits the mode then sets.
fn set_owner_mode(fd: BorrowedFd<'_>, meta: &Meta, path: &Path) -> Result<(), ArchiveError> {
    fchown(fd, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid))).map_err(io_error("chown", path))?;
    fchmod(fd, meta.mode).map_err(io_error("chmod", path))
}

fn set_xattrs(node: &xattrs::Node<'_>, list: &Xattrs, path: &Path) -> Result<(), ArchiveError> {
    for (name, value) in list {
        xattrs::set(node, name, value, path)?;
    }
    Ok(())
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<File> {
    openat(dir, name, DIR_FLAGS, Mode::empty()).map(File::from)
}

/// Owner, mode, mtime and the xattrs that travel, from an entry's headers.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let h = entry.header();
    let id = |field: &str, value: io::Result<u64>| {
        value
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            // -1 means "leave unchanged" to chown.
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| format!("the {field} field is invalid or out of range"))
    };
    let uid = id("uid", h.uid())?;
    let gid = id("gid", h.gid())?;
    let mode = h.mode().map_err(|_| "the mode field is invalid".to_string())?;
    let mtime = h.mtime().map_err(|_| "the mtime field is invalid".to_string())?;
    let mtime = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
    let mut xattrs = Vec::new();
    if let Some(records) = entry.pax_extensions().map_err(|e| format!("unreadable PAX header: {e}"))? {
        for record in records {
            let record = record.map_err(|e| format!("malformed PAX record: {e}"))?;
            let key = record.key_bytes();
            if key.starts_with(b"GNU.sparse.") {
                return Err("sparse files are not supported".into());
            }
            let Some(name) = key.strip_prefix(b"SCHILY.xattr.") else { continue };
            if name.is_empty() || name.contains(&0) {
                return Err("a PAX xattr record needs a name without NUL".into());
            }
            if xattrs::travels(name) {
                xattrs.push((OsStr::from_bytes(name).to_os_string(), record.value_bytes().to_vec()));
            }
        }
    }
    xattrs.sort();
    Ok(Meta { uid, gid, mode: Mode::from_bits_truncate(mode & 0o7777), mtime, xattrs })
}
