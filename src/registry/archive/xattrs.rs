//! Extended attributes of layer entries: which ones travel in a layer, and how a node that
//! cannot be opened (a symlink, a device) is reached without following it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use xattr::FileExt;

use super::{io_error, ArchiveError};

/// Overlay's mark of an opaque directory (value `y`).
pub(super) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Overlay's own bookkeeping (opaque, origin, redirect, ...): meaningful only to the overlay
/// and the filesystem that wrote it; a layer carries opaque directories as OCI markers.
const OVERLAY_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];
/// A label belongs to the policy of the host that set it, not to the cache.
const SELINUX: &[u8] = b"security.selinux";

/// Name and value pairs, sorted by name.
pub(super) type Xattrs = Vec<(OsString, Vec<u8>)>;

/// Whether an xattr of this name is written to and read from layers.
pub(super) fn travels(name: &[u8]) -> bool {
    name != SELINUX && !OVERLAY_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Where an entry's xattrs are reached.
pub(super) enum Node<'a> {
    /// Its open descriptor.
    File(&'a File),
    /// A name in an open directory, through `/proc/self/fd` with the l* calls: the kernel
    /// follows the descriptor's link but not the name.
    At(BorrowedFd<'a>, &'a OsStr),
}

impl Node<'_> {
    fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
        let mut path = OsString::from(format!("/proc/self/fd/{}/", dir.as_raw_fd()));
        path.push(name);
        PathBuf::from(path)
    }

    fn list(&self) -> io::Result<Vec<OsString>> {
        match self {
            Node::File(file) => Ok(file.list_xattr()?.collect()),
            Node::At(dir, name) => Ok(xattr::list(Self::proc_path(*dir, name))?.collect()),
        }
    }

    fn get(&self, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
        match self {
            Node::File(file) => file.get_xattr(name),
            Node::At(dir, entry) => xattr::get(Self::proc_path(*dir, entry), name),
        }
    }

    fn set(&self, name: &OsStr, value: &[u8]) -> io::Result<()> {
        match self {
            Node::File(file) => file.set_xattr(name, value),
            Node::At(dir, entry) => xattr::set(Self::proc_path(*dir, entry), name, value),
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// The xattrs of `node` that travel, sorted by name so a layer's bytes do not depend on the
/// order a filesystem lists them in.
pub(super) fn read(node: &Node<'_>, path: &Path) -> Result<Xattrs, ArchiveError> {
    let names = match node.list() {
        Ok(names) => names,
        // A filesystem without xattrs has none to write.
        Err(e) if unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(io_error("llistxattr", path)(e)),
    };
    let mut xattrs = Vec::new();
    for name in names {
        if !travels(name.as_bytes()) {
            continue;
        }
        if let Some(value) = node.get(&name).map_err(io_error("lgetxattr", path))? {
            xattrs.push((name, value));
        }
    }
    xattrs.sort();
    Ok(xattrs)
}

/// One xattr of `node`, if it has it.
pub(super) fn get(node: &Node<'_>, name: &str, path: &Path) -> Result<Option<Vec<u8>>, ArchiveError> {
    match node.get(OsStr::new(name)) {
        Err(e) if unsupported(&e) => Ok(None),
        other => other.map_err(io_error("lgetxattr", path)),
    }
}

/// Sets `name` on `node`.
pub(super) fn set(node: &Node<'_>, name: &OsStr, value: &[u8], path: &Path) -> Result<(), ArchiveError> {
    node.set(name, value).map_err(io_error("lsetxattr", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_and_selinux_xattrs_stay_home() {
        for name in ["user.x", "trusted.other", "security.capability", "system.posix_acl_access", "trusted.overlayx"] {
            assert!(travels(name.as_bytes()), "{name}");
        }
        for name in ["trusted.overlay.opaque", "trusted.overlay.origin", "user.overlay.redirect", "security.selinux"] {
            assert!(!travels(name.as_bytes()), "{name}");
        }
    }
}
