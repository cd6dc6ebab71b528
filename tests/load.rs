//! Load through the gRPC API: one `jobcachefs serve`, 64 volumes over 4 caches (16 each) created,
//! staged, published, written and torn down concurrently, five rounds in a row.
//!
//! Every volume of a cache starts from the same base, so exactly one of each 16 publishes and the
//! rest are stale. Afterwards nothing is left mounted, and the server holds no more file
//! descriptors or threads than before the load, and its memory stays flat between rounds.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use jobcachefs::csi::pb;
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

const CACHES: usize = 4;
const PER_CACHE: usize = 16;
const FILES: usize = 3;
const ROUNDS: usize = 5;

/// A `jobcachefs serve` whose pid the test can watch; SIGTERM and wait when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts the server on `sb`'s state dir with `--kubelet-dir <sandbox>` and connects to it.
    async fn start(sb: &Sandbox) -> (Self, Channel) {
        let dir = sb.dir.path();
        let socket = dir.join("csi.sock");
        let log = dir.join("server.log");
        let child = Command::new(env!("CARGO_BIN_EXE_jobcachefs"))
            .arg("--state-dir")
            .arg(&sb.state)
            .args(["serve", "--endpoint", &format!("unix://{}", socket.display()), "--node-id", "node-a"])
            .arg("--kubelet-dir")
            .arg(dir)
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start jobcachefs serve");
        let server = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "server did not start: {}", server.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let channel = jobcachefs::csi::client::connect(&format!("unix://{}", socket.display())).await.expect("connect");
        (server, channel)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Entries in /proc/<pid>/fd.
    fn fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid())).expect("/proc/pid/fd").count()
    }

    /// Entries in /proc/<pid>/task.
    fn threads(&self) -> usize {
        fs::read_dir(format!("/proc/{}/task", self.pid())).expect("/proc/pid/task").count()
    }

    /// VmRSS in KiB, from /proc/<pid>/status.
    fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc/pid/status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS number")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Calls made and ABORTED answers retried, over the whole test.
#[derive(Default)]
struct Tally {
    calls: AtomicUsize,
    aborted: AtomicUsize,
}

/// Makes a call; retries it on ABORTED (another call for the volume in flight); any other
/// error, or no answer within 30 s, is the call's failure.
async fn call<T, F, Fut>(tally: &Tally, what: &str, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    for _ in 0..50 {
        tally.calls.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(30), f()).await {
            Err(_) => return Err(format!("{what}: no answer within 30s")),
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s)) if s.code() == Code::Aborted => {
                tally.aborted.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Err(s)) => return Err(format!("{what}: {:?}: {}", s.code(), s.message())),
        }
    }
    Err(format!("{what}: still ABORTED after 50 tries"))
}

#[derive(Clone)]
struct Clients {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

fn cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// One volume in flight: its paths and what it was created as.
struct Vol {
    name: String,
    staging: PathBuf,
    target: PathBuf,
    volume: pb::Volume,
}

/// CreateVolume, NodeStage, NodePublish.
async fn bring_up(c: &Clients, t: &Tally, dir: &Path, name: &str, params: &[(&str, &str)]) -> Result<Vol, String> {
    let req = pb::CreateVolumeRequest {
        name: name.to_string(),
        volume_capabilities: vec![cap()],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
        ..Default::default()
    };
    let volume = call(t, "CreateVolume", || {
        let mut ctl = c.controller.clone();
        let req = req.clone();
        async move { ctl.create_volume(req).await }
    })
    .await?
    .volume
    .ok_or("CreateVolume: no volume in the answer")?;
    let vol = Vol {
        name: name.to_string(),
        staging: dir.join(format!("staging/{name}")),
        target: dir.join(format!("pods/{name}/mount")),
        volume,
    };
    let stage = pb::NodeStageVolumeRequest {
        volume_id: vol.volume.volume_id.clone(),
        staging_target_path: s(&vol.staging),
        volume_capability: Some(cap()),
        volume_context: vol.volume.volume_context.clone(),
        ..Default::default()
    };
    call(t, "NodeStageVolume", || {
        let mut node = c.node.clone();
        let req = stage.clone();
        async move { node.node_stage_volume(req).await }
    })
    .await?;
    let publish = pb::NodePublishVolumeRequest {
        volume_id: vol.volume.volume_id.clone(),
        staging_target_path: s(&vol.staging),
        target_path: s(&vol.target),
        volume_capability: Some(cap()),
        volume_context: vol.volume.volume_context.clone(),
        ..Default::default()
    };
    call(t, "NodePublishVolume", || {
        let mut node = c.node.clone();
        let req = publish.clone();
        async move { node.node_publish_volume(req).await }
    })
    .await?;
    Ok(vol)
}

/// NodeUnpublish, NodeUnstage, DeleteVolume (which commits).
async fn tear_down(c: &Clients, t: &Tally, vol: &Vol) -> Result<(), String> {
    let id = vol.volume.volume_id.clone();
    let unpublish = pb::NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: s(&vol.target) };
    call(t, "NodeUnpublishVolume", || {
        let mut node = c.node.clone();
        let req = unpublish.clone();
        async move { node.node_unpublish_volume(req).await }
    })
    .await?;
    let unstage = pb::NodeUnstageVolumeRequest { volume_id: id.clone(), staging_target_path: s(&vol.staging) };
    call(t, "NodeUnstageVolume", || {
        let mut node = c.node.clone();
        let req = unstage.clone();
        async move { node.node_unstage_volume(req).await }
    })
    .await?;
    let delete = pb::DeleteVolumeRequest { volume_id: id, ..Default::default() };
    call(t, "DeleteVolume", || {
        let mut ctl = c.controller.clone();
        let req = delete.clone();
        async move { ctl.delete_volume(req).await }
    })
    .await?;
    Ok(())
}

fn file_name(round: usize, cache: usize, vol: usize, k: usize) -> String {
    format!("r{round}-c{cache}-v{vol:02}-f{k}")
}

/// One round: every volume up and written before any is torn down, so all 16 of a cache share
/// one base; then all torn down at once.
async fn round(c: &Clients, t: &Arc<Tally>, dir: &Path, r: usize) -> Vec<String> {
    let barrier = Arc::new(tokio::sync::Barrier::new(CACHES * PER_CACHE));
    let mut tasks = Vec::new();
    for cache in 0..CACHES {
        for v in 0..PER_CACHE {
            let (c, t, dir, barrier) = (c.clone(), t.clone(), dir.to_path_buf(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("pvc-r{r}-c{cache}-v{v:02}");
                let cache_name = format!("load-{cache}");
                let up = bring_up(&c, &t, &dir, &name, &[("cacheName", &cache_name)]).await;
                let up = up.and_then(|vol| {
                    for k in 0..FILES {
                        let f = vol.target.join(file_name(r, cache, v, k));
                        fs::write(&f, format!("{name} {k}")).map_err(|e| format!("write {}: {e}", f.display()))?;
                    }
                    Ok(vol)
                });
                // Everyone waits, even after a failure, so the others are not left hanging.
                barrier.wait().await;
                let vol = up.map_err(|e| format!("{name}: {e}"))?;
                tear_down(&c, &t, &vol).await.map_err(|e| format!("{}: {e}", vol.name))
            }));
        }
    }
    let mut failures = Vec::new();
    for task in tasks {
        if let Err(e) =
            tokio::time::timeout(Duration::from_secs(60), task).await.expect("round task hung").expect("task")
        {
            failures.push(e);
        }
    }
    failures
}

/// The files a later job sees in `cache`: a non-publishing volume, listed, torn down.
async fn files_in(c: &Clients, t: &Tally, dir: &Path, name: &str, cache: usize) -> Vec<String> {
    let cache_name = format!("load-{cache}");
    let vol = bring_up(c, t, dir, name, &[("cacheName", &cache_name), ("publish", "false")])
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut names: Vec<String> = fs::read_dir(&vol.target)
        .expect("read the mount")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    tear_down(c, t, &vol).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_volumes_over_four_caches_concurrently_five_rounds() {
    if !can_mount() {
        return;
    }
    let started = Instant::now();
    let sb = Sandbox::new();
    let (server, channel) = Server::start(&sb).await;
    let c = Clients { controller: ControllerClient::new(channel.clone()), node: NodeClient::new(channel) };
    let tally = Arc::new(Tally::default());
    let dir = sb.dir.path();

    // Before the load: one idle connection, nothing in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fds_before, threads_before) = (server.fds(), server.threads());
    let mut rss = Vec::new();
    // The volume whose files a cache shows, per round and cache.
    let mut winners: BTreeMap<(usize, usize), usize> = BTreeMap::new();

    for r in 1..=ROUNDS {
        let t0 = Instant::now();
        let failures = round(&c, &tally, dir, r).await;
        let load = t0.elapsed();
        assert!(failures.is_empty(), "round {r}: {} calls failed:\n{}", failures.len(), failures.join("\n"));
        assert!(sb.mounts().is_empty(), "round {r}: mounts left below the sandbox: {:?}", sb.mounts());
        for cache in 0..CACHES {
            let key = key(&format!("load-{cache}"));
            let head = sb.store().head(&key).expect("HEAD").expect("a version");
            assert_eq!(
                head.version,
                r as u64,
                "round {r}: cache load-{cache} advanced once per round (one winner, {} stale)",
                PER_CACHE - 1
            );
            let names = files_in(&c, &tally, dir, &format!("read-r{r}-c{cache}"), cache).await;
            // Exactly one volume's files of each round, all of them, nothing from other caches.
            for past in 1..=r {
                let prefix = format!("r{past}-c{cache}-v");
                let of_round: Vec<&String> = names.iter().filter(|n| n.starts_with(&format!("r{past}-"))).collect();
                let vols: Vec<usize> = {
                    let mut v: Vec<usize> = of_round
                        .iter()
                        .filter_map(|n| n.strip_prefix(&prefix))
                        .filter_map(|rest| rest.get(..2).and_then(|d| d.parse().ok()))
                        .collect();
                    v.dedup();
                    v
                };
                assert_eq!(vols.len(), 1, "round {r}: load-{cache} shows one volume of round {past}: {names:?}");
                let winner = vols[0];
                let expect: Vec<String> = (0..FILES).map(|k| file_name(past, cache, winner, k)).collect();
                assert_eq!(of_round, expect.iter().collect::<Vec<_>>(), "round {r}: load-{cache}, round {past}");
                assert_eq!(
                    *winners.entry((past, cache)).or_insert(winner),
                    winner,
                    "a published version never changes"
                );
            }
            assert_eq!(names.len(), FILES * r, "round {r}: load-{cache} holds only its winners' files: {names:?}");
        }
        assert!(sb.mounts().is_empty(), "round {r}: mounts left after the reads: {:?}", sb.mounts());
        assert!(sb.store().volumes().expect("volumes").is_empty(), "round {r}: every volume was deleted");
        rss.push(server.rss_kib());
        eprintln!(
            "round {r}: {} volumes in {:.2}s; server fds {} threads {} rss {} KiB",
            CACHES * PER_CACHE,
            load.as_secs_f64(),
            server.fds(),
            server.threads(),
            rss[r - 1]
        );
    }

    // Idle blocking threads exit after tokio's 10 s keep-alive: wait for them, bounded.
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.threads() > threads_before + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (fds_after, threads_after) = (server.fds(), server.threads());
    eprintln!(
        "server pid {}: fds {fds_before} -> {fds_after}, threads {threads_before} -> {threads_after}, \
         rss per round {rss:?} KiB; {} calls, {} ABORTED and retried; {:.1}s in all",
        server.pid(),
        tally.calls.load(Ordering::Relaxed),
        tally.aborted.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert!(fds_after.abs_diff(fds_before) <= 2, "file descriptors leak: {fds_before} before, {fds_after} after");
    assert!(threads_after <= threads_before + 2, "threads leak: {threads_before} before, {threads_after} after");
    let (second, fifth) = (rss[1], rss[ROUNDS - 1]);
    assert!(
        fifth * 100 <= second * 120,
        "memory grows round over round: {second} KiB after round 2, {fifth} KiB after 5"
    );
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}
