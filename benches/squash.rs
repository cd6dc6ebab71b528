//! Squash time after small commits: the full flatten (a read-only overlay view of the whole
//! stack copied into one layer, what every squash did before) against the merge of the layers
//! above the big bottom layer (hard links, overlay form), on the same stacks, on real mounts
//! (root).
//!
//! Per cache shape (a Maven repository of 20,000 files, 492 MiB; a node_modules tree of 200,000
//! files, 975 MiB; shapes as in benches/compare.rs) the cache is seeded once as a base layer.
//! Every measured run builds its own cache on that base (a fallback restore shares the base
//! layer) with 8 small commits, each rewriting 1% of the files, adding 1% new ones and deleting
//! 0.2%, the same 8 in every run; then the squash of its 9 layers (limit 8) is timed, the
//! flatten and the merge alternating. Medians of 5 (min–max) and their ratio. Nothing is deleted
//! until the end: this machine's ext4 has no journal, and deletes slow file creation for
//! minutes after (BENCHMARKS.md, "No deletes during measurement").
//!
//! `cargo bench --bench squash`; `-- --quick` runs a 1,000-file cache with 3 runs, for CI to
//! check that the benchmark still works (its timings are not judged). Exits 2 without root.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcachefs::lock::FileLock;
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::{Engine, Released};
use jobcachefs::store::squash::{SquashMode, SquashOutcome};
use jobcachefs::store::{CacheKey, Layout, NewVolume, Policy, Store, VolumeId};
use tokio::runtime::Runtime;

const COMMITS: usize = 8;
const MAX_DEPTH: usize = 8;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("squash: needs root to mount overlayfs");
        std::process::exit(2);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 3 } else { 5 };
    let shapes: Vec<(&str, Spec)> = if quick {
        vec![("small", small_spec())]
    } else {
        vec![("maven", maven_spec()), ("node_modules", node_spec())]
    };
    let dir = tempfile::Builder::new().prefix("jcfs-squash").tempdir_in("/var/tmp").expect("temp dir");
    let layout = Layout::new(dir.path().join("s")).expect("layout");
    let engine = Engine::new(
        Store::open(layout.clone()).expect("store"),
        Arc::new(SysMounter),
        Arc::new(FileLock::new(layout)),
        Duration::from_secs(30),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let bench = Bench { engine, rt, jobs: dir.path().join("jobs") };
    let mut rows = Vec::new();
    for (shape, spec) in &shapes {
        let base = CacheKey::new("bench", &format!("{shape}-base")).expect("key");
        let t = Instant::now();
        let target = bench.restore(&base, &[], "seed");
        write_tree(&target, spec);
        bench.release("seed");
        eprintln!(
            "[{shape}] seeded {} files, {} MiB in {:.1} s",
            spec.files.len(),
            spec.bytes() >> 20,
            t.elapsed().as_secs_f64()
        );
        let (mut flat, mut merge) = (Vec::new(), Vec::new());
        for run in 0..runs {
            for mode in [SquashMode::Flatten, SquashMode::Auto] {
                let name = format!("{shape}-{}-{run}", if mode == SquashMode::Flatten { "flat" } else { "merge" });
                let cache = CacheKey::new("bench", &name).expect("key");
                for commit in 0..COMMITS {
                    let id = format!("{name}-{commit}");
                    let target = bench.restore(&cache, std::slice::from_ref(&base), &id);
                    run_job(&target, spec, commit);
                    bench.release(&id);
                }
                nix::unistd::sync();
                let t = Instant::now();
                let out = bench.rt.block_on(bench.engine.squash_with(&cache, MAX_DEPTH, mode, Box::new(|_| {})));
                let took = t.elapsed();
                let want = if mode == SquashMode::Flatten { (COMMITS + 1, 1) } else { (COMMITS, 2) };
                match out.expect("squash") {
                    SquashOutcome::Squashed { replaced, depth, .. } if (replaced, depth) == want => {}
                    other => panic!("{name}: expected {want:?} (replaced, depth), got {other:?}"),
                }
                eprintln!("[{shape}] run {run} {name}: {:.3} s", took.as_secs_f64());
                if mode == SquashMode::Flatten {
                    flat.push(took)
                } else {
                    merge.push(took)
                }
            }
        }
        rows.push((shape.to_string(), spec.files.len(), spec.bytes(), summary(&mut flat), summary(&mut merge)));
    }
    println!(
        "{:<13} {:>8} {:>9} {:>30} {:>30} {:>7}",
        "cache", "files", "MiB", "flatten s median (min-max)", "merge s median (min-max)", "ratio"
    );
    for (shape, files, bytes, flat, merge) in rows {
        println!(
            "{:<13} {:>8} {:>9} {:>30} {:>30} {:>6.1}x",
            shape,
            files,
            bytes >> 20,
            flat.show(),
            merge.show(),
            flat.median / merge.median
        );
    }
    // Unmounted and released already; the data goes with the temp dir.
    drop(bench);
    dir.close().expect("remove the benchmark's data");
}

struct Bench {
    engine: Engine,
    rt: Runtime,
    jobs: PathBuf,
}

impl Bench {
    /// Mounts a publishing volume `id` of `cache` (restoring from `fallbacks` while it has none).
    fn restore(&self, cache: &CacheKey, fallbacks: &[CacheKey], id: &str) -> PathBuf {
        let target = self.jobs.join(id);
        fs::create_dir_all(&target).expect("mount point");
        let req = NewVolume {
            id: VolumeId::new(id).expect("volume id"),
            cache: cache.clone(),
            policy: Policy { publish: true, ..Policy::default() },
            fallbacks: fallbacks.to_vec(),
            mount_path: Some(target.clone()),
            owner: None,
            request: None,
            flags: jobcachefs::mount::MountOptions::default(),
            root: Default::default(),
            content: None,
            cache_size: None,
        };
        self.rt.block_on(self.engine.restore(req)).expect("restore");
        target
    }

    fn release(&self, id: &str) {
        let vid = VolumeId::new(id).expect("volume id");
        match self.rt.block_on(self.engine.release(&vid, true)).expect("release") {
            Some(Released::Committed { .. }) => {}
            other => panic!("{id}: expected a commit, got {other:?}"),
        }
    }
}

struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

impl Summary {
    fn show(&self) -> String {
        format!("{:.3} ({:.3}-{:.3})", self.median, self.min, self.max)
    }
}

fn summary(times: &mut [Duration]) -> Summary {
    times.sort();
    let s = |d: Duration| d.as_secs_f64();
    Summary { median: s(times[times.len() / 2]), min: s(times[0]), max: s(times[times.len() - 1]) }
}

// ---------------------------------------------------------------------------------------------
// Cache shapes and the job (from benches/compare.rs)
// ---------------------------------------------------------------------------------------------

/// A regular file of a generated cache; its content is derived from its index in the spec.
struct Entry {
    path: String,
    size: usize,
    /// Incompressible content (jars are zip files), else source-like text.
    binary: bool,
}

/// A generated cache: files sorted by path (so directories are written together) and symlinks.
struct Spec {
    files: Vec<Entry>,
    links: Vec<(String, String)>,
}

impl Spec {
    fn new(mut files: Vec<Entry>, links: Vec<(String, String)>) -> Self {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Self { files, links }
    }

    fn bytes(&self) -> u64 {
        self.files.iter().map(|e| e.size as u64).sum()
    }
}

/// splitmix64: deterministic, fast, and good enough for file sizes and content.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0xA24B_AED4_963E_E407))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// 1,000 source files of up to 20 KiB: the quick run.
fn small_spec() -> Spec {
    let mut rng = Rng::new(1);
    let files = (0..1_000)
        .map(|i| Entry {
            path: format!("src/m{}/f{i}.txt", i % 10),
            size: 512 + rng.below(19_457) as usize,
            binary: false,
        })
        .collect();
    Spec::new(files, Vec::new())
}

/// A local Maven repository: 2,500 artifact versions of 8 files; one version in 33 has a big jar.
fn maven_spec() -> Spec {
    const SUFFIXES: [(&str, bool); 8] = [
        (".jar", true),
        (".jar.sha1", false),
        (".pom", false),
        (".pom.sha1", false),
        ("-sources.jar", true),
        ("-sources.jar.sha1", false),
        ("-javadoc.jar", true),
        ("._remote.repositories", false),
    ];
    let mut rng = Rng::new(2);
    let mut files = Vec::with_capacity(20_000);
    for d in 0..2_500 {
        let (group, artifact, version) = (d / 50, (d % 50) / 2, d % 2);
        let dir = format!("repository/org/g{group}/a{artifact}/1.{version}");
        for (k, (suffix, binary)) in SUFFIXES.iter().enumerate() {
            let size = if k == 0 && d % 33 == 0 {
                (1 << 20) + rng.below(4 << 20) as usize
            } else {
                // Skewed towards small files: most are 1–10 KiB, a few approach 64 KiB.
                1024 + (rng.unit().powi(4) * 63.0 * 1024.0) as usize
            };
            files.push(Entry { path: format!("{dir}/a{artifact}-1.{version}{suffix}"), size, binary: *binary });
        }
    }
    Spec::new(files, Vec::new())
}

/// 2,000 packages of 100 files, one in ten nested in another's node_modules, with `.bin` links.
fn node_spec() -> Spec {
    let mut rng = Rng::new(3);
    let mut files = Vec::with_capacity(200_000);
    let mut links = Vec::new();
    for p in 0..2_000 {
        let base = if p % 10 == 0 && p > 0 {
            format!("node_modules/p{}/node_modules/p{p}", p - 1)
        } else {
            format!("node_modules/p{p}")
        };
        for i in 0..100 {
            let rel = match (i, i % 4) {
                (0, _) => "index.js".to_string(),
                (1, _) => "package.json".to_string(),
                (_, 0) => format!("f{i}.js"),
                (_, 1) => format!("lib/f{i}.js"),
                (_, 2) => format!("lib/d{}/f{i}.js", i % 7),
                _ => format!("lib/d{}/s{}/f{i}.js", i % 7, i % 3),
            };
            let size = 200 + (rng.unit().powi(2) * 14_800.0) as usize;
            files.push(Entry { path: format!("{base}/{rel}"), size, binary: false });
        }
        if p % 10 == 1 {
            links.push((format!("node_modules/.bin/p{p}"), format!("../p{p}/index.js")));
        }
    }
    Spec::new(files, links)
}

/// Tokens of source-like text: compresses about as well as real caches do.
const WORDS: [&str; 32] = [
    "function",
    "return",
    "const",
    "require(",
    "module",
    "exports",
    "=>",
    "{",
    "}",
    "(",
    ")",
    ";\n",
    "this",
    "value",
    "if",
    "else",
    "import",
    "from",
    "async",
    "await",
    "null",
    "undefined",
    "0x1f",
    "\"use strict\"",
    "prototype",
    "length",
    "callback",
    "error",
    "options",
    "default",
    "new",
    "Object",
];

/// Fills `buf` with `size` bytes derived from `seed`.
fn fill(buf: &mut Vec<u8>, seed: u64, size: usize, binary: bool) {
    buf.clear();
    let mut rng = Rng::new(seed);
    while buf.len() < size {
        let r = rng.next();
        if binary {
            buf.extend_from_slice(&r.to_le_bytes());
            continue;
        }
        for shift in (0..60).step_by(5) {
            buf.extend_from_slice(WORDS[(r >> shift) as usize % WORDS.len()].as_bytes());
            buf.push(b' ');
        }
    }
    buf.truncate(size);
}

fn write_file(path: &Path, buf: &[u8]) {
    fs::write(path, buf).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes the cache's first version into `root`.
fn write_tree(root: &Path, spec: &Spec) {
    let mut buf = Vec::new();
    let mut last_dir = PathBuf::new();
    for (i, e) in spec.files.iter().enumerate() {
        let path = root.join(&e.path);
        let dir = path.parent().expect("file in a directory");
        if dir != last_dir {
            fs::create_dir_all(dir).expect("mkdir");
            last_dir = dir.to_path_buf();
        }
        fill(&mut buf, i as u64, e.size, e.binary);
        write_file(&path, &buf);
    }
    for (link, target) in &spec.links {
        let path = root.join(link);
        fs::create_dir_all(path.parent().expect("link in a directory")).expect("mkdir for link");
        symlink(target, &path).expect("symlink");
    }
}

/// Which of the job's choices entry `i` falls in for commit `run`: a different 1% each commit.
fn job_slot(i: usize, run: usize) -> usize {
    (i + 7 * run) % 100
}

/// What a build does to its cache: rewrites 1% of the files (same size, new content), adds 1%
/// new ones and deletes 0.2%.
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
                let (parent, name) = e.path.rsplit_once('/').expect("file in a directory");
                write_file(&dir.join(format!("{parent}/new-{run}-{name}")), &buf);
            }
            25 if i % 5 == 0 => match fs::remove_file(dir.join(&e.path)) {
                // An earlier commit may have deleted it already.
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => panic!("delete {}: {err}", e.path),
            },
            _ => {}
        }
    }
}
