//! NodeGetVolumeStats' cost against the size of what a job wrote, on real overlay mounts (root).
//!
//! kubelet polls every volume's stats every minute. `cargo bench --bench stats` mounts a
//! volume, writes 1,000 / 10,000 / 100,000 files into it, and prints the median of the
//! first poll (which measures the upper) and of the polls after it (served from that
//! measurement), with the ratio of each against the smallest size: a poll must cost the
//! same whatever the upper holds. `-- --quick` runs the small size only, for CI.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcachefs::lock::FileLock;
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::Engine;
use jobcachefs::store::{CacheKey, Layout, NewVolume, Policy, Store, VolumeId};

const POLLS: usize = 51;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("stats: needs root to mount overlayfs");
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
    println!("{:>9} {:>22} {:>22}", "files", "first poll ms (walk)", "later polls ms median");
    let mut base: Option<(f64, f64)> = None;
    for &n in sizes {
        let id = VolumeId::new(format!("stats-{n}")).expect("id");
        let target = dir.path().join(format!("m{n}"));
        fs::create_dir_all(&target).expect("mkdir");
        let req = NewVolume::new(
            id.clone(),
            CacheKey::new("bench", &format!("s{n}")).expect("key"),
            Policy { publish: true, ..Policy::default() },
            Some(target.clone()),
        );
        rt.block_on(engine.restore(req)).expect("restore");
        for i in 0..n {
            let d = target.join(format!("d{}", i / 100));
            if i % 100 == 0 {
                fs::create_dir_all(&d).expect("mkdir");
            }
            fs::write(d.join(format!("f{i}")), b"x").expect("write");
        }
        let t = Instant::now();
        let first = rt.block_on(engine.stats(&id, &target)).expect("stats");
        let first_ms = ms(t.elapsed());
        assert!(first.used_files >= n as u64, "{first:?}");
        let mut later = Vec::with_capacity(POLLS);
        for _ in 0..POLLS {
            let t = Instant::now();
            rt.block_on(engine.stats(&id, &target)).expect("stats");
            later.push(ms(t.elapsed()));
        }
        later.sort_by(f64::total_cmp);
        let median = later[POLLS / 2];
        println!("{n:>9} {first_ms:>22.3} {median:>22.3}");
        let (f0, m0) = *base.get_or_insert((first_ms, median));
        if n != sizes[0] {
            println!(
                "{:>9} vs {} files: first poll x{:.1}, later polls x{:.2} for x{} the files",
                "",
                sizes[0],
                first_ms / f0,
                median / m0,
                n / sizes[0]
            );
        }
        rt.block_on(engine.release(&id, false)).expect("release");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
