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

#[path = "common/shapes.rs"]
mod shapes;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcachefs::lock::FileLock;
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::{Engine, Released};
use jobcachefs::store::squash::{SquashMode, SquashOutcome};
use jobcachefs::store::{CacheKey, Layout, NewVolume, Policy, Store, VolumeId};
use shapes::*;
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
            fallbacks: fallbacks.to_vec(),
            ..NewVolume::new(
                VolumeId::new(id).expect("volume id"),
                cache.clone(),
                Policy { publish: true, ..Policy::default() },
                Some(target.clone()),
            )
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
// The job (the cache shapes are in common/shapes.rs, shared with compare)
// ---------------------------------------------------------------------------------------------

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
                write_file(&dir.join(added_path(e, run)), &buf);
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
