//! Durable before named: at each step of a commit and of a squash, the filesystem holding the
//! state dir is cut off (FS_IOC_SHUTDOWN without a log flush, as a power cut would: what was
//! not yet made durable never reaches the disk) and the CLI is killed. After the image is
//! mounted again (journal or log recovery), HEAD parses, every layer it names is there and
//! whole (every file the jobs wrote, byte for byte, in a read-only overlay of HEAD's layers),
//! gc keeps it so, and the next `run` publishes.
//!
//! A SIGKILL alone (tests/crash.rs) cannot show a missing sync: the page cache survives the
//! process. Each case runs on a loop-mounted ext4 image (journal on) and, where mkfs.xfs
//! exists, on XFS. Needs `--features failpoints` and root; with `CI` set, missing ext4 or
//! loop devices fail the test.
mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;
use jobcachefs::store::Head;
use nix::mount::{MntFlags, MsFlags};

const MIB: u64 = 1024 * 1024;
const CACHE: &str = "c";

/// What a job leaves in the cache: path (relative) to content.
type Files = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone, Copy)]
enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }

    /// Whether this machine can make and loop-mount one. ext4 is required in CI; XFS is a bonus.
    fn available(self) -> bool {
        let mkfs = format!("mkfs.{}", self.name());
        let tool = Command::new(&mkfs).arg("-V").output().is_ok_and(|o| o.status.success());
        let ok = tool && Path::new("/dev/loop-control").exists();
        if !ok {
            let required = matches!(self, Fs::Ext4) && std::env::var_os("CI").is_some();
            assert!(!required, "CI must be able to make a loop-mounted ext4 ({mkfs} and /dev/loop-control)");
            eprintln!("skipping {}: no {mkfs} or no loop devices", self.name());
        }
        ok
    }
}

/// A sandbox whose state dir is a loop-mounted image that can be cut off and mounted again.
struct Disk {
    sb: Sandbox,
    fs: Fs,
    image: PathBuf,
}

impl Disk {
    /// Makes a fresh image of `fs` and mounts it on the sandbox's state dir.
    fn new(fs: Fs) -> Self {
        let sb = Sandbox::new();
        fs::create_dir_all(&sb.state).expect("state dir");
        let image = sb.dir.path().join("state.img");
        // Sparse: XFS wants 300 MiB at least, but only what is written takes space.
        let mib = match fs {
            Fs::Ext4 => 160,
            Fs::Xfs => 320,
        };
        File::create(&image).and_then(|f| f.set_len(mib * MIB)).expect("image file");
        let mkfs = match fs {
            // -m 0: no blocks reserved for root; the journal is on by default.
            Fs::Ext4 => Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image).output(),
            Fs::Xfs => Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&image).output(),
        }
        .expect("mkfs");
        assert!(mkfs.status.success(), "mkfs.{}: {}", fs.name(), stderr(&mkfs));
        let disk = Self { sb, fs, image };
        disk.mount();
        disk
    }

    /// Mounts the image on the state dir.
    fn mount(&self) {
        // mount(8) sets the loop device up and frees it again at unmount (autoclear).
        let out = Command::new("mount")
            .args(["-t", self.fs.name(), "-o", "loop"])
            .arg(&self.image)
            .arg(&self.sb.state)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount -o loop ({}): {}", self.fs.name(), stderr(&out));
    }

    /// Unmounts the (shut down) filesystem and everything a killed process left on it, then
    /// mounts the image again: the kernel replays the journal or log, as after a reboot.
    fn remount(&self) {
        let mut below: Vec<PathBuf> = self.sb.mounts().into_iter().filter(|m| m.starts_with(&self.sb.state)).collect();
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in below {
            unmount(&m);
        }
        assert!(!self.sb.mounts().contains(&self.sb.state), "the state dir is still mounted");
        self.mount();
    }

    /// Runs the CLI with the state dir's filesystem cut off at `step`; asserts it got there.
    fn cut_at(&self, step: &str, args: &[&str]) {
        let path = self.sb.state.to_str().expect("utf-8 path");
        let out = self.sb.cli_env(args, &[("JOBCACHEFS_SHUTDOWN_AT", step), ("JOBCACHEFS_SHUTDOWN_PATH", path)]);
        assert_eq!(out.status.signal(), Some(9), "{step}: not cut off and killed: {:?} {}", out.status, stderr(&out));
    }

    /// `run` of a job that first removes `remove`, then copies `src` into the cache.
    fn job(src: &Path, remove: &str) -> Vec<String> {
        let script = r#"rm -rf "$JOBCACHE_DIR/$1" && cp -a "$0"/. "$JOBCACHE_DIR"/"#;
        let src = src.to_str().expect("utf-8 path");
        ["run", "--cache", CACHE, "--no-maintenance", "--", "sh", "-c", script, src, remove].map(String::from).to_vec()
    }

    /// Runs `job(src, remove)`, asserted to publish.
    fn run_job(&self, what: &str, src: &Path, remove: &str) {
        let args = Self::job(src, remove);
        let out = self.sb.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success() && stderr(&out).contains("published v"), "{what}: seed: {}", stderr(&out));
    }

    /// The cache's HEAD, which must exist and parse.
    fn head(&self) -> Head {
        self.sb.store().head(&key(CACHE)).expect("HEAD parses after recovery").expect("HEAD exists")
    }
}

/// Content for file `i` of job `tag`: deterministic, not compressible, not all alike.
fn payload(tag: u32, i: u32, len: usize) -> Vec<u8> {
    let mut x = (u64::from(tag) << 32 | u64::from(i)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A job's change: `files` small files spread over directories, one of a few MiB, a file every
/// job rewrites (`common`), and a directory the next job deletes (`gone-<tag>`).
fn change(tag: u32, files: u32) -> Files {
    let mut out = Files::new();
    for i in 0..files {
        let len = (i % 13) as usize * 700 + 37;
        out.insert(format!("j{tag}/d{}/f{i}", i % 24), payload(tag, i, len));
    }
    out.insert(format!("j{tag}/big"), payload(tag, u32::MAX, 3 * MIB as usize));
    out.insert("common".to_string(), payload(tag, u32::MAX - 1, 5000));
    for i in 0..5 {
        out.insert(format!("gone-{tag}/g{i}"), payload(tag, u32::MAX - 2 - i, 900));
    }
    out
}

/// Writes `files` below `dir` (on the host's disk, outside the image).
fn write_tree(dir: &Path, files: &Files) {
    for (rel, data) in files {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, data).expect("write source file");
    }
}

/// A job's effect on the cache's content, as `run_job` makes it.
fn apply(content: &mut Files, removed: &str, added: &Files) {
    content.retain(|k, _| !k.starts_with(&format!("{removed}/")));
    content.extend(added.iter().map(|(k, v)| (k.clone(), v.clone())));
}

/// Every regular file below `root`, with its content.
fn read_tree(root: &Path) -> Files {
    let mut out = Files::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let entry = entry.expect("entry");
            let path = entry.path();
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let rel = path.strip_prefix(root).expect("below root").to_string_lossy().into_owned();
                out.insert(rel, fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())));
            }
        }
    }
    out
}

/// Asserts that `got` is `want` exactly, summing up what differs rather than dumping it.
fn assert_same(what: &str, got: &Files, want: &Files) {
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differ: Vec<String> = want
        .iter()
        .filter_map(|(k, v)| {
            let g = got.get(k)?;
            (g != v).then(|| {
                format!(
                    "{k} ({} of {} bytes, {})",
                    g.len(),
                    v.len(),
                    if g.len() == v.len() { "other bytes" } else { "short" }
                )
            })
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "{what}: {} of {} files missing (e.g. {:?}), {} extra (e.g. {:?}), {} differ (e.g. {:?})",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(3)],
        extra.len(),
        &extra[..extra.len().min(3)],
        differ.len(),
        &differ[..differ.len().min(3)],
    );
}

/// Checks the recovered state: every layer HEAD names is there with its record, and a
/// read-only overlay of them holds exactly `want`. Returns HEAD.
fn assert_head_whole(disk: &Disk, what: &str, want: &Files) -> Head {
    let head = disk.head();
    let layout = disk.sb.layout();
    let store = disk.sb.store();
    for l in &head.layers {
        assert!(layout.layer_dir(l).is_dir(), "{what}: HEAD names missing layer {l}");
        assert!(store.layer(l).expect("layer record parses").is_some(), "{what}: layer {l} has no record");
    }
    // Top first, over the empty layer: an overlay without an upper needs two lower layers.
    let mut lower: Vec<String> = head.layers.iter().rev().map(|l| layout.layer_dir(l).display().to_string()).collect();
    lower.push(layout.empty_layer().display().to_string());
    let view = disk.sb.path("view");
    let opts = format!("lowerdir={}", lower.join(":"));
    nix::mount::mount(Some("overlay"), &view, Some("overlay"), MsFlags::MS_RDONLY, Some(opts.as_str()))
        .unwrap_or_else(|e| panic!("{what}: read-only overlay of HEAD: {e}"));
    let got = read_tree(&view);
    unmount(&view);
    assert_same(what, &got, want);
    head
}

/// Unmounts `path`, riding out the brief EBUSY of another test thread's fork holding a copy
/// of a descriptor inside it until that child execs.
fn unmount(path: &Path) {
    for attempt in 0.. {
        match nix::mount::umount2(path, MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) if attempt < 50 => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => return other.unwrap_or_else(|e| panic!("unmount {}: {e}", path.display())),
        }
    }
}

/// The next job after the recovery works and publishes the next version.
fn assert_next_run_publishes(disk: &Disk, what: &str, version: u64) {
    let out = disk.sb.cli(&["run", "--cache", CACHE, "--", "sh", "-c", "echo after > $JOBCACHE_DIR/after"]);
    assert!(out.status.success(), "{what}: run after recovery: {}", stderr(&out));
    let next = version + 1;
    assert!(stderr(&out).contains(&format!("published v{next}")), "{what}: {}", stderr(&out));
    assert_eq!(disk.head().version, next, "{what}");
}

/// `cache gc` after recovery, asserted to succeed.
fn gc(disk: &Disk, what: &str) {
    let out = disk.sb.cli(&["cache", "gc"]);
    assert!(out.status.success(), "{what}: gc after recovery: {}", stderr(&out));
}

/// Cut off at each step of a commit (promote, layer record, HEAD, decision, settle): the HEAD
/// found after recovery is the old version or the new one, and whole either way.
fn commit_steps(fs: Fs) {
    if !can_mount() || !fs.available() {
        return;
    }
    for step in [
        "atomic.before-rename",
        "commit.after-pending",
        "commit.after-rename",
        "commit.after-layer-record",
        "commit.before-head",
        "commit.after-head",
        "commit.after-decision",
        "commit.settle-before-drop",
    ] {
        let started = Instant::now();
        let what = format!("{} {step}", fs.name());
        let disk = Disk::new(fs);
        let base = change(0, 50);
        let big = change(1, 2000);
        let (src0, src1) = (disk.sb.path("src0"), disk.sb.path("src1"));
        write_tree(&src0, &base);
        write_tree(&src1, &big);
        disk.run_job(&what, &src0, "none");

        let job = Disk::job(&src1, "gone-0");
        disk.cut_at(step, &job.iter().map(String::as_str).collect::<Vec<_>>());
        disk.remount();

        let mut want = base.clone();
        let version = disk.head().version;
        // Once the HEAD write returned it must survive the cut: it was made durable.
        let named = matches!(step, "commit.after-head" | "commit.after-decision" | "commit.settle-before-drop");
        assert_eq!(version, if named { 2 } else { 1 }, "{what}: HEAD after recovery");
        if version == 2 {
            apply(&mut want, "gone-0", &big);
        }
        assert_head_whole(&disk, &what, &want);
        gc(&disk, &what);
        assert_head_whole(&disk, &format!("{what}, after gc"), &want);
        assert_next_run_publishes(&disk, &what, version);
        eprintln!("{what}: {:.1?}", started.elapsed());
    }
}

/// Cut off at each step of a squash of a three-layer HEAD: after recovery and gc (which takes
/// the replaced layers once HEAD names the flat one), HEAD holds the whole content.
fn squash_steps(fs: Fs) {
    if !can_mount() || !fs.available() {
        return;
    }
    for step in
        ["squash.after-copy", "atomic.before-rename", "squash.after-layer", "squash.before-head", "squash.after-head"]
    {
        let started = Instant::now();
        let what = format!("{} {step}", fs.name());
        let disk = Disk::new(fs);
        let mut want = Files::new();
        for tag in 0..3 {
            let job = change(tag, 700);
            let src = disk.sb.path(&format!("src{tag}"));
            write_tree(&src, &job);
            let removed = if tag == 0 { "none".to_string() } else { format!("gone-{}", tag - 1) };
            disk.run_job(&what, &src, &removed);
            apply(&mut want, &removed, &job);
        }
        assert_eq!(disk.head().layers.len(), 3, "{what}: seeded");

        disk.cut_at(step, &["cache", "squash", CACHE, "--max-depth", "1"]);
        disk.remount();

        let head = assert_head_whole(&disk, &what, &want);
        assert_eq!(head.version, 3, "{what}: a squash never changes the version");
        // Once the HEAD write returned it must survive the cut, and name the flat layer.
        let depth = if step == "squash.after-head" { 1 } else { 3 };
        assert_eq!(head.layers.len(), depth, "{what}: HEAD's depth after recovery");
        gc(&disk, &what);
        assert_head_whole(&disk, &format!("{what}, after gc"), &want);
        assert_next_run_publishes(&disk, &what, 3);
        eprintln!("{what}: {:.1?}", started.elapsed());
    }
}

#[test]
fn a_commit_cut_off_at_each_step_on_ext4_leaves_a_whole_head() {
    commit_steps(Fs::Ext4);
}

#[test]
fn a_commit_cut_off_at_each_step_on_xfs_leaves_a_whole_head() {
    commit_steps(Fs::Xfs);
}

#[test]
fn a_squash_cut_off_at_each_step_on_ext4_leaves_a_whole_head() {
    squash_steps(Fs::Ext4);
}

#[test]
fn a_squash_cut_off_at_each_step_on_xfs_leaves_a_whole_head() {
    squash_steps(Fs::Xfs);
}
