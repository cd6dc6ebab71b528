//! Crash safety of the CSI driver: `jobcachefs serve` is killed (SIGKILL, via the test-only
//! crash points of the `failpoints` feature) at each step of a commit (a PVC's DeleteVolume and
//! an inline volume's NodeUnpublishVolume), of a background squash, of gc and of eviction, with
//! volumes staged and published around it. A normal server restarted on the same state dir must
//! find every HEAD old or new (never torn, every layer it names on disk), keep every pinned
//! layer, collect the crash's orphans at start-up, let the volumes be unpublished, unstaged and
//! deleted with their change committed exactly once, and then run a full lifecycle.
//! Needs `--features failpoints`.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use jobcachefs::csi::pb;
use jobcachefs::store::Head;
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "node-a";
const CRASH_ENV: &str = "JOBCACHEFS_CRASH_AT";

// ---------------------------------------------------------------------------------------------
// The server process (after tests/common/csi_server.rs, plus the crash point and exit status)
// ---------------------------------------------------------------------------------------------

/// A running `jobcachefs serve`; SIGTERM and wait when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to end by itself (a crash point) and returns how it ended.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for server") {
                return status;
            }
            assert!(Instant::now() < deadline, "server still running after {within:?}:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts the process died of SIGKILL (the crash point), within `within`.
    async fn assert_killed(&mut self, what: &str, within: Duration) {
        let status = self.wait_exit(within).await;
        assert_eq!(
            status.signal(),
            Some(9),
            "{what}: the server must die of SIGKILL, got {status}:\n{}",
            self.log_text()
        );
    }

    async fn connect(&self) -> Csi {
        let channel = jobcachefs::csi::client::connect(&format!("unix://{}", self.socket.display()))
            .await
            .expect("connect to the server");
        Csi { controller: ControllerClient::new(channel.clone()), node: NodeClient::new(channel) }
    }

    /// SIGTERM and wait (a clean shutdown; mounts stay).
    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.log_text());
        }
    }
}

struct Csi {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

/// Starts `jobcachefs --state-dir STATE serve` with `--kubelet-dir <sandbox>`, the socket and log
/// named by `tag`, extra flags, and `JOBCACHEFS_CRASH_AT=crash` when given. Waits until it
/// accepts connections, or (`may_die`) until it exits first.
async fn spawn(sb: &Sandbox, tag: &str, extra: &[&str], crash: Option<&str>, may_die: bool) -> Server {
    let socket = sb.dir.path().join(format!("{tag}.sock"));
    let log = sb.dir.path().join(format!("{tag}.log"));
    let _ = fs::remove_file(&socket);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jobcachefs"));
    cmd.arg("--state-dir")
        .arg(&sb.state)
        .args(["serve", "--endpoint", &format!("unix://{}", socket.display()), "--node-id", NODE])
        .arg("--kubelet-dir")
        .arg(sb.dir.path())
        .args(["--allow-inline-publish", "default"])
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove(CRASH_ENV)
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log).expect("log file"));
    if let Some(step) = crash {
        cmd.env(CRASH_ENV, step);
    }
    let mut server = Server { child: cmd.spawn().expect("start server"), socket, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&server.socket).is_err() {
        if may_die && server.child.try_wait().expect("wait").is_some() {
            return server;
        }
        assert!(Instant::now() < deadline, "server did not start:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server
}

async fn serve(sb: &Sandbox, tag: &str, extra: &[&str]) -> (Server, Csi) {
    let server = spawn(sb, tag, extra, None, false).await;
    let csi = server.connect().await;
    (server, csi)
}

async fn serve_crashing(sb: &Sandbox, tag: &str, extra: &[&str], step: &str) -> (Server, Csi) {
    let server = spawn(sb, tag, extra, Some(step), false).await;
    let csi = server.connect().await;
    (server, csi)
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

fn writer() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// A volume id shaped like kubelet's for inline volumes.
fn kubelet_id(n: u8) -> String {
    format!("csi-{n:02x}{}", "5e".repeat(31))
}

/// A persistent volume: its CreateVolume answer and where kubelet stages and publishes it.
struct Pvc {
    vol: pb::Volume,
    staging: PathBuf,
    target: PathBuf,
}

impl Pvc {
    fn id(&self) -> &str {
        &self.vol.volume_id
    }
}

/// An inline volume: its id and target.
struct Inline {
    id: String,
    target: PathBuf,
}

async fn create(c: &mut Csi, sb: &Sandbox, name: &str, params: &[(&str, &str)]) -> Pvc {
    let req = pb::CreateVolumeRequest {
        name: name.to_string(),
        volume_capabilities: vec![writer()],
        parameters: map(params),
        ..Default::default()
    };
    let vol = c.controller.create_volume(req).await.expect("CreateVolume").into_inner().volume.expect("volume");
    Pvc {
        vol,
        staging: sb.dir.path().join(format!("plugins/staging/{name}")),
        target: sb.dir.path().join(format!("pods/{name}/volume")),
    }
}

async fn stage(c: &mut Csi, v: &Pvc) -> Result<(), tonic::Status> {
    c.node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: v.id().to_string(),
            staging_target_path: path_str(&v.staging),
            volume_capability: Some(writer()),
            volume_context: v.vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn publish(c: &mut Csi, v: &Pvc) -> Result<(), tonic::Status> {
    c.node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: v.id().to_string(),
            staging_target_path: path_str(&v.staging),
            target_path: path_str(&v.target),
            volume_capability: Some(writer()),
            volume_context: v.vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn unpublish(c: &mut Csi, id: &str, target: &Path) -> Result<(), tonic::Status> {
    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.to_string(),
            target_path: path_str(target),
        })
        .await
        .map(drop)
}

async fn unstage(c: &mut Csi, v: &Pvc) -> Result<(), tonic::Status> {
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: v.id().to_string(),
            staging_target_path: path_str(&v.staging),
        })
        .await
        .map(drop)
}

async fn delete(c: &mut Csi, id: &str) -> Result<(), tonic::Status> {
    c.controller
        .delete_volume(pb::DeleteVolumeRequest { volume_id: id.to_string(), ..Default::default() })
        .await
        .map(drop)
}

async fn publish_inline(c: &mut Csi, sb: &Sandbox, n: u8, cache: &str) -> Inline {
    let id = kubelet_id(n);
    let target = sb.dir.path().join(format!("pods/inline-{n}/volume"));
    let ctx = map(&[
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/pod.name", "build-1"),
        ("cacheName", cache),
    ]);
    c.node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.clone(),
            target_path: path_str(&target),
            volume_capability: Some(writer()),
            volume_context: ctx,
            ..Default::default()
        })
        .await
        .expect("inline NodePublishVolume");
    Inline { id, target }
}

/// Every call is made twice, as kubelet and the provisioner retry: both must succeed.
macro_rules! ok_twice {
    ($what:expr, $call:expr) => {
        for attempt in 1..=2 {
            if let Err(e) = $call.await {
                panic!("{} (attempt {attempt}): {:?} {}", $what, e.code(), e.message());
            }
        }
    };
}

/// The call the crash interrupted fails as a dropped connection does.
fn assert_transport_error(what: &str, r: Result<(), tonic::Status>) {
    match r {
        Ok(()) => panic!("{what}: the call succeeded, but the crash point should have killed the server"),
        Err(e) => assert!(
            matches!(e.code(), Code::Unavailable | Code::Unknown),
            "{what}: expected a transport error from the killed server, got {:?}: {}",
            e.code(),
            e.message()
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// What the store holds
// ---------------------------------------------------------------------------------------------

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// HEAD parses and every layer it names is on disk; `None` when the cache has no HEAD.
fn whole_head(sb: &Sandbox, name: &str) -> Option<Head> {
    let path = sb.layout().head_path(&key(name));
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    let head: Head = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("HEAD of {name} is torn ({e}): {}", String::from_utf8_lossy(&bytes)));
    for l in &head.layers {
        assert!(sb.layout().layer_dir(l).is_dir(), "HEAD of {name} v{} names missing layer {l}", head.version);
    }
    Some(head)
}

fn version(sb: &Sandbox, name: &str) -> u64 {
    whole_head(sb, name).map_or(0, |h| h.version)
}

/// Every layer a volume record pins is on disk (a pending layer may still be the volume's upper).
fn assert_pins_kept(sb: &Sandbox, what: &str) {
    let layout = sb.layout();
    for v in sb.store().volumes().expect("volume records") {
        for l in &v.base.layers {
            assert!(layout.layer_dir(l).is_dir(), "{what}: volume {} pins layer {l}, which is gone", v.id);
        }
        if let Some(p) = &v.pending {
            assert!(
                layout.layer_dir(p).is_dir() || layout.upper_dir(&v.id, v.image.as_ref()).is_dir(),
                "{what}: volume {} waits to publish layer {p}, but neither it nor the upper is there",
                v.id
            );
        }
    }
}

/// The state start-up gc must leave: no scratch or trash, no half-written files, and only layers
/// some HEAD or live volume names. `Err` says what is left.
fn collected(sb: &Sandbox) -> Result<(), String> {
    let layout = sb.layout();
    let store = sb.store();
    let mut named: HashSet<String> = HashSet::new();
    for c in store.caches().map_err(|e| e.to_string())? {
        if let Some(h) = store.head(&c).map_err(|e| e.to_string())? {
            named.extend(h.layers.iter().map(|l| l.to_string()));
        }
        // The versions a cache keeps (for rollback) name layers too.
        for v in store.versions(&c).map_err(|e| e.to_string())? {
            named.extend(v.layers.iter().map(|l| l.to_string()));
        }
        for e in fs::read_dir(layout.cache_dir(&c)).map_err(|e| e.to_string())? {
            let name = e.map_err(|e| e.to_string())?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                return Err(format!("half-written {name} left in cache {c}"));
            }
        }
    }
    for v in store.volumes().map_err(|e| e.to_string())? {
        named.extend(v.pinned().map(|l| l.to_string()));
    }
    for e in fs::read_dir(layout.layers_dir()).map_err(|e| e.to_string())? {
        let name = e.map_err(|e| e.to_string())?.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            return Err(format!("scratch layers/{name} survived gc"));
        }
        if !named.contains(name.trim_end_matches(".json")) {
            return Err(format!("layers/{name} is named by no HEAD, kept version or volume, yet survived gc"));
        }
    }
    let tmp: Vec<_> =
        fs::read_dir(layout.tmp_dir()).map_err(|e| e.to_string())?.map(|e| e.unwrap().file_name()).collect();
    if !tmp.is_empty() {
        return Err(format!("tmp/ not emptied: {tmp:?}"));
    }
    for e in fs::read_dir(layout.volumes_dir()).map_err(|e| e.to_string())? {
        let name = e.map_err(|e| e.to_string())?.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            return Err(format!("volumes/{name} survived gc"));
        }
    }
    Ok(())
}

/// Waits (up to 15 s) for the server's gc to leave the state [`collected`].
async fn assert_collected(sb: &Sandbox, server: &Server, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match collected(sb) {
            Ok(()) => return,
            Err(left) if Instant::now() > deadline => panic!("{what}: {left}\n{}", server.log_text()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Mounts below the sandbox, per mountinfo.
fn mounts(sb: &Sandbox) -> Vec<PathBuf> {
    jobcachefs::mount::info::read_mountinfo()
        .expect("mountinfo")
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(sb.dir.path()))
        .collect()
}

/// With no server left: the CLI's gc finds no volume, no mount, no scratch, only HEAD layers.
fn assert_clean(sb: &Sandbox, what: &str) {
    assert!(mounts(sb).is_empty(), "{what}: mounts left: {:?}", mounts(sb));
    let gc = sb.cli(&["cache", "gc", "--json"]);
    assert!(gc.status.success(), "{what}: {}", stderr(&gc));
    assert_eq!(fs::read_dir(sb.layout().volumes_dir()).unwrap().count(), 0, "{what}: volumes left");
    if let Err(left) = collected(sb) {
        panic!("{what}: {left}");
    }
    assert!(mounts(sb).is_empty(), "{what}: mounts left: {:?}", mounts(sb));
}

fn seed(sb: &Sandbox, name: &str) {
    let out = sb.cli(&["run", "--cache", name, "--no-maintenance", "--", "sh", "-c", "echo 0 > $JOBCACHE_DIR/v0"]);
    assert!(out.status.success(), "seed {name}: {}", stderr(&out));
    assert_eq!(version(sb, name), 1);
}

// ---------------------------------------------------------------------------------------------
// The scene: what is staged and published when the server dies
// ---------------------------------------------------------------------------------------------

/// `a`: a publishing PVC of cache `pvc` that wrote a.txt; `b`: a non-publishing PVC of `pvc`
/// that stays staged and published throughout (its pinned layers must survive everything);
/// `i`: an inline volume of cache `inl` that wrote i.txt.
struct Scene {
    a: Pvc,
    b: Pvc,
    i: Inline,
}

/// Seeds caches `pvc` and `inl` at v1 (and `old` when asked), then with a normal server stages and
/// publishes the scene; `a` is unpublished and unstaged too when `a_released`.
async fn set_scene(sb: &Sandbox, with_old: bool, a_released: bool) -> Scene {
    seed(sb, "pvc");
    seed(sb, "inl");
    if with_old {
        seed(sb, "old");
    }
    let (srv, mut c) = serve(sb, "setup", &[]).await;
    let a = create(&mut c, sb, "pvc-a", &[("cacheName", "pvc")]).await;
    ok_twice!("stage a", stage(&mut c, &a));
    ok_twice!("publish a", publish(&mut c, &a));
    assert_eq!(read(&a.target.join("v0")), "0\n");
    write(&a.target.join("a.txt"), "a");
    let b = create(&mut c, sb, "pvc-b", &[("cacheName", "pvc"), ("publish", "false")]).await;
    ok_twice!("stage b", stage(&mut c, &b));
    ok_twice!("publish b", publish(&mut c, &b));
    write(&b.target.join("b.txt"), "b");
    let i = publish_inline(&mut c, sb, 1, "inl").await;
    assert_eq!(read(&i.target.join("v0")), "0\n");
    write(&i.target.join("i.txt"), "i");
    if a_released {
        ok_twice!("unpublish a", unpublish(&mut c, a.id(), &a.target));
        ok_twice!("unstage a", unstage(&mut c, &a));
    }
    srv.stop();
    assert_eq!(version(sb, "pvc"), 1);
    assert_eq!(version(sb, "inl"), 1);
    Scene { a, b, i }
}

/// What must hold right after a crash, before any restart.
fn after_crash(sb: &Sandbox, scene: &Scene, what: &str) {
    for name in ["pvc", "inl", "old"] {
        whole_head(sb, name);
    }
    assert_pins_kept(sb, what);
    assert_eq!(read(&scene.b.target.join("v0")), "0\n", "{what}: b still reads its base through its mount");
    assert_eq!(read(&scene.b.target.join("b.txt")), "b", "{what}: b keeps what it wrote");
}

/// With a normal server after the crash: the remaining volumes come down and commit once, the
/// bystander still reads its layers, and a full lifecycle works. `a` was released if `a_released`.
async fn finish(sb: &Sandbox, c: &mut Csi, scene: &Scene, a_released: bool, what: &str) {
    let Scene { a, b, i } = scene;
    assert_eq!(read(&b.target.join("v0")), "0\n", "{what}: b reads its pinned layers after the restart");
    if !a_released {
        assert_eq!(read(&a.target.join("a.txt")), "a", "{what}: a's mount outlived the server");
        ok_twice!("unpublish a after the restart", unpublish(c, a.id(), &a.target));
        ok_twice!("unstage a after the restart", unstage(c, a));
    }
    ok_twice!("DeleteVolume a after the restart", delete(c, a.id()));
    assert_eq!(version(sb, "pvc"), 2, "{what}: a's change is committed exactly once");
    ok_twice!("NodeUnpublish inline after the restart", unpublish(c, &i.id, &i.target));
    assert!(!i.target.exists(), "{what}: NodeUnpublish removes the inline target");
    assert_eq!(version(sb, "inl"), 2, "{what}: the inline volume's change is committed exactly once");

    assert_eq!(read(&b.target.join("v0")), "0\n", "{what}: b still reads after the commits");
    ok_twice!("unpublish b", unpublish(c, b.id(), &b.target));
    ok_twice!("unstage b", unstage(c, b));
    ok_twice!("delete b", delete(c, b.id()));
    assert_eq!(version(sb, "pvc"), 2, "{what}: b may not publish");

    lifecycle(sb, c, what).await;
}

/// A new PVC and a new inline volume see every committed change and commit their own.
async fn lifecycle(sb: &Sandbox, c: &mut Csi, what: &str) {
    let before = (version(sb, "pvc"), version(sb, "inl"));
    let n = create(c, sb, "pvc-next", &[("cacheName", "pvc")]).await;
    ok_twice!("stage next", stage(c, &n));
    ok_twice!("publish next", publish(c, &n));
    assert_eq!(read(&n.target.join("v0")), "0\n", "{what}");
    assert_eq!(read(&n.target.join("a.txt")), "a", "{what}: a's change is in the cache");
    assert!(!n.target.join("b.txt").exists(), "{what}: b never published");
    write(&n.target.join("next.txt"), "next");
    ok_twice!("unpublish next", unpublish(c, n.id(), &n.target));
    ok_twice!("unstage next", unstage(c, &n));
    ok_twice!("delete next", delete(c, n.id()));
    assert_eq!(version(sb, "pvc"), before.0 + 1, "{what}: the lifecycle after the crash publishes");

    let j = publish_inline(c, sb, 2, "inl").await;
    assert_eq!(read(&j.target.join("i.txt")), "i", "{what}: the inline change is in the cache");
    write(&j.target.join("j.txt"), "j");
    ok_twice!("unpublish next inline", unpublish(c, &j.id, &j.target));
    assert_eq!(version(sb, "inl"), before.1 + 1, "{what}");
    let check = create(c, sb, "pvc-check", &[("cacheName", "pvc"), ("publish", "false")]).await;
    ok_twice!("stage check", stage(c, &check));
    assert_eq!(read(&check.staging.join("next.txt")), "next", "{what}");
    ok_twice!("unstage check", unstage(c, &check));
    ok_twice!("delete check", delete(c, check.id()));
    // A background squash may have its scratch view mounted for a moment; nothing else may remain.
    let left: Vec<_> = mounts(sb).into_iter().filter(|m| !m.starts_with(sb.layout().tmp_dir())).collect();
    assert!(left.is_empty(), "{what}: mounts left: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// Commit: a PVC's DeleteVolume and an inline volume's NodeUnpublishVolume
// ---------------------------------------------------------------------------------------------

async fn killed_in_commit(step: &str) {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let scene = set_scene(&sb, false, true).await;
    // Before the HEAD write a crash leaves the old version; after it, the new one.
    let done = ["commit.after-head", "commit.after-decision", "commit.settle-before-drop"];
    let want = if done.contains(&step) { 2 } else { 1 };

    let (mut srv, mut c) = serve_crashing(&sb, "crash-delete", &[], step).await;
    assert_transport_error(&format!("{step}: DeleteVolume"), delete(&mut c, scene.a.id()).await);
    srv.assert_killed(&format!("{step}: DeleteVolume"), Duration::from_secs(10)).await;
    after_crash(&sb, &scene, step);
    assert_eq!(version(&sb, "pvc"), want, "{step}: HEAD after a crash in DeleteVolume");
    drop(srv);

    let (mut srv, mut c) = serve_crashing(&sb, "crash-unpublish", &[], step).await;
    assert_transport_error(
        &format!("{step}: inline NodeUnpublishVolume"),
        unpublish(&mut c, &scene.i.id, &scene.i.target).await,
    );
    srv.assert_killed(&format!("{step}: inline NodeUnpublishVolume"), Duration::from_secs(10)).await;
    after_crash(&sb, &scene, step);
    assert_eq!(version(&sb, "inl"), want, "{step}: HEAD after a crash in an inline NodeUnpublish");
    assert_eq!(version(&sb, "pvc"), want, "{step}");
    drop(srv);

    let (srv, mut c) = serve(&sb, "restarted", &[]).await;
    assert_collected(&sb, &srv, &format!("{step}: start-up gc after the crash")).await;
    after_crash(&sb, &scene, step);
    finish(&sb, &mut c, &scene, true, step).await;
    srv.stop();
    assert_clean(&sb, step);
}

macro_rules! commit_crash_tests {
    ($($name:ident => $step:literal,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            killed_in_commit($step).await;
        }
    )*};
}

commit_crash_tests! {
    commit_killed_at_atomic_before_rename => "atomic.before-rename",
    commit_killed_after_pending => "commit.after-pending",
    commit_killed_after_rename => "commit.after-rename",
    commit_killed_after_layer_record => "commit.after-layer-record",
    commit_killed_before_head => "commit.before-head",
    commit_killed_after_head => "commit.after-head",
    commit_killed_after_its_decision => "commit.after-decision",
    commit_killed_before_dropping_the_volume => "commit.settle-before-drop",
}

/// A stale release killed after recording its decision: the retry finishes the same decision
/// (drops the layer, then the volume) instead of failing on the upper that is gone.
async fn stale_release_killed(step: &str) {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let scene = set_scene(&sb, false, true).await;
    // Another job commits first, so a's base (v1) is stale.
    let (srv, mut c) = serve(&sb, "newer", &[]).await;
    let x = create(&mut c, &sb, "pvc-x", &[("cacheName", "pvc")]).await;
    ok_twice!("stage x", stage(&mut c, &x));
    ok_twice!("publish x", publish(&mut c, &x));
    write(&x.target.join("x.txt"), "x");
    ok_twice!("unpublish x", unpublish(&mut c, x.id(), &x.target));
    ok_twice!("unstage x", unstage(&mut c, &x));
    ok_twice!("delete x", delete(&mut c, x.id()));
    srv.stop();
    assert_eq!(version(&sb, "pvc"), 2);

    let (mut srv, mut c) = serve_crashing(&sb, "crash-stale", &[], step).await;
    assert_transport_error(&format!("{step}: stale DeleteVolume"), delete(&mut c, scene.a.id()).await);
    srv.assert_killed(&format!("{step}: stale DeleteVolume"), Duration::from_secs(10)).await;
    drop(srv);

    let (srv, mut c) = serve(&sb, "restarted", &[]).await;
    ok_twice!("stale DeleteVolume after the restart", delete(&mut c, scene.a.id()));
    assert_eq!(version(&sb, "pvc"), 2, "{step}: a stale change never advances HEAD");
    assert_collected(&sb, &srv, &format!("{step}: the stale layer is collected")).await;
    let check = create(&mut c, &sb, "pvc-check", &[("cacheName", "pvc"), ("publish", "false")]).await;
    ok_twice!("stage check", stage(&mut c, &check));
    assert_eq!(read(&check.staging.join("x.txt")), "x", "{step}: the newer version is intact");
    assert!(!check.staging.join("a.txt").exists(), "{step}: the stale change is not in the cache");
    ok_twice!("unstage check", unstage(&mut c, &check));
    ok_twice!("delete check", delete(&mut c, check.id()));
    srv.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_release_killed_after_its_decision() {
    stale_release_killed("commit.after-decision").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_release_killed_before_dropping_the_volume() {
    stale_release_killed("commit.settle-before-drop").await;
}

// ---------------------------------------------------------------------------------------------
// Background squash past --max-depth
// ---------------------------------------------------------------------------------------------

async fn killed_in_squash(step: &str) {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let scene = set_scene(&sb, false, true).await;
    let deep = ["--max-depth", "1"];
    let v1 = whole_head(&sb, "pvc").expect("v1");

    // The commit makes `pvc` two layers deep; the squash it starts in the background dies.
    let (mut srv, mut c) = serve_crashing(&sb, "crash-squash", &deep, step).await;
    let deleted = delete(&mut c, scene.a.id()).await;
    srv.assert_killed(&format!("{step}: background squash"), Duration::from_secs(15)).await;
    if let Err(e) = &deleted {
        // The squash may kill the server before the DeleteVolume answer goes out; then it is retried.
        assert_transport_error(&format!("{step}: DeleteVolume"), Err(e.clone()));
    }
    after_crash(&sb, &scene, step);
    let head = whole_head(&sb, "pvc").expect("HEAD");
    assert_eq!(head.version, 2, "{step}: the commit landed; a squash never changes the version");
    assert_eq!(head.layers.len(), 2, "{step}: the squash died before its HEAD write: {head:?}");
    assert!(head.layers.starts_with(&v1.layers), "{step}: {head:?}");
    drop(srv);

    let (srv, mut c) = serve(&sb, "restarted", &deep).await;
    assert_collected(&sb, &srv, &format!("{step}: start-up gc after the crash")).await;
    after_crash(&sb, &scene, step);
    assert_eq!(whole_head(&sb, "pvc").expect("HEAD"), head, "{step}: gc leaves HEAD alone");
    assert!(mounts(&sb).iter().all(|m| !m.starts_with(&sb.state)), "{step}: squash view left: {:?}", mounts(&sb));

    // b pins v1's layer: a squash that completes now must not take it from b.
    let n = create(&mut c, &sb, "pvc-deeper", &[("cacheName", "pvc")]).await;
    ok_twice!("stage deeper", stage(&mut c, &n));
    assert_eq!(read(&n.staging.join("a.txt")), "a", "{step}: a's change is in the cache");
    write(&n.staging.join("deeper.txt"), "deeper");
    ok_twice!("unstage deeper", unstage(&mut c, &n));
    ok_twice!("delete deeper", delete(&mut c, n.id()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let squashed = loop {
        let h = whole_head(&sb, "pvc").expect("HEAD");
        if h.layers.len() == 1 {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "{step}: a squash after the restart never completed: {h:?}\n{}",
            srv.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(squashed.version, 3, "{step}");
    assert_collected(&sb, &srv, &format!("{step}: gc after the squash")).await;
    for l in &v1.layers {
        assert!(sb.layout().layer_dir(l).is_dir(), "{step}: layer {l} pinned by b was collected");
    }
    assert_eq!(read(&scene.b.target.join("v0")), "0\n", "{step}: b still reads its pinned layers");

    finish_after_squash(&sb, &mut c, &scene, step).await;
    srv.stop();
    assert_clean(&sb, step);
}

/// `a` is already committed here: only the inline volume and b remain, then a lifecycle.
async fn finish_after_squash(sb: &Sandbox, c: &mut Csi, scene: &Scene, what: &str) {
    let Scene { a, b, i } = scene;
    ok_twice!("DeleteVolume a again", delete(c, a.id()));
    assert_eq!(version(sb, "pvc"), 3, "{what}: a repeated DeleteVolume commits nothing twice");
    ok_twice!("NodeUnpublish inline after the restart", unpublish(c, &i.id, &i.target));
    assert_eq!(version(sb, "inl"), 2, "{what}");
    ok_twice!("unpublish b", unpublish(c, b.id(), &b.target));
    ok_twice!("unstage b", unstage(c, b));
    ok_twice!("delete b", delete(c, b.id()));
    lifecycle(sb, c, what).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squash_killed_after_copy() {
    killed_in_squash("squash.after-copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squash_killed_after_layer() {
    killed_in_squash("squash.after-layer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squash_killed_before_head() {
    killed_in_squash("squash.before-head").await;
}

// ---------------------------------------------------------------------------------------------
// Garbage collection at start-up, and eviction
// ---------------------------------------------------------------------------------------------

/// Debris of earlier crashes and a cache removed by hand, for gc to collect.
fn plant_orphans(sb: &Sandbox) -> Vec<PathBuf> {
    let layout = sb.layout();
    let rm = sb.cli(&["cache", "rm", "old"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    let mut planted = Vec::new();
    for dir in [
        layout.layers_dir().join("orphan01"),
        layout.layers_dir().join(".incoming-orphan02"),
        layout.layers_dir().join(".squash-orphan03"),
        layout.layers_dir().join(".trash-orphan04"),
        layout.volumes_dir().join(".trash-orphan05"),
        layout.tmp_dir().join("trash-orphan06"),
    ] {
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/file"), "x").unwrap();
        planted.push(dir);
    }
    let tmp = layout.cache_dir(&key("pvc")).join(".head.json.orphan07.tmp");
    fs::write(&tmp, "{\"version\": 9, \"lay").unwrap();
    planted.push(tmp);
    planted
}

async fn killed_in_gc(step: &str) {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let scene = set_scene(&sb, true, false).await;
    let old_layers = whole_head(&sb, "old").expect("old").layers;
    let planted = plant_orphans(&sb);

    // The start-up gc dies.
    let mut srv = spawn(&sb, "crash-gc", &[], Some(step), true).await;
    srv.assert_killed(&format!("{step}: start-up gc"), Duration::from_secs(10)).await;
    after_crash(&sb, &scene, step);
    assert_eq!((version(&sb, "pvc"), version(&sb, "inl")), (1, 1), "{step}");
    assert_eq!(read(&scene.a.target.join("a.txt")), "a", "{step}: a's mount outlived the server");
    assert_eq!(read(&scene.i.target.join("i.txt")), "i", "{step}: the inline mount outlived the server");
    drop(srv);

    let (srv, mut c) = serve(&sb, "restarted", &[]).await;
    assert_collected(&sb, &srv, &format!("{step}: start-up gc after the crash")).await;
    for p in &planted {
        assert!(!p.exists(), "{step}: {} survived the start-up gc", p.display());
    }
    for l in &old_layers {
        assert!(!sb.layout().layer_dir(l).exists(), "{step}: removed cache's layer {l} survived");
    }
    after_crash(&sb, &scene, step);
    finish(&sb, &mut c, &scene, false, step).await;
    srv.stop();
    assert_clean(&sb, step);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_killed_after_scan() {
    killed_in_gc("gc.after-scan").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_killed_after_trash() {
    killed_in_gc("gc.after-trash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_killed_before_remove() {
    if !can_mount() {
        return;
    }
    let step = "evict.before-remove";
    let sb = Sandbox::new();
    let scene = set_scene(&sb, true, false).await;
    let old = whole_head(&sb, "old").expect("old");
    let evicting = ["--max-idle", "1s", "--gc-interval", "200ms"];

    // `old` has no volume and goes idle after a second: the periodic gc evicts it, and dies.
    let mut srv = spawn(&sb, "crash-evict", &evicting, Some(step), true).await;
    srv.assert_killed(&format!("{step}: eviction"), Duration::from_secs(15)).await;
    after_crash(&sb, &scene, step);
    assert_eq!(whole_head(&sb, "old").as_ref(), Some(&old), "{step}: killed before the HEAD was removed");
    assert_eq!((version(&sb, "pvc"), version(&sb, "inl")), (1, 1), "{step}: caches in use are never evicted");
    drop(srv);

    // Restarted with the same flags, the eviction completes; caches with live volumes stay.
    let srv = spawn(&sb, "restarted-evicting", &evicting, None, false).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while whole_head(&sb, "old").is_some() {
        assert!(Instant::now() < deadline, "{step}: old was never evicted after the restart\n{}", srv.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_collected(&sb, &srv, &format!("{step}: gc after the eviction")).await;
    for l in &old.layers {
        assert!(!sb.layout().layer_dir(l).exists(), "{step}: evicted cache's layer {l} survived");
    }
    after_crash(&sb, &scene, step);
    assert_eq!((version(&sb, "pvc"), version(&sb, "inl")), (1, 1), "{step}: caches in use are never evicted");
    srv.stop();

    let (srv, mut c) = serve(&sb, "restarted", &[]).await;
    assert_collected(&sb, &srv, step).await;
    finish(&sb, &mut c, &scene, false, step).await;
    srv.stop();
    assert_clean(&sb, step);
}

// ---------------------------------------------------------------------------------------------
// Volume records written by the node and controller calls
// ---------------------------------------------------------------------------------------------

/// CreateVolume, NodeStageVolume and NodeUnstageVolume write volume records; a crash before the
/// rename of each leaves a volume the next server can still use (or, for a create, re-create).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_writing_volume_records_in_node_calls() {
    if !can_mount() {
        return;
    }
    let step = "atomic.before-rename";
    let sb = Sandbox::new();
    let scene = set_scene(&sb, false, false).await;

    // NodeUnstageVolume records the unmount after doing it.
    let (srv, mut c) = serve(&sb, "unpublish-a", &[]).await;
    ok_twice!("unpublish a", unpublish(&mut c, scene.a.id(), &scene.a.target));
    srv.stop();
    let (mut srv, mut c) = serve_crashing(&sb, "crash-unstage", &[], step).await;
    assert_transport_error("NodeUnstageVolume", unstage(&mut c, &scene.a).await);
    srv.assert_killed("NodeUnstageVolume", Duration::from_secs(10)).await;
    after_crash(&sb, &scene, "NodeUnstageVolume");
    drop(srv);

    // CreateVolume dies before its record exists.
    let (mut srv, mut c) = serve_crashing(&sb, "crash-create", &[], step).await;
    let req = pb::CreateVolumeRequest {
        name: "pvc-new".into(),
        volume_capabilities: vec![writer()],
        parameters: map(&[("cacheName", "pvc")]),
        ..Default::default()
    };
    assert_transport_error("CreateVolume", c.controller.create_volume(req).await.map(drop));
    srv.assert_killed("CreateVolume", Duration::from_secs(10)).await;
    after_crash(&sb, &scene, "CreateVolume");
    drop(srv);

    let (srv, mut c) = serve(&sb, "restarted", &[]).await;
    assert_collected(&sb, &srv, "start-up gc after the crashes").await;
    // The volume created half-way is created again, whole, and works.
    let n = create(&mut c, &sb, "pvc-new", &[("cacheName", "pvc")]).await;
    ok_twice!("stage new", stage(&mut c, &n));
    ok_twice!("publish new", publish(&mut c, &n));
    assert_eq!(read(&n.target.join("v0")), "0\n");
    write(&n.target.join("new.txt"), "new");
    ok_twice!("unpublish new", unpublish(&mut c, n.id(), &n.target));
    ok_twice!("unstage new", unstage(&mut c, &n));

    ok_twice!("unstage a after the restart", unstage(&mut c, &scene.a));
    finish_records(&sb, &mut c, &scene, &n).await;
    srv.stop();
    assert_clean(&sb, step);
}

async fn finish_records(sb: &Sandbox, c: &mut Csi, scene: &Scene, n: &Pvc) {
    finish(sb, c, scene, true, "records").await;
    // pvc-new started from v1 and is stale now: deleting it publishes nothing and loses nothing.
    let before = version(sb, "pvc");
    ok_twice!("delete new", delete(c, n.id()));
    assert_eq!(version(sb, "pvc"), before, "a stale volume never rolls the cache back");
}
