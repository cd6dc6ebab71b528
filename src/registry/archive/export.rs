//! A layer directory in overlay form written as an OCI layer tar, zstd-compressed and hashed
//! as it is written.
//!
//! The walk goes through directory descriptors and never follows a symlink (layer content
//! comes from build jobs). It keeps one directory open and climbs back with `..`, checking
//! each directory's identity, so neither depth nor a descriptor limit stops it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, major, minor, FileStat, Mode, SFlag};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::names::{join, pax_record, whiteout_name, OPAQUE_MARKER, WHITEOUT_PREFIX};
use super::xattrs::{self, Xattrs, OPAQUE_XATTR};
use super::{io_error, ArchiveError, Exported};
use crate::registry::manifest::Blob;

/// zstd's default level: fast to write, and layers are written once per commit.
const ZSTD_LEVEL: i32 = 3;
/// Largest uid/gid a ustar header holds (7 octal digits); larger ones go in PAX records.
const USTAR_ID_MAX: u64 = 0o7777777;
/// Largest size a ustar header holds (11 octal digits).
const USTAR_SIZE_MAX: u64 = 0o77777777777;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);
const FILE_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_NOFOLLOW).union(OFlag::O_NOCTTY).union(OFlag::O_CLOEXEC);

type Id = (libc::dev_t, libc::ino_t);

pub(super) fn export(layer: &Path, out: &Path) -> Result<Exported, ArchiveError> {
    let file = File::create(out).map_err(io_error("create", out))?;
    let mut encoder = zstd::Encoder::new(Hashing::new(file), ZSTD_LEVEL).map_err(io_error("zstd", out))?;
    encoder.include_checksum(true).map_err(io_error("zstd", out))?;
    let mut writer =
        Writer { tar: tar::Builder::new(Hashing::new(encoder)), layer, out, links: HashMap::new(), bytes: 0, files: 0 };
    writer.walk()?;
    let (bytes, files) = (writer.bytes, writer.files);
    let tar = writer.tar.into_inner().map_err(io_error("write", out))?;
    let (encoder, diff_id, _) = tar.finish();
    let (mut file, digest, size) = encoder.finish().map_err(io_error("write", out))?.finish();
    file.flush().map_err(io_error("write", out))?;
    Ok(Exported { blob: Blob { digest, size, diff_id }, bytes, files })
}

/// Passes bytes through, hashing and counting them.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Self { inner, hash: Sha256::new(), len: 0 }
    }

    /// The writer, `sha256:<hex>` of what went through, and its length.
    fn finish(self) -> (W, String, u64) {
        (self.inner, super::sha256_digest(self.hash), self.len)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A directory's entries still to write, and the directory's identity to check on return.
struct Frame {
    id: Id,
    rel: Vec<u8>,
    children: std::vec::IntoIter<Child>,
}

struct Child {
    name: OsString,
    st: FileStat,
}

struct Writer<'a, W: Write> {
    tar: tar::Builder<W>,
    layer: &'a Path,
    out: &'a Path,
    // The first path of every inode with more than one link, for the later ones.
    links: HashMap<Id, Vec<u8>>,
    bytes: u64,
    files: u64,
}

/// What one tar entry says about a node besides its name.
struct Entry<'a> {
    kind: EntryType,
    st: &'a FileStat,
    mode: u32,
    size: u64,
    link: Option<&'a [u8]>,
    xattrs: &'a Xattrs,
}

impl<W: Write> Writer<'_, W> {
    fn path(&self, rel: &[u8]) -> PathBuf {
        self.layer.join(OsStr::from_bytes(rel))
    }

    fn walk(&mut self) -> Result<(), ArchiveError> {
        let root =
            File::from(nix::fcntl::open(self.layer, DIR_FLAGS, Mode::empty()).map_err(io_error("open", self.layer))?);
        let st = fstat(root.as_fd()).map_err(io_error("fstat", self.layer))?;
        self.directory(&root, b"", &st)?;
        let mut cur = root;
        let mut frame = Frame { id: id(&st), rel: Vec::new(), children: self.children(&cur, b"")?.into_iter() };
        let mut above: Vec<Frame> = Vec::new();
        loop {
            let Some(child) = frame.children.next() else {
                let Some(parent) = above.pop() else { return Ok(()) };
                let up =
                    open_dir_at(cur.as_fd(), OsStr::new("..")).map_err(io_error("open", &self.path(&parent.rel)))?;
                let st = fstat(up.as_fd()).map_err(io_error("fstat", &self.path(&parent.rel)))?;
                if id(&st) != parent.id {
                    return Err(changed(self.path(&parent.rel)));
                }
                (cur, frame) = (up, parent);
                continue;
            };
            let rel = child_rel(&frame.rel, child.name.as_bytes());
            if kind(&child.st) != SFlag::S_IFDIR {
                self.node(cur.as_fd(), &child, &rel)?;
                continue;
            }
            let dir = open_dir_at(cur.as_fd(), &child.name).map_err(io_error("open", &self.path(&rel)))?;
            let st = fstat(dir.as_fd()).map_err(io_error("fstat", &self.path(&rel)))?;
            if id(&st) != id(&child.st) {
                return Err(changed(self.path(&rel)));
            }
            self.directory(&dir, &rel, &st)?;
            let children = self.children(&dir, &rel)?.into_iter();
            above.push(std::mem::replace(&mut frame, Frame { id: id(&st), rel, children }));
            cur = dir;
        }
    }

    /// The entries of a directory in the order they are written: whiteouts first (as OCI
    /// asks), then the rest, each by name. Sockets are left out: no layer format holds one.
    fn children(&self, dir: &File, rel: &[u8]) -> Result<Vec<Child>, ArchiveError> {
        let path = || self.path(rel);
        let dup = dir.try_clone().map_err(io_error("dup", &path()))?;
        let mut stream = Dir::from_fd(dup.into()).map_err(io_error("opendir", &path()))?;
        let mut whiteouts = Vec::new();
        let mut others = Vec::new();
        for entry in stream.iter() {
            let entry = entry.map_err(io_error("readdir", &path()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsStr::from_bytes(name).to_os_string();
            let child_rel = || child_rel(rel, name.as_bytes());
            if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
                return Err(ArchiveError::Refused {
                    entry: String::from_utf8_lossy(&child_rel()).into_owned(),
                    rule: "a name starting with .wh. cannot be written to an OCI layer (it means a whiteout there)"
                        .into(),
                });
            }
            let st = fstatat(dir.as_fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(io_error("fstatat", &self.path(&child_rel())))?;
            match kind(&st) {
                SFlag::S_IFSOCK => {}
                _ if is_whiteout(&st) => whiteouts.push(Child { name, st }),
                _ => others.push(Child { name, st }),
            }
        }
        whiteouts.sort_by(|a, b| a.name.cmp(&b.name));
        others.sort_by(|a, b| a.name.cmp(&b.name));
        whiteouts.extend(others);
        Ok(whiteouts)
    }

    /// A directory (`./` for the root), then its opaque marker if it has one, so the marker
    /// comes before everything the directory holds.
    fn directory(&mut self, dir: &File, rel: &[u8], st: &FileStat) -> Result<(), ArchiveError> {
        let path = self.path(rel);
        let node = xattrs::Node::File(dir);
        let xattrs = xattrs::read(&node, &path)?;
        let opaque = xattrs::get(&node, OPAQUE_XATTR, &path)?.is_some_and(|v| v == b"y");
        let name = if rel.is_empty() { b"./".to_vec() } else { [rel, b"/"].concat() };
        let entry = Entry { kind: EntryType::Directory, st, mode: perms(st), size: 0, link: None, xattrs: &xattrs };
        self.append(&name, &entry, io::empty(), rel)?;
        if opaque {
            let marker = child_rel(rel, OPAQUE_MARKER);
            let entry = Entry { kind: EntryType::Regular, st, mode: 0, size: 0, link: None, xattrs: &Vec::new() };
            self.append(&marker, &entry, io::empty(), rel)?;
        }
        Ok(())
    }

    /// Anything but a directory, named `child` in the open directory `dir`.
    fn node(&mut self, dir: BorrowedFd<'_>, child: &Child, rel: &[u8]) -> Result<(), ArchiveError> {
        let path = self.path(rel);
        let st = &child.st;
        if is_whiteout(st) {
            // Overlay links many whiteouts to one inode; each stays a whiteout of its own.
            let (parent, name) = split_last(rel);
            let wh = child_rel(parent, &whiteout_name(name));
            let entry =
                Entry { kind: EntryType::Regular, st, mode: perms(st), size: 0, link: None, xattrs: &Vec::new() };
            return self.append(&wh, &entry, io::empty(), rel);
        }
        if st.st_nlink > 1 {
            if let Some(first) = self.links.get(&id(st)) {
                let first = first.clone();
                let entry = Entry {
                    kind: EntryType::Link,
                    st,
                    mode: perms(st),
                    size: 0,
                    link: Some(&first),
                    xattrs: &Vec::new(),
                };
                return self.append(rel, &entry, io::empty(), rel);
            }
            self.links.insert(id(st), rel.to_vec());
        }
        match kind(st) {
            SFlag::S_IFREG => {
                let fd =
                    openat(dir, child.name.as_os_str(), FILE_FLAGS, Mode::empty()).map_err(io_error("open", &path))?;
                let file = File::from(fd);
                let now = fstat(file.as_fd()).map_err(io_error("fstat", &path))?;
                if id(&now) != id(st) {
                    return Err(changed(path));
                }
                let xattrs = xattrs::read(&xattrs::Node::File(&file), &path)?;
                let size = u64::try_from(now.st_size).unwrap_or(0);
                let entry =
                    Entry { kind: EntryType::Regular, st: &now, mode: perms(&now), size, link: None, xattrs: &xattrs };
                self.append(rel, &entry, Exact { inner: (&file).take(size), left: size }, rel)?;
                self.bytes += size;
                Ok(())
            }
            SFlag::S_IFLNK => {
                let target = readlinkat(dir, child.name.as_os_str()).map_err(io_error("readlink", &path))?;
                let xattrs = xattrs::read(&xattrs::Node::At(dir, &child.name), &path)?;
                let entry = Entry {
                    kind: EntryType::Symlink,
                    st,
                    mode: perms(st),
                    size: 0,
                    link: Some(target.as_bytes()),
                    xattrs: &xattrs,
                };
                self.append(rel, &entry, io::empty(), rel)
            }
            k @ (SFlag::S_IFCHR | SFlag::S_IFBLK | SFlag::S_IFIFO) => {
                let kind = match k {
                    SFlag::S_IFCHR => EntryType::Char,
                    SFlag::S_IFBLK => EntryType::Block,
                    _ => EntryType::Fifo,
                };
                let xattrs = xattrs::read(&xattrs::Node::At(dir, &child.name), &path)?;
                let entry = Entry { kind, st, mode: perms(st), size: 0, link: None, xattrs: &xattrs };
                self.append(rel, &entry, io::empty(), rel)
            }
            other => Err(ArchiveError::Refused {
                entry: String::from_utf8_lossy(rel).into_owned(),
                rule: format!("file type {:o} cannot be written to a layer", other.bits()),
            }),
        }
    }

    /// Writes one entry, preceded by a PAX header when a field does not fit ustar's.
    fn append(&mut self, name: &[u8], e: &Entry<'_>, data: impl Read, rel: &[u8]) -> Result<(), ArchiveError> {
        let refused = |rule: String| ArchiveError::Refused { entry: String::from_utf8_lossy(rel).into_owned(), rule };
        let mut h = Header::new_ustar();
        let mut pax = Vec::new();
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        if h.set_path(OsStr::from_bytes(name)).is_err() {
            pax.extend(pax_record("path", name));
            set_truncated(&mut h.as_old_mut().name, name);
            if let Some(ustar) = h.as_ustar_mut() {
                ustar.prefix = [0; 155];
            }
        }
        if let Some(link) = e.link {
            if h.set_link_name_literal(link).is_err() {
                pax.extend(pax_record("linkpath", link));
                set_truncated(&mut h.as_old_mut().linkname, link);
            }
        }
        let (uid, gid) = (u64::from(e.st.st_uid), u64::from(e.st.st_gid));
        if uid > USTAR_ID_MAX {
            pax.extend(pax_record("uid", uid.to_string().as_bytes()));
        }
        if gid > USTAR_ID_MAX {
            pax.extend(pax_record("gid", gid.to_string().as_bytes()));
        }
        h.set_uid(if uid > USTAR_ID_MAX { 0 } else { uid });
        h.set_gid(if gid > USTAR_ID_MAX { 0 } else { gid });
        if e.size > USTAR_SIZE_MAX {
            pax.extend(pax_record("size", e.size.to_string().as_bytes()));
            h.set_size(0);
        } else {
            h.set_size(e.size);
        }
        // Whole seconds (what ustar holds); a time before 1970 is written as 1970.
        h.set_mtime(u64::try_from(e.st.st_mtime).unwrap_or(0));
        if matches!(e.kind, EntryType::Char | EntryType::Block) {
            let (maj, min) = (major(e.st.st_rdev), minor(e.st.st_rdev));
            let fits = |n: u64| u32::try_from(n).ok().filter(|&n| u64::from(n) <= USTAR_ID_MAX);
            let (Some(maj), Some(min)) = (fits(maj), fits(min)) else {
                return Err(refused(format!("device {maj}:{min} does not fit a tar header")));
            };
            h.set_device_major(maj).map_err(io_error("write", self.out))?;
            h.set_device_minor(min).map_err(io_error("write", self.out))?;
        }
        for (key, value) in e.xattrs {
            let Some(key) = key.to_str() else {
                return Err(refused(format!("xattr name {key:?} is not UTF-8, which PAX records require")));
            };
            pax.extend(pax_record(&format!("SCHILY.xattr.{key}"), value));
        }
        if !pax.is_empty() {
            let mut ph = Header::new_ustar();
            ph.set_entry_type(EntryType::XHeader);
            set_truncated(&mut ph.as_old_mut().name, b"././@PaxHeader");
            ph.set_mode(0o644);
            ph.set_size(pax.len() as u64);
            ph.set_mtime(0);
            ph.set_cksum();
            self.tar.append(&ph, &pax[..]).map_err(io_error("write", self.out))?;
        }
        h.set_cksum();
        self.tar.append(&h, data).map_err(|e| {
            // A short read means the file shrank under us; name the file, not the output.
            if e.kind() == io::ErrorKind::UnexpectedEof {
                changed(self.path(rel))
            } else {
                io_error("write", self.out)(e)
            }
        })?;
        self.files += 1;
        Ok(())
    }
}

/// Reads exactly `left` bytes: a file that shrank while written must not yield a short entry.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was read"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn changed(path: PathBuf) -> ArchiveError {
    ArchiveError::Io { op: "walk", path, source: io::Error::other("the layer changed while it was exported") }
}

fn set_truncated(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// `name` inside the directory at `parent` (`""` for the root).
fn child_rel(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        join(&[parent, name])
    }
}

fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (b"", rel),
    }
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<File> {
    openat(dir, name, DIR_FLAGS, Mode::empty()).map(File::from)
}

fn id(st: &FileStat) -> Id {
    (st.st_dev, st.st_ino)
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn perms(st: &FileStat) -> u32 {
    st.st_mode & 0o7777
}

/// Overlay's whiteout: a character device 0/0.
fn is_whiteout(st: &FileStat) -> bool {
    kind(st) == SFlag::S_IFCHR && st.st_rdev == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_last_separates_the_last_name() {
        assert_eq!(split_last(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_last(b"c"), (&b""[..], &b"c"[..]));
    }
}
