//! A real `cargo build --offline` through a cache volume, against the same build in a plain
//! directory, on real overlay mounts (root).
//!
//! `cargo bench --bench real_build` generates a small Rust workspace whose dependencies are
//! crates jobcachefs itself depends on (serde, serde_json, clap, tracing, thiserror,
//! sha2, at the versions of jobcachefs's Cargo.lock), so their
//! sources are in `~/.cargo/registry` of any machine that built jobcachefs and nothing is
//! downloaded. The cache holds what a CI cache of a Rust project holds: `CARGO_HOME` (registry
//! index, `.crate` files, unpacked sources) and a warm `target/` from an earlier build.
//!
//! Two CI jobs are timed, each three ways in every run, interleaved (the order rotates):
//! - "app rebuilt": the job's own crate changed, dependencies are fresh in the cached
//!   `target/`; cargo checks every fingerprint, rebuilds and links the app;
//! - "clean target": a build into an empty target directory, every dependency compiled from
//!   the sources in the cached `CARGO_HOME`;
//!
//! and the three ways are: a plain directory holding a fresh copy of the cache (same
//! filesystem), a jobcachefs volume whose cache is that content in one layer, and one whose
//! cache is the same content spread over 8 layers (the squash limit). Every build gets an
//! identical, fresh starting state at the same path (a bind mount of the copy or of the
//! volume), so cargo sees the same absolute paths everywhere. Medians of 5 runs with
//! (min–max), and the overhead against the plain directory taken run by run. `-- --quick`:
//! one run of a tiny workspace, for CI to check that the benchmark still works.

use std::collections::hash_map::DefaultHasher;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcachefs::lock::FileLock;
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::{Engine, Released};
use jobcachefs::store::{CacheKey, Layout, NewVolume, Policy, Store, VolumeId};
use nix::mount::{MntFlags, MsFlags};

/// Layers of the deep cache: the squash limit, the deepest a cache gets in use.
const DEPTH: usize = 8;

/// A dependency of the generated app: a crate of jobcachefs's own lockfile, with features
/// jobcachefs enables too (so every optional dependency they pull in was downloaded).
struct Dep {
    name: &'static str,
    features: &'static [&'static str],
}

/// What is built and how often.
struct Profile {
    runs: usize,
    deps: &'static [Dep],
    /// Generated modules of the app; they set how long rebuilding it takes.
    modules: usize,
    /// Records per module.
    records: usize,
    /// Whether the app uses serde's derives, clap, tokio... or only serde_json.
    full: bool,
}

const FULL_DEPS: &[Dep] = &[
    Dep { name: "serde", features: &["derive"] },
    Dep { name: "serde_json", features: &[] },
    Dep { name: "clap", features: &["derive", "env"] },
    Dep { name: "tracing", features: &[] },
    Dep { name: "thiserror", features: &[] },
    Dep { name: "sha2", features: &[] },
];

const QUICK_DEPS: &[Dep] = &[Dep { name: "serde", features: &[] }, Dep { name: "serde_json", features: &[] }];

impl Profile {
    fn from_args() -> Self {
        if std::env::args().any(|a| a == "--quick") {
            Self { runs: 1, deps: QUICK_DEPS, modules: 2, records: 4, full: false }
        } else {
            Self { runs: 5, deps: FULL_DEPS, modules: 10, records: 8, full: true }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Job {
    /// The app's source changed; dependencies come from the cached target/.
    App,
    /// An empty target directory; dependencies compile from the cached sources.
    Clean,
}

impl Job {
    fn label(self) -> &'static str {
        match self {
            Job::App => "app rebuilt, deps cached",
            Job::Clean => "clean target, sources from cache",
        }
    }

    fn target_dir(self) -> &'static str {
        match self {
            Job::App => "target",
            Job::Clean => "target-clean",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Plain,
    One,
    Deep,
}

const WAYS: [Way; 3] = [Way::Plain, Way::One, Way::Deep];

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::Plain => "plain directory",
            Way::One => "jobcachefs, 1 layer",
            Way::Deep => "jobcachefs, 8 layers",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Way::Plain => "plain",
            Way::One => "one",
            Way::Deep => "deep",
        }
    }
}

/// One timed build.
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    user: Duration,
    sys: Duration,
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("real_build: needs root to mount overlayfs");
        std::process::exit(2);
    }
    let profile = Profile::from_args();
    let tools = Toolchain::find();
    let registry = Registry::find();
    let versions = locked_versions(profile.deps);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let sb = Sandbox::new();
    clean_up_on_signal(&rt, &sb.root);
    let engine = Engine::new(
        Store::open(sb.layout.clone()).expect("store"),
        Arc::new(SysMounter),
        Arc::new(FileLock::new(sb.layout.clone())),
        Duration::from_secs(30),
    );

    // The starting state every build gets: CARGO_HOME and a warm target/, built at the job
    // path itself so that every absolute path cargo recorded is the one the jobs use.
    let started = Instant::now();
    write_app(&sb.app(), &profile, &versions, 0);
    registry.seed(&sb.job().join("cargo-home"));
    let first = tools.build(&sb, Job::App).unwrap_or_else(|stderr| {
        eprintln!("real_build: the offline build of the generated workspace failed; its output:\n{stderr}");
        eprintln!(
            "real_build: every crate it needs must be in {} (build jobcachefs once, with network, so \
             cargo downloads them); the workspace is {}",
            registry.root.display(),
            sb.app().display()
        );
        std::process::exit(1);
    });
    let crates = first.compiled;
    let template = sb.root.join("template");
    fs::rename(sb.job(), &template).expect("keep the template");
    fs::create_dir(sb.job()).expect("job mount point");
    let (files, bytes) = tree_size(&template);
    eprintln!(
        "real_build: cache content: {files} files, {:.0} MiB ({crates} crates built in {:.1} s)",
        bytes as f64 / (1 << 20) as f64,
        first.sample.wall.as_secs_f64()
    );

    let one = CacheKey::new("bench", "one").expect("key");
    let deep = CacheKey::new("bench", "deep").expect("key");
    seed_one(&rt, &engine, &sb, &one, &template);
    seed_deep(&rt, &engine, &sb, &deep, &template);
    // Page cache hot for every way, as on a busy CI node: the plain copies are fresh from
    // `cp`, the layers are read once here.
    read_all(&sb.layout_root().join("layers"));
    eprintln!("real_build: set up in {:.0} s; measuring", started.elapsed().as_secs_f64());

    let jobs = [Job::App, Job::Clean];
    // samples[job][way][run]
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); WAYS.len()]; jobs.len()];
    for run in 0..profile.runs {
        for (j, &job) in jobs.iter().enumerate() {
            write_app(&sb.app(), &profile, &versions, (run * jobs.len() + j + 1) as u64);
            for k in 0..WAYS.len() {
                let w = (run + k) % WAYS.len();
                let way = WAYS[w];
                let tag = format!("r{run}-{}-{}", job.target_dir(), way.tag());
                let source = match way {
                    Way::Plain => {
                        let copy = sb.root.join("plain").join(&tag);
                        copy_tree(&template, &copy);
                        copy
                    }
                    Way::One => restore(&rt, &engine, &sb, &one, &tag),
                    Way::Deep => restore(&rt, &engine, &sb, &deep, &tag),
                };
                bind(&source, &sb.job());
                let built = tools.build(&sb, job).unwrap_or_else(|stderr| panic!("{tag}: build failed:\n{stderr}"));
                unmount(&sb.job());
                let want = if job == Job::App { 1 } else { crates };
                assert_eq!(
                    built.compiled, want,
                    "{tag}: cargo compiled {} crates, expected {want}: the cache's state was not reproduced",
                    built.compiled
                );
                eprintln!(
                    "real_build: run {} {:<34} {:<22} {:>7.2} s wall {:>7.2} s CPU",
                    run + 1,
                    job.label(),
                    way.label(),
                    built.sample.wall.as_secs_f64(),
                    (built.sample.user + built.sample.sys).as_secs_f64()
                );
                samples[j][w].push(built.sample);
            }
        }
    }

    print_table(&jobs, &samples, &profile);
    eprintln!("real_build: done in {:.0} s; deleting the scratch", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// The toolchain and the crates on this machine
// ---------------------------------------------------------------------------------------------

/// The cargo and rustc that build jobcachefs, called directly (not through rustup's proxies,
/// whose start-up would be timed too).
struct Toolchain {
    cargo: PathBuf,
    rustc: PathBuf,
}

/// The outcome of a successful build.
struct Built {
    sample: Sample,
    /// How many crates cargo compiled.
    compiled: usize,
}

impl Toolchain {
    fn find() -> Self {
        // `cargo bench` tells its bench which cargo runs it.
        let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("cargo"));
        let out = Command::new("rustc").args(["--print", "sysroot"]).output();
        let sysroot = match out {
            Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
            other => {
                eprintln!("real_build: cannot ask rustc for its sysroot: {other:?}");
                std::process::exit(1);
            }
        };
        let rustc = sysroot.join("bin/rustc");
        if !rustc.is_file() {
            eprintln!("real_build: no rustc at {}", rustc.display());
            std::process::exit(1);
        }
        Self { cargo, rustc }
    }

    /// `cargo build --offline` of the app with CARGO_HOME and the target directory in the job
    /// directory; the stderr of a failed build is the error.
    fn build(&self, sb: &Sandbox, job: Job) -> Result<Built, String> {
        let job_dir = sb.job();
        let mut cmd = Command::new(&self.cargo);
        cmd.args(["build", "--offline", "--jobs", "2", "--color", "never"])
            .current_dir(sb.app())
            .env("CARGO_HOME", job_dir.join("cargo-home"))
            .env("CARGO_TARGET_DIR", job_dir.join(job.target_dir()))
            .env("RUSTC", &self.rustc)
            // As CI sets it (and caching actions recommend): incremental state is not worth caching.
            .env("CARGO_INCREMENTAL", "0")
            .env("CARGO_TERM_PROGRESS_WHEN", "never");
        for var in [
            "CARGO_BUILD_TARGET_DIR",
            "RUSTC_WRAPPER",
            "CARGO_BUILD_RUSTC_WRAPPER",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_JOBS",
        ] {
            cmd.env_remove(var);
        }
        // Writeback of earlier runs' files must not land in this one.
        nix::unistd::sync();
        let before = children_usage();
        let t = Instant::now();
        let out = cmd.output().map_err(|e| format!("cannot run {}: {e}", self.cargo.display()))?;
        let wall = t.elapsed();
        let after = children_usage();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(stderr);
        }
        let compiled = stderr.lines().filter(|l| l.trim_start().starts_with("Compiling ")).count();
        Ok(Built {
            sample: Sample { wall, user: after.0.saturating_sub(before.0), sys: after.1.saturating_sub(before.1) },
            compiled,
        })
    }
}

/// User and system CPU time of all waited-for children (cargo waits for its rustc and linkers).
fn children_usage() -> (Duration, Duration) {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given, which is large enough.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, u.as_mut_ptr()) } != 0 {
        return (Duration::ZERO, Duration::ZERO);
    }
    // SAFETY: zero-initialised and filled in by the successful call above.
    let u = unsafe { u.assume_init() };
    (tv(u.ru_utime), tv(u.ru_stime))
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
}

/// The crates.io registry cargo downloaded jobcachefs's dependencies into.
struct Registry {
    /// `$CARGO_HOME/registry`.
    root: PathBuf,
    /// The name of crates.io's directory under `index/`, `cache/` and `src/`.
    index: String,
}

impl Registry {
    fn find() -> Self {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
        let root = home.join("registry");
        let index = fs::read_dir(root.join("cache"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("index.crates.io-"));
        let Some(index) = index.filter(|i| root.join("index").join(i).is_dir()) else {
            eprintln!(
                "real_build: no crates.io index and .crate files under {}: build jobcachefs once (cargo \
                 build) so cargo downloads the crates this benchmark compiles offline",
                root.display()
            );
            std::process::exit(1);
        };
        Self { root, index }
    }

    /// Gives `cargo_home` a copy of the registry: the index and every `.crate` file (cargo
    /// unpacks what the build needs), plus the unpacked sources of any crate whose `.crate`
    /// file is gone.
    fn seed(&self, cargo_home: &Path) {
        let reg = cargo_home.join("registry");
        for part in ["index", "cache"] {
            let dst = reg.join(part);
            fs::create_dir_all(&dst).expect("registry dir");
            copy_tree(&self.root.join(part).join(&self.index), &dst.join(&self.index));
        }
        let src = self.root.join("src").join(&self.index);
        let cache = self.root.join("cache").join(&self.index);
        for entry in fs::read_dir(&src).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let crate_file = cache.join(format!("{}.crate", name.to_string_lossy()));
            if !crate_file.exists() {
                let dst = reg.join("src").join(&self.index);
                fs::create_dir_all(&dst).expect("registry src dir");
                copy_tree(&entry.path(), &dst.join(&name));
            }
        }
    }
}

/// The version of each dependency in jobcachefs's own Cargo.lock (the newest, where it holds
/// several); exits naming a crate it does not hold.
fn locked_versions(deps: &[Dep]) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock");
    let lock = fs::read_to_string(&path).unwrap_or_else(|e| {
        eprintln!("real_build: cannot read {}: {e}", path.display());
        std::process::exit(1);
    });
    let mut found = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_owned());
        } else if let (Some(v), Some(n)) = (line.strip_prefix("version = "), name.take()) {
            found.push((n, v.trim_matches('"').to_owned()));
        }
    }
    deps.iter()
        .map(|d| {
            found.iter().filter(|(n, _)| n == d.name).map(|(_, v)| v.clone()).next_back().unwrap_or_else(|| {
                eprintln!(
                    "real_build: {} is not in {}: the benchmark builds only crates jobcachefs depends on",
                    d.name,
                    path.display()
                );
                std::process::exit(1);
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The generated workspace
// ---------------------------------------------------------------------------------------------

/// Writes the app: its manifest, jobcachefs's lockfile (so cargo picks the same versions of
/// everything, offline) and sources; `run` goes into main.rs, so each value is a change.
fn write_app(dir: &Path, p: &Profile, versions: &[String], run: u64) {
    fs::create_dir_all(dir.join("src")).expect("app dir");
    let mut manifest = String::from(
        "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n[dependencies]\n",
    );
    for (d, v) in p.deps.iter().zip(versions) {
        let features: Vec<String> = d.features.iter().map(|f| format!("\"{f}\"")).collect();
        let _ = writeln!(manifest, "{} = {{ version = \"={v}\", features = [{}] }}", d.name, features.join(", "));
    }
    write_if_changed(&dir.join("Cargo.toml"), &manifest);
    if !dir.join("Cargo.lock").exists() {
        fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"), dir.join("Cargo.lock"))
            .expect("copy Cargo.lock");
    }
    for k in 0..p.modules {
        let module = if p.full { full_module(k, p.records) } else { quick_module(k, p.records) };
        write_if_changed(&dir.join(format!("src/m{k}.rs")), &module);
    }
    let main = if p.full { full_main(p.modules, run) } else { quick_main(p.modules, run) };
    fs::write(dir.join("src/main.rs"), main).expect("write main.rs");
}

/// Leaves a file alone when it already holds `text`, so only main.rs changes between runs.
fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

fn full_main(modules: usize, run: u64) -> String {
    let mut s = String::from("//! Generated by jobcachefs's real_build benchmark.\nuse clap::Parser;\n\n");
    for k in 0..modules {
        let _ = writeln!(s, "mod m{k};");
    }
    let _ = write!(
        s,
        "\nconst RUN: u64 = {run};\n\n\
         #[derive(Parser)]\n\
         struct Args {{\n    #[arg(long, env = \"APP_SEED\", default_value_t = 1)]\n    seed: u64,\n}}\n\n\
         fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {{\n\
         \x20   let seed = Args::parse().seed + RUN;\n\
         \x20   std::thread::scope(|scope| {{\n\
         \x20       let mut tasks = Vec::new();\n"
    );
    for k in 0..modules {
        let _ = writeln!(s, "        tasks.push(scope.spawn(move || m{k}::run(seed).map_err(|e| e.to_string())));");
    }
    s.push_str(
        "        for task in tasks {\n            let digest = task.join().map_err(|_| \"a module panicked\")??;\n\
         \x20           tracing::info!(%digest, \"module done\");\n        }\n        Ok(())\n    })\n}\n",
    );
    s
}

fn full_module(k: usize, records: usize) -> String {
    let mut s = String::from(
        "use std::collections::BTreeMap;\n\nuse serde::{Deserialize, Serialize};\nuse sha2::{Digest, Sha256};\n\n\
         #[derive(Debug, thiserror::Error)]\n\
         pub enum Error {\n    #[error(\"record {0} did not survive a round trip\")]\n    RoundTrip(usize),\n\
         \x20   #[error(\"json: {0}\")]\n    Json(#[from] serde_json::Error),\n}\n\n\
         #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]\n#[serde(tag = \"type\")]\n\
         pub enum Kind {\n    Leaf { depth: u32 },\n    Branch { children: Vec<u64> },\n    Empty,\n}\n",
    );
    for i in 0..records {
        let _ = write!(
            s,
            "\n#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]\n#[serde(rename_all = \"camelCase\")]\n\
             pub struct Rec{i} {{\n    pub id: u64,\n    pub display_name: String,\n    pub tags: Vec<String>,\n\
             \x20   pub weights: BTreeMap<String, u64>,\n    pub parent: Option<u64>,\n    pub kind: Kind,\n\
             \x20   #[serde(default, skip_serializing_if = \"Option::is_none\")]\n    pub note{i}: Option<String>,\n}}\n"
        );
    }
    s.push_str("\npub fn run(seed: u64) -> Result<String, Error> {\n    let mut hasher = Sha256::new();\n");
    for i in 0..records {
        let _ = write!(
            s,
            "    {{\n        let r = Rec{i} {{\n            id: seed + {i},\n            display_name: format!(\"m{k}-{i}-{{seed}}\"),\n\
             \x20           tags: vec![\"a\".into(), \"b\".into()],\n            weights: BTreeMap::from([(\"w\".to_string(), seed)]),\n\
             \x20           parent: Some({i}),\n            kind: Kind::Leaf {{ depth: {i} }},\n            note{i}: None,\n        }};\n\
             \x20       let text = serde_json::to_string(&r)?;\n        let back: Rec{i} = serde_json::from_str(&text)?;\n\
             \x20       if back != r {{\n            return Err(Error::RoundTrip({i}));\n        }}\n\
             \x20       hasher.update(text.as_bytes());\n    }}\n"
        );
    }
    s.push_str("    Ok(format!(\"{:x}\", hasher.finalize()))\n}\n");
    s
}

fn quick_main(modules: usize, run: u64) -> String {
    let mut s = String::from("//! Generated by jobcachefs's real_build benchmark.\n");
    for k in 0..modules {
        let _ = writeln!(s, "mod m{k};");
    }
    let _ = write!(s, "\nconst RUN: u64 = {run};\n\nfn main() {{\n    let seed = RUN + std::env::args().count() as u64;\n    let mut n = 0;\n");
    for k in 0..modules {
        let _ = writeln!(s, "    n += m{k}::run(seed).len();");
    }
    s.push_str("    println!(\"{n}\");\n}\n");
    s
}

fn quick_module(k: usize, records: usize) -> String {
    let mut s = String::from("pub fn run(seed: u64) -> String {\n    let mut out = String::new();\n");
    for i in 0..records {
        let _ = writeln!(
            s,
            "    out.push_str(&serde_json::json!({{\"id\": seed + {i}, \"name\": \"m{k}-{i}\", \"tags\": [\"a\", \"b\"]}}).to_string());"
        );
    }
    s.push_str("    out\n}\n");
    s
}

// ---------------------------------------------------------------------------------------------
// The caches
// ---------------------------------------------------------------------------------------------

/// A volume that publishes, mounted at `target`.
fn new_volume(id: &str, cache: &CacheKey, target: &Path) -> NewVolume {
    NewVolume::new(
        VolumeId::new(id).expect("volume id"),
        cache.clone(),
        Policy { publish: true, ..Policy::default() },
        Some(target.to_path_buf()),
    )
}

/// Restores a new volume of `cache` at its own mount point and returns it.
fn restore(rt: &tokio::runtime::Runtime, engine: &Engine, sb: &Sandbox, cache: &CacheKey, id: &str) -> PathBuf {
    let target = sb.root.join("vols").join(id);
    fs::create_dir_all(&target).expect("mount point");
    rt.block_on(engine.restore(new_volume(id, cache, &target))).unwrap_or_else(|e| panic!("restore {id}: {e}"));
    target
}

/// Copies `from` into a new volume of `cache` and commits it; returns the cache's depth.
fn commit_copy(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    sb: &Sandbox,
    cache: &CacheKey,
    id: &str,
    from: &Path,
) -> usize {
    let target = restore(rt, engine, sb, cache, id);
    copy_contents(from, &target);
    let vid = VolumeId::new(id).expect("volume id");
    match rt.block_on(engine.release(&vid, true)) {
        Ok(Some(Released::Committed { depth, .. })) => depth,
        other => panic!("commit {id}: {other:?}"),
    }
}

fn seed_one(rt: &tokio::runtime::Runtime, engine: &Engine, sb: &Sandbox, cache: &CacheKey, template: &Path) {
    let depth = commit_copy(rt, engine, sb, cache, "seed-one", template);
    assert_eq!(depth, 1, "one-layer cache");
}

/// The template spread over [`DEPTH`] layers: each file goes to the layer its path hashes to,
/// so every directory of any size is merged from all of them and a lookup in it may have to
/// search the whole stack.
fn seed_deep(rt: &tokio::runtime::Runtime, engine: &Engine, sb: &Sandbox, cache: &CacheKey, template: &Path) {
    let parts = sb.root.join("parts");
    let part = |i: usize| parts.join(i.to_string());
    for i in 0..DEPTH {
        fs::create_dir_all(part(i)).expect("part dir");
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut empty = true;
        for entry in fs::read_dir(template.join(&rel)).expect("read template").flatten() {
            empty = false;
            let rel = rel.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                stack.push(rel);
                continue;
            }
            let mut h = DefaultHasher::new();
            rel.hash(&mut h);
            let dst = part((h.finish() % DEPTH as u64) as usize).join(&rel);
            fs::create_dir_all(dst.parent().expect("parent")).expect("part dir");
            // A hard link keeps the file's mtime, which cargo's fingerprints compare.
            fs::hard_link(template.join(&rel), &dst).expect("link into part");
        }
        if empty {
            fs::create_dir_all(part(0).join(&rel)).expect("empty dir");
        }
    }
    let mut depth = 0;
    for i in 0..DEPTH {
        depth = commit_copy(rt, engine, sb, cache, &format!("seed-deep-{i}"), &part(i));
    }
    assert_eq!(depth, DEPTH, "deep cache");
}

// ---------------------------------------------------------------------------------------------
// Files and mounts
// ---------------------------------------------------------------------------------------------

/// `cp -a`: keeps modes, owners, hard links and, above all, nanosecond mtimes, on which cargo
/// decides what is fresh.
fn copy_tree(from: &Path, to: &Path) {
    run_cp(Command::new("cp").arg("-a").arg(from).arg(to));
}

fn copy_contents(from: &Path, to: &Path) {
    run_cp(Command::new("cp").arg("-a").arg(from.join(".")).arg(to));
}

fn run_cp(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cp: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Files and bytes below `dir`.
fn tree_size(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    walk(dir, &mut |_, m| {
        files += 1;
        bytes += m.len();
    });
    (files, bytes)
}

/// Reads every file below `dir` once.
fn read_all(dir: &Path) {
    let mut buf = vec![0u8; 1 << 20];
    walk(dir, &mut |path, m| {
        if m.is_file() {
            if let Ok(mut f) = fs::File::open(path) {
                while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
            }
        }
    });
}

/// Calls `f` on every non-directory below `dir`.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata)) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            walk(&entry.path(), f);
        } else {
            f(&entry.path(), &meta);
        }
    }
}

fn bind(from: &Path, to: &Path) {
    nix::mount::mount(Some(from), to, None::<&OsStr>, MsFlags::MS_BIND, None::<&OsStr>)
        .unwrap_or_else(|e| panic!("bind {} on {}: {e}", from.display(), to.display()));
}

fn unmount(path: &Path) {
    nix::mount::umount2(path, MntFlags::empty()).unwrap_or_else(|e| panic!("unmount {}: {e}", path.display()));
}

/// The bench's scratch tree under /var/tmp. Dropping it (also while unwinding from a panic)
/// unmounts whatever is still mounted below it before the tree is deleted. Nothing is deleted
/// before then: on this machine's journal-less ext4, file creation slows down for minutes
/// after a large delete (BENCHMARKS.md, "No deletes during measurement").
struct Sandbox {
    root: PathBuf,
    layout: Layout,
    _dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("jcfs-build").tempdir_in("/var/tmp").expect("temp dir");
        let root = dir.path().to_path_buf();
        let layout = Layout::new(root.join("s")).expect("layout");
        for d in ["job", "plain", "vols"] {
            fs::create_dir(root.join(d)).expect("scratch dir");
        }
        Self { root, layout, _dir: dir }
    }

    /// Where every build finds its cache: CARGO_HOME and target/ below it.
    fn job(&self) -> PathBuf {
        self.root.join("job")
    }

    /// The generated workspace: the job's checkout, outside the cache.
    fn app(&self) -> PathBuf {
        self.root.join("app")
    }

    fn layout_root(&self) -> PathBuf {
        self.root.join("s")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        unmount_under(&self.root);
    }
}

/// Ctrl-C or SIGTERM in the middle of a run: unmount, delete the tree, exit.
fn clean_up_on_signal(rt: &tokio::runtime::Runtime, root: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let root = root.to_path_buf();
    let _runtime = rt.enter();
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    rt.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("real_build: interrupted; cleaning up {}", root.display());
        unmount_under(&root);
        let _ = fs::remove_dir_all(&root);
        std::process::exit(130);
    });
}

/// Unmounts everything below `root`, newest first; lazily only if a plain unmount fails.
fn unmount_under(root: &Path) {
    let Ok(mounts) = jobcachefs::mount::info::read_mountinfo() else { return };
    for m in mounts.iter().rev().filter(|m| m.mount_point.starts_with(root)) {
        if nix::mount::umount2(&m.mount_point, MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&m.mount_point, MntFlags::MNT_DETACH);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

fn print_table(jobs: &[Job], samples: &[Vec<Vec<Sample>>], p: &Profile) {
    println!(
        "\nreal build through the cache: medians of {} run(s) (min - max); overheads are against the plain \
         directory of the same run. CPU = user + system time of cargo and everything it ran, which other \
         load on the machine stretches less than wall time.",
        p.runs
    );
    println!(
        "{:<34} {:<22} {:>24} {:>26} {:>24} {:>26} {:>7}",
        "job", "way", "wall s", "wall overhead", "CPU s", "CPU overhead", "sys s"
    );
    for (j, job) in jobs.iter().enumerate() {
        let plain = &samples[j][0];
        for (w, way) in WAYS.iter().enumerate() {
            let mine = &samples[j][w];
            let wall = |s: &Sample| s.wall.as_secs_f64();
            let cpu = |s: &Sample| (s.user + s.sys).as_secs_f64();
            let over = |f: &dyn Fn(&Sample) -> f64| -> String {
                if *way == Way::Plain {
                    return "-".to_owned();
                }
                let v: Vec<f64> = mine.iter().zip(plain).map(|(m, p)| (f(m) / f(p) - 1.0) * 100.0).collect();
                spread(&v, "%")
            };
            let sys: Vec<f64> = mine.iter().map(|s| s.sys.as_secs_f64()).collect();
            println!(
                "{:<34} {:<22} {:>24} {:>26} {:>24} {:>26} {:>7.2}",
                job.label(),
                way.label(),
                spread(&mine.iter().map(wall).collect::<Vec<_>>(), ""),
                over(&wall),
                spread(&mine.iter().map(cpu).collect::<Vec<_>>(), ""),
                over(&cpu),
                median(&sys)
            );
        }
    }
}

/// "median (min–max)" with `unit` after each number.
fn spread(v: &[f64], unit: &str) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.2}{unit} ({min:.2}{unit} - {max:.2}{unit})", median(v))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
