//! Layer tars on real files, as root: a rich layer survives export and import unchanged, and
//! every hostile tar is refused with nothing left behind, inside or outside the destination.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Cursor, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use jobcachefs::registry::archive::{export_layer, import_layer, ArchiveError, Limits};
use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Whiteouts, owners and trusted xattrs need root. Outside CI a test without it says so and
/// returns; in CI (`CI` set) it fails, so a missing privilege never passes silently.
fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run the layer archive tests as root");
    eprintln!("skipping: whiteouts, owners and trusted xattrs need root");
    false
}

/// On disk rather than a tmpfs: user xattrs need a filesystem that stores them.
fn tmp() -> TempDir {
    tempfile::Builder::new().prefix("jcfs-archive").tempdir_in("/var/tmp").expect("temp dir")
}

fn set_mtime(path: &Path, secs: i64) {
    let t = TimeSpec::new(secs, 0);
    utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).expect("utimensat");
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn whiteout(path: &Path) {
    mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).expect("mknod whiteout");
}

/// Bytes that do not compress: a xorshift stream.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Everything the round trip must keep about one entry.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nlink: u64,
    rdev: u64,
    content: Option<String>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        let path = root.join(rel);
        let md = fs::symlink_metadata(&path).expect("lstat");
        let ft = md.file_type();
        let kind = match () {
            _ if ft.is_dir() => "dir",
            _ if ft.is_file() => "file",
            _ if ft.is_symlink() => "symlink",
            _ if ft.is_char_device() => "char",
            _ if ft.is_block_device() => "block",
            _ if ft.is_fifo() => "fifo",
            _ => "other",
        };
        let xattrs = xattr::list(&path)
            .expect("llistxattr")
            .map(|n| {
                let v = xattr::get(&path, &n).expect("lgetxattr").unwrap_or_default();
                (n.to_string_lossy().into_owned(), v)
            })
            .collect();
        out.insert(
            rel.to_path_buf(),
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: md.mtime(),
                nlink: if ft.is_dir() { 0 } else { md.nlink() },
                rdev: md.rdev(),
                content: ft.is_file().then(|| sha256_hex(&fs::read(&path).expect("read"))),
                link: ft.is_symlink().then(|| fs::read_link(&path).expect("readlink")),
                xattrs,
            },
        );
        if ft.is_dir() {
            for entry in fs::read_dir(&path).expect("readdir") {
                walk(root, &rel.join(entry.expect("dirent").file_name()), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// A layer with every kind of entry and attribute overlay form holds.
fn rich_layer(layer: &Path) {
    fs::create_dir(layer).unwrap();
    fs::create_dir_all(layer.join("dir/nested/deep")).unwrap();
    fs::write(layer.join("dir/nested/deep/file.txt"), "hello\n").unwrap();
    fs::write(layer.join("dir/big.bin"), noise(3 << 20, 0x9e37_79b9_7f4a_7c15)).unwrap();
    fs::write(layer.join("dir/empty"), "").unwrap();
    symlink("nested/deep/file.txt", layer.join("dir/link")).unwrap();
    symlink("/somewhere/absolute//odd/./target", layer.join("dir/abs-link")).unwrap();
    fs::write(layer.join("dir/hard1"), "shared inode").unwrap();
    fs::hard_link(layer.join("dir/hard1"), layer.join("dir/hard2")).unwrap();
    mknod(&layer.join("dir/fifo"), SFlag::S_IFIFO, Mode::from_bits_truncate(0o640), 0).unwrap();
    whiteout(&layer.join("dir/gone"));
    fs::create_dir(layer.join("opaque")).unwrap();
    xattr::set(layer.join("opaque"), "trusted.overlay.opaque", b"y").unwrap();
    fs::write(layer.join("opaque/kept"), "kept").unwrap();
    fs::write(layer.join("suid"), "#!/bin/sh\n").unwrap();
    lchown(layer.join("suid"), Some(1000), Some(1001)).unwrap();
    chmod(&layer.join("suid"), 0o4755);
    fs::create_dir(layer.join("sticky")).unwrap();
    chmod(&layer.join("sticky"), 0o1777);
    lchown(layer.join("sticky"), Some(1000), Some(1001)).unwrap();
    lchown(layer.join("dir/link"), Some(1000), Some(1001)).unwrap();
    fs::write(layer.join("xattrs"), "attributes").unwrap();
    xattr::set(layer.join("xattrs"), "user.x", b"value").expect("user xattrs on /var/tmp");
    xattr::set(layer.join("xattrs"), "trusted.kept", b"\0binary\xff").unwrap();
    xattr::set(layer.join("xattrs"), "trusted.overlay.origin", b"\0\xfb\x21origin").unwrap();
    chmod(layer, 0o750);
    let mut secs = 1_600_000_000;
    for (rel, _) in snapshot(layer) {
        secs += 1000;
        set_mtime(&layer.join(rel), secs);
    }
}

fn tar_entries(blob: &Path) -> Vec<(String, tar::EntryType, BTreeMap<String, Vec<u8>>)> {
    let tar = zstd::decode_all(fs::File::open(blob).unwrap()).unwrap();
    let mut archive = tar::Archive::new(&tar[..]);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        let mut pax = BTreeMap::new();
        if let Some(records) = entry.pax_extensions().unwrap() {
            for r in records {
                let r = r.unwrap();
                pax.insert(r.key().unwrap().to_string(), r.value_bytes().to_vec());
            }
        }
        out.push((path, kind, pax));
    }
    out
}

#[test]
fn a_rich_layer_round_trips() {
    if !root() {
        return;
    }
    let t = tmp();
    let layer = t.path().join("layer");
    rich_layer(&layer);
    let before = snapshot(&layer);

    let out = t.path().join("layer.tar.zst");
    let exported = export_layer(&layer, &out).expect("export");
    let blob = fs::read(&out).unwrap();
    assert_eq!(exported.blob.digest, sha256_hex(&blob));
    assert_eq!(exported.blob.size, blob.len() as u64);
    assert_eq!(exported.blob.diff_id, sha256_hex(&zstd::decode_all(&blob[..]).unwrap()));
    assert_eq!(exported.bytes, (3 << 20) + 6 + 12 + 4 + 10 + 10);
    assert_eq!(snapshot(&layer), before, "export leaves the layer as it was");

    let again = export_layer(&layer, &t.path().join("again.tar.zst")).expect("export again");
    assert_eq!(again.blob, exported.blob, "the same tree gives the same blob");

    let entries = tar_entries(&out);
    let names: Vec<&str> = entries.iter().map(|(p, _, _)| p.as_str()).collect();
    let at = |name: &str| names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("{name} in {names:?}"));
    assert_eq!(names[0], "./", "the root comes first");
    assert_eq!(at("opaque/.wh..wh..opq"), at("opaque/") + 1, "the marker right after its directory");
    assert!(at("opaque/.wh..wh..opq") < at("opaque/kept"));
    assert!(at("dir/.wh.gone") < at("dir/big.bin"), "whiteouts before their siblings");
    assert!(!names.contains(&"dir/gone"));
    assert!(at("dir/") < at("dir/nested/") && at("dir/nested/") < at("dir/nested/deep/file.txt"));
    let hard2 = &entries[at("dir/hard2")];
    assert_eq!(hard2.1, tar::EntryType::Link, "the second name of an inode is a hard link");
    assert_eq!(entries[at("dir/.wh.gone")].1, tar::EntryType::Regular);
    let pax = &entries[at("xattrs")].2;
    assert_eq!(pax.get("SCHILY.xattr.user.x").map(Vec::as_slice), Some(&b"value"[..]));
    assert_eq!(pax.get("SCHILY.xattr.trusted.kept").map(Vec::as_slice), Some(&b"\0binary\xff"[..]));
    assert!(entries.iter().all(|(_, _, pax)| pax.keys().all(|k| !k.contains("overlay"))), "no overlay xattrs");
    assert_eq!(exported.files, entries.len() as u64);

    let dest = t.path().join("imported");
    let imported = import_layer(&blob[..], &dest, &Limits::default()).expect("import");
    assert_eq!((imported.bytes, imported.files), (exported.bytes, exported.files));

    let after = snapshot(&dest);
    let mut expected = before;
    expected.get_mut(Path::new("xattrs")).unwrap().xattrs.remove("trusted.overlay.origin");
    assert_eq!(after, expected);
    // The same, spelled out.
    let node = |rel: &str| &after[Path::new(rel)];
    assert_eq!((node("dir/gone").kind, node("dir/gone").rdev), ("char", 0), "a whiteout again");
    assert_eq!(node("opaque").xattrs.get("trusted.overlay.opaque").map(Vec::as_slice), Some(&b"y"[..]));
    assert!(!node("xattrs").xattrs.contains_key("trusted.overlay.origin"));
    assert_eq!(node("xattrs").xattrs["user.x"], b"value");
    assert_eq!((node("suid").mode, node("suid").uid, node("suid").gid), (0o4755, 1000, 1001));
    assert_eq!(node("sticky").mode, 0o1777);
    assert_eq!((node("dir/hard1").nlink, node("dir/hard2").nlink), (2, 2));
    assert_eq!(
        fs::metadata(dest.join("dir/hard1")).unwrap().ino(),
        fs::metadata(dest.join("dir/hard2")).unwrap().ino()
    );
    assert_eq!(node("dir/fifo").kind, "fifo");
    assert_eq!(node("").mode, 0o750);
}

#[test]
fn a_real_wh_file_cannot_be_exported() {
    if !root() {
        return;
    }
    let t = tmp();
    let layer = t.path().join("layer");
    fs::create_dir_all(layer.join("d")).unwrap();
    fs::write(layer.join("d/.wh.sneaky"), "").unwrap();
    let err = export_layer(&layer, &t.path().join("out")).expect_err("a .wh. file");
    assert!(matches!(err, ArchiveError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("d/.wh.sneaky"), "{err}");
}

#[test]
fn sockets_are_left_out_and_an_empty_layer_exports() {
    if !root() {
        return;
    }
    let t = tmp();
    let layer = t.path().join("layer");
    fs::create_dir(&layer).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(layer.join("sock")).unwrap();
    let out = t.path().join("out");
    let exported = export_layer(&layer, &out).expect("export");
    assert_eq!((exported.files, exported.bytes), (1, 0), "only ./");
    let dest = t.path().join("dest");
    import_layer(fs::File::open(&out).unwrap(), &dest, &Limits::default()).expect("import");
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
}

// ---- Hand-made tars -------------------------------------------------------------------------

/// A ustar header with the name (and link name) copied raw, past the tar crate's checks.
fn header(name: &[u8], kind: u8, size: u64, link: &[u8]) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(if kind == b'5' { 0o755 } else { 0o644 });
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_device_major(if kind == b'3' { 1 } else { 0 }).unwrap();
    h.set_device_minor(if kind == b'3' { 3 } else { 0 }).unwrap();
    h.set_cksum();
    h
}

#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn add(mut self, name: &str, kind: u8, link: &str, data: &[u8]) -> Self {
        let h = header(name.as_bytes(), kind, data.len() as u64, link.as_bytes());
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }
    fn file(self, name: &str, data: &[u8]) -> Self {
        self.add(name, b'0', "", data)
    }
    fn dir(self, name: &str) -> Self {
        self.add(name, b'5', "", b"")
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.add(name, b'2', target, b"")
    }
    fn hard_link(self, name: &str, target: &str) -> Self {
        self.add(name, b'1', target, b"")
    }
    fn tar(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0; 1024]);
        self.0
    }
    fn zst(self) -> Vec<u8> {
        zstd::encode_all(&self.tar()[..], 3).unwrap()
    }
}

/// A temp dir holding `outside/secret`, the import's destination `dest`, and nothing else.
struct Scene {
    t: TempDir,
}

impl Scene {
    fn new() -> Self {
        let t = tmp();
        fs::create_dir(t.path().join("outside")).unwrap();
        fs::write(t.path().join("outside/secret"), "secret").unwrap();
        Self { t }
    }
    fn dest(&self) -> PathBuf {
        self.t.path().join("dest")
    }
    fn outside(&self) -> String {
        self.t.path().join("outside").display().to_string()
    }
    fn import(&self, blob: impl Read, limits: &Limits) -> Result<(), ArchiveError> {
        import_layer(blob, &self.dest(), limits).map(|_| ())
    }
    /// The import left nothing: no `dest`, nothing new beside it or in `outside`.
    fn assert_untouched(&self, case: &str) {
        assert!(!self.dest().exists(), "{case}: dest removed");
        let names = |dir: &Path| {
            let mut n: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            n.sort();
            n
        };
        assert_eq!(names(self.t.path()), ["outside"], "{case}: nothing beside dest");
        assert_eq!(names(&self.t.path().join("outside")), ["secret"], "{case}: nothing in outside");
        assert_eq!(fs::read_to_string(self.t.path().join("outside/secret")).unwrap(), "secret", "{case}");
        assert_eq!(fs::metadata(self.t.path().join("outside/secret")).unwrap().nlink(), 1, "{case}: no new link");
    }
    fn refused(&self, case: &str, blob: &[u8], limits: &Limits, entry: &str, rule: &str) {
        let err = self.import(blob, limits).expect_err(case);
        let msg = err.to_string();
        assert!(matches!(err, ArchiveError::Refused { .. }), "{case}: {msg}");
        assert!(msg.contains(entry), "{case}: {msg:?} should name {entry:?}");
        assert!(msg.contains(rule), "{case}: {msg:?} should say {rule:?}");
        self.assert_untouched(case);
    }
}

#[test]
fn hostile_tars_are_refused_and_leave_nothing() {
    if !root() {
        return;
    }
    let s = Scene::new();
    let outside = s.outside();
    let abs = format!("{outside}/abs");
    let std = Limits::default();
    let cases: Vec<(&str, Vec<u8>, Limits, &str, &str)> = vec![
        ("parent", Tar::default().file("../escape", b"x").zst(), std.clone(), "../escape", "'..'"),
        ("absolute", Tar::default().file(&abs, b"x").zst(), std.clone(), &abs, "relative"),
        ("parent inside", Tar::default().dir("a/").file("a/../../x", b"x").zst(), std.clone(), "a/../../x", "'..'"),
        (
            "file through a symlink",
            Tar::default().symlink("link", &outside).file("link/pwned", b"x").zst(),
            std.clone(),
            "link/pwned",
            "symlink",
        ),
        (
            "hard link through a symlink",
            Tar::default().symlink("link", &outside).hard_link("h", "link/secret").zst(),
            std.clone(),
            "link/secret",
            "not an earlier entry",
        ),
        (
            "hard link placed through a symlink",
            Tar::default().symlink("link", &outside).file("f", b"x").hard_link("link/h", "f").zst(),
            std.clone(),
            "link/h",
            "symlink",
        ),
        ("duplicate file", Tar::default().file("a", b"1").file("a", b"2").zst(), std.clone(), "a", "duplicate"),
        ("duplicate dir", Tar::default().dir("d/").dir("d/").zst(), std.clone(), "d/", "duplicate"),
        ("file over a dir", Tar::default().dir("d/").file("d", b"x").zst(), std.clone(), "d", "duplicate"),
        (
            "file through a file",
            Tar::default().file("f", b"x").file("f/g", b"x").zst(),
            std.clone(),
            "f/g",
            "not a directory",
        ),
        (
            "hard link to nothing",
            Tar::default().hard_link("h", "missing").zst(),
            std.clone(),
            "missing",
            "not an earlier entry",
        ),
        ("hard link out", Tar::default().hard_link("h", "../x").zst(), std.clone(), "../x", "'..'"),
        (
            "hard link absolute",
            Tar::default().hard_link("h", &format!("{outside}/secret")).zst(),
            std.clone(),
            "secret",
            "relative",
        ),
        ("hard link to a dir", Tar::default().dir("d/").hard_link("h", "d").zst(), std.clone(), "h", "is a directory"),
        (
            "hard link to a whiteout",
            Tar::default().file(".wh.gone", b"").hard_link("h", "gone").zst(),
            std.clone(),
            "h",
            "is a whiteout",
        ),
        (
            "device",
            Tar::default().add("null", b'3', "", b"").zst(),
            std.clone(),
            "null",
            "device nodes are not allowed",
        ),
        (
            "too many entries",
            Tar::default().file("1", b"").file("2", b"").file("3", b"").file("4", b"").zst(),
            Limits { max_entries: 3, ..std.clone() },
            "4",
            "more than 3 entries",
        ),
        (
            "implied parents count",
            Tar::default().file("a/b/c", b"").zst(),
            Limits { max_entries: 2, ..std.clone() },
            "a/b/c",
            "more than 2 entries",
        ),
        (
            "too many bytes",
            Tar::default().file("a", &[1; 6000]).file("b", &[2; 6000]).zst(),
            Limits { max_total_bytes: 10_000, ..std.clone() },
            "b",
            "beyond the layer limit of 10000 bytes",
        ),
        (
            "path too long",
            Tar::default().file(&"p".repeat(80), b"").zst(),
            Limits { max_path_bytes: 64, ..std.clone() },
            "ppp",
            "longer than 64 bytes",
        ),
        (
            "whiteout with content",
            Tar::default().file(".wh.x", b"data").zst(),
            std.clone(),
            ".wh.x",
            "empty regular file",
        ),
        ("whiteout as a dir", Tar::default().dir(".wh.x/").zst(), std.clone(), ".wh.x/", "empty regular file"),
        ("inside a whiteout", Tar::default().file(".wh.x/y", b"").zst(), std.clone(), ".wh.x/y", "cannot hold entries"),
        ("whiteout of ..", Tar::default().file("d/.wh...", b"").zst(), std.clone(), "d/.wh...", "must name an entry"),
        ("aufs metadata", Tar::default().dir(".wh..wh.plnk/").zst(), std.clone(), ".wh..wh.plnk", "aufs"),
        ("unknown type", Tar::default().add("what", b'Z', "", b"").zst(), std.clone(), "what", "not supported"),
        ("global PAX header", Tar::default().add("g", b'g', "", b"").zst(), std.clone(), "g", "not supported"),
        ("dir with content", Tar::default().add("d/", b'5', "", b"xx").zst(), std.clone(), "d/", "only a regular file"),
        ("symlink without target", Tar::default().symlink("l", "").zst(), std.clone(), "l", "needs a target"),
        ("file named as a dir", Tar::default().file("f/", b"").zst(), std.clone(), "f/", "trailing '/'"),
        ("root as a file", Tar::default().file("./", b"").zst(), std.clone(), "./", "must be a directory"),
        ("root twice", Tar::default().dir("./").dir(".").zst(), std.clone(), ".", "named twice"),
        (
            "opaque twice",
            Tar::default().file(".wh..wh..opq", b"").file("./.wh..wh..opq", b"").zst(),
            std.clone(),
            "opq",
            "duplicate",
        ),
        (
            "garbage after the end",
            zstd::encode_all(&[Tar::default().file("a", b"x").tar(), b"hidden".to_vec()].concat()[..], 3).unwrap(),
            std.clone(),
            "after the end",
            "only zero padding",
        ),
    ];
    for (case, blob, limits, entry, rule) in cases {
        s.refused(case, &blob, &limits, entry, rule);
    }
}

#[test]
fn device_nodes_come_only_when_allowed() {
    if !root() {
        return;
    }
    let s = Scene::new();
    let blob = Tar::default().add("null", b'3', "", b"").add("pipe", b'6', "", b"").zst();
    s.import(&blob[..], &Limits { devices: true, ..Limits::default() }).expect("devices allowed");
    let md = fs::symlink_metadata(s.dest().join("null")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), makedev(1, 3));
    assert!(fs::symlink_metadata(s.dest().join("pipe")).unwrap().file_type().is_fifo());
}

#[test]
fn implied_parents_dot_slash_names_and_a_late_opaque_marker() {
    if !root() {
        return;
    }
    let s = Scene::new();
    let blob = Tar::default()
        .file("./a/b/file", b"content")
        .dir("./a/")
        .file("a/.wh..wh..opq", b"")
        .file("./.wh.gone", b"")
        .zst();
    let imported = s.import(&blob[..], &Limits::default());
    imported.expect("import");
    let dest = s.dest();
    assert_eq!(fs::read(dest.join("a/b/file")).unwrap(), b"content");
    let b = fs::metadata(dest.join("a/b")).unwrap();
    assert_eq!((b.mode() & 0o7777, b.uid(), b.gid()), (0o755, 0, 0), "an implied parent");
    assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o755, "a root the tar does not name");
    assert_eq!(fs::metadata(dest.join("a")).unwrap().mtime(), 1_600_000_000, "the explicit entry for an implied dir");
    assert_eq!(xattr::get(dest.join("a"), "trusted.overlay.opaque").unwrap().as_deref(), Some(&b"y"[..]));
    let gone = fs::symlink_metadata(dest.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
}

// ---- Streams that fail or never end ---------------------------------------------------------

/// Counts the bytes a generator has produced.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// A zstd blob compressed while it is read from `tar`, and how much of `tar` was produced.
fn lazy_blob(tar: impl Read) -> (impl Read, Rc<Cell<u64>>) {
    let count = Rc::new(Cell::new(0));
    let counted = Counted { inner: tar, count: count.clone() };
    (zstd::stream::read::Encoder::new(counted, 1).unwrap(), count)
}

fn zeros(n: u64) -> io::Take<io::Repeat> {
    io::repeat(0).take(n)
}

#[test]
fn a_decompression_bomb_stops_at_the_limit() {
    if !root() {
        return;
    }
    const MB: u64 = 1 << 20;
    let limits = Limits { max_total_bytes: 10 * MB, ..Limits::default() };
    let s = Scene::new();

    // One 200 MB file of zeros: refused from its header, before any content is read.
    let tar = Cursor::new(header(b"bomb", b'0', 200 * MB, b"").as_bytes().to_vec()).chain(zeros(200 * MB + 1024));
    let (blob, produced) = lazy_blob(tar);
    let err = s.import(blob, &limits).expect_err("a 200 MB file");
    assert!(err.to_string().contains("bomb") && err.to_string().contains("beyond the layer limit"), "{err}");
    assert!(produced.get() < 2 * MB, "read {} bytes of the bomb", produced.get());
    s.assert_untouched("one big file");

    // Fifty 4 MB files: the third is refused, so at most the first two were written.
    let mut tar: Box<dyn Read> = Box::new(io::empty());
    for i in 0..50 {
        let h = header(format!("f{i}").as_bytes(), b'0', 4 * MB, b"").as_bytes().to_vec();
        tar = Box::new(tar.chain(Cursor::new(h)).chain(zeros(4 * MB)));
    }
    let (blob, produced) = lazy_blob(tar.chain(zeros(1024)));
    let err = s.import(blob, &limits).expect_err("200 MB in files");
    assert!(err.to_string().contains("\"f2\"") && err.to_string().contains("beyond the layer limit"), "{err}");
    assert!(produced.get() < 12 * MB, "read {} bytes of the bomb", produced.get());
    s.assert_untouched("many files");

    // A 100 MB PAX header: the tar reader would hold it in memory.
    let pax = Cursor::new(header(b"././@PaxHeader", b'x', 100 * MB, b"").as_bytes().to_vec()).chain(zeros(100 * MB));
    let (blob, produced) = lazy_blob(pax.chain(Cursor::new(header(b"f", b'0', 0, b"").as_bytes().to_vec())));
    let err = s.import(blob, &limits).expect_err("a 100 MB header");
    assert!(err.to_string().contains("headers are larger than the layer allows"), "{err}");
    assert!(produced.get() < 4 * MB, "read {} bytes of the header", produced.get());
    s.assert_untouched("big header");
}

/// Serves `bytes`, then fails where the end would be, as the registry client's digest check does.
struct FailsAtEnd(Cursor<Vec<u8>>);

impl Read for FailsAtEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf)? {
            0 if !buf.is_empty() => Err(io::Error::new(io::ErrorKind::InvalidData, "digest mismatch (test)")),
            n => Ok(n),
        }
    }
}

fn small_layer_blob() -> Vec<u8> {
    Tar::default().dir("d/").file("d/a", b"a").file("d/noise", &noise(256 << 10, 7)).file("d/z", b"z").zst()
}

#[test]
fn a_blob_that_fails_its_digest_leaves_nothing() {
    if !root() {
        return;
    }
    let s = Scene::new();
    let err = s.import(FailsAtEnd(Cursor::new(small_layer_blob())), &Limits::default()).expect_err("digest");
    assert!(err.to_string().contains("digest mismatch (test)"), "{err}");
    s.assert_untouched("digest");
    // The same blob read to its end is fine, so the failure came only at the end.
    s.import(&small_layer_blob()[..], &Limits::default()).expect("the blob itself is good");
    assert_eq!(fs::read(s.dest().join("d/z")).unwrap(), b"z");
}

#[test]
fn a_truncated_blob_leaves_nothing() {
    if !root() {
        return;
    }
    let s = Scene::new();
    let blob = small_layer_blob();
    for cut in [0, 10, blob.len() / 2, blob.len() - 4, blob.len() - 1] {
        let err = s.import(&blob[..cut], &Limits::default()).expect_err("truncated");
        assert!(matches!(err, ArchiveError::Io { .. }), "cut at {cut}: {err}");
        s.assert_untouched(&format!("cut at {cut}"));
    }
    let err = s.import(&b"not zstd at all"[..], &Limits::default()).expect_err("not zstd");
    assert!(matches!(err, ArchiveError::Io { .. }), "{err}");
    s.assert_untouched("not zstd");
}

#[test]
fn an_existing_destination_is_left_alone() {
    if !root() {
        return;
    }
    let s = Scene::new();
    fs::create_dir(s.dest()).unwrap();
    fs::write(s.dest().join("mine"), "mine").unwrap();
    let err = s.import(&small_layer_blob()[..], &Limits::default()).expect_err("dest exists");
    assert!(matches!(err, ArchiveError::Io { .. }), "{err}");
    assert_eq!(fs::read_to_string(s.dest().join("mine")).unwrap(), "mine");
}

#[test]
fn long_paths_and_link_targets_travel_in_pax_records() {
    if !root() {
        return;
    }
    let t = tmp();
    let layer = t.path().join("layer");
    let long_name = "n".repeat(200);
    let deep = layer.join("x".repeat(120)).join("y".repeat(120));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join(&long_name), "deep").unwrap();
    symlink("t".repeat(300), layer.join("long-link")).unwrap();
    lchown(layer.join("long-link"), Some(3_000_000), Some(4_000_000)).unwrap();
    let out = t.path().join("out");
    export_layer(&layer, &out).expect("export");
    let dest = t.path().join("dest");
    import_layer(fs::File::open(&out).unwrap(), &dest, &Limits::default()).expect("import");
    let rel = Path::new(&"x".repeat(120)).join("y".repeat(120)).join(&long_name);
    assert_eq!(fs::read(dest.join(&rel)).unwrap(), b"deep");
    assert_eq!(fs::read_link(dest.join("long-link")).unwrap().as_os_str().as_bytes(), "t".repeat(300).as_bytes());
    let md = fs::symlink_metadata(dest.join("long-link")).unwrap();
    assert_eq!((md.uid(), md.gid()), (3_000_000, 4_000_000));
}
