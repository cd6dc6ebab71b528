//! Restore and commit time against the cache's size, on real overlay mounts (root).
//!
//! `cargo bench --bench restore_commit` builds caches of 1,000 / 10,000 / 100,000 files and
//! prints, per size, the median (min–max) of restoring a volume (pin + overlay mount) and of
//! committing a job's 100-file change (unmount, promote, HEAD). Each run stacks one more
//! layer (depth 2 to 8), inside the squash limit, as a busy cache would. `-- --quick` runs the small
//! size only, for CI to check that the benchmark still works (its timings are not judged).

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcachefs::lock::FileLock;
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::{Engine, Released};
use jobcachefs::store::{CacheKey, Layout, NewVolume, Policy, Store, VolumeId};

const RUNS: usize = 7;
const DELTA_FILES: usize = 100;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("restore_commit: needs root to mount overlayfs");
        std::process::exit(2);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000, 100_000] };
    let dir = tempfile::Builder::new().prefix("jcfs-bench").tempdir_in("/var/tmp").expect("temp dir");
    let layout = Layout::new(dir.path().join("s")).expect("layout");
    let engine = Engine::new(
        Store::open(layout.clone()).expect("store"),
        Arc::new(SysMounter),
        Arc::new(FileLock::new(layout)),
        Duration::from_secs(30),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    println!(
        "{:>9} {:>10} {:>26} {:>26}",
        "files", "bytes", "restore ms median (min-max)", "commit ms median (min-max)"
    );
    let mut first_restore = None;
    let mut first_commit = None;
    for &n in sizes {
        let cache = CacheKey::new("bench", &format!("c{n}")).expect("key");
        let mut seq = 0;
        let mut vol = |policy: Policy, target: &Path| {
            seq += 1;
            NewVolume::new(
                VolumeId::new(format!("b{n}-{seq}")).expect("id"),
                cache.clone(),
                policy,
                Some(target.to_path_buf()),
            )
        };
        let publish = Policy { publish: true, ..Policy::default() };
        let target = dir.path().join(format!("m{n}"));
        fs::create_dir_all(&target).expect("mkdir");

        // Seed the cache: n files of 1 KiB in 100-file directories.
        let req = vol(publish.clone(), &target);
        let id = req.id.clone();
        rt.block_on(engine.restore(req)).expect("restore");
        let payload = vec![b'x'; 1024];
        for i in 0..n {
            let d = target.join(format!("d{}", i / 100));
            if i % 100 == 0 {
                fs::create_dir_all(&d).expect("mkdir");
            }
            fs::write(d.join(format!("f{i}")), &payload).expect("write");
        }
        let seeded = rt.block_on(engine.release(&id, true)).expect("release").expect("volume");
        assert!(matches!(seeded, Released::Committed { .. }), "{seeded:?}");

        let mut restore = Vec::new();
        let mut commit = Vec::new();
        for run in 0..RUNS {
            let req = vol(publish.clone(), &target);
            let id = req.id.clone();
            let t = Instant::now();
            rt.block_on(engine.restore(req)).expect("restore");
            restore.push(t.elapsed());
            // The job: rewrite DELTA_FILES existing files (copy-up) and add as many new ones.
            for i in 0..DELTA_FILES / 2 {
                let f = i * (n / (DELTA_FILES / 2)).max(1);
                fs::write(target.join(format!("d{}/f{f}", f / 100)), format!("run {run}")).expect("rewrite");
                fs::write(target.join(format!("d0/new-{run}-{i}")), "new").expect("add");
            }
            let t = Instant::now();
            let r = rt.block_on(engine.release(&id, true)).expect("release").expect("volume");
            commit.push(t.elapsed());
            assert!(matches!(r, Released::Committed { .. }), "{r:?}");
        }
        let (rm, cm) = (median(&mut restore), median(&mut commit));
        println!(
            "{:>9} {:>10} {:>26} {:>26}",
            n,
            n * 1024,
            format!("{:.2} ({:.2}-{:.2})", ms(rm), ms(restore[0]), ms(restore[RUNS - 1])),
            format!("{:.2} ({:.2}-{:.2})", ms(cm), ms(commit[0]), ms(commit[RUNS - 1]))
        );
        let r0 = *first_restore.get_or_insert(rm);
        let c0 = *first_commit.get_or_insert(cm);
        if n != sizes[0] {
            println!(
                "{:>9} vs {} files: restore x{:.2}, commit x{:.2} for x{} the files",
                "",
                sizes[0],
                ms(rm) / ms(r0),
                ms(cm) / ms(c0),
                n / sizes[0]
            );
        }
        rt.block_on(engine.collect(None, None)).expect("gc");
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
