//! Merge of a contiguous run of layers into one layer that stays in overlay form, done on the
//! layer directories themselves (no overlay view), so it can replace that run anywhere in a
//! stack: the merged layer's whiteouts and opaque directories still act on the layers below.
//!
//! Each layer of the run is applied to the merged tree in order, bottom to top, with overlay's
//! lookup rules: a whiteout or any other non-directory replaces what the tree had at its path
//! (a whiteout stays one: the layers below the run may hold the path); an opaque directory
//! replaces it and stays opaque; a directory merges into a directory, and a directory over a
//! whiteout or a non-directory becomes opaque (overlay's lookup stops at that entry, so the
//! layers below the run must not show through). A merged directory takes the owner, mode,
//! times and xattrs of the topmost directory at its path, as overlay shows it.
//!
//! Non-directories are hard-linked from the source layers, never copied: layers are immutable
//! and live on one filesystem, so the merge costs one link per entry, not its bytes. Garbage
//! collection later unlinks the old layers' names and the merged layer keeps the inodes.
//! Overlay accepts lower files with several links. Hard links within one layer stay hard links
//! (both names link the same inode). Linked files keep all their xattrs as they were in the
//! source layer, `trusted.overlay.*` included, exactly as overlay saw them there; the new
//! directories drop `trusted.overlay.*` except the opaque marker the merge decides on.
//! Only a file already at the filesystem's link limit is copied instead.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{fchmod, fstat, fstatat, futimens, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};

use super::tree::{
    self, copy_entry, id, kind, list, measure, open_dir_at, perms, proc_path, read_xattrs, remove_tree, set_owner_fd,
    size, times, write_xattrs, Context, DirStack, Id, Node, TreeError, TreeStats, Xattrs,
};

/// The xattr that makes a directory opaque, and its value.
const OPAQUE: &str = "trusted.overlay.opaque";
const OPAQUE_YES: &[u8] = b"y";

/// Merges `layers` (bottom to top) into the new directory `dst`, in overlay form. Reports the
/// entries applied so far to `progress`; returns what the merged layer holds. On failure the
/// partial merge is removed.
pub fn merge_layers(
    layers: &[PathBuf],
    dst: &Path,
    progress: &mut dyn FnMut(&TreeStats),
) -> Result<TreeStats, TreeError> {
    std::fs::DirBuilder::new().mode(0o700).create(dst).ctx("mkdir", || dst.to_path_buf())?;
    let merged = (|| {
        let mut merger = Merger { applied: TreeStats::default(), progress };
        for layer in layers {
            merger.apply(layer, dst)?;
        }
        (merger.progress)(&merger.applied);
        measure(dst)
    })();
    if merged.is_err() {
        // Ours alone; leaving it would only make scratch for gc.
        let _ = remove_tree(dst);
    }
    merged
}

/// Bytes of `bottom` that the layers `above` it (bottom to top) hide: under a whiteout, an
/// opaque directory, or any entry that replaces it. What a full flatten would give back once
/// the old layers are collected. Walks only the entries of `above`, and of `bottom` only the
/// directories both hold and what is hidden.
pub fn hidden_bytes(bottom: &Path, above: &[PathBuf]) -> Result<u64, TreeError> {
    let mut hidden = Shadow::default();
    for layer in above {
        let mut from = DirStack::open(layer)?;
        let mut under = DirStack::open(bottom)?;
        let mut pending = vec![list(&from.top).ctx("readdir", || from.path())?];
        while let Some(names) = pending.last_mut() {
            let Some(name) = names.pop() else {
                pending.pop();
                if !pending.is_empty() {
                    from.pop()?;
                    under.pop()?;
                }
                continue;
            };
            let Some(below) = lstat_opt(&under, &name)? else { continue };
            let rel = from.rel(&name);
            if hidden.covers(&rel) {
                continue;
            }
            let st = fstatat(from.fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .ctx("lstat", || from.child(&name))?;
            let both_dirs = kind(&st) == SFlag::S_IFDIR && kind(&below) == SFlag::S_IFDIR;
            if both_dirs {
                let dir = from.open_child(&name, &st)?;
                let xattrs = read_xattrs(Node::File(&dir), true, || from.child(&name))?;
                if !is_opaque(&xattrs) {
                    let names = list(&dir).ctx("readdir", || from.child(&name))?;
                    let lower = under.open_child(&name, &below)?;
                    from.push(name.clone(), id(&st), dir);
                    under.push(name, id(&below), lower);
                    pending.push(names);
                    continue;
                }
            }
            let bytes = match kind(&below) {
                SFlag::S_IFDIR => measure(&proc_path(under.fd(), &name))?.bytes,
                SFlag::S_IFREG => size(&below),
                _ => 0,
            };
            hidden.insert(&rel, bytes);
        }
    }
    Ok(hidden.total())
}

/// Paths of the bottom layer hidden so far, as a tree of names; a hidden path covers all below it.
#[derive(Default)]
struct Shadow {
    children: HashMap<OsString, Shadow>,
    hidden: Option<u64>,
}

impl Shadow {
    fn covers(&self, rel: &[OsString]) -> bool {
        let mut node = self;
        for name in rel {
            if node.hidden.is_some() {
                return true;
            }
            match node.children.get(name) {
                Some(child) => node = child,
                None => return false,
            }
        }
        node.hidden.is_some()
    }

    fn insert(&mut self, rel: &[OsString], bytes: u64) {
        let mut node = self;
        for name in rel {
            if node.hidden.is_some() {
                return;
            }
            node = node.children.entry(name.clone()).or_default();
        }
        // What was hidden below this path is counted in `bytes` now.
        node.children.clear();
        node.hidden = Some(bytes);
    }

    fn total(&self) -> u64 {
        let mut sum = 0;
        let mut stack = vec![self];
        while let Some(node) = stack.pop() {
            sum += node.hidden.unwrap_or(0);
            stack.extend(node.children.values());
        }
        sum
    }
}

fn lstat_opt(dirs: &DirStack, name: &OsStr) -> Result<Option<FileStat>, TreeError> {
    match fstatat(dirs.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(TreeError::new("lstat", dirs.child(name), e.into())),
    }
}

fn is_opaque(xattrs: &Xattrs) -> bool {
    xattrs.iter().any(|(name, value)| name == OPAQUE && value == OPAQUE_YES)
}

/// A directory of the merged tree being filled from one layer, and what it gets once done.
struct Dir {
    names: Vec<OsString>,
    st: FileStat,
    /// The source directory's xattrs without `trusted.overlay.*`.
    xattrs: Xattrs,
    opaque: bool,
    /// It was in the merged tree before this layer: xattrs of a lower layer may need removing.
    existed: bool,
}

struct Merger<'a> {
    applied: TreeStats,
    progress: &'a mut dyn FnMut(&TreeStats),
}

impl Merger<'_> {
    /// Applies one layer to the merged tree at `dst`.
    fn apply(&mut self, layer: &Path, dst: &Path) -> Result<(), TreeError> {
        let mut from = DirStack::open(layer)?;
        let mut to = DirStack::open(dst)?;
        let st = fstat(from.fd()).ctx("fstat", || from.path())?;
        let names = list(&from.top).ctx("readdir", || from.path())?;
        let xattrs = read_xattrs(Node::File(&from.top), false, || from.path())?;
        // The root is never opaque: overlay merges every layer's root.
        let mut pending = vec![Dir { names, st, xattrs, opaque: false, existed: true }];
        // Copies made for files at the link limit, for their other names in this layer.
        let mut copies: HashMap<Id, Box<[OsString]>> = HashMap::new();
        while let Some(dir) = pending.last_mut() {
            if let Some(name) = dir.names.pop() {
                if let Some(sub) = self.entry(&mut from, &mut to, name, &mut copies)? {
                    pending.push(sub);
                }
                continue;
            }
            let Some(done) = pending.pop() else { break };
            finish_dir(&to, &done)?;
            if !pending.is_empty() {
                from.pop()?;
                to.pop()?;
            }
        }
        Ok(())
    }

    /// Applies one entry of the current directory; a directory is entered, not finished.
    fn entry(
        &mut self,
        from: &mut DirStack,
        to: &mut DirStack,
        name: OsString,
        copies: &mut HashMap<Id, Box<[OsString]>>,
    ) -> Result<Option<Dir>, TreeError> {
        let st =
            fstatat(from.fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ctx("lstat", || from.child(&name))?;
        let below = lstat_opt(to, &name)?;
        self.count(&st);
        if kind(&st) != SFlag::S_IFDIR {
            if let Some(old) = &below {
                remove_entry(to, &name, old)?;
            }
            place(from, to, &name, &st, copies)?;
            return Ok(None);
        }
        let src = from.open_child(&name, &st)?;
        let all = read_xattrs(Node::File(&src), true, || from.child(&name))?;
        let src_opaque = is_opaque(&all);
        let xattrs: Xattrs = all.into_iter().filter(|(n, _)| !n.as_bytes().starts_with(tree::OVERLAY_XATTRS)).collect();
        let names = list(&src).ctx("readdir", || from.child(&name))?;
        let (dst, dst_id, opaque, existed) = match &below {
            Some(old) if kind(old) == SFlag::S_IFDIR && !src_opaque => {
                let dst = to.open_child(&name, old)?;
                let was = read_xattrs(Node::File(&dst), true, || to.child(&name))?;
                (dst, id(old), is_opaque(&was), true)
            }
            _ => {
                // Over a whiteout or a non-directory overlay's lookup stops here: opaque, so
                // nothing below the run shows through.
                let opaque = src_opaque || below.is_some();
                if let Some(old) = &below {
                    remove_entry(to, &name, old)?;
                }
                mkdirat(to.fd(), name.as_os_str(), Mode::from_bits_truncate(0o700)).ctx("mkdir", || to.child(&name))?;
                let dst = open_dir_at(to.fd(), &name).ctx("open", || to.child(&name))?;
                let dst_id = id(&fstat(dst.as_fd()).ctx("fstat", || to.child(&name))?);
                (dst, dst_id, opaque, false)
            }
        };
        from.push(name.clone(), id(&st), src);
        to.push(name, dst_id, dst);
        Ok(Some(Dir { names, st, xattrs, opaque, existed }))
    }

    fn count(&mut self, st: &FileStat) {
        self.applied.files += 1;
        if kind(st) == SFlag::S_IFREG {
            self.applied.bytes += size(st);
        }
        if self.applied.files.is_multiple_of(1000) {
            (self.progress)(&self.applied);
        }
    }
}

/// Removes what the merged tree had at `name` before an upper layer replaced it.
fn remove_entry(to: &DirStack, name: &OsStr, old: &FileStat) -> Result<(), TreeError> {
    if kind(old) == SFlag::S_IFDIR {
        return remove_tree(&proc_path(to.fd(), name));
    }
    unlinkat(to.fd(), name, UnlinkatFlags::NoRemoveDir).ctx("unlink", || to.child(name))
}

/// Puts a non-directory into the merged tree: a hard link to the source's inode.
fn place(
    from: &DirStack,
    to: &DirStack,
    name: &OsStr,
    st: &FileStat,
    copies: &mut HashMap<Id, Box<[OsString]>>,
) -> Result<(), TreeError> {
    match linkat(from.fd(), name, to.fd(), name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        // At the link limit (or, should a layer ever sit on another filesystem, across it).
        Err(Errno::EMLINK | Errno::EXDEV) => {}
        Err(e) => return Err(TreeError::new("link", to.child(name), e.into())),
    }
    if let Some(rel) = copies.get(&id(st)) {
        if let Some(first) = rel.last() {
            let parent = to.open_parent_of(rel)?;
            let old_dir = match &parent {
                Some(dir) => dir.as_fd(),
                None => to.root_fd()?,
            };
            // The copy may have been replaced since, or be at the limit itself: copy again.
            if linkat(old_dir, first.as_os_str(), to.fd(), name, AtFlags::empty()).is_ok() {
                return Ok(());
            }
        }
    }
    copy_entry(from, to, name, st)?;
    if st.st_nlink > 1 {
        copies.insert(id(st), to.rel(name));
    }
    Ok(())
}

/// Gives a merged directory the attributes of the topmost source directory applied to it.
fn finish_dir(to: &DirStack, dir: &Dir) -> Result<(), TreeError> {
    let file: &File = &to.top;
    set_owner_fd(file, &dir.st).ctx("lchown", || to.path())?;
    let mut want = dir.xattrs.clone();
    if dir.opaque {
        want.push((OPAQUE.into(), OPAQUE_YES.to_vec()));
    }
    if dir.existed {
        use xattr::FileExt;
        for (old, _) in read_xattrs(Node::File(file), true, || to.path())? {
            if !want.iter().any(|(n, _)| n == &old) {
                file.remove_xattr(&old).ctx("lremovexattr", || to.path())?;
            }
        }
    }
    write_xattrs(Node::File(file), &want, || to.path())?;
    fchmod(to.fd(), perms(&dir.st)).ctx("chmod", || to.path())?;
    let (atime, mtime) = times(&dir.st);
    futimens(to.fd(), &atime, &mtime).ctx("utimensat", || to.path())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn root() -> bool {
        let ok = nix::unistd::geteuid().is_root();
        if !ok {
            eprintln!("skipped: whiteouts and trusted xattrs need root");
        }
        ok
    }

    fn whiteout(path: &Path) {
        nix::sys::stat::mknod(path, SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
    }

    fn opaque(path: &Path) {
        xattr::set(path, OPAQUE, OPAQUE_YES).unwrap();
    }

    fn is_whiteout(path: &Path) -> bool {
        let m = fs::symlink_metadata(path).unwrap();
        std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()) && m.rdev() == 0
    }

    fn marked_opaque(path: &Path) -> bool {
        xattr::get(path, OPAQUE).unwrap().as_deref() == Some(OPAQUE_YES)
    }

    fn names(path: &Path) -> Vec<String> {
        let mut out: Vec<String> =
            fs::read_dir(path).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        out.sort();
        out
    }

    /// Layers l0..ln under `t`, each made by its closure.
    fn layers(t: &Path, makers: &[&dyn Fn(&Path)]) -> Vec<PathBuf> {
        makers
            .iter()
            .enumerate()
            .map(|(i, make)| {
                let dir = t.join(format!("l{i}"));
                fs::create_dir(&dir).unwrap();
                make(&dir);
                dir
            })
            .collect()
    }

    #[test]
    fn whiteouts_stay_and_files_replace() {
        if !root() {
            return;
        }
        let t = tmp();
        let run = layers(
            t.path(),
            &[
                &|d| {
                    fs::write(d.join("a"), "a1").unwrap();
                    fs::write(d.join("b"), "b1").unwrap();
                },
                &|d| {
                    whiteout(&d.join("a"));
                    whiteout(&d.join("below"));
                    fs::write(d.join("b"), "b2").unwrap();
                },
                &|d| fs::write(d.join("below"), "back").unwrap(),
            ],
        );
        let dst = t.path().join("m");
        let stats = merge_layers(&run, &dst, &mut |_| {}).unwrap();
        assert!(is_whiteout(&dst.join("a")), "a deleted in the run stays deleted over the layers below");
        assert_eq!(fs::read_to_string(dst.join("b")).unwrap(), "b2");
        assert_eq!(fs::read_to_string(dst.join("below")).unwrap(), "back", "re-created over its whiteout");
        assert_eq!(fs::metadata(dst.join("b")).unwrap().ino(), fs::metadata(run[1].join("b")).unwrap().ino());
        assert_eq!(stats, TreeStats { bytes: 6, files: 3 });
    }

    #[test]
    fn directories_merge_replace_and_turn_opaque() {
        if !root() {
            return;
        }
        let t = tmp();
        let run = layers(
            t.path(),
            &[
                &|d| {
                    fs::create_dir_all(d.join("merge/old")).unwrap();
                    fs::create_dir_all(d.join("opq/old")).unwrap();
                    fs::write(d.join("was-file"), "f").unwrap();
                    fs::create_dir_all(d.join("was-dir/x")).unwrap();
                },
                &|d| {
                    fs::create_dir(d.join("merge")).unwrap();
                    fs::write(d.join("merge/new"), "n").unwrap();
                    xattr::set(d.join("merge"), "user.top", b"2").unwrap();
                    fs::create_dir(d.join("opq")).unwrap();
                    fs::write(d.join("opq/only"), "o").unwrap();
                    opaque(&d.join("opq"));
                    fs::create_dir(d.join("was-file")).unwrap();
                    fs::write(d.join("was-dir"), "now a file").unwrap();
                    whiteout(&d.join("gone"));
                },
                &|d| {
                    fs::create_dir(d.join("gone")).unwrap();
                    fs::write(d.join("gone/again"), "g").unwrap();
                    fs::create_dir(d.join("fresh")).unwrap();
                },
            ],
        );
        xattr::set(run[0].join("merge"), "user.low", b"0").unwrap();
        let dst = t.path().join("m");
        merge_layers(&run, &dst, &mut |_| {}).unwrap();

        assert_eq!(names(&dst.join("merge")), ["new", "old"]);
        assert!(!marked_opaque(&dst.join("merge")), "merged, the layers below still show through");
        assert_eq!(xattr::get(dst.join("merge"), "user.top").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(xattr::get(dst.join("merge"), "user.low").unwrap(), None, "the topmost directory's xattrs");
        assert_eq!(names(&dst.join("opq")), ["only"]);
        assert!(marked_opaque(&dst.join("opq")));
        assert!(marked_opaque(&dst.join("was-file")), "a directory over a file hides what is below the run");
        assert!(fs::symlink_metadata(dst.join("was-dir")).unwrap().is_file());
        assert!(marked_opaque(&dst.join("gone")), "a directory over a whiteout too");
        assert_eq!(names(&dst.join("gone")), ["again"]);
        assert!(!marked_opaque(&dst.join("fresh")), "a new directory merges with the layers below");
    }

    #[test]
    fn metadata_links_and_symlinks_are_kept() {
        if !root() {
            return;
        }
        let t = tmp();
        let run = layers(
            t.path(),
            &[
                &|d| {
                    fs::create_dir(d.join("dir")).unwrap();
                    fs::write(d.join("dir/f"), "f").unwrap();
                },
                &|d| {
                    fs::create_dir(d.join("dir")).unwrap();
                    fs::write(d.join("h1"), "h").unwrap();
                    fs::hard_link(d.join("h1"), d.join("dir/h2")).unwrap();
                    symlink("../h1", d.join("dir/s")).unwrap();
                    std::os::unix::fs::chown(d.join("dir"), Some(1234), Some(5678)).unwrap();
                    fs::set_permissions(d.join("dir"), fs::Permissions::from_mode(0o751)).unwrap();
                    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
                    File::open(d.join("dir")).unwrap().set_modified(when).unwrap();
                },
            ],
        );
        let dst = t.path().join("m");
        merge_layers(&run, &dst, &mut |_| {}).unwrap();
        let m = fs::symlink_metadata(dst.join("dir")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777, m.mtime()), (1234, 5678, 0o751, 1_600_000_000));
        assert_eq!(fs::metadata(dst.join("h1")).unwrap().ino(), fs::metadata(dst.join("dir/h2")).unwrap().ino());
        assert_eq!(fs::read_link(dst.join("dir/s")).unwrap(), Path::new("../h1"));
        assert_eq!(fs::read_to_string(dst.join("dir/f")).unwrap(), "f");
    }

    #[test]
    fn hidden_bytes_counts_each_hidden_byte_once() {
        if !root() {
            return;
        }
        let t = tmp();
        let all = layers(
            t.path(),
            &[
                &|d| {
                    fs::create_dir_all(d.join("d/e")).unwrap();
                    fs::write(d.join("d/e/big"), [0; 1000]).unwrap();
                    fs::write(d.join("d/small"), [0; 10]).unwrap();
                    fs::write(d.join("kept"), [0; 100]).unwrap();
                    fs::write(d.join("changed"), [0; 7]).unwrap();
                },
                &|d| {
                    fs::create_dir_all(d.join("d/e")).unwrap();
                    whiteout(&d.join("d/e/big"));
                    fs::write(d.join("changed"), "new").unwrap();
                    fs::write(d.join("added"), [0; 50]).unwrap();
                },
                &|d| {
                    fs::create_dir(d.join("d")).unwrap();
                    opaque(&d.join("d"));
                },
            ],
        );
        assert_eq!(hidden_bytes(&all[0], &all[1..2]).unwrap(), 1007);
        assert_eq!(hidden_bytes(&all[0], &all[1..]).unwrap(), 1017, "d/e/big once, inside the opaque d");
    }

    #[test]
    fn a_failed_merge_leaves_nothing() {
        let t = tmp();
        let dst = t.path().join("m");
        let err = merge_layers(&[t.path().join("missing")], &dst, &mut |_| {}).unwrap_err();
        assert!(matches!(err, TreeError::NotFound { .. }), "{err}");
        assert!(!dst.exists());
    }
}
