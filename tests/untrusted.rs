//! Untrusted layer content: a job writes whatever it likes into its cache dir, and the driver
//! commits, restores, squashes, collects and removes it without ever following a symlink,
//! opening a device or FIFO, executing anything, or touching a file outside the state dir.
//!
//! The job (a `jobcachefs mount` + `release` pair, with the test writing as the job, and a
//! `jobcachefs run`) plants symlinks to `/etc`, `/etc/shadow`, the state dir and a canary dir
//! outside the sandbox (some named like the driver's own paths), device nodes, setuid files, a
//! FIFO, a socket, hard links, xattrs including forged `trusted.overlay.*` markers, a directory
//! 2000 levels deep and 255-byte names.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{makedev, mkdirat, mknod, Mode, SFlag};

/// How deep the planted directory goes: its path is far past PATH_MAX.
const DEEP: usize = 2000;
/// Every level of the deep directory.
const LEVEL: &str = "dd";

// ---------------------------------------------------------------------------------------------
// The world outside
// ---------------------------------------------------------------------------------------------

/// A canary dir outside the sandbox: a secret, a directory symlinks point into, and a FIFO that
/// would block anything that follows a symlink to it and opens it.
struct Outside {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Outside {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("jcfs-untrusted").tempdir_in("/var/tmp").expect("temp dir");
        let path = dir.path().to_path_buf();
        fs::create_dir(path.join("victim")).unwrap();
        fs::write(path.join("victim/keep"), "keep\n").unwrap();
        fs::write(path.join("secret"), "secret\n").unwrap();
        nix::unistd::mkfifo(&path.join("fifo-trap"), Mode::from_bits_truncate(0o644)).unwrap();
        Self { _dir: dir, path }
    }

    fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

/// Every entry below `root` (not following symlinks) and what it is, plus `/etc/passwd`,
/// `/etc/shadow` (mtime and content) and the names in `/etc` and `/`.
fn world(root: &Path) -> BTreeMap<String, String> {
    fn walk(path: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(m) = fs::symlink_metadata(path) else { return };
        let link = fs::read_link(path).ok();
        out.insert(
            path.display().to_string(),
            format!(
                "{:?} mode={:o} len={} mtime={}.{} link={link:?}",
                m.file_type(),
                m.permissions().mode(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ),
        );
        if m.is_dir() {
            for e in fs::read_dir(path).unwrap().flatten() {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    for f in ["/etc/passwd", "/etc/shadow"] {
        if let Ok(m) = fs::metadata(f) {
            let content = fs::read(f).unwrap_or_default();
            out.insert(f.into(), format!("mtime={}.{} {:?}", m.mtime(), m.mtime_nsec(), content));
        }
    }
    for dir in ["/etc", "/"] {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        out.insert(format!("names in {dir}"), names.join(" "));
    }
    out
}

#[track_caller]
fn assert_world(before: &BTreeMap<String, String>, root: &Path, when: &str) {
    let after = world(root);
    let changed: Vec<String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} -> {:?}", after.get(k)))
        .chain(after.keys().filter(|k| !before.contains_key(*k)).map(|k| format!("new {k}")))
        .collect();
    assert!(changed.is_empty(), "{when}: something outside the state dir changed:\n  {}", changed.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// Running the driver
// ---------------------------------------------------------------------------------------------

/// Runs the binary on the sandbox's state dir; a run that does not end in time was blocked by
/// something it should never have opened (a FIFO, a device behind a symlink).
fn cli(sb: &Sandbox, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jobcachefs"))
        .arg("--state-dir")
        .arg(&sb.state)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run jobcachefs");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            child.stdout.take().expect("stdout").read_to_end(&mut out).unwrap();
            child.stderr.take().expect("stderr").read_to_end(&mut err).unwrap();
            return Output { status, stdout: out, stderr: err };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("jobcachefs {args:?} hung: did it open a FIFO or follow a symlink to one?");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[track_caller]
fn success(sb: &Sandbox, args: &[&str]) -> Output {
    let out = cli(sb, args);
    assert!(out.status.success(), "jobcachefs {args:?}: {}{}", stdout(&out), stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    out
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// What the job plants
// ---------------------------------------------------------------------------------------------

/// Symlinks the job plants: (name, target text).
fn symlinks(sb: &Sandbox, out: &Outside) -> Vec<(String, String)> {
    let state = p(&sb.state).to_string();
    vec![
        ("etc".into(), "/etc".into()),
        ("shadow".into(), "/etc/shadow".into()),
        ("passwd-relative".into(), "../../../../../../../../../../etc/passwd".into()),
        ("victim".into(), p(&out.join("victim")).into()),
        ("secret".into(), p(&out.join("secret")).into()),
        ("trap".into(), p(&out.join("fifo-trap")).into()),
        ("zero".into(), "/dev/zero".into()),
        ("state".into(), state.clone()),
        // Named like the driver's own paths.
        ("layers".into(), format!("{state}/layers")),
        ("caches".into(), format!("{state}/caches")),
        ("volumes".into(), format!("{state}/volumes")),
        ("upper".into(), "/".into()),
        ("work".into(), p(&out.join("victim")).into()),
        ("head.json".into(), "/etc/passwd".into()),
        ("volume.json".into(), p(&out.join("secret")).into()),
        ("lock".into(), "/etc/shadow".into()),
        ("l".repeat(255), "/etc".into()),
        ("long-text".into(), format!("/{}", "x/".repeat(1900))),
    ]
}

fn long_file() -> String {
    "n".repeat(255)
}

fn long_dir() -> String {
    "D".repeat(255)
}

/// Creates the deep directory below `root` through descriptors (its path is too long for one call).
fn make_deep(root: &Path) {
    let mut dir = fs::File::open(root).unwrap();
    for _ in 0..DEEP {
        mkdirat(dir.as_fd(), LEVEL, Mode::from_bits_truncate(0o755)).expect("mkdir deep");
        let fd = openat(dir.as_fd(), LEVEL, OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY, Mode::empty())
            .expect("open deep");
        dir = fs::File::from(fd);
    }
    let fd = openat(
        dir.as_fd(),
        "bottom",
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
        Mode::from_bits_truncate(0o644),
    )
    .expect("create bottom");
    fs::File::from(fd).write_all(b"deep\n").unwrap();
}

/// The bottom file of the deep directory, if every level is there and holds only the next one.
fn read_deep(root: &Path) -> Result<String, String> {
    let mut dir = fs::File::open(root.join("deep")).map_err(|e| format!("open deep: {e}"))?;
    for level in 0..DEEP {
        let names: Vec<_> = nix::dir::Dir::from_fd(dir.try_clone().map_err(|e| e.to_string())?.into())
            .map_err(|e| format!("level {level}: {e}"))?
            .iter()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        if names != [LEVEL] {
            return Err(format!("level {level} holds {names:?}"));
        }
        let fd = openat(dir.as_fd(), LEVEL, OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY, Mode::empty())
            .map_err(|e| format!("level {level}: {e}"))?;
        dir = fs::File::from(fd);
    }
    let fd = openat(dir.as_fd(), "bottom", OFlag::O_RDONLY | OFlag::O_NOFOLLOW, Mode::empty())
        .map_err(|e| format!("bottom: {e}"))?;
    let mut s = String::new();
    fs::File::from(fd).read_to_string(&mut s).map_err(|e| e.to_string())?;
    Ok(s)
}

fn true_binary() -> &'static str {
    ["/usr/bin/true", "/bin/true"].into_iter().find(|p| Path::new(p).exists()).expect("a true binary")
}

/// Writes everything hostile into the mounted cache dir `dir`, as a job running as root would.
fn plant(sb: &Sandbox, out: &Outside, dir: &Path) {
    for (name, target) in symlinks(sb, out) {
        std::os::unix::fs::symlink(&target, dir.join(&name)).unwrap_or_else(|e| panic!("symlink {name}: {e}"));
    }
    mknod(&dir.join("null"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(1, 3)).expect("mknod char");
    mknod(&dir.join("loop0"), SFlag::S_IFBLK, Mode::from_bits_truncate(0o660), makedev(7, 0)).expect("mknod block");
    nix::unistd::mkfifo(&dir.join("fifo"), Mode::from_bits_truncate(0o644)).expect("mkfifo");
    drop(std::os::unix::net::UnixListener::bind(dir.join("sock")).expect("bind socket"));

    fs::copy(true_binary(), dir.join("suid-true")).unwrap();
    fs::set_permissions(dir.join("suid-true"), fs::Permissions::from_mode(0o4755)).unwrap();
    let script = format!("#!/bin/sh\ntouch {}\n", p(&out.join("executed")));
    fs::write(dir.join("suid-script"), script).unwrap();
    fs::set_permissions(dir.join("suid-script"), fs::Permissions::from_mode(0o6755)).unwrap();

    // Hard links across mounts: the overlay refuses them, to the job.
    for (from, name) in [(out.join("secret"), "hl-secret"), (PathBuf::from("/etc/passwd"), "hl-passwd")] {
        let err = fs::hard_link(&from, dir.join(name)).expect_err("a hard link out of the overlay must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "hard link to {}: {err}", from.display());
    }
    fs::write(dir.join("inner-a"), "linked\n").unwrap();
    fs::hard_link(dir.join("inner-a"), dir.join("inner-b")).expect("a hard link inside the cache");

    fs::write(dir.join("xattr-file"), "x\n").unwrap();
    xattr::set(dir.join("xattr-file"), "user.note", b"hello").expect("user xattr");
    xattr::set(dir.join("xattr-file"), "trusted.note", b"root-only").expect("trusted xattr");

    fs::create_dir(dir.join("deep")).unwrap();
    make_deep(&dir.join("deep"));
    fs::write(dir.join(long_file()), "long\n").unwrap();
    fs::create_dir(dir.join(long_dir())).unwrap();
    fs::write(dir.join(long_dir()).join(long_file()), "long in long\n").unwrap();
    fs::write(dir.join("evil\nname\x1b[2J"), "odd name\n").unwrap();

    // For the forged overlay markers of the second job.
    fs::create_dir_all(dir.join("shared")).unwrap();
    fs::write(dir.join("shared/a"), "a\n").unwrap();
    fs::create_dir_all(dir.join("elsewhere")).unwrap();
    fs::write(dir.join("elsewhere/from-elsewhere"), "elsewhere\n").unwrap();
}

/// Names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Checks a tree holding what `plant` wrote: a layer on disk or a mounted cache dir. `flat` is a
/// squashed layer (sockets are dropped there, overlay xattrs too).
fn check_tree(sb: &Sandbox, out: &Outside, dir: &Path, what: &str, flat: bool) {
    for (name, target) in symlinks(sb, out) {
        let at = dir.join(&name);
        let m = fs::symlink_metadata(&at).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        assert!(m.file_type().is_symlink(), "{what}: {name} is still a symlink, not {:?}", m.file_type());
        assert_eq!(fs::read_link(&at).unwrap(), Path::new(&target), "{what}: {name} keeps its target text");
    }
    let dev = |name: &str| fs::symlink_metadata(dir.join(name)).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
    let null = dev("null");
    assert!(null.file_type().is_char_device(), "{what}: null is a char device, not its contents");
    assert_eq!(null.rdev(), makedev(1, 3), "{what}: null keeps its numbers");
    let blk = dev("loop0");
    assert!(blk.file_type().is_block_device(), "{what}: loop0 is a block device");
    assert_eq!(blk.rdev(), makedev(7, 0), "{what}: loop0 keeps its numbers");
    assert!(dev("fifo").file_type().is_fifo(), "{what}: fifo is a FIFO");
    match fs::symlink_metadata(dir.join("sock")) {
        Ok(m) => assert!(m.file_type().is_socket(), "{what}: sock is a socket or nothing, never {:?}", m.file_type()),
        Err(e) => assert!(flat, "{what}: sock: {e}"),
    }
    for (name, mode) in [("suid-true", 0o4755), ("suid-script", 0o6755)] {
        let m = dev(name);
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{what}: {name} keeps setuid/setgid");
        assert_eq!(m.uid(), 0, "{what}: {name} is still root's");
    }
    assert_eq!(fs::read(dir.join("suid-true")).unwrap(), fs::read(true_binary()).unwrap(), "{what}: suid-true");
    assert!(!dir.join("hl-secret").exists() && !dir.join("hl-passwd").exists(), "{what}: no link out");
    assert_eq!(dev("inner-a").ino(), dev("inner-b").ino(), "{what}: a hard link inside the cache stays one");
    assert_eq!(xattr::get(dir.join("xattr-file"), "user.note").unwrap().as_deref(), Some(&b"hello"[..]), "{what}");
    assert_eq!(
        xattr::get(dir.join("xattr-file"), "trusted.note").unwrap().as_deref(),
        Some(&b"root-only"[..]),
        "{what}: trusted.note"
    );
    assert_eq!(read_deep(dir).as_deref(), Ok("deep\n"), "{what}: the {DEEP}-level directory");
    assert_eq!(fs::read_to_string(dir.join(long_file())).unwrap(), "long\n", "{what}: a 255-byte name");
    assert_eq!(fs::read_to_string(dir.join(long_dir()).join(long_file())).unwrap(), "long in long\n", "{what}");
    assert_eq!(fs::read_to_string(dir.join("evil\nname\x1b[2J")).unwrap(), "odd name\n", "{what}");
    assert!(!out.join("executed").exists(), "{what}: nothing the job planted was executed");
}

/// The forged directories of the second job, as a later mount or a layer shows them.
fn check_forgeries(dir: &Path, what: &str) {
    assert_eq!(names(&dir.join("redir")), ["own"], "{what}: a forged redirect shows nothing from elsewhere");
    assert_eq!(names(&dir.join("shared")), ["a", "b"], "{what}: a forged opaque marker hides nothing");
    assert_eq!(names(&dir.join("elsewhere")), ["from-elsewhere"], "{what}: the redirect's target is untouched");
}

/// `trusted.overlay.*` names on a path in a layer on disk (not through an overlay).
fn overlay_xattrs(path: &Path) -> Vec<String> {
    xattr::list(path)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.starts_with("trusted.overlay."))
        .collect()
}

/// Whether a symlink's target was copied into `layer`: a real file where the job put a link,
/// checked without following links at any component.
fn copied(layer: &Path) -> bool {
    ["etc/passwd", "victim/keep", "state/layers", "upper/etc", "secret"].iter().any(|rel| {
        let mut at = layer.to_path_buf();
        rel.split('/').all(|part| {
            at.push(part);
            fs::symlink_metadata(&at).is_ok_and(|m| !m.file_type().is_symlink())
        })
    })
}

fn layers(sb: &Sandbox) -> Vec<PathBuf> {
    let head = sb.store().head(&key("u")).unwrap().expect("a version");
    head.layers.iter().map(|l| sb.layout().layer_dir(l)).collect()
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[test]
fn untrusted_layer_content_is_kept_as_is_and_never_followed() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let out = Outside::new();
    let before = world(&out.path);

    // Job 1 plants everything and publishes v1.
    let w1 = sb.dir.path().join("job1/cache");
    success(&sb, &["mount", "--cache", "u", p(&w1)]);
    plant(&sb, &out, &w1);
    check_tree(&sb, &out, &w1, "job 1's mount", false);
    let rel = success(&sb, &["release", p(&w1)]);
    assert!(stdout(&rel).contains("published v1"), "{}", stdout(&rel));
    assert_world(&before, &out.path, "after the first commit");
    let l1 = layers(&sb);
    assert_eq!(l1.len(), 1);
    check_tree(&sb, &out, &l1[0], "layer 1 on disk", false);
    assert!(!copied(&l1[0]), "no symlink target was copied into the layer");

    // Job 2 restores it, sees it as it was, and forges overlay markers: an opaque flag on a
    // directory with content below, a redirect to another directory of the cache.
    let w2 = sb.dir.path().join("job2/cache");
    success(&sb, &["mount", "--cache", "u", p(&w2)]);
    check_tree(&sb, &out, &w2, "job 2's restore", false);
    fs::write(w2.join("shared/b"), "b\n").unwrap();
    let forged_opaque = xattr::set(w2.join("shared"), "trusted.overlay.opaque", b"y");
    fs::create_dir(w2.join("redir")).unwrap();
    fs::write(w2.join("redir/own"), "own\n").unwrap();
    let forged_redirect = xattr::set(w2.join("redir"), "trusted.overlay.redirect", b"/elsewhere");
    eprintln!("forging through the overlay: opaque {forged_opaque:?}, redirect {forged_redirect:?}");
    let rel = success(&sb, &["release", p(&w2)]);
    assert!(stdout(&rel).contains("published v2"), "{}", stdout(&rel));
    assert_world(&before, &out.path, "after the second commit");
    let l2 = layers(&sb);
    assert_eq!(l2.len(), 2);
    // The kernel stores a job's trusted.overlay.* escaped (trusted.overlay.overlay.*) or refuses it.
    // (Overlay's own copy-up marker, trusted.overlay.origin, may be there.)
    for (d, forged) in [("shared", "trusted.overlay.opaque"), ("redir", "trusted.overlay.redirect")] {
        let found = overlay_xattrs(&l2[1].join(d));
        assert!(!found.iter().any(|n| n == forged), "layer 2 {d}: the job's {forged} is live: {found:?}");
    }

    // Job 3, through `run`: the forged markers change nothing, the symlinks are only text.
    let script = "readlink $JOBCACHE_DIR/etc; ls $JOBCACHE_DIR/redir; ls $JOBCACHE_DIR/shared; \
                  cat $JOBCACHE_DIR/elsewhere/from-elsewhere";
    let run = success(&sb, &["run", "--cache", "u", "--no-publish", "--no-maintenance", "--", "sh", "-c", script]);
    assert_eq!(stdout(&run), "/etc\nown\na\nb\nelsewhere\n", "{}", stderr(&run));
    let w3 = sb.dir.path().join("job3/cache");
    success(&sb, &["mount", "--cache", "u", p(&w3)]);
    check_tree(&sb, &out, &w3, "job 3's restore", false);
    check_forgeries(&w3, "job 3's restore");
    // What a job leaves in a volume that is not published is dropped without following it.
    std::os::unix::fs::symlink(out.join("victim"), w3.join("drop-victim")).unwrap();
    fs::create_dir(w3.join("drop-dir")).unwrap();
    std::os::unix::fs::symlink(&sb.state, w3.join("drop-dir/state")).unwrap();
    std::os::unix::fs::symlink("/etc", w3.join("drop-dir/etc")).unwrap();
    make_deep(&w3.join("drop-dir"));
    let rel = success(&sb, &["release", "--no-publish", p(&w3)]);
    assert!(stdout(&rel).contains("not published"), "{}", stdout(&rel));
    assert_world(&before, &out.path, "after dropping an unpublished volume");
    assert!(sb.state.join("layers").is_dir() && sb.state.join("caches").is_dir(), "the state dir survived");

    // Squash flattens both layers into one, copying symlinks as symlinks, devices as devices,
    // and dropping overlay markers; the old layers (full of symlinks) are deleted.
    let sq = success(&sb, &["cache", "squash", "u", "--max-depth", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&sq.stdout).expect("squash prints JSON");
    assert_eq!(v["outcome"], "squashed", "{v}");
    assert_eq!(v["depth"], 1, "{v}");
    assert_world(&before, &out.path, "after squash");
    let flat = layers(&sb);
    assert_eq!(flat.len(), 1);
    check_tree(&sb, &out, &flat[0], "the squashed layer", true);
    check_forgeries(&flat[0], "the squashed layer");
    for d in ["shared", "redir", "elsewhere"] {
        assert_eq!(overlay_xattrs(&flat[0].join(d)), Vec::<String>::new(), "squashed {d}: overlay xattrs dropped");
    }
    assert!(!copied(&flat[0]), "no symlink target was copied into the squashed layer");
    let record = sb.store().layer(&sb.store().head(&key("u")).unwrap().unwrap().layers[0]).unwrap().unwrap();
    assert!(record.bytes < 16 << 20, "the squashed layer holds the job's bytes only: {} bytes", record.bytes);

    // Mount again after the squash: the same content.
    let w4 = sb.dir.path().join("job4/cache");
    success(&sb, &["mount", "--cache", "u", p(&w4)]);
    check_tree(&sb, &out, &w4, "job 4's restore after squash", true);
    check_forgeries(&w4, "job 4's restore after squash");
    success(&sb, &["release", "--no-publish", p(&w4)]);

    // gc deletes only inside the state dir; `cache rm` frees the layers, not the symlinks' targets.
    let gc = success(&sb, &["cache", "gc", "--json"]);
    assert!(serde_json::from_slice::<serde_json::Value>(&gc.stdout).is_ok(), "{}", stdout(&gc));
    assert_world(&before, &out.path, "after gc");
    check_tree(&sb, &out, &layers(&sb)[0], "the squashed layer after gc", true);
    let rm = success(&sb, &["cache", "rm", "u"]);
    assert!(stdout(&rm).contains("cache default/u: removed"), "{}", stdout(&rm));
    success(&sb, &["cache", "gc"]);
    assert_eq!(fs::read_dir(sb.layout().layers_dir()).unwrap().count(), 0, "the layers are freed");
    assert_world(&before, &out.path, "after cache rm and gc");
    assert!(sb.state.join("layers").is_dir() && sb.state.join("caches").is_dir(), "the state dir survived");
    assert_eq!(fs::read_to_string(out.join("victim/keep")).unwrap(), "keep\n");
    assert!(Path::new("/etc/passwd").is_file() && Path::new("/dev/zero").exists());
    assert!(sb.mounts().is_empty(), "nothing stays mounted: {:?}", sb.mounts());
}
