//! Restoring a cache on another node through an OCI registry, against downloading and extracting
//! one tar+zstd archive of the whole cache from the same registry (what archive caches such as
//! actions/cache do), on real overlay mounts and a real registry (root).
//!
//! Setup: a local registry (the Debian `docker-registry`, see `common/registry.rs`) and node A,
//! which publishes v1 of a Maven-like cache (~1 GB; text compresses ~4:1, jars not at all) by
//! restore + write + release. The archive: the same tree as one tar+zstd (level 3) blob, pushed
//! once with `Registry::push_blob` to another repository of the same registry. Nodes B (no
//! prefetch) and C (prefetch) take v1, untimed. Then each run:
//!
//! 1. A publishes a 1% delta (a new version whose top layer is the change: files rewritten or
//!    added, 1% of the cache's bytes, ~10 MB);
//! 2. `1% delta`: B restores it: `Engine::restore` asks the registry, pulls the one new layer,
//!    mounts;
//! 3. `1% delta, prefetched`: C runs `Engine::prefetch_once` (untimed: it happens in the
//!    background before a job asks), then restores: a head check and a mount, no blob fetched
//!    (asserted). Apart, for its parts: a restore on node L, which has no registry, and a head
//!    check (`tag_digest`) from a client of the bench's;
//! 4. `first restore`: a fresh node (new state dir) restores: every layer pulled, then a mount;
//! 5. `archive`: `open_blob` of the archive, streamed through zstd and tar into an empty dir,
//!    read to its end (the reader checks size and digest there, as a layer pull does).
//!
//! Steps 4 and 5 swap order every other run. An untimed `sync` comes before every timed step;
//! nothing is deleted until the end. Bytes are counted twice: "blobs" is the sum of the blob
//! sizes a restore needs (the registry head's layers the node lacks just before it, or the
//! archive's size); "served" is what the registry wrote in response bodies during the timed
//! step, from its own log (`http.response.written`, HEAD responses excluded: blobs plus
//! manifests and errors), so it is what actually moved. Ratios are archive ÷ way, taken run by run, then
//! their median.
//!
//! `cargo bench --bench registry` (a few minutes); `-- --quick` runs a ~50 MB cache with 3 runs,
//! for CI to check that the benchmark still works (its timings are not judged). Exits 2 without
//! root. The registry is stopped and mounts and data removed on the way out, also on a panic,
//! SIGINT and SIGTERM.

#[path = "common/registry.rs"]
mod local_registry;
#[path = "common/shapes.rs"]
mod shapes;

use std::fmt::Display;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcachefs::lock::FileLock;
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::remote::{RemoteConfig, Synced, HEAD_TAG};
use jobcachefs::ops::{Engine, Released};
use jobcachefs::registry::archive::Limits;
use jobcachefs::registry::{Blob, Registry, RegistryConfig};
use jobcachefs::store::{CacheKey, Layout, NewVolume, Policy, Store, VolumeId};
use local_registry::{LocalRegistry, Served};
use sha2::{Digest, Sha256};
use shapes::*;
use tokio::runtime::Runtime;

const LOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// zstd level of the archive: the default, as layers are written.
const ARCHIVE_LEVEL: i32 = 3;
/// C's prefetch interval; the bench runs the rounds itself, this only says how long what a
/// round saw counts as current (a restore within it only asks whether `head` moved since,
/// waiting briefly, and pulls nothing when it did not).
const PREFETCH: Duration = Duration::from_secs(3600);

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("registry: needs root to mount overlayfs");
        std::process::exit(2);
    }
    let started = *STARTED.get_or_init(Instant::now);
    let quick = std::env::args().any(|a| a == "--quick");
    // Quick: ~50 MB and 3 runs; full: ~1 GB and 5.
    let (runs, artifact_versions) = if quick { (3, 250) } else { (5, 5_000) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let sb = Sandbox::new();
    clean_up_on_signal(&rt, &sb);
    let bench = Bench::new(&sb, &rt);
    let spec = maven_repo(artifact_versions);
    note(format!("cache: {} files, {}", spec.files.len(), size(spec.bytes())));

    // Node A publishes v1: the whole cache as one layer.
    let a = bench.node("a", None);
    let t = Instant::now();
    let v1 = bench.publish(&a, "a-seed", |dir| write_tree(dir, &spec));
    let (head, _) = bench.head();
    let v1_blob = head.layers.iter().map(|l| l.blob.size).sum::<u64>();
    note(format!("A published v{v1}: 1 layer, blob {} in {:.1} s", size(v1_blob), t.elapsed().as_secs_f64()));

    // The archive: the same tree, generated apart, as one tar+zstd blob in the same registry.
    let t = Instant::now();
    let gen = sb.root.join("gen");
    write_tree(&gen, &spec);
    let archive_path = sb.root.join("cache.tar.zst");
    let archive = pack(&gen, &archive_path);
    rt.block_on(bench.client.push_blob(&bench.archive_key, &archive_path, &archive, &[]))
        .or_die(|| "push the archive".into());
    note(format!("archive: blob {} pushed in {:.1} s", size(archive.size), t.elapsed().as_secs_f64()));

    // L: no registry, for the cost of the restore's local part (records, mount) in this run.
    let l = bench.node_without_registry("l");
    bench.publish(&l, "l-seed", |dir| write_file(&dir.join("f"), b"x"));
    // B and C hold v1 before the runs.
    let b = bench.node("b", None);
    let c = bench.node("c", Some(PREFETCH));
    for (name, node) in [("B", &b), ("C", &c)] {
        let t = Instant::now();
        let synced = rt.block_on(node.sync_cache(&bench.key)).or_die(|| format!("{name} takes v1"));
        assert!(matches!(synced, Synced::Pulled { version, .. } if version == v1), "{name}: {synced:?}");
        note(format!("{name} took v{v1} in {:.1} s", t.elapsed().as_secs_f64()));
    }

    let mut res = Results::default();
    for run in 0..runs {
        // 1. A publishes a 1% delta.
        let mut change = (0, String::new());
        let version = bench.publish(&a, &format!("a-{run}"), |dir| change = delta_job(dir, &spec, run));
        let (head, _) = bench.head();
        let layer = head.layers.last().expect("a layer").blob.size;
        res.deltas.push((change.0, layer));
        let check = change.1.as_str();

        // 2. B restores it.
        let delta = bench.restore(&b, &format!("b-{run}"), version, check);
        assert_eq!(delta.layers, 1, "B pulls the delta's layer only");
        res.ways[WAY_DELTA].push(delta);

        // 3. C prefetches it, then restores.
        nix::unistd::sync();
        let mark = bench.registry.mark();
        let t = Instant::now();
        let found = rt.block_on(c.prefetch_once());
        let took = t.elapsed();
        let served = bench.registry.served_since(mark);
        match found.as_slice() {
            [(key, Ok(Synced::Pulled { version: v, layers: 1, bytes }))] if key == &bench.key && *v == version => {
                res.prefetches.push((took, *bytes, served))
            }
            other => panic!("C's prefetch of v{version}: {other:?}"),
        }
        let prefetched = bench.restore(&c, &format!("c-{run}"), version, check);
        // It asks the registry for the head's digest (at most 250 ms), and pulls nothing.
        assert_eq!((prefetched.layers, prefetched.served.blob_gets), (0, 0), "a restore after prefetch is a mount");
        res.ways[WAY_PREFETCHED].push(prefetched);
        // Its parts apart: L's restore, and a head check (`tag_digest`) from the bench's client.
        nix::unistd::sync();
        res.local.push(bench.local_restore(&l, &format!("l-{run}")));
        let t = Instant::now();
        rt.block_on(bench.client.tag_digest(&bench.key, HEAD_TAG)).or_die(|| "head check".into());
        res.head_check.push(t.elapsed());

        // 4 and 5. A fresh node's first restore, and the archive, in turns.
        for step in [run % 2, 1 - run % 2] {
            if step == 0 {
                let fresh = bench.node(&format!("first-{run}"), None);
                let first = bench.restore(&fresh, &format!("first-{run}"), version, check);
                assert_eq!(first.layers, head.layers.len(), "a fresh node pulls every layer");
                res.ways[WAY_FIRST].push(first);
            } else {
                res.ways[WAY_ARCHIVE].push(bench.extract(&archive, run));
            }
        }
        let ms = |w: usize| ms(res.ways[w][run].took);
        note(format!(
            "run {run}: v{version} (delta {} in a {} layer): delta {:.1} ms, prefetched {:.2} ms (prefetch {:.1} ms), \
             first restore {:.0} ms, archive {:.0} ms",
            size(change.0),
            size(layer),
            ms(WAY_DELTA),
            ms(WAY_PREFETCHED),
            took.as_secs_f64() * 1000.0,
            ms(WAY_FIRST),
            ms(WAY_ARCHIVE),
        ));
    }

    report(&spec, &archive, v1_blob, &res, quick);
    println!("\nmeasured in {:.0} s", started.elapsed().as_secs_f64());
    note("deleting the scratch tree".into());
    drop((a, b, c, l, bench));
    drop(sb);
    note("done".into());
}

const WAY_ARCHIVE: usize = 0;
const WAY_FIRST: usize = 1;
const WAY_DELTA: usize = 2;
const WAY_PREFETCHED: usize = 3;
const WAY_NAMES: [&str; 4] =
    ["archive (one tar+zstd blob)", "first restore (all layers)", "1% delta (one layer)", "1% delta, prefetched"];

/// What the runs measured.
#[derive(Default)]
struct Results {
    /// Per way (`WAY_*`), per run.
    ways: [Vec<Sample>; 4],
    /// Per run: bytes the delta wrote, and its layer's blob size.
    deltas: Vec<(u64, u64)>,
    /// Per run: C's prefetch round (time, blob bytes it pulled, what the registry served).
    prefetches: Vec<(Duration, u64, Served)>,
    /// Per run: a restore on L, a node without a registry (records and mount only).
    local: Vec<Duration>,
    /// Per run: a head check (`tag_digest`) from a warm client.
    head_check: Vec<Duration>,
}

/// One timed step.
#[derive(Clone)]
struct Sample {
    took: Duration,
    /// Blob bytes the step needed.
    blobs: u64,
    /// Blobs pulled (1 for the archive).
    layers: usize,
    /// What the registry answered during the step.
    served: Served,
}

// ---------------------------------------------------------------------------------------------
// Nodes, the registry, and the steps
// ---------------------------------------------------------------------------------------------

struct Bench<'a> {
    sb: &'a Sandbox,
    rt: &'a Runtime,
    registry: &'a LocalRegistry,
    /// A client of its own, to read the registry's head and the archive outside the nodes.
    client: Registry,
    key: CacheKey,
    archive_key: CacheKey,
}

impl<'a> Bench<'a> {
    fn new(sb: &'a Sandbox, rt: &'a Runtime) -> Self {
        Bench {
            sb,
            rt,
            registry: &sb.registry,
            client: client(&sb.registry.addr),
            key: CacheKey::new("bench", "maven").expect("key"),
            archive_key: CacheKey::new("bench", "archive").expect("key"),
        }
    }

    /// A node: its own state dir and file lock, the registry.
    fn node(&self, name: &str, prefetch: Option<Duration>) -> Engine {
        let dir = self.sb.root.join("nodes").join(name);
        fs::create_dir_all(&dir).or_die(|| format!("mkdir {}", dir.display()));
        let layout = Layout::new(dir).expect("layout");
        Engine::new(
            Store::open(layout.clone()).expect("store"),
            Arc::new(SysMounter),
            Arc::new(FileLock::new(layout)),
            LOCK_TIMEOUT,
        )
        .with_registry(RemoteConfig {
            registry: client(&self.registry.addr),
            restore_timeout: Duration::from_secs(10),
            // No untagging in the background while other steps are measured.
            keep: 1_000,
            limits: Limits::default(),
            prefetch,
        })
    }

    /// A node that uses no registry.
    fn node_without_registry(&self, name: &str) -> Engine {
        let dir = self.sb.root.join("nodes").join(name);
        fs::create_dir_all(&dir).or_die(|| format!("mkdir {}", dir.display()));
        let layout = Layout::new(dir).expect("layout");
        Engine::new(
            Store::open(layout.clone()).expect("store"),
            Arc::new(SysMounter),
            Arc::new(FileLock::new(layout)),
            LOCK_TIMEOUT,
        )
    }

    /// Times a restore on a node without a registry: the volume's records and its mount.
    fn local_restore(&self, node: &Engine, id: &str) -> Duration {
        let target = self.mount_point(id);
        let vid = VolumeId::new(id).expect("volume id");
        let req = NewVolume::new(vid.clone(), self.key.clone(), Policy::default(), Some(target));
        let t = Instant::now();
        self.rt.block_on(node.restore(req)).or_die(|| format!("restore {id}"));
        let took = t.elapsed();
        self.rt.block_on(node.release(&vid, false)).or_die(|| format!("release {id}"));
        took
    }

    /// The registry's head of the cache.
    fn head(&self) -> (jobcachefs::registry::RemoteVersion, String) {
        let head = self.rt.block_on(self.client.read_version(&self.key, HEAD_TAG)).or_die(|| "read the head".into());
        head.expect("the registry has a head")
    }

    fn mount_point(&self, id: &str) -> PathBuf {
        let dir = self.sb.root.join("jobs").join(id);
        fs::create_dir_all(&dir).or_die(|| format!("mkdir {}", dir.display()));
        dir
    }

    /// Restore, `work`, release on `node`: returns the version published.
    fn publish(&self, node: &Engine, id: &str, work: impl FnOnce(&Path)) -> u64 {
        let target = self.mount_point(id);
        let vid = VolumeId::new(id).expect("volume id");
        let req = NewVolume::new(
            vid.clone(),
            self.key.clone(),
            Policy { publish: true, ..Policy::default() },
            Some(target.clone()),
        );
        self.rt.block_on(node.restore(req)).or_die(|| format!("restore {id}"));
        work(&target);
        match self.rt.block_on(node.release(&vid, true)).or_die(|| format!("release {id}")) {
            Some(Released::Committed { version, .. }) => version,
            other => panic!("{id}: expected a commit, got {other:?}"),
        }
    }

    /// Times `node`'s restore of the cache; it must get `version`, with `check` in it.
    fn restore(&self, node: &Engine, id: &str, version: u64, check: &str) -> Sample {
        let (head, _) = self.head();
        assert_eq!(head.version, version, "the registry's head");
        let missing = node.store().missing_layers(&self.key, &head).or_die(|| format!("{id}: missing layers"));
        let blobs = missing.iter().map(|l| l.blob.size).sum();
        let target = self.mount_point(id);
        let vid = VolumeId::new(id).expect("volume id");
        let req = NewVolume::new(vid.clone(), self.key.clone(), Policy::default(), Some(target.clone()));
        nix::unistd::sync();
        let mark = self.registry.mark();
        let t = Instant::now();
        let restored = self.rt.block_on(node.restore(req)).or_die(|| format!("restore {id}"));
        let took = t.elapsed();
        let served = self.registry.served_since(mark);
        assert_eq!(restored.volume.base.version, version, "{id}: the restored version");
        assert!(target.join(check).is_file(), "{id}: {check} missing from v{version}");
        self.rt.block_on(node.release(&vid, false)).or_die(|| format!("release {id}"));
        Sample { took, blobs, layers: missing.len(), served }
    }

    /// Times the archive cache's restore: download and extract the whole archive.
    fn extract(&self, archive: &Blob, run: usize) -> Sample {
        let dest = self.sb.root.join("extracted").join(run.to_string());
        fs::create_dir_all(&dest).or_die(|| format!("mkdir {}", dest.display()));
        nix::unistd::sync();
        let mark = self.registry.mark();
        let t = Instant::now();
        // Streamed from a blocking thread, as a node pulls a layer.
        let extracted = self.rt.block_on(async {
            let reader = self.client.open_blob(&self.archive_key, archive).await.or_die(|| "open the archive".into());
            let dest = dest.clone();
            tokio::task::spawn_blocking(move || {
                let mut tar = tar::Archive::new(zstd::Decoder::new(reader)?);
                tar.unpack(&dest)?;
                // To the end of the blob: the reader checks its size and digest there.
                let mut zst = tar.into_inner();
                io::copy(&mut zst, &mut io::sink())?;
                io::copy(&mut zst.finish(), &mut io::sink()).map(|_| ())
            })
            .await
        });
        extracted.expect("extracting thread").or_die(|| format!("extract the archive into {}", dest.display()));
        let took = t.elapsed();
        let served = self.registry.served_since(mark);
        Sample { took, blobs: archive.size, layers: 1, served }
    }
}

fn client(addr: &str) -> Registry {
    Registry::new(RegistryConfig {
        host: addr.to_string(),
        prefix: "jcfs".into(),
        auth_file: None,
        ca_file: None,
        insecure: true,
        timeout: Duration::from_secs(120),
    })
    .expect("registry client")
}

/// Writes `src` as a tar+zstd archive at `out`, as an archive cache saves one; its blob
/// descriptor (digest of the file, diff id of the tar).
fn pack(src: &Path, out: &Path) -> Blob {
    let file = File::create(out).or_die(|| format!("create {}", out.display()));
    let encoder = zstd::Encoder::new(Hashing::new(file), ARCHIVE_LEVEL).expect("zstd encoder");
    let mut tar = tar::Builder::new(Hashing::new(encoder));
    tar.follow_symlinks(false);
    tar.append_dir_all(".", src).or_die(|| format!("archive {}", src.display()));
    let tarred = tar.into_inner().expect("finish tar");
    let diff_id = digest(tarred.hash);
    let file = tarred.inner.finish().expect("finish zstd");
    file.inner.sync_all().expect("sync the archive");
    Blob { digest: digest(file.hash), size: file.bytes, diff_id }
}

/// A writer that hashes and counts what goes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing { inner, hash: Sha256::new(), bytes: 0 }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn digest(hash: Sha256) -> String {
    format!("sha256:{:x}", hash.finalize())
}

// ---------------------------------------------------------------------------------------------
// The cache and the job
// ---------------------------------------------------------------------------------------------

/// A local Maven repository of `versions` artifact versions of 8 files (jar, pom, sha1s,
/// sources, javadoc), most 1–64 KiB, one version in 33 with a 1–5 MB jar: `maven_spec` of
/// benches/common/shapes.rs at another size (5,000 versions: 40,000 files, ~1 GB).
fn maven_repo(versions: usize) -> Spec {
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
    let mut files = Vec::with_capacity(versions * SUFFIXES.len());
    for d in 0..versions {
        let (group, artifact, version) = (d / 50, (d % 50) / 2, d % 2);
        let dir = format!("repository/org/g{group}/a{artifact}/1.{version}");
        for (k, (suffix, binary)) in SUFFIXES.iter().enumerate() {
            let size = if k == 0 && d % 33 == 0 {
                (1 << 20) + rng.below(4 << 20) as usize
            } else {
                1024 + (rng.unit().powi(4) * 63.0 * 1024.0) as usize
            };
            files.push(Entry { path: format!("{dir}/a{artifact}-1.{version}{suffix}"), size, binary: *binary });
        }
    }
    Spec::new(files, Vec::new())
}

/// A build's change of 1% of the cache's bytes: files taken in an order shuffled per run (so
/// every kind and size of file can be in it), each rewritten or given a new file beside it,
/// until the bytes written reach 1% (1–1.7% of the files), skipping a file that would
/// take them past 1.1%. Not "the files in slot 0": the tree is sorted, so a fixed stride would
/// pick the same one or two of an artifact's 8 kinds of file. Returns the bytes written and
/// the path of an added file (to check a restore has it).
fn delta_job(dir: &Path, spec: &Spec, run: usize) -> (u64, String) {
    let mut order: Vec<usize> = (0..spec.files.len()).collect();
    order.sort_by_key(|&i| Rng::new(((run as u64 + 1) << 32) ^ i as u64).next());
    let target = spec.bytes() / 100;
    let mut buf = Vec::new();
    let (mut bytes, mut added) = (0, String::new());
    for i in order {
        if bytes >= target {
            break;
        }
        let e = &spec.files[i];
        if bytes + e.size as u64 > target + target / 10 {
            // A big jar that would overshoot: the delta stays within 1.0-1.1% of the bytes.
            continue;
        }
        let seed = (i as u64) ^ ((run as u64 + 1) << 40);
        let add = Rng::new(seed).next() % 2 == 1;
        let path = if add { added_path(e, run) } else { e.path.clone() };
        fill(&mut buf, seed ^ u64::from(add), e.size, e.binary);
        write_file(&dir.join(&path), &buf);
        bytes += e.size as u64;
        if add {
            added = path;
        }
    }
    assert!(!added.is_empty(), "the delta adds a file");
    (bytes, added)
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn report(spec: &Spec, archive: &Blob, v1_blob: u64, res: &Results, quick: bool) {
    let Results { ways, deltas, prefetches, local, head_check } = res;
    let runs = ways[WAY_ARCHIVE].len();
    println!(
        "\ncache: {} files, {}; v1 layer blob {}, archive blob {}; deltas (written / layer blob): {}",
        spec.files.len(),
        size(spec.bytes()),
        size(v1_blob),
        size(archive.size),
        deltas.iter().map(|(w, l)| format!("{} / {}", size(*w), size(*l))).collect::<Vec<_>>().join(", ")
    );
    println!("medians of {runs} runs (min-max); ratios are archive / way, run by run, then their median\n");
    println!(
        "{:<28} {:>24} {:>12} {:>12} {:>5} {:>18} {:>18}",
        "way", "restore ms", "blobs", "served", "reqs", "time x archive", "bytes x archive"
    );
    let mut time_ratio = [0.0; 4];
    let mut byte_ratio = [0.0; 4];
    for (w, samples) in ways.iter().enumerate() {
        let mut took: Vec<f64> = samples.iter().map(|s| ms(s.took)).collect();
        let blobs = median_u64(samples.iter().map(|s| s.blobs).collect());
        let served = median_u64(samples.iter().map(|s| s.served.bytes).collect());
        let reqs = median_u64(samples.iter().map(|s| s.served.requests).collect());
        let mut tr: Vec<f64> = (0..runs).map(|r| ms(ways[WAY_ARCHIVE][r].took) / ms(samples[r].took)).collect();
        let mut br: Vec<f64> =
            (0..runs).map(|r| ways[WAY_ARCHIVE][r].served.bytes as f64 / samples[r].served.bytes as f64).collect();
        let (t, ratio_t, ratio_b) = (summary(&mut took), summary(&mut tr), summary(&mut br));
        (time_ratio[w], byte_ratio[w]) = (ratio_t.0, ratio_b.0);
        println!(
            "{:<28} {:>24} {:>12} {:>12} {:>5} {:>18} {:>18}",
            WAY_NAMES[w],
            format!("{} ({}-{})", num(t.0), num(t.1), num(t.2)),
            size(blobs),
            size(served),
            reqs,
            times(ratio_t),
            if blobs == 0 { "no blob".to_string() } else { times(ratio_b) },
        );
    }
    println!("\nregistry calls in the last run (method, what, status):");
    for (w, samples) in ways.iter().enumerate() {
        println!("  {:<28} {}", WAY_NAMES[w], samples[runs - 1].served.calls.join(", "));
    }
    let mut pt: Vec<f64> = prefetches.iter().map(|p| ms(p.0)).collect();
    let pt = summary(&mut pt);
    println!(
        "\nprefetch round before the prefetched restore (untimed there): {} ms ({}-{}), blobs {}, served {}",
        num(pt.0),
        num(pt.1),
        num(pt.2),
        size(median_u64(prefetches.iter().map(|p| p.1).collect())),
        size(median_u64(prefetches.iter().map(|p| p.2.bytes).collect())),
    );

    let mut local: Vec<f64> = local.iter().map(|d| ms(*d)).collect();
    let mut head_check: Vec<f64> = head_check.iter().map(|d| ms(*d)).collect();
    let (local, head_check) = (summary(&mut local), summary(&mut head_check));
    println!(
        "parts of a prefetched restore, measured apart in the same runs: restore on a node without a registry \
         (records + mount) {} ms ({}-{}); a head check (GET /v2/ + HEAD manifest) {} ms ({}-{})",
        num(local.0),
        num(local.1),
        num(local.2),
        num(head_check.0),
        num(head_check.1),
        num(head_check.2),
    );

    let mut pre: Vec<f64> = ways[WAY_PREFETCHED].iter().map(|s| ms(s.took)).collect();
    let pre = summary(&mut pre);
    let judged = if quick { " (quick run: not judged)" } else { "" };
    println!("\ntargets{judged}:");
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "  1% delta restores >= 20x faster than the archive: {:.1}x -> {}",
        time_ratio[WAY_DELTA],
        met(time_ratio[WAY_DELTA] >= 20.0)
    );
    println!(
        "  1% delta moves >= 20x fewer bytes than the archive: {:.1}x -> {}",
        byte_ratio[WAY_DELTA],
        met(byte_ratio[WAY_DELTA] >= 20.0)
    );
    println!(
        "  with prefetch the restore stays under 10 ms: {} ms median (max {}) -> {}",
        num(pre.0),
        num(pre.2),
        met(pre.0 < 10.0)
    );
}

/// Median, min, max.
fn summary(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort();
    v[v.len() / 2]
}

fn times((median, min, max): (f64, f64, f64)) -> String {
    if median.is_infinite() {
        return "no bytes".into();
    }
    format!("{}x ({}-{})", num(median), num(min), num(max))
}

/// Three significant digits, at least one decimal below 100.
fn num(x: f64) -> String {
    match x {
        x if x.is_infinite() => "inf".into(),
        x if x >= 100.0 => format!("{x:.0}"),
        x if x >= 10.0 => format!("{x:.1}"),
        x => format!("{x:.2}"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

// ---------------------------------------------------------------------------------------------
// Failing loudly, and cleaning up on the way out
// ---------------------------------------------------------------------------------------------

/// When the bench started, for progress notes.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, stamped with seconds since the start.
fn note(line: String) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:6.1}s] {line}");
}

/// `expect` with a message built only on failure.
trait OrDie<T> {
    fn or_die(self, what: impl FnOnce() -> String) -> T;
}

impl<T, E: Display> OrDie<T> for Result<T, E> {
    fn or_die(self, what: impl FnOnce() -> String) -> T {
        self.unwrap_or_else(|e| panic!("{}: {e}", what()))
    }
}

/// The scratch tree under /var/tmp and the registry storing into it. Dropping it (also while
/// unwinding from a panic) stops the registry and unmounts what is still mounted below the
/// tree before the tree is deleted.
struct Sandbox {
    root: PathBuf,
    registry: LocalRegistry,
    _dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("jcfs-registry").tempdir_in("/var/tmp").expect("temp dir");
        let root = dir.path().to_path_buf();
        let registry = LocalRegistry::start(&root.join("registry"));
        note(format!("registry on {}, scratch in {}", registry.addr, root.display()));
        Sandbox { root, registry, _dir: dir }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("registry: last lines of the registry's log:\n{}", self.registry.log_tail(20));
        }
        self.registry.stop();
        unmount_under(&self.root);
        remove_parallel(&self.root);
    }
}

/// Ctrl-C or SIGTERM in the middle of a run: kill the registry, unmount, delete the tree, exit.
/// Best effort, racing the main thread; a panic cleans up in `Sandbox::drop` instead.
fn clean_up_on_signal(rt: &Runtime, sb: &Sandbox) {
    use tokio::signal::unix::{signal, SignalKind};
    let root = sb.root.clone();
    let registry = sb.registry.pid().map(nix::unistd::Pid::from_raw);
    let _runtime = rt.enter();
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    rt.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("registry: interrupted; cleaning up {}", root.display());
        if let Some(pid) = registry {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        unmount_under(&root);
        remove_parallel(&root);
        let _ = fs::remove_dir_all(&root);
        std::process::exit(130);
    });
}

/// Unmounts everything below `root`, newest first; lazily only if a plain unmount fails.
fn unmount_under(root: &Path) {
    let Ok(mounts) = jobcachefs::mount::info::read_mountinfo() else { return };
    for m in mounts.iter().rev().filter(|m| m.mount_point.starts_with(root)) {
        if nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Deletes what is below `root` with 16 threads: this machine's filesystem discards freed
/// blocks synchronously, so one thread mostly waits on the disk (see benches/compare.rs).
fn remove_parallel(root: &Path) {
    let mut items = Vec::new();
    // Seven levels down are the artifacts' directories in the nodes' layers
    // (nodes/a/layers/<id>/repository/org/g1) and in the extracted trees: many small items.
    list_below(root, 7, &mut items);
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
