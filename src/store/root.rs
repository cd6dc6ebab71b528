//! The volume root: the one directory whose owner, mode and xattrs a job sees first.
//!
//! Overlay takes the merged root's attributes from the upper directory, so a new volume's
//! upper root is made a copy of the version's root (its top layer's) before anything mounts
//! it; otherwise every version would reset the root to the driver's own `root 0755` and a
//! job running as uid 1000 could not write where the last one did. Owner parameters and a
//! pod's fsGroup then change only this directory, never walking the tree below it.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::StoreError;

/// Owner and mode a volume's root is given, over whatever the version had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSpec {
    /// Owning user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Owning group id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Permission bits, including setgid and sticky (at most 0o7777).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl RootSpec {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.uid.is_none() && self.gid.is_none() && self.mode.is_none()
    }
}

/// Bits a pod's fsGroup adds to the root: setgid (new entries inherit the group) and `g+rwx`.
pub const GROUP_BITS: u32 = 0o2070;

/// Xattrs that belong to overlay's own bookkeeping and never describe the content.
const OVERLAY_XATTRS: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

fn io(op: &'static str, path: &Path, e: impl Into<std::io::Error>) -> StoreError {
    StoreError::io(op, path, e.into())
}

/// Makes `dir` (a fresh, empty directory) look like `template`'s root — owner, mode and every
/// xattr but overlay's — then applies `spec` on top.
pub fn prepare(dir: &Path, template: Option<&Path>, spec: &RootSpec) -> Result<(), StoreError> {
    let (mut uid, mut gid, mut mode) = (0, 0, 0o755);
    if let Some(from) = template {
        let meta = std::fs::symlink_metadata(from).map_err(|e| io("stat", from, e))?;
        (uid, gid, mode) = (meta.uid(), meta.gid(), meta.mode() & 0o7777);
        copy_xattrs(from, dir)?;
    }
    uid = spec.uid.unwrap_or(uid);
    gid = spec.gid.unwrap_or(gid);
    mode = spec.mode.unwrap_or(mode);
    // Owner before mode: chown clears setgid, and it also drops security.capability-like
    // xattrs on files (not on directories, which is all this touches).
    nix::unistd::chown(dir, Some(uid.into()), Some(gid.into())).map_err(|e| io("chown", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|e| io("chmod", dir, e))
}

/// Gives `dir` to group `gid` with [`GROUP_BITS`], keeping its owner and other bits.
pub fn give_to_group(dir: &Path, gid: u32) -> Result<(), StoreError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io("stat", dir, e))?;
    if meta.gid() != gid {
        nix::unistd::chown(dir, None, Some(gid.into())).map_err(|e| io("chown", dir, e))?;
    }
    let mode = (meta.mode() & 0o7777) | GROUP_BITS;
    // Always set: the chown above cleared setgid, and a repeat must leave the same result.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|e| io("chmod", dir, e))
}

fn copy_xattrs(from: &Path, to: &Path) -> Result<(), StoreError> {
    let names = match xattr::list(from) {
        Ok(names) => names,
        // A filesystem without xattrs has none to copy.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(io("llistxattr", from, e)),
    };
    for name in names {
        if OVERLAY_XATTRS.iter().any(|p| name.as_bytes().starts_with(p)) {
            continue;
        }
        let Some(value) = xattr::get(from, &name).map_err(|e| io("lgetxattr", from, e))? else { continue };
        xattr::set(to, &name, &value).map_err(|e| io("lsetxattr", to, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> (u32, u32, u32) {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    }

    #[test]
    fn a_new_root_copies_the_versions_root_then_the_spec() {
        let tmp = tempfile::tempdir().unwrap();
        let (top, a, b, c) = (tmp.path().join("top"), tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        for d in [&top, &a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o2770)).unwrap();
        let root = nix::unistd::geteuid().is_root();
        if root {
            nix::unistd::chown(&top, Some(1000.into()), Some(1001.into())).unwrap();
            xattr::set(&top, "trusted.overlay.opaque", b"y").unwrap();
            xattr::set(&top, "trusted.other", b"kept").unwrap();
        }
        xattr::set(&top, "user.note", b"hello").ok();

        prepare(&a, Some(&top), &RootSpec::default()).unwrap();
        let (uid, gid) =
            if root { (1000, 1001) } else { (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw()) };
        assert_eq!(mode_of(&a), (uid, gid, 0o2770), "the version's root, setgid included");
        if root {
            assert_eq!(xattr::get(&a, "trusted.other").unwrap().as_deref(), Some(&b"kept"[..]));
            assert_eq!(
                xattr::get(&a, "trusted.overlay.opaque").unwrap(),
                None,
                "overlay's own markers are not content"
            );
        }

        let spec = RootSpec { uid: root.then_some(2000), gid: root.then_some(2001), mode: Some(0o750) };
        prepare(&b, Some(&top), &spec).unwrap();
        let want = if root { (2000, 2001, 0o750) } else { (uid, gid, 0o750) };
        assert_eq!(mode_of(&b), want, "the spec wins over the version");

        prepare(&c, None, &RootSpec::default()).unwrap();
        assert_eq!(mode_of(&c).2, 0o755, "no version: the driver's default");
    }

    #[test]
    fn giving_to_a_group_sets_setgid_and_group_rwx_and_repeats_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let gid = if nix::unistd::geteuid().is_root() { 4242 } else { nix::unistd::getegid().as_raw() };
        give_to_group(&d, gid).unwrap();
        let first = mode_of(&d);
        assert_eq!((first.1, first.2), (gid, 0o2770));
        give_to_group(&d, gid).unwrap();
        assert_eq!(mode_of(&d), first, "a repeat changes nothing");
    }
}
