//! What a commit costs while other jobs on the node have dirty data on the same filesystem.
//!
//! `cargo bench --bench commit_dirty` makes a job's delta of 2,000 files of 10 KiB (20 MB in
//! 200 nested directories) and times, each on a fresh delta or volume:
//! - `syncfs`: one `syncfs` of the filesystem holding the delta (what promote did before);
//! - `tree sync`: the store's `durable::sync_tree`, an fsync of the delta's files and
//!   directories only (what promote does now);
//! - `umount`: unmounting an overlay whose upper is on that filesystem, with one file written
//!   (the kernel syncs the upper's whole filesystem when a writable overlay goes away);
//! - `umount volatile`: the same overlay mounted `volatile`, as the driver mounts volumes;
//! - `commit`: the whole commit through the public API (`Engine::release`: unmount, promote,
//!   HEAD) of a volume the delta was written into.
//!
//! First with no other dirty data (the baseline), then while another process keeps ~2 GB of
//! unrelated data dirty in another directory of the same filesystem (it rewrites its files
//! whenever /proc/meminfo `Dirty` falls below 90% of that, and never syncs). Each row is the
//! median (min–max) of 5 runs, and the ratio syncfs / tree sync per run, then its median.
//! `-- --quick` uses 200 MB of dirty data and 3 runs, for CI. Data lives in a temp dir under
//! /var/tmp, removed at the end, also after a panic. Needs root (overlay mounts).

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcachefs::lock::FileLock;
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::{Engine, Released};
use jobcachefs::store::{durable, CacheKey, Layout, NewVolume, Policy, Store, VolumeId};

const MIB: u64 = 1024 * 1024;
/// The delta: DIRS_A x DIRS_B directories of FILES files of FILE_BYTES each.
const DIRS_A: usize = 20;
const DIRS_B: usize = 10;
const FILES: usize = 10;
const FILE_BYTES: usize = 10 * 1024;
/// The other process's files.
const WRITER_FILE: u64 = 32 * MIB;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--dirty-writer") {
        let (Some(dir), Some(bytes)) = (args.get(i + 1), args.get(i + 2).and_then(|b| b.parse().ok())) else {
            eprintln!("commit_dirty: --dirty-writer <dir> <bytes>");
            std::process::exit(2);
        };
        dirty_writer(Path::new(dir), bytes);
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("commit_dirty: needs root to mount overlayfs");
        std::process::exit(2);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (dirty_bytes, runs) = if quick { (200 * MIB, 3) } else { (2048 * MIB, 5) };

    let dir = tempfile::Builder::new().prefix("jcfs-dirty").tempdir_in("/var/tmp").expect("temp dir").keep();
    let mut guard = Cleanup { dir: dir.clone(), writer: None };
    let layout = Layout::new(dir.join("s")).expect("layout");
    let engine = Engine::new(
        Store::open(layout.clone()).expect("store"),
        Arc::new(SysMounter),
        Arc::new(FileLock::new(layout)),
        Duration::from_secs(30),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let bench = Bench { dir: dir.clone(), engine, rt, seq: 0 };

    println!(
        "delta: {} files of {} KiB in {} directories; {runs} runs; median (min-max) in ms",
        DIRS_A * DIRS_B * FILES,
        FILE_BYTES / 1024,
        DIRS_A * DIRS_B + DIRS_A
    );
    println!(
        "{:<26} {:>9} {:>24} {:>24} {:>16} {:>24} {:>24} {:>24}",
        "other dirty data",
        "Dirty MB",
        "syncfs",
        "tree sync",
        "syncfs/tree",
        "umount",
        "umount volatile",
        "commit (Engine)"
    );
    let mut bench = bench;
    let baseline = bench.row(runs, None);
    baseline.print("none");

    let other = dir.join("other-job");
    fs::create_dir_all(&other).expect("mkdir");
    let exe = std::env::current_exe().expect("own path");
    let child = Command::new(exe)
        .arg("--dirty-writer")
        .arg(&other)
        .arg(dirty_bytes.to_string())
        .spawn()
        .expect("start the dirty-data writer");
    guard.writer = Some(child);
    let loaded = bench.row(runs, Some(dirty_bytes));
    loaded.print(&format!("{} MB, another process", dirty_bytes / MIB));
    println!(
        "with the dirty data, tree sync is x{:.1} faster than syncfs (median of per-run ratios); \
         the whole commit costs x{:.1} its baseline",
        loaded.ratio(),
        median(&mut loaded.commit.clone()) / median(&mut baseline.commit.clone()),
    );
    drop(bench);
    drop(guard);
}

struct Bench {
    dir: PathBuf,
    engine: Engine,
    rt: tokio::runtime::Runtime,
    seq: usize,
}

/// One row's samples, in ms.
#[derive(Default)]
struct Row {
    dirty_mb: Vec<f64>,
    syncfs: Vec<f64>,
    tree: Vec<f64>,
    umount: Vec<f64>,
    umount_volatile: Vec<f64>,
    commit: Vec<f64>,
}

impl Row {
    fn ratio(&self) -> f64 {
        let mut r: Vec<f64> = self.syncfs.iter().zip(&self.tree).map(|(b, a)| b / a).collect();
        median(&mut r)
    }

    fn print(&self, what: &str) {
        let cell = |v: &[f64]| {
            let mut v = v.to_vec();
            let m = median(&mut v);
            format!("{m:.1} ({:.1}-{:.1})", v[0], v[v.len() - 1])
        };
        let ratios: Vec<f64> = self.syncfs.iter().zip(&self.tree).map(|(b, a)| b / a).collect();
        println!(
            "{:<26} {:>9.0} {:>24} {:>24} {:>16} {:>24} {:>24} {:>24}",
            what,
            median(&mut self.dirty_mb.clone()),
            cell(&self.syncfs),
            cell(&self.tree),
            format!("x{:.1} ({:.1}-{:.1})", self.ratio(), min(&ratios), max(&ratios)),
            cell(&self.umount),
            cell(&self.umount_volatile),
            cell(&self.commit),
        );
    }
}

impl Bench {
    /// Measures each way `runs` times; with `dirty`, first waits until that much is dirty.
    fn row(&mut self, runs: usize, dirty: Option<u64>) -> Row {
        let mut row = Row::default();
        for run in 0..runs {
            let delta = self.fresh("delta");
            write_delta(&delta, run);
            row.dirty_mb.push(wait_dirty(dirty) as f64 / MIB as f64);
            let t = Instant::now();
            let f = File::open(&delta).expect("open delta");
            nix::unistd::syncfs(&f).expect("syncfs");
            row.syncfs.push(ms(t.elapsed()));

            let delta = self.fresh("delta");
            write_delta(&delta, run);
            wait_dirty(dirty);
            let t = Instant::now();
            durable::sync_tree(&delta).expect("tree sync");
            row.tree.push(ms(t.elapsed()));

            row.umount.push(self.umount(dirty, false));
            row.umount_volatile.push(self.umount(dirty, true));
            row.commit.push(self.commit(run, dirty));
        }
        row
    }

    /// A new path in the temp dir.
    fn fresh(&mut self, what: &str) -> PathBuf {
        let n = self.next();
        self.dir.join(format!("{what}-{n}"))
    }

    fn next(&mut self) -> usize {
        self.seq += 1;
        self.seq
    }

    /// An overlay with its upper on the filesystem, one file written, unmounted.
    fn umount(&mut self, dirty: Option<u64>, volatile: bool) -> f64 {
        let base = self.fresh("ovl");
        let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|d| base.join(d));
        for d in [&lower, &upper, &work, &merged] {
            fs::create_dir_all(d).expect("mkdir");
        }
        let mut opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        if volatile {
            opts.push_str(",volatile");
        }
        nix::mount::mount(Some("overlay"), &merged, Some("overlay"), nix::mount::MsFlags::empty(), Some(opts.as_str()))
            .expect("mount overlay");
        fs::write(merged.join("f"), "one file").expect("write");
        wait_dirty(dirty);
        let t = Instant::now();
        nix::mount::umount(&merged).expect("umount");
        ms(t.elapsed())
    }

    /// Restores a volume of a new cache, writes the delta into it, and times its release.
    fn commit(&mut self, run: usize, dirty: Option<u64>) -> f64 {
        let n = self.next();
        let target = self.dir.join(format!("mnt-{n}"));
        fs::create_dir_all(&target).expect("mkdir");
        let id = VolumeId::new(format!("v{n}")).expect("id");
        let req = NewVolume::new(
            id.clone(),
            CacheKey::new("bench", &format!("c{n}")).expect("key"),
            Policy { publish: true, ..Policy::default() },
            Some(target.clone()),
        );
        self.rt.block_on(self.engine.restore(req)).expect("restore");
        write_delta(&target, run);
        wait_dirty(dirty);
        let t = Instant::now();
        let r = self.rt.block_on(self.engine.release(&id, true)).expect("release").expect("volume");
        let took = ms(t.elapsed());
        assert!(matches!(r, Released::Committed { .. }), "{r:?}");
        took
    }
}

/// The job's change: nested directories of small files, not all alike.
fn write_delta(root: &Path, run: usize) {
    let mut data = vec![0u8; FILE_BYTES];
    let mut x = (run as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for a in 0..DIRS_A {
        for b in 0..DIRS_B {
            let d = root.join(format!("pkg{a}/v{b}"));
            fs::create_dir_all(&d).expect("mkdir");
            for f in 0..FILES {
                for byte in data.iter_mut().step_by(512) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *byte = x as u8;
                }
                fs::write(d.join(format!("f{f}.jar")), &data).expect("write delta file");
            }
        }
    }
}

/// Bytes dirty now, from /proc/meminfo.
fn dirty_now() -> u64 {
    let text = fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    text.lines()
        .find_map(|l| l.strip_prefix("Dirty:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("Dirty in /proc/meminfo")
        * 1024
}

/// Waits until 90% of `want` is dirty (the writer refills what a sync cleaned); returns
/// what is dirty then.
fn wait_dirty(want: Option<u64>) -> u64 {
    let Some(want) = want else { return dirty_now() };
    let started = Instant::now();
    loop {
        let now = dirty_now();
        if now >= want / 10 * 9 {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "only {} MB dirty after 3 minutes (want {} MB): vm.dirty_* limits too low?",
            now / MIB,
            want / MIB
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The other job: keeps `bytes` of data in `dir` dirty, never syncing, rewriting it whenever
/// less than 90% of it is dirty. Dies with its parent.
fn dirty_writer(dir: &Path, bytes: u64) {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let count = bytes.div_ceil(WRITER_FILE);
    let mut chunk = vec![0u8; MIB as usize];
    let mut files: Vec<File> =
        (0..count).map(|i| File::create(dir.join(format!("blob{i}"))).expect("create writer file")).collect();
    let mut pass = 0u8;
    loop {
        if dirty_now() < bytes / 10 * 9 {
            pass = pass.wrapping_add(1);
            chunk.iter_mut().step_by(4096).for_each(|b| *b = pass);
            for f in &mut files {
                f.seek(SeekFrom::Start(0)).expect("seek");
                for _ in 0..WRITER_FILE / MIB {
                    f.write_all(&chunk).expect("write");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the writer, unmounts what a panic left mounted, and removes the temp dir.
struct Cleanup {
    dir: PathBuf,
    writer: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.writer.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut ours: Vec<PathBuf> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|p| p.starts_with(&self.dir))
            .collect();
        ours.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in ours {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("commit_dirty: remove {}: {e}", self.dir.display());
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
