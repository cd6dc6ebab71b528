//! jobcachefs against the two ways CI systems keep build caches today, on the same generated
//! caches, on real overlay mounts (root).
//!
//! Contenders, each with its own lineage of the same cache:
//! - `copy`: full-copy snapshots on shared storage. Restore copies the current snapshot into the
//!   job's directory; publish copies the job's directory into a new snapshot and swaps a
//!   `current` symlink to it (atomic rename).
//! - `archive`: restore extracts a tar+zstd archive (level 3, one thread); publish archives the
//!   whole job directory again, as actions/cache does.
//! - `jcfs-engine`: restore mounts, publish commits, through the store API (`Engine`).
//! - `jcfs-csi`: the same through the real `jobcachefs serve` over its unix socket:
//!   CreateVolume+NodeStage+NodePublish, then NodeUnpublish+NodeUnstage+DeleteVolume.
//!
//! Every run of every contender restores, lets a job rewrite 1% of the files and add 1% new
//! ones, then publishes. Every publish makes what it wrote durable: the copy and archive ones end
//! with a `syncfs` of the filesystem they wrote (only their own data is dirty then: the cheapest
//! way for them), jobcachefs fsyncs its delta's tree itself; an untimed `sync` separates the
//! phases so no contender pays for another's dirty pages. Reads are measured on a warm page cache.
//!
//! Extra tables: read overhead through overlay at depths 1, 8 and 32 against a plain directory,
//! 16 concurrent volumes of one cache releasing at once, and the time spent inside the publish lock.
//!
//! The runs' data is kept until the end (see [`Contender`]) and deleted then, about 30 GB.
//!
//! `cargo bench --bench compare` (under 15 minutes on 2 cores, see BENCHMARKS.md); `-- --quick`
//! runs the small cache only with 3 runs, depths 1 and 8 and 4 concurrent volumes, for CI to
//! check that it still works. Any failure panics, which exits non-zero; the server is stopped and
//! mounts and data are removed on the way out, also on SIGINT and SIGTERM.

#[path = "common/shapes.rs"]
mod shapes;

use std::fmt::Display;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcachefs::csi::pb;
use jobcachefs::lock::{FileLock, PublishLock};
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::{unmount_patiently, Engine, Released};
use jobcachefs::store::commit::{Advanced, Prepared};
use jobcachefs::store::{CacheKey, Layout, NewVolume, Policy, Store, VolumeId};
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use shapes::*;
use tokio::runtime::{Handle, Runtime};
use tonic::transport::Channel;

const LOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// The namespace CSI volumes without PVC metadata land in.
const CSI_NAMESPACE: &str = "default";

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("compare: needs root to mount overlayfs");
        std::process::exit(2);
    }
    let started = *STARTED.get_or_init(Instant::now);
    let cfg = Config::from_args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let sb = Sandbox::new(&rt);
    clean_up_on_signal(&rt, &sb);
    let mut report = Report::default();
    for &shape in &cfg.shapes {
        let spec = shape.spec();
        let gen = generate(&sb, shape, &spec);
        if shape == cfg.depth_shape {
            report.depth = depth_overhead(&sb, &cfg, &spec, &gen);
        }
        if shape == Shape::Small {
            report.concurrency = Some(concurrency(&sb, &cfg, &gen));
        }
        let (rows, lock) = compare(&sb, &cfg, shape, &spec, &gen);
        report.rows.extend(rows);
        report.locks.push(lock);
    }
    report.print(&cfg);
    println!("\nmeasured in {:.0} s", started.elapsed().as_secs_f64());
    note("deleting the scratch tree".into());
    drop(sb);
    note("done".into());
}

/// When the bench started, for progress notes.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, stamped with seconds since the start.
fn note(line: String) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:6.1}s] {line}");
}

/// What to run: the full comparison, or the CI smoke run.
struct Config {
    runs: usize,
    shapes: Vec<Shape>,
    depth_shape: Shape,
    depths: Vec<usize>,
    volumes: usize,
}

impl Config {
    fn from_args() -> Self {
        if std::env::args().any(|a| a == "--quick") {
            Self { runs: 3, shapes: vec![Shape::Small], depth_shape: Shape::Small, depths: vec![1, 8], volumes: 4 }
        } else {
            Self {
                runs: 5,
                shapes: vec![Shape::Small, Shape::Maven, Shape::Node],
                // Big enough for lookups to matter, small enough to read 4 times per run.
                depth_shape: Shape::Maven,
                depths: vec![1, 8, 32],
                volumes: 16,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Failing loudly, and cleaning up on the way out
// ---------------------------------------------------------------------------------------------

/// `expect` with a message built only on failure, so paths can go into it for free.
trait OrDie<T> {
    fn or_die(self, what: impl FnOnce() -> String) -> T;
}

impl<T, E: Display> OrDie<T> for Result<T, E> {
    fn or_die(self, what: impl FnOnce() -> String) -> T {
        self.unwrap_or_else(|e| panic!("{}: {e}", what()))
    }
}

/// The bench's scratch tree, the engine over its state dir and the CSI server on it. Dropping it
/// (also while unwinding from a panic) stops the server and unmounts whatever is still mounted
/// below the tree before the tree is deleted.
struct Sandbox {
    root: PathBuf,
    engine: Engine,
    lock: FileLock,
    rt: Handle,
    server: Option<Child>,
    /// Taken on the way out: the server's graceful shutdown waits for open connections.
    channel: Option<Channel>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sandbox {
    fn new(rt: &Runtime) -> Self {
        let dir = tempfile::Builder::new().prefix("jcfs-compare").tempdir_in("/var/tmp").expect("temp dir");
        let root = dir.path().to_path_buf();
        let layout = Layout::new(root.join("s")).expect("layout");
        let engine = Engine::new(
            Store::open(layout.clone()).expect("store"),
            Arc::new(SysMounter),
            Arc::new(FileLock::new(layout.clone())),
            LOCK_TIMEOUT,
        );
        fs::create_dir(root.join("jobs")).expect("jobs dir");
        let log = root.join("server.log");
        let mut server = start_server(&root, &log);
        let channel = match wait_for_server(rt.handle(), &mut server, &Self::socket(&root)) {
            Ok(channel) => channel,
            Err(why) => {
                let _ = server.kill();
                let _ = server.wait();
                panic!("{why}; its log:\n{}", fs::read_to_string(&log).unwrap_or_default());
            }
        };
        Self {
            root,
            engine,
            lock: FileLock::new(layout),
            rt: rt.handle().clone(),
            server: Some(server),
            channel: Some(channel),
            log,
            _dir: dir,
        }
    }

    fn socket(root: &Path) -> String {
        format!("unix://{}", root.join("csi.sock").display())
    }

    fn channel(&self) -> Channel {
        self.channel.clone().expect("connected until the sandbox is dropped")
    }

    fn store(&self) -> &Store {
        self.engine.store()
    }

    fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// A new mount point for one job.
    fn mount_dir(&self, tag: &str) -> PathBuf {
        let dir = self.jobs().join(tag);
        fs::create_dir(&dir).or_die(|| format!("mkdir {}", dir.display()));
        dir
    }

    fn stop_server(&mut self) {
        self.channel = None;
        let Some(mut child) = self.server.take() else { return };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_server();
        unmount_under(&self.root);
        remove_parallel(&self.root);
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("compare: last lines of the server log:");
            tail.iter().rev().for_each(|l| eprintln!("  {l}"));
        }
    }
}

/// Ctrl-C or SIGTERM in the middle of a run: stop the server, unmount, delete the tree, exit.
/// Best effort, racing the main thread; a panic cleans up in `Sandbox::drop` instead.
fn clean_up_on_signal(rt: &Runtime, sb: &Sandbox) {
    use tokio::signal::unix::{signal, SignalKind};
    let root = sb.root.clone();
    let server = sb.server.as_ref().map(|c| nix::unistd::Pid::from_raw(c.id() as i32));
    let _runtime = rt.enter();
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    rt.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("compare: interrupted; cleaning up {}", root.display());
        if let Some(pid) = server {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        unmount_under(&root);
        remove_parallel(&root);
        let _ = fs::remove_dir_all(&root);
        std::process::exit(130);
    });
}

/// Unmounts everything below `root`, newest first; lazily only if a plain unmount fails, since
/// this runs on the way out and nothing may be left mounted.
fn unmount_under(root: &Path) {
    let Ok(mounts) = jobcachefs::mount::info::read_mountinfo() else { return };
    for m in mounts.iter().rev().filter(|m| m.mount_point.starts_with(root)) {
        if nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Deletes what is below `root` (the caller has unmounted it) with 16 threads: this machine's
/// filesystem discards freed blocks synchronously, so a lone `rm` mostly waits on the disk
/// (~100 µs a file) and the runs' 4 million files would take longer to delete than to measure.
/// 16 threads delete about 4 times as fast as one.
fn remove_parallel(root: &Path) {
    let mut items = Vec::new();
    // Three levels down are the job directories, snapshots and layers: many similar-sized trees.
    list_below(root, 3, &mut items);
    let queue = std::sync::Mutex::new(items);
    let next = || queue.lock().ok().and_then(|mut q| q.pop());
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                while let Some(path) = next() {
                    let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                    let _ = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                }
            });
        }
    });
}

/// The entries `depth` levels below `dir`, or shallower where a branch ends sooner.
fn list_below(dir: &Path, depth: usize, items: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if depth > 1 && entry.file_type().is_ok_and(|t| t.is_dir()) {
            list_below(&entry.path(), depth - 1, items);
        } else {
            items.push(entry.path());
        }
    }
}

/// Connects once the server listens; an error if it exits or takes over 30 s.
fn wait_for_server(rt: &Handle, server: &mut Child, endpoint: &str) -> Result<Channel, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.try_wait().map_err(|e| format!("poll jobcachefs serve: {e}"))? {
            return Err(format!("jobcachefs serve exited at start with {status}"));
        }
        if let Ok(channel) = rt.block_on(jobcachefs::csi::client::connect(endpoint)) {
            return Ok(channel);
        }
        if Instant::now() > deadline {
            return Err("jobcachefs serve did not listen within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_server(root: &Path, log: &Path) -> Child {
    let out = File::create(log).or_die(|| format!("create {}", log.display()));
    let err = out.try_clone().expect("server log");
    Command::new(env!("CARGO_BIN_EXE_jobcachefs"))
        .arg("--state-dir")
        .arg(root.join("s"))
        .args(["--log-level", "warn", "serve", "--endpoint", &Sandbox::socket(root), "--node-id", "bench"])
        // Staging and target paths live in the sandbox, not in kubelet's directory.
        .arg("--kubelet-dir")
        .arg(root)
        // No periodic collection in the middle of a measurement; the bench collects between caches.
        .args(["--gc-interval", "24h"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start jobcachefs serve")
}

// ---------------------------------------------------------------------------------------------
// Generated caches
// ---------------------------------------------------------------------------------------------

/// The three caches of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// 1,000 files, 10 MB.
    Small,
    /// 20,000 files, ~500 MB: many 1–64 KiB files and some 1–5 MB jars.
    Maven,
    /// 200,000 files of ~5 KiB, ~1 GB, nested packages.
    Node,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::Small => "small",
            Shape::Maven => "maven",
            Shape::Node => "node_modules",
        }
    }

    /// A valid cache name (no `_`).
    fn key(self) -> &'static str {
        match self {
            Shape::Small => "small",
            Shape::Maven => "maven",
            Shape::Node => "node",
        }
    }

    fn spec(self) -> Spec {
        match self {
            Shape::Small => small_spec(),
            Shape::Maven => maven_spec(),
            Shape::Node => node_spec(),
        }
    }
}

fn generate(sb: &Sandbox, shape: Shape, spec: &Spec) -> PathBuf {
    let gen = sb.root.join(format!("gen-{}", shape.key()));
    let t = Instant::now();
    write_tree(&gen, spec);
    nix::unistd::sync();
    note(format!(
        "[{}] generated {} files, {} in {:.1} s",
        shape.label(),
        spec.files.len(),
        size(spec.bytes()),
        t.elapsed().as_secs_f64()
    ));
    gen
}

// ---------------------------------------------------------------------------------------------
// The job
// ---------------------------------------------------------------------------------------------

/// What a build does to its cache: rewrites 1% of the files (same size, new content) and adds
/// 1% new ones.
fn run_job(dir: &Path, spec: &Spec, run: usize) {
    let mut buf = Vec::new();
    for (i, e) in spec.files.iter().enumerate() {
        let seed = (i as u64) ^ ((run as u64 + 1) << 40);
        match job_slot(i, run) {
            0 => {
                fill(&mut buf, seed, e.size, e.binary);
                write_file(&dir.join(&e.path), &buf);
            }
            50 => {
                fill(&mut buf, seed ^ 1, e.size, e.binary);
                write_file(&dir.join(added_path(e, run)), &buf);
            }
            _ => {}
        }
    }
}

/// Checks a restored job directory holds the cache's latest version: the previous run's first
/// added file (or, before any run, the first file).
fn check_restored(dir: &Path, spec: &Spec, run: usize, who: &str) {
    let expected = match run.checked_sub(1) {
        None => spec.files[0].path.clone(),
        Some(prev) => {
            let i = (0..spec.files.len()).find(|&i| job_slot(i, prev) == 50).expect("an added file");
            added_path(&spec.files[i], prev)
        }
    };
    assert!(dir.join(&expected).is_file(), "{who} run {run}: restored directory lacks {expected}");
}

// ---------------------------------------------------------------------------------------------
// Plain file work shared by the baselines
// ---------------------------------------------------------------------------------------------

/// Copies the entries of `src` into the existing directory `dst`: directories, `fs::copy` per
/// file, symlinks as symlinks. Returns the bytes of file data copied.
fn copy_contents(src: &Path, dst: &Path) -> u64 {
    let mut bytes = 0;
    for entry in fs::read_dir(src).or_die(|| format!("read {}", src.display())) {
        let entry = entry.or_die(|| format!("read {}", src.display()));
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type().or_die(|| format!("stat {}", from.display()));
        if kind.is_dir() {
            bytes += copy_tree(&from, &to);
        } else if kind.is_symlink() {
            let target = fs::read_link(&from).or_die(|| format!("readlink {}", from.display()));
            symlink(target, &to).or_die(|| format!("symlink {}", to.display()));
        } else {
            bytes += fs::copy(&from, &to).or_die(|| format!("copy {}", from.display()));
        }
    }
    bytes
}

/// Copies the tree `src` to the new directory `dst`, keeping the directories' modes.
fn copy_tree(src: &Path, dst: &Path) -> u64 {
    fs::create_dir(dst).or_die(|| format!("mkdir {}", dst.display()));
    let mode = fs::metadata(src).or_die(|| format!("stat {}", src.display())).permissions();
    fs::set_permissions(dst, mode).or_die(|| format!("chmod {}", dst.display()));
    copy_contents(src, dst)
}

/// Flushes the filesystem holding `path`, as jobcachefs's commit does for its upper.
fn syncfs(path: &Path) {
    let f = File::open(path).or_die(|| format!("open {}", path.display()));
    nix::unistd::syncfs(&f).or_die(|| format!("syncfs {}", path.display()));
}

fn fsync_dir(dir: &Path) {
    File::open(dir).and_then(|d| d.sync_all()).or_die(|| format!("fsync {}", dir.display()));
}

// ---------------------------------------------------------------------------------------------
// Contenders
// ---------------------------------------------------------------------------------------------

/// One way of keeping a cache. `restore` and `publish` are timed; `seed` and `cleanup` are not.
///
/// Data a run leaves (job directories, replaced snapshots and archives) is kept until the bench
/// ends: on a journal-less ext4 (this machine kind) inode allocation skips, one by one, inodes
/// deleted in the last 1–5 minutes, so a mass delete would slow whoever creates files next and
/// charge one contender's cleanup to another's restore.
trait Contender {
    fn name(&self) -> &'static str;
    /// Makes the tree at `gen` the cache's first version.
    fn seed(&mut self, gen: &Path);
    /// Gives job `run` its own copy (or mount) of the cache's current version; returns its directory.
    fn restore(&mut self, run: usize) -> PathBuf;
    /// Makes the job's directory the cache's next version, durably; returns the bytes it wrote.
    fn publish(&mut self, run: usize) -> u64;
    /// Removes the run's empty mount points.
    fn cleanup(&mut self, _run: usize) {}
}

/// A symlink naming a cache's current version, swapped by an atomic rename.
struct Pointer {
    dir: PathBuf,
}

impl Pointer {
    fn current(&self) -> PathBuf {
        let link = self.dir.join("current");
        self.dir.join(fs::read_link(&link).or_die(|| format!("readlink {}", link.display())))
    }

    /// Points at `target` (relative to the directory) atomically and durably.
    fn point_to(&self, target: &str) {
        let tmp = self.dir.join("current.tmp");
        symlink(target, &tmp).or_die(|| format!("symlink {}", tmp.display()));
        fs::rename(&tmp, self.dir.join("current")).expect("rename pointer");
        fsync_dir(&self.dir);
    }
}

/// Full-copy snapshots: `snapshots/<name>/` trees and a `current` symlink naming one.
struct CopySnapshots {
    pointer: Pointer,
}

impl CopySnapshots {
    fn new(root: PathBuf) -> Self {
        fs::create_dir_all(root.join("snapshots")).expect("snapshots dir");
        Self { pointer: Pointer { dir: root } }
    }

    fn job(&self, run: usize) -> PathBuf {
        self.pointer.dir.join(format!("job-{run}"))
    }
}

impl Contender for CopySnapshots {
    fn name(&self) -> &'static str {
        "copy"
    }

    fn seed(&mut self, gen: &Path) {
        copy_tree(gen, &self.pointer.dir.join("snapshots/seed"));
        self.pointer.point_to("snapshots/seed");
    }

    fn restore(&mut self, run: usize) -> PathBuf {
        let job = self.job(run);
        copy_tree(&self.pointer.current(), &job);
        job
    }

    fn publish(&mut self, run: usize) -> u64 {
        let name = format!("snapshots/run-{run}");
        let snapshot = self.pointer.dir.join(&name);
        let bytes = copy_tree(&self.job(run), &snapshot);
        syncfs(&snapshot);
        self.pointer.point_to(&name);
        bytes
    }
}

/// tar+zstd archives, one per version, and a `current` symlink naming one (a new object per
/// version, as a blob store keeps them).
struct Archives {
    pointer: Pointer,
}

impl Archives {
    fn new(root: PathBuf) -> Self {
        fs::create_dir_all(&root).expect("archive dir");
        Self { pointer: Pointer { dir: root } }
    }

    fn job(&self, run: usize) -> PathBuf {
        self.pointer.dir.join(format!("job-{run}"))
    }

    /// Archives `src` as `name`, flushes it and points `current` at it.
    fn pack(&self, src: &Path, name: &str) -> u64 {
        let path = self.pointer.dir.join(name);
        let file = File::create(&path).or_die(|| format!("create {}", path.display()));
        let encoder = zstd::Encoder::new(file, 3).expect("zstd encoder");
        let mut builder = tar::Builder::new(encoder);
        builder.follow_symlinks(false);
        builder.append_dir_all(".", src).or_die(|| format!("archive {}", src.display()));
        let file = builder.into_inner().expect("finish tar").finish().expect("finish zstd");
        syncfs(&path);
        self.pointer.point_to(name);
        file.metadata().expect("archive size").len()
    }
}

impl Contender for Archives {
    fn name(&self) -> &'static str {
        "archive"
    }

    fn seed(&mut self, gen: &Path) {
        self.pack(gen, "seed.tar.zst");
    }

    fn restore(&mut self, run: usize) -> PathBuf {
        let job = self.job(run);
        let file = File::open(self.pointer.current()).expect("open archive");
        let decoder = zstd::Decoder::new(file).expect("zstd decoder");
        tar::Archive::new(decoder).unpack(&job).or_die(|| format!("extract into {}", job.display()));
        job
    }

    fn publish(&mut self, run: usize) -> u64 {
        self.pack(&self.job(run), &format!("run-{run}.tar.zst"))
    }
}

/// A volume that publishes, mounted at `target`.
fn new_volume(id: &str, cache: &CacheKey, target: &Path) -> NewVolume {
    NewVolume::new(
        VolumeId::new(id).or_die(|| format!("volume id {id}")),
        cache.clone(),
        Policy { publish: true, ..Policy::default() },
        Some(target.to_path_buf()),
    )
}

/// Restores volume `id` of `cache` at a new mount point under the jobs dir.
fn mount(sb: &Sandbox, cache: &CacheKey, id: &str) -> PathBuf {
    let target = sb.mount_dir(id);
    sb.rt.block_on(sb.engine.restore(new_volume(id, cache, &target))).or_die(|| format!("restore {id}"));
    target
}

/// Releases volume `id`; `publish` false drops its change.
fn release(sb: &Sandbox, id: &str, publish: bool) -> Released {
    let vid = VolumeId::new(id).expect("volume id");
    let released = sb.rt.block_on(sb.engine.release(&vid, publish)).or_die(|| format!("release {id}"));
    released.unwrap_or_else(|| panic!("release {id}: no such volume"))
}

/// Bytes of a commit; anything else is a failure of the contender.
fn committed_bytes(released: Released, what: &str) -> u64 {
    match released {
        Released::Committed { bytes, .. } => bytes,
        other => panic!("{what}: expected a commit, got {other}"),
    }
}

/// Makes `gen` the first version of `cache` through a mounted volume.
fn seed_cache(sb: &Sandbox, cache: &CacheKey, gen: &Path, id: &str) {
    let target = mount(sb, cache, id);
    copy_contents(gen, &target);
    committed_bytes(release(sb, id, true), id);
    fs::remove_dir(&target).expect("remove mount point");
}

/// jobcachefs through its library API: restore mounts, publish commits.
struct Mounted<'a> {
    sb: &'a Sandbox,
    cache: CacheKey,
}

impl Mounted<'_> {
    fn id(&self, run: usize) -> String {
        format!("eng-{}-{run}", self.cache.name.as_str())
    }
}

impl Contender for Mounted<'_> {
    fn name(&self) -> &'static str {
        "jcfs-engine"
    }

    fn seed(&mut self, gen: &Path) {
        seed_cache(self.sb, &self.cache, gen, &format!("eng-{}-seed", self.cache.name.as_str()));
    }

    fn restore(&mut self, run: usize) -> PathBuf {
        mount(self.sb, &self.cache, &self.id(run))
    }

    fn publish(&mut self, run: usize) -> u64 {
        let id = self.id(run);
        committed_bytes(release(self.sb, &id, true), &id)
    }

    fn cleanup(&mut self, run: usize) {
        let dir = self.sb.jobs().join(self.id(run));
        fs::remove_dir(&dir).or_die(|| format!("remove {}", dir.display()));
    }
}

/// jobcachefs through the CSI socket, as kubelet and the external-provisioner drive it.
struct Csi<'a> {
    sb: &'a Sandbox,
    cache: String,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    volume_id: String,
}

impl<'a> Csi<'a> {
    fn new(sb: &'a Sandbox, cache: &str) -> Self {
        Self {
            sb,
            cache: cache.to_string(),
            controller: ControllerClient::new(sb.channel()),
            node: NodeClient::new(sb.channel()),
            volume_id: String::new(),
        }
    }

    fn dir(&self, tag: &str) -> PathBuf {
        self.sb.jobs().join(format!("csi-{}-{tag}", self.cache))
    }

    fn capability() -> pb::VolumeCapability {
        use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
        pb::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        }
    }

    /// CreateVolume + NodeStageVolume + NodePublishVolume; returns the target path.
    fn up(&mut self, tag: &str) -> PathBuf {
        let dir = self.dir(tag);
        let (staging, target) = (dir.join("staging"), dir.join("target"));
        let create = pb::CreateVolumeRequest {
            name: format!("pvc-{}-{tag}", self.cache),
            volume_capabilities: vec![Self::capability()],
            parameters: [("cacheName".to_string(), self.cache.clone())].into(),
            ..Default::default()
        };
        let stage = |volume_id: String| pb::NodeStageVolumeRequest {
            volume_id,
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(Self::capability()),
            ..Default::default()
        };
        let publish = |volume_id: String| pb::NodePublishVolumeRequest {
            volume_id,
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(Self::capability()),
            ..Default::default()
        };
        let (controller, node) = (&mut self.controller, &mut self.node);
        self.volume_id = self.sb.rt.block_on(async move {
            let created = controller.create_volume(create).await.or_die(|| "CreateVolume".into());
            let id = created.into_inner().volume.expect("CreateVolume answers a volume").volume_id;
            node.node_stage_volume(stage(id.clone())).await.or_die(|| "NodeStageVolume".into());
            node.node_publish_volume(publish(id.clone())).await.or_die(|| "NodePublishVolume".into());
            id
        });
        target
    }

    /// NodeUnpublishVolume + NodeUnstageVolume + DeleteVolume (which commits); returns the bytes
    /// of the layer it committed.
    fn down(&mut self, tag: &str) -> u64 {
        let dir = self.dir(tag);
        let id = self.volume_id.clone();
        let before = self.head_version();
        let unpublish = pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: dir.join("target").display().to_string(),
        };
        let unstage = pb::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: dir.join("staging").display().to_string(),
        };
        let delete = pb::DeleteVolumeRequest { volume_id: id, ..Default::default() };
        let (controller, node) = (&mut self.controller, &mut self.node);
        self.sb.rt.block_on(async move {
            node.node_unpublish_volume(unpublish).await.or_die(|| "NodeUnpublishVolume".into());
            node.node_unstage_volume(unstage).await.or_die(|| "NodeUnstageVolume".into());
            controller.delete_volume(delete).await.or_die(|| "DeleteVolume".into());
        });
        assert_eq!(self.head_version(), before + 1, "csi {tag}: DeleteVolume did not commit");
        self.top_layer_bytes()
    }

    fn key(&self) -> CacheKey {
        CacheKey::new(CSI_NAMESPACE, &self.cache).expect("cache key")
    }

    fn head_version(&self) -> u64 {
        self.sb.store().head(&self.key()).expect("read head").map_or(0, |h| h.version)
    }

    fn top_layer_bytes(&self) -> u64 {
        let head = self.sb.store().head(&self.key()).expect("read head").expect("a head");
        let top = head.layers.last().expect("a layer");
        self.sb.store().layer(top).expect("read layer record").expect("layer record").bytes
    }
}

impl Contender for Csi<'_> {
    fn name(&self) -> &'static str {
        "jcfs-csi"
    }

    fn seed(&mut self, gen: &Path) {
        let target = self.up("seed");
        copy_contents(gen, &target);
        self.down("seed");
        self.cleanup_tag("seed");
    }

    fn restore(&mut self, run: usize) -> PathBuf {
        self.up(&run.to_string())
    }

    fn publish(&mut self, run: usize) -> u64 {
        self.down(&run.to_string())
    }

    fn cleanup(&mut self, run: usize) {
        self.cleanup_tag(&run.to_string());
    }
}

impl Csi<'_> {
    /// NodeUnpublish removed the target; the staging dir and its parent are the caller's.
    fn cleanup_tag(&self, tag: &str) {
        let dir = self.dir(tag);
        fs::remove_dir(dir.join("staging")).expect("remove staging dir");
        fs::remove_dir(&dir).or_die(|| format!("remove {}", dir.display()));
    }
}

// ---------------------------------------------------------------------------------------------
// The comparison
// ---------------------------------------------------------------------------------------------

/// One contender on one cache: a value per run, index-aligned with the other contenders' runs.
struct Row {
    shape: Shape,
    files: usize,
    bytes: u64,
    contender: &'static str,
    restore: Vec<Duration>,
    publish: Vec<Duration>,
    written: Vec<u64>,
}

/// Runs every contender `cfg.runs` times on `shape`, interleaved so ratios pair runs made under
/// the same conditions; then measures the publish lock on the engine's cache.
fn compare(sb: &Sandbox, cfg: &Config, shape: Shape, spec: &Spec, gen: &Path) -> (Vec<Row>, LockRow) {
    let key = shape.key();
    let engine_cache = CacheKey::new("bench", &format!("eng-{key}")).expect("cache key");
    let csi_cache = format!("csi-{key}");
    let mut contenders: Vec<Box<dyn Contender + '_>> = vec![
        Box::new(CopySnapshots::new(sb.root.join(format!("copy-{key}")))),
        Box::new(Archives::new(sb.root.join(format!("archive-{key}")))),
        Box::new(Mounted { sb, cache: engine_cache.clone() }),
        Box::new(Csi::new(sb, &csi_cache)),
    ];
    for c in &mut contenders {
        let t = Instant::now();
        c.seed(gen);
        nix::unistd::sync();
        note(format!("[{}] seeded {} in {:.1} s", shape.label(), c.name(), t.elapsed().as_secs_f64()));
    }
    let mut rows: Vec<Row> = contenders
        .iter()
        .map(|c| Row {
            shape,
            files: spec.files.len(),
            bytes: spec.bytes(),
            contender: c.name(),
            restore: Vec::new(),
            publish: Vec::new(),
            written: Vec::new(),
        })
        .collect();
    for run in 0..cfg.runs {
        for (c, row) in contenders.iter_mut().zip(&mut rows) {
            one_run(c.as_mut(), row, spec, run);
        }
    }
    let lock = lock_time(sb, cfg, shape, &engine_cache, spec);
    (rows, lock)
}

/// Restore, job, publish, cleanup; only restore and publish are timed.
fn one_run(c: &mut dyn Contender, row: &mut Row, spec: &Spec, run: usize) {
    let t = Instant::now();
    let job = c.restore(run);
    row.restore.push(t.elapsed());
    check_restored(&job, spec, run, c.name());
    // Whatever the restore left dirty is not the publish's to flush.
    nix::unistd::sync();
    run_job(&job, spec, run);
    let t = Instant::now();
    row.written.push(c.publish(run));
    row.publish.push(t.elapsed());
    c.cleanup(run);
    nix::unistd::sync();
    note(format!(
        "[{}] run {run} {:<12} restore {:>9} ms, publish {:>9} ms, wrote {}",
        row.shape.label(),
        c.name(),
        fmt_ms(row.restore[run]),
        fmt_ms(row.publish[run]),
        size(row.written[run])
    ));
}

// ---------------------------------------------------------------------------------------------
// Time inside the publish lock
// ---------------------------------------------------------------------------------------------

/// The engine's release split into its phases: promote (outside the lock), waiting for the lock,
/// and holding it (check, write HEAD, give it up).
struct LockRow {
    shape: Shape,
    promote: Vec<Duration>,
    wait: Vec<Duration>,
    held: Vec<Duration>,
}

fn lock_time(sb: &Sandbox, cfg: &Config, shape: Shape, cache: &CacheKey, spec: &Spec) -> LockRow {
    let mut row = LockRow { shape, promote: Vec::new(), wait: Vec::new(), held: Vec::new() };
    // Runs after the comparison's, so each job changes files of its own.
    for run in cfg.runs..2 * cfg.runs {
        let id = format!("lock-{}-{run}", shape.key());
        let target = mount(sb, cache, &id);
        run_job(&target, spec, run);
        nix::unistd::sync();
        let (promote, wait, held) = split_release(sb, cache, &id, &target);
        row.promote.push(promote);
        row.wait.push(wait);
        row.held.push(held);
        fs::remove_dir(&target).expect("remove mount point");
    }
    note(format!("[{}] lock held {} ms (median)", shape.label(), fmt_ms(median(&row.held))));
    row
}

/// What `Engine::release` does, with each phase timed.
fn split_release(sb: &Sandbox, cache: &CacheKey, id: &str, target: &Path) -> (Duration, Duration, Duration) {
    let store = sb.store();
    let vid = VolumeId::new(id).expect("volume id");
    let record = store.volume(&vid).expect("read volume").expect("volume exists");
    unmount_patiently(&jobcachefs::mount::SysMounter, target).or_die(|| format!("unmount {}", target.display()));
    let t = Instant::now();
    let Prepared::Publish(promoted) = store.promote(&vid, true).expect("promote") else {
        panic!("{id}: nothing to publish")
    };
    let promote = t.elapsed();
    let t = Instant::now();
    let guard = sb.rt.block_on(sb.lock.acquire(cache, LOCK_TIMEOUT)).expect("publish lock");
    let wait = t.elapsed();
    let t = Instant::now();
    guard.ensure_held().expect("lock held");
    let advanced = store.advance_head(&record, &promoted).expect("advance head");
    sb.rt.block_on(guard.release()).expect("release lock");
    let held = t.elapsed();
    assert!(matches!(advanced, Advanced::Committed { .. }), "{id}: {advanced:?}");
    store.drop_volume(&vid).expect("drop volume");
    (promote, wait, held)
}

// ---------------------------------------------------------------------------------------------
// Read overhead at depth
// ---------------------------------------------------------------------------------------------

/// Reading the whole cache through an overlay `depth` layers deep, against the plain directory.
struct DepthRow {
    depth: usize,
    plain: Vec<Duration>,
    /// The second pass over a mount: overlay's own dentries and inodes are cached too.
    warm: Vec<Duration>,
    /// The first pass over a fresh mount, as a job sees it (the lower files are in the page cache).
    first: Vec<Duration>,
}

/// Stats every entry and reads every file below `dir`; returns (files, bytes).
fn read_pass(dir: &Path, buf: &mut [u8]) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    for entry in fs::read_dir(dir).or_die(|| format!("read {}", dir.display())) {
        let path = entry.or_die(|| format!("read {}", dir.display())).path();
        let meta = fs::symlink_metadata(&path).or_die(|| format!("stat {}", path.display()));
        if meta.is_dir() {
            let (f, b) = read_pass(&path, buf);
            files += f;
            bytes += b;
        } else if meta.is_file() {
            let mut file = File::open(&path).or_die(|| format!("open {}", path.display()));
            loop {
                let n = file.read(buf).or_die(|| format!("read {}", path.display()));
                if n == 0 {
                    break;
                }
                bytes += n as u64;
            }
            files += 1;
        }
    }
    (files, bytes)
}

fn timed_pass(dir: &Path, buf: &mut [u8], expect: (u64, u64)) -> Duration {
    let t = Instant::now();
    let got = read_pass(dir, buf);
    let took = t.elapsed();
    assert_eq!(got, expect, "{}: (files, bytes) read differ from the plain directory", dir.display());
    took
}

/// Builds one cache up to each depth in turn by publishing versions that rewrite a few files
/// (never squashing), and times full read passes against the plain directory `gen`.
fn depth_overhead(sb: &Sandbox, cfg: &Config, spec: &Spec, gen: &Path) -> Vec<DepthRow> {
    let cache = CacheKey::new("bench", "depth").expect("cache key");
    seed_cache(sb, &cache, gen, "depth-seed");
    let mut buf = vec![0u8; 1 << 16];
    let expect = read_pass(gen, &mut buf);
    let mut depth = 1;
    let mut rows = Vec::new();
    for &target in &cfg.depths {
        while depth < target {
            depth = add_version(sb, &cache, spec, depth);
        }
        rows.push(depth_runs(sb, cfg, &cache, depth, gen, expect, &mut buf));
    }
    rows
}

/// Publishes a version rewriting 5 files (same sizes); returns the new depth.
fn add_version(sb: &Sandbox, cache: &CacheKey, spec: &Spec, depth: usize) -> usize {
    let id = format!("depth-v{depth}");
    let target = mount(sb, cache, &id);
    let mut buf = Vec::new();
    for k in 0..5 {
        let i = (depth * 13 + k * 101) % spec.files.len();
        fill(&mut buf, (i as u64) ^ ((depth as u64) << 32), spec.files[i].size, spec.files[i].binary);
        write_file(&target.join(&spec.files[i].path), &buf);
    }
    let released = release(sb, &id, true);
    fs::remove_dir(&target).expect("remove mount point");
    match released {
        Released::Committed { depth, .. } => depth,
        other => panic!("{id}: expected a commit, got {other}"),
    }
}

fn depth_runs(
    sb: &Sandbox,
    cfg: &Config,
    cache: &CacheKey,
    depth: usize,
    gen: &Path,
    expect: (u64, u64),
    buf: &mut [u8],
) -> DepthRow {
    let mut row = DepthRow { depth, plain: Vec::new(), warm: Vec::new(), first: Vec::new() };
    // Warm the page cache for both trees before anything is timed.
    read_pass(gen, buf);
    let warmup = format!("depth-{depth}-warm");
    read_pass(&mount(sb, cache, &warmup), buf);
    release(sb, &warmup, false);
    fs::remove_dir(sb.jobs().join(&warmup)).expect("remove mount point");
    for run in 0..cfg.runs {
        row.plain.push(timed_pass(gen, buf, expect));
        let id = format!("depth-{depth}-{run}");
        let target = mount(sb, cache, &id);
        row.first.push(timed_pass(&target, buf, expect));
        row.warm.push(timed_pass(&target, buf, expect));
        release(sb, &id, false);
        fs::remove_dir(&target).expect("remove mount point");
    }
    note(format!(
        "[depth {depth}] plain {} ms, overlay warm {} ms, first pass {} ms",
        fmt_ms(median(&row.plain)),
        fmt_ms(median(&row.warm)),
        fmt_ms(median(&row.first))
    ));
    row
}

// ---------------------------------------------------------------------------------------------
// Concurrent commits
// ---------------------------------------------------------------------------------------------

/// `volumes` volumes of one cache, all from the same base, releasing at once.
struct ConcurrencyRow {
    volumes: usize,
    wall: Vec<Duration>,
    committed: Vec<usize>,
    stale: Vec<usize>,
}

fn concurrency(sb: &Sandbox, cfg: &Config, gen: &Path) -> ConcurrencyRow {
    let cache = CacheKey::new("bench", "conc").expect("cache key");
    seed_cache(sb, &cache, gen, "conc-seed");
    let mut row = ConcurrencyRow { volumes: cfg.volumes, wall: Vec::new(), committed: Vec::new(), stale: Vec::new() };
    for run in 0..cfg.runs {
        let ids: Vec<String> = (0..cfg.volumes).map(|k| format!("conc-{run}-{k}")).collect();
        for id in &ids {
            let target = mount(sb, &cache, id);
            for f in 0..3 {
                write_file(&target.join(format!("job-{f}.txt")), id.as_bytes());
            }
        }
        nix::unistd::sync();
        let t = Instant::now();
        let released = release_all(sb, &ids);
        row.wall.push(t.elapsed());
        let committed = released.iter().filter(|r| matches!(r, Released::Committed { .. })).count();
        let stale = released.iter().filter(|r| matches!(r, Released::Stale { .. })).count();
        assert!(committed == 1 && stale == ids.len() - 1, "run {run}: one commit per base expected: {released:?}");
        row.committed.push(committed);
        row.stale.push(stale);
        for id in &ids {
            fs::remove_dir(sb.jobs().join(id)).expect("remove mount point");
        }
    }
    note(format!("[concurrency] {} volumes released in {} ms (median)", cfg.volumes, fmt_ms(median(&row.wall))));
    row
}

/// Releases every volume at once, each in its own task, as concurrent jobs ending would.
fn release_all(sb: &Sandbox, ids: &[String]) -> Vec<Released> {
    sb.rt.block_on(async {
        let tasks: Vec<_> = ids
            .iter()
            .map(|id| {
                let engine = sb.engine.clone();
                let vid = VolumeId::new(id.as_str()).expect("volume id");
                tokio::spawn(async move { engine.release(&vid, true).await })
            })
            .collect();
        let mut released = Vec::new();
        for task in tasks {
            released.push(task.await.expect("release task").expect("release").expect("volume exists"));
        }
        released
    })
}

// ---------------------------------------------------------------------------------------------
// Figures and tables
// ---------------------------------------------------------------------------------------------

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn fmt_ms(d: Duration) -> String {
    fmt_num(ms(d))
}

/// Three significant figures or so, without exponents.
fn fmt_num(x: f64) -> String {
    match x {
        x if x >= 100.0 => format!("{x:.0}"),
        x if x >= 10.0 => format!("{x:.1}"),
        x => format!("{x:.2}"),
    }
}

/// "median (min–max)" of durations, in ms.
fn spread(v: &[Duration]) -> String {
    let (lo, hi) = (v.iter().min().expect("runs"), v.iter().max().expect("runs"));
    format!("{} ({}–{})", fmt_ms(median(v)), fmt_ms(*lo), fmt_ms(*hi))
}

/// "median (min–max)" of plain numbers.
fn spread_f(v: &[f64], unit: &str) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    format!("{}{unit} ({}–{})", fmt_num(s[s.len() / 2]), fmt_num(s[0]), fmt_num(s[s.len() - 1]))
}

fn median_f(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Run-by-run ratios a[i] / b[i].
fn ratios(a: &[Duration], b: &[Duration]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x.as_secs_f64() / y.as_secs_f64().max(1e-9)).collect()
}

fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    depth: Vec<DepthRow>,
    concurrency: Option<ConcurrencyRow>,
    locks: Vec<LockRow>,
}

impl Report {
    fn print(&self, cfg: &Config) {
        println!("\n## Restore and publish, {} runs each: ms median (min–max)\n", cfg.runs);
        self.print_main();
        println!("\n## Read overhead through overlay (stat + read every file), ms median (min–max)\n");
        self.print_depth();
        println!("\n## Concurrent releases of one cache (all volumes from the same base)\n");
        self.print_concurrency();
        println!("\n## Time inside the publish lock (jcfs-engine, 1% delta), ms median (min–max)\n");
        self.print_locks();
    }

    fn row(&self, shape: Shape, contender: &str) -> &Row {
        self.rows.iter().find(|r| r.shape == shape && r.contender == contender).expect("row measured")
    }

    fn print_main(&self) {
        let mut table = vec![[
            "cache",
            "contender",
            "restore ms",
            "publish ms",
            "publish writes",
            "restore ×engine",
            "×csi",
            "publish ×engine",
            "×csi",
            "growth vs small (restore / publish)",
        ]
        .map(String::from)
        .to_vec()];
        for r in &self.rows {
            let (eng, csi) = (self.row(r.shape, "jcfs-engine"), self.row(r.shape, "jcfs-csi"));
            let small = self.row(Shape::Small, r.contender);
            let growth = |a: &[Duration], b: &[Duration]| fmt_num(ms(median(a)) / ms(median(b)));
            table.push(vec![
                format!("{} ({} files, {})", r.shape.label(), r.files, size(r.bytes)),
                r.contender.to_string(),
                spread(&r.restore),
                spread(&r.publish),
                size(*r.written.iter().max().expect("runs")),
                spread_f(&ratios(&r.restore, &eng.restore), "×"),
                format!("{}×", fmt_num(median_f(&ratios(&r.restore, &csi.restore)))),
                spread_f(&ratios(&r.publish, &eng.publish), "×"),
                format!("{}×", fmt_num(median_f(&ratios(&r.publish, &csi.publish)))),
                format!("×{} / ×{}", growth(&r.restore, &small.restore), growth(&r.publish, &small.publish)),
            ]);
        }
        print_table(&table);
    }

    fn print_depth(&self) {
        let mut table = vec![["layers", "plain dir", "overlay, warm", "overhead", "overlay, first pass", "overhead"]
            .map(String::from)
            .to_vec()];
        for r in &self.depth {
            let pct = |v: &[Duration]| ratios(v, &r.plain).iter().map(|x| (x - 1.0) * 100.0).collect::<Vec<_>>();
            table.push(vec![
                r.depth.to_string(),
                spread(&r.plain),
                spread(&r.warm),
                spread_f(&pct(&r.warm), "%"),
                spread(&r.first),
                spread_f(&pct(&r.first), "%"),
            ]);
        }
        print_table(&table);
    }

    fn print_concurrency(&self) {
        let Some(c) = &self.concurrency else { return };
        let rates: Vec<f64> = c.wall.iter().map(|w| c.volumes as f64 / w.as_secs_f64()).collect();
        let table = vec![
            ["volumes", "release all, ms", "releases/s", "committed / stale per run"].map(String::from).to_vec(),
            vec![
                c.volumes.to_string(),
                spread(&c.wall),
                spread_f(&rates, ""),
                format!("{} / {} (every run)", c.committed[0], c.stale[0]),
            ],
        ];
        print_table(&table);
    }

    fn print_locks(&self) {
        let mut table = vec![["cache", "promote (outside the lock)", "wait for lock", "inside the lock"]
            .map(String::from)
            .to_vec()];
        for l in &self.locks {
            table.push(vec![l.shape.label().to_string(), spread(&l.promote), spread(&l.wait), spread(&l.held)]);
        }
        print_table(&table);
    }
}

/// Prints a Markdown table with padded columns, so it reads in a terminal and pastes into docs.
fn print_table(rows: &[Vec<String>]) {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let line = |r: &[String]| {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!("| {} |", cells.join(" | "))
    };
    println!("{}", line(&rows[0]));
    println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
    rows[1..].iter().for_each(|r| println!("{}", line(r)));
}
