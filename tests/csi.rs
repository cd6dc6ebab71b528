//! The CSI API over a real unix socket, as kubelet, the external-provisioner and csi-sanity call it.
//!
//! Each test starts `jobcachefs serve` on its own sandbox (state dir, socket, staging and target
//! dirs) and talks to it with the generated tonic clients. Argument checks are tables of
//! (case, request, expected code, word the message must name); lifecycle tests make every call
//! twice, because kubelet and the provisioner retry, and assert what a user sees: codes,
//! messages, files in mounts and the cache's version.
//!
//! Coverage follows kubernetes-csi/csi-test `pkg/sanity` (identity.go, controller.go, node.go) for
//! the capabilities we advertise: CONTROLLER_SERVICE + VOLUME_ACCESSIBILITY_CONSTRAINTS,
//! CREATE_DELETE_VOLUME, STAGE_UNSTAGE_VOLUME and GET_VOLUME_STATS.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use jobcachefs::csi::pb;
use jobcachefs::mount::{info, MountEntry, Mounter, SysMounter};
use pb::controller_client::ControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use pb::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::{Code, Status};

const NODE: &str = "node-a";
const TOPOLOGY_KEY: &str = "jobcachefs.dev/node";
const MIB: i64 = 1024 * 1024;
const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";

// ---------------------------------------------------------------------------------------------
// The server process and its clients
// ---------------------------------------------------------------------------------------------

/// A running `jobcachefs serve`; stopped with SIGTERM when dropped.
struct Server {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts the server on the sandbox's state dir and `<sandbox>/csi.sock` and waits until it
    /// accepts connections.
    async fn start(sb: &Sandbox, extra: &[&str]) -> Self {
        let socket = sb.dir.path().join("csi.sock");
        let log = sb.dir.path().join("server.log");
        let file = fs::OpenOptions::new().create(true).append(true).open(&log).expect("server log");
        let child = Command::new(env!("CARGO_BIN_EXE_jobcachefs"))
            .arg("--state-dir")
            .arg(&sb.state)
            .args(["--log-level", "info", "serve", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", NODE])
            .arg("--kubelet-dir")
            .arg(sb.dir.path())
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("server log"))
            .stderr(file)
            .spawn()
            .expect("start jobcachefs serve");
        let mut server = Self { child: Some(child), socket, log };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().expect("try_wait") {
                panic!("jobcachefs serve exited at start with {status}:\n{}", self.log_text());
            }
            if self.socket.exists() && std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no socket at {} after 30s:\n{}",
                self.socket.display(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    async fn connect(&self) -> Csi {
        let path = self.socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await
            .expect("connect to the CSI socket");
        Csi {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    /// SIGTERM, then wait (bounded) for the process to exit.
    async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("jobcachefs serve did not exit within 20s of SIGTERM:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            eprintln!("---- jobcachefs serve log ----\n{}\n---- end of log ----", self.log_text());
        }
    }
}

/// The three CSI services on one connection.
#[derive(Clone)]
struct Csi {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

// ---------------------------------------------------------------------------------------------
// Calling and judging
// ---------------------------------------------------------------------------------------------

/// Makes the same call twice and asserts both answers agree (same response, or same code);
/// evaluates to the first answer.
macro_rules! twice {
    ($client:expr, $method:ident, $req:expr) => {{
        let req = $req;
        let first = $client.$method(req.clone()).await.map(tonic::Response::into_inner);
        let second = $client.$method(req).await.map(tonic::Response::into_inner);
        same(stringify!($method), first, second)
    }};
}

/// Like `twice!` for reads whose numbers move with the filesystem (free space): both calls must
/// answer with the same code; evaluates to the second answer.
macro_rules! twice_code {
    ($client:expr, $method:ident, $req:expr) => {{
        let req = $req;
        let first = $client.$method(req.clone()).await.map(tonic::Response::into_inner);
        let second = $client.$method(req).await.map(tonic::Response::into_inner);
        let code = |r: &Result<_, Status>| r.as_ref().err().map_or(Code::Ok, Status::code);
        assert_eq!(
            code(&first),
            code(&second),
            "{}: the repeated call must answer the same: {first:?} then {second:?}",
            stringify!($method)
        );
        second
    }};
}

fn same<T: PartialEq + Debug>(what: &str, a: Result<T, Status>, b: Result<T, Status>) -> Result<T, Status> {
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!(x, y, "{what}: the repeated call must answer the same"),
        (Err(x), Err(y)) => assert_eq!(
            x.code(),
            y.code(),
            "{what}: the repeated call must answer the same ({:?} then {:?})",
            x.message(),
            y.message()
        ),
        _ => panic!("{what}: first call answered {a:?}, the repeated call {b:?}"),
    }
    a
}

/// The response, or a panic naming the call, the code and the message.
#[track_caller]
fn ok<T>(what: &str, r: Result<T, Status>) -> T {
    match r {
        Ok(v) => v,
        Err(s) => panic!("{what}: expected OK, got {:?}: {}", s.code(), s.message()),
    }
}

/// Lower case without `_`, ` `, `-`, so "volume_id", "volume id" and "volumeId" all match.
fn squash(s: &str) -> String {
    s.to_lowercase().chars().filter(|c| !matches!(c, '_' | ' ' | '-')).collect()
}

/// Asserts the answer's code and, for an error, that its message names `needle`.
#[track_caller]
fn expect_code<T: Debug>(what: &str, r: &Result<T, Status>, code: Code, needle: &str) {
    match r {
        Ok(v) if code == Code::Ok => {
            let _ = v;
        }
        Ok(v) => panic!("{what}: expected {code:?}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: expected {code:?}, got {:?}: {}", s.code(), s.message());
            assert!(!s.message().is_empty(), "{what}: a {code:?} answer must say why");
            assert!(
                squash(s.message()).contains(&squash(needle)),
                "{what}: the message must name {needle:?}: {}",
                s.message()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

fn mount_cap(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(pb::volume_capability::MountVolume::default())),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

fn block_cap(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(pb::volume_capability::BlockVolume::default())),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

fn writer() -> pb::VolumeCapability {
    mount_cap(Mode::SingleNodeWriter)
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn create_req(name: &str, params: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_string(),
        volume_capabilities: vec![writer()],
        parameters: map(params),
        ..Default::default()
    }
}

fn capacity(required: i64, limit: i64) -> Option<pb::CapacityRange> {
    Some(pb::CapacityRange { required_bytes: required, limit_bytes: limit })
}

fn stage_req(vol: &pb::Volume, staging: &Path) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path_str(staging),
        volume_capability: Some(writer()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

fn unstage_req(vol: &pb::Volume, staging: &Path) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest { volume_id: vol.volume_id.clone(), staging_target_path: path_str(staging) }
}

fn publish_req(vol: &pb::Volume, staging: &Path, target: &Path, readonly: bool) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path_str(staging),
        target_path: path_str(target),
        volume_capability: Some(writer()),
        readonly,
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    }
}

fn unpublish_req(volume_id: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest { volume_id: volume_id.to_string(), target_path: path_str(target) }
}

fn stats_req(volume_id: &str, path: &str) -> pb::NodeGetVolumeStatsRequest {
    pb::NodeGetVolumeStatsRequest {
        volume_id: volume_id.to_string(),
        volume_path: path.to_string(),
        ..Default::default()
    }
}

fn delete_req(volume_id: &str) -> pb::DeleteVolumeRequest {
    pb::DeleteVolumeRequest { volume_id: volume_id.to_string(), ..Default::default() }
}

/// An inline ephemeral volume as kubelet asks for it: no staging path, pod metadata in the context.
fn inline_req(volume_id: &str, target: &Path, namespace: &str, attrs: &[(&str, &str)]) -> pb::NodePublishVolumeRequest {
    let mut ctx = map(&[
        (EPHEMERAL, "true"),
        (POD_NAMESPACE, namespace),
        ("csi.storage.k8s.io/pod.name", "build-1"),
        ("csi.storage.k8s.io/pod.uid", "0d9c4c1e-3f6a-4b7e-9a51-5b2f3c8f7a10"),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
    ]);
    ctx.extend(map(attrs));
    pb::NodePublishVolumeRequest {
        volume_id: volume_id.to_string(),
        target_path: path_str(target),
        volume_capability: Some(writer()),
        volume_context: ctx,
        ..Default::default()
    }
}

/// A volume id shaped like kubelet's for inline volumes: "csi-" and a sha256 in hex (68 chars).
fn kubelet_id(n: u8) -> String {
    format!("csi-{n:02x}{}", "5e".repeat(31))
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

// ---------------------------------------------------------------------------------------------
// What a user sees
// ---------------------------------------------------------------------------------------------

/// The cache's HEAD version per `jobcachefs cache show --json` (0: no version yet).
fn version(sb: &Sandbox, namespace: &str, name: &str) -> u64 {
    let out = sb.cli(&["cache", "show", name, "--namespace", namespace, "--json"]);
    assert!(out.status.success(), "cache show {namespace}/{name}: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("cache show prints JSON");
    v["version"].as_u64().unwrap_or_else(|| panic!("no version in {v}"))
}

/// This process's mounts at exactly `path`.
fn mounts_at(path: &Path) -> Vec<MountEntry> {
    info::read_mountinfo().expect("mountinfo").into_iter().filter(|m| m.mount_point == path).collect()
}

#[track_caller]
fn assert_one_mount(path: &Path, what: &str) -> MountEntry {
    let mut at = mounts_at(path);
    assert_eq!(at.len(), 1, "{what}: exactly one mount at {}: {at:?}", path.display());
    at.pop().expect("one")
}

#[track_caller]
fn assert_not_mounted(path: &Path, what: &str) {
    let at = mounts_at(path);
    assert!(at.is_empty(), "{what}: nothing mounted at {}: {at:?}", path.display());
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// Identity, capabilities, node info
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_capabilities_and_node_info() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let meta = fs::metadata(&srv.socket).expect("socket");
    assert!(meta.file_type().is_socket(), "the endpoint is a unix socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "only root may talk to the driver");
    let mut c = srv.connect().await;

    let info = ok("GetPluginInfo", twice!(c.identity, get_plugin_info, pb::GetPluginInfoRequest {}));
    assert_eq!(info.name, "jobcachefs.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    // csi-sanity: at most 63 characters, a domain-like name.
    assert!(info.name.len() <= 63);
    assert!(info.name.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_')));

    let caps =
        ok("GetPluginCapabilities", twice!(c.identity, get_plugin_capabilities, pb::GetPluginCapabilitiesRequest {}));
    let services: BTreeSet<i32> = caps
        .capabilities
        .iter()
        .map(|cap| match &cap.r#type {
            Some(pb::plugin_capability::Type::Service(s)) => s.r#type,
            #[allow(unreachable_patterns)]
            other => panic!("only service capabilities are advertised, got {other:?}"),
        })
        .collect();
    let want: BTreeSet<i32> = [
        pb::plugin_capability::service::Type::ControllerService as i32,
        pb::plugin_capability::service::Type::VolumeAccessibilityConstraints as i32,
    ]
    .into();
    assert_eq!(services, want, "plugin capabilities");

    let probe = ok("Probe", twice!(c.identity, probe, pb::ProbeRequest {}));
    assert_eq!(probe.ready, Some(true), "a started driver is ready");

    let caps = ok(
        "ControllerGetCapabilities",
        twice!(c.controller, controller_get_capabilities, pb::ControllerGetCapabilitiesRequest {}),
    );
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .map(|cap| match &cap.r#type {
            Some(pb::controller_service_capability::Type::Rpc(r)) => r.r#type,
            #[allow(unreachable_patterns)]
            other => panic!("controller capabilities are RPCs, got {other:?}"),
        })
        .collect();
    use pb::controller_service_capability::rpc::Type as Rpc;
    let want: Vec<i32> = [
        Rpc::CreateDeleteVolume,
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::CloneVolume,
        Rpc::GetCapacity,
        Rpc::ListVolumes,
        Rpc::ListVolumesPublishedNodes,
        Rpc::VolumeCondition,
    ]
    .iter()
    .map(|t| *t as i32)
    .collect();
    assert_eq!(rpcs, want, "only what csi-sanity's allowed list holds, and what is served");

    let caps = ok("NodeGetCapabilities", twice!(c.node, node_get_capabilities, pb::NodeGetCapabilitiesRequest {}));
    let rpcs: BTreeSet<i32> = caps
        .capabilities
        .iter()
        .map(|cap| match &cap.r#type {
            Some(pb::node_service_capability::Type::Rpc(r)) => r.r#type,
            #[allow(unreachable_patterns)]
            other => panic!("node capabilities are RPCs, got {other:?}"),
        })
        .collect();
    let want: BTreeSet<i32> = [
        pb::node_service_capability::rpc::Type::StageUnstageVolume as i32,
        pb::node_service_capability::rpc::Type::GetVolumeStats as i32,
        pb::node_service_capability::rpc::Type::VolumeMountGroup as i32,
        pb::node_service_capability::rpc::Type::VolumeCondition as i32,
    ]
    .into();
    assert_eq!(rpcs, want, "node capabilities");

    let info = ok("NodeGetInfo", twice!(c.node, node_get_info, pb::NodeGetInfoRequest {}));
    assert_eq!(info.node_id, NODE);
    assert!(info.max_volumes_per_node >= 0, "csi-sanity: max_volumes_per_node is not negative");
    let topo = info.accessible_topology.expect("VOLUME_ACCESSIBILITY_CONSTRAINTS: NodeGetInfo names the topology");
    assert_eq!(topo.segments, map(&[(TOPOLOGY_KEY, NODE)]));
}

// ---------------------------------------------------------------------------------------------
// Controller
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_checks_its_arguments() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;

    let name = "pvc-7d3c1f52-0b7e-4d56-9f39-2a8b8c3c6e01";
    let base = || create_req(name, &[("cacheName", "m2")]);
    let with = |params: &[(&str, &str)]| create_req(name, params);
    let caps = |caps: Vec<pb::VolumeCapability>| pb::CreateVolumeRequest { volume_capabilities: caps, ..base() };
    // Far beyond the filesystem holding any test machine's state dir.
    let huge = 1i64 << 60;
    let cases: Vec<(&str, pb::CreateVolumeRequest, Code, &str)> = vec![
        ("no name", pb::CreateVolumeRequest { name: String::new(), ..base() }, Code::InvalidArgument, "name"),
        ("no capabilities", caps(vec![]), Code::InvalidArgument, "capabilit"),
        ("block access", caps(vec![block_cap(Mode::SingleNodeWriter)]), Code::InvalidArgument, ""),
        (
            "block among mount capabilities",
            caps(vec![writer(), block_cap(Mode::SingleNodeWriter)]),
            Code::InvalidArgument,
            "",
        ),
        ("multi-node reader only", caps(vec![mount_cap(Mode::MultiNodeReaderOnly)]), Code::InvalidArgument, ""),
        ("multi-node single writer", caps(vec![mount_cap(Mode::MultiNodeSingleWriter)]), Code::InvalidArgument, ""),
        ("multi-node multi writer", caps(vec![mount_cap(Mode::MultiNodeMultiWriter)]), Code::InvalidArgument, ""),
        ("no cacheName", with(&[("publish", "true")]), Code::InvalidArgument, "cacheName"),
        ("no parameters at all", with(&[]), Code::InvalidArgument, "cacheName"),
        ("cacheName not a name", with(&[("cacheName", "Maven Repo!")]), Code::InvalidArgument, "cacheName"),
        ("cacheName with ..", with(&[("cacheName", "../etc")]), Code::InvalidArgument, "cacheName"),
        ("publish not a bool", with(&[("cacheName", "m2"), ("publish", "yes")]), Code::InvalidArgument, "publish"),
        (
            "publishWhen unknown",
            with(&[("cacheName", "m2"), ("publishWhen", "sometimes")]),
            Code::InvalidArgument,
            "publishWhen",
        ),
        (
            "ignoreCache not a bool",
            with(&[("cacheName", "m2"), ("ignoreCache", "1")]),
            Code::InvalidArgument,
            "ignoreCache",
        ),
        ("onStale unknown", with(&[("cacheName", "m2"), ("onStale", "merge")]), Code::InvalidArgument, "onStale"),
        (
            "fallbackCaches with a bad name",
            with(&[("cacheName", "m2"), ("fallbackCaches", "main,Not/Allowed")]),
            Code::InvalidArgument,
            "fallbackCaches",
        ),
        ("maxBytes not a size", with(&[("cacheName", "m2"), ("maxBytes", "lots")]), Code::InvalidArgument, "maxBytes"),
        ("unknown parameter", with(&[("cacheName", "m2"), ("colour", "blue")]), Code::InvalidArgument, "colour"),
        (
            "limit below required",
            pb::CreateVolumeRequest { capacity_range: capacity(2 * MIB, MIB), ..base() },
            Code::InvalidArgument,
            "limit",
        ),
        (
            "required beyond the node's disk",
            pb::CreateVolumeRequest { capacity_range: capacity(huge, 0), ..base() },
            Code::OutOfRange,
            "",
        ),
    ];
    for (case, req, code, needle) in cases {
        let r = twice!(c.controller, create_volume, req);
        expect_code(&format!("CreateVolume {case}"), &r, code, needle);
    }

    // None of the refused requests left a volume behind under that name.
    let vol = ok("CreateVolume after refusals", twice!(c.controller, create_volume, base())).volume.expect("volume");
    assert!(!vol.volume_id.is_empty());

    // Everything valid at once; metadata keys from the provisioner are accepted, not echoed as ours.
    let all = [
        ("cacheName", "m2"),
        ("publish", "true"),
        ("publishWhen", "on-change"),
        ("ignoreCache", "false"),
        ("onStale", "stack"),
        ("fallbackCaches", "main,release-1.x"),
        ("maxBytes", "500MiB"),
        (PVC_NAMESPACE, "team-a"),
        ("csi.storage.k8s.io/pvc/name", "maven"),
        ("csi.storage.k8s.io/pv/name", "pvc-1"),
    ];
    let vol = ok("CreateVolume all parameters", twice!(c.controller, create_volume, create_req("pvc-all", &all)))
        .volume
        .expect("volume");
    for (k, v) in &all[..7] {
        assert_eq!(vol.volume_context.get(*k).map(String::as_str), Some(*v), "context echoes {k}: {vol:?}");
    }
    assert_eq!(vol.volume_context.get("namespace").map(String::as_str), Some("team-a"), "{vol:?}");

    for (case, params) in [
        ("maxBytes in bytes", vec![("cacheName", "m2"), ("maxBytes", "1048576")]),
        ("publishWhen always", vec![("cacheName", "m2"), ("publishWhen", "always")]),
        ("publishWhen on-success", vec![("cacheName", "m2"), ("publishWhen", "on-success")]),
        ("publish false", vec![("cacheName", "m2"), ("publish", "false")]),
        ("ignoreCache true", vec![("cacheName", "m2"), ("ignoreCache", "true")]),
        ("onStale skip", vec![("cacheName", "m2"), ("onStale", "skip")]),
    ] {
        let r = twice!(c.controller, create_volume, create_req(&format!("pvc-{}", case.replace(' ', "-")), &params));
        let vol = ok(&format!("CreateVolume {case}"), r).volume.expect("volume");
        for (k, v) in &params {
            assert_eq!(vol.volume_context.get(*k).map(String::as_str), Some(*v), "{case}: context echoes {k}");
        }
    }

    // csi-sanity: a 128-character name works and maps to a usable id.
    let long = format!("sanity-controller-create-maxlen-{}", "x".repeat(128 - 32));
    assert_eq!(long.len(), 128);
    let vol = ok(
        "CreateVolume max-length name",
        twice!(c.controller, create_volume, create_req(&long, &[("cacheName", "m2")])),
    )
    .volume
    .expect("volume");
    assert!(!vol.volume_id.is_empty() && vol.volume_id.len() <= 128, "volume id {:?}", vol.volume_id);

    // Capacity granted: required, else limit, else 0.
    for (case, range, granted) in [
        ("required only", capacity(MIB, 0), MIB),
        ("limit only", capacity(0, 2 * MIB), 2 * MIB),
        ("required and limit", capacity(MIB, 4 * MIB), MIB),
        ("required equals limit", capacity(3 * MIB, 3 * MIB), 3 * MIB),
        ("empty range", capacity(0, 0), 0),
        ("no range", None, 0),
    ] {
        let req = pb::CreateVolumeRequest {
            capacity_range: range,
            ..create_req(&format!("pvc-cap-{}", case.replace(' ', "-")), &[("cacheName", "m2")])
        };
        let vol = ok(&format!("CreateVolume {case}"), twice!(c.controller, create_volume, req)).volume.expect("volume");
        assert_eq!(vol.capacity_bytes, granted, "{case}");
    }

    // csi-sanity "Node Service should work": the node's topology as a requirement is honoured.
    let topo = pb::Topology { segments: map(&[(TOPOLOGY_KEY, NODE)]) };
    let req = pb::CreateVolumeRequest {
        accessibility_requirements: Some(pb::TopologyRequirement {
            requisite: vec![topo.clone()],
            preferred: vec![topo.clone()],
        }),
        ..create_req("pvc-topology", &[("cacheName", "m2")])
    };
    let vol = ok("CreateVolume with topology", twice!(c.controller, create_volume, req)).volume.expect("volume");
    assert_eq!(vol.accessible_topology, vec![topo]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_is_idempotent_by_name() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;

    let name = "pvc-0f6f1a9e-4d0b-4c43-8a5e-3c3d8f1a2b77";
    let req = pb::CreateVolumeRequest { capacity_range: capacity(MIB, 0), ..create_req(name, &[("cacheName", "m2")]) };
    let first = ok("CreateVolume", twice!(c.controller, create_volume, req.clone())).volume.expect("volume");
    assert!(!first.volume_id.is_empty(), "a volume id");
    assert_eq!(first.capacity_bytes, MIB);
    assert_eq!(first.volume_context.get("cacheName").map(String::as_str), Some("m2"), "{first:?}");
    assert_eq!(first.volume_context.get("namespace").map(String::as_str), Some("default"), "{first:?}");
    assert_eq!(first.accessible_topology, vec![pb::Topology { segments: map(&[(TOPOLOGY_KEY, NODE)]) }]);

    let incompatible: Vec<(&str, pb::CreateVolumeRequest)> = vec![
        ("another capacity", pb::CreateVolumeRequest { capacity_range: capacity(2 * MIB, 0), ..req.clone() }),
        (
            "another capacity, required = limit (csi-sanity)",
            pb::CreateVolumeRequest { capacity_range: capacity(2 * MIB, 2 * MIB), ..req.clone() },
        ),
        ("no capacity", pb::CreateVolumeRequest { capacity_range: None, ..req.clone() }),
        ("another cache", pb::CreateVolumeRequest { parameters: map(&[("cacheName", "npm")]), ..req.clone() }),
        (
            "another publish policy",
            pb::CreateVolumeRequest { parameters: map(&[("cacheName", "m2"), ("publish", "false")]), ..req.clone() },
        ),
        (
            "another namespace",
            pb::CreateVolumeRequest {
                parameters: map(&[("cacheName", "m2"), (PVC_NAMESPACE, "team-b")]),
                ..req.clone()
            },
        ),
    ];
    for (case, r) in incompatible {
        let got = twice!(c.controller, create_volume, r);
        expect_code(&format!("CreateVolume same name, {case}"), &got, Code::AlreadyExists, "");
    }
    let again = ok("CreateVolume original again", twice!(c.controller, create_volume, req.clone())).volume;
    assert_eq!(again.as_ref(), Some(&first), "the refusals changed nothing");

    let other = ok(
        "CreateVolume another name",
        twice!(c.controller, create_volume, create_req("pvc-other", &[("cacheName", "m2")])),
    )
    .volume
    .expect("volume");
    assert_ne!(other.volume_id, first.volume_id, "names map to distinct ids");

    // Deterministic per name: deleting and creating again gives the same id.
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&other.volume_id)));
    let recreated = ok(
        "CreateVolume recreated",
        twice!(c.controller, create_volume, create_req("pvc-other", &[("cacheName", "m2")])),
    )
    .volume
    .expect("volume");
    assert_eq!(recreated.volume_id, other.volume_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_and_validate_capabilities() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;
    let vol =
        ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-validate", &[("cacheName", "m2")])))
            .volume
            .expect("volume");

    let validate = |id: &str, caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
        volume_id: id.to_string(),
        volume_capabilities: caps,
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    };
    let cases: Vec<(&str, pb::ValidateVolumeCapabilitiesRequest, Code, &str)> = vec![
        ("no volume_id", validate("", vec![writer()]), Code::InvalidArgument, "volume_id"),
        ("no capabilities", validate(&vol.volume_id, vec![]), Code::InvalidArgument, "capabilit"),
        ("unknown volume", validate("pvc-00000000-dead-beef-0000-000000000000", vec![writer()]), Code::NotFound, ""),
    ];
    for (case, req, code, needle) in cases {
        let r = twice!(c.controller, validate_volume_capabilities, req);
        expect_code(&format!("ValidateVolumeCapabilities {case}"), &r, code, needle);
    }

    for (case, caps) in [
        ("single-node writer", vec![writer()]),
        ("single-node reader", vec![mount_cap(Mode::SingleNodeReaderOnly)]),
        ("both", vec![writer(), mount_cap(Mode::SingleNodeReaderOnly)]),
    ] {
        let r = ok(
            &format!("ValidateVolumeCapabilities {case}"),
            twice!(c.controller, validate_volume_capabilities, validate(&vol.volume_id, caps.clone())),
        );
        let confirmed = r.confirmed.unwrap_or_else(|| panic!("{case}: confirmed, not {:?}", r.message));
        assert_eq!(confirmed.volume_capabilities, caps, "{case}: confirmed echoes the capabilities");
    }
    for (case, caps) in [
        ("block", vec![block_cap(Mode::SingleNodeWriter)]),
        ("multi-node reader", vec![mount_cap(Mode::MultiNodeReaderOnly)]),
        ("multi-node writer", vec![mount_cap(Mode::MultiNodeMultiWriter)]),
        ("mount and block", vec![writer(), block_cap(Mode::SingleNodeWriter)]),
    ] {
        let r = ok(
            &format!("ValidateVolumeCapabilities {case}"),
            twice!(c.controller, validate_volume_capabilities, validate(&vol.volume_id, caps)),
        );
        assert!(r.confirmed.is_none(), "{case}: not confirmed: {r:?}");
        assert!(!r.message.is_empty(), "{case}: says why it is not confirmed");
    }

    let cases: Vec<(&str, pb::DeleteVolumeRequest, Code, &str)> = vec![
        ("no volume_id", delete_req(""), Code::InvalidArgument, "volume_id"),
        ("unknown volume", delete_req("pvc-00000000-dead-beef-0000-000000000000"), Code::Ok, ""),
        // csi-sanity "should succeed when an invalid volume id is used".
        ("invalid volume id", delete_req("fake-volume-id"), Code::Ok, ""),
        ("malformed volume id", delete_req("Not A/Volume..Id"), Code::Ok, ""),
        ("created, never staged", delete_req(&vol.volume_id), Code::Ok, ""),
    ];
    for (case, req, code, needle) in cases {
        let r = twice!(c.controller, delete_volume, req);
        expect_code(&format!("DeleteVolume {case}"), &r, code, needle);
    }
    let r = twice!(c.controller, validate_volume_capabilities, validate(&vol.volume_id, vec![writer()]));
    expect_code("ValidateVolumeCapabilities after DeleteVolume", &r, Code::NotFound, "");
    assert_eq!(version(&sb, "default", "m2"), 0, "a volume never staged publishes nothing");
}

// ---------------------------------------------------------------------------------------------
// Node: argument checks
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_calls_check_their_arguments() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;
    let vol = ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-args", &[("cacheName", "m2")])))
        .volume
        .expect("volume");
    let unknown = pb::Volume { volume_id: "pvc-00000000-dead-beef-0000-000000000000".into(), ..vol.clone() };
    let staging = sb.dir.path().join("plugins/staging/pvc-args");
    let target = sb.dir.path().join("pods/uid-1/volumes/pvc-args/mount");

    let stage = || stage_req(&vol, &staging);
    let cases: Vec<(&str, pb::NodeStageVolumeRequest, Code, &str)> = vec![
        (
            "no volume_id",
            pb::NodeStageVolumeRequest { volume_id: String::new(), ..stage() },
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            "no staging_target_path",
            pb::NodeStageVolumeRequest { staging_target_path: String::new(), ..stage() },
            Code::InvalidArgument,
            "staging_target_path",
        ),
        (
            "no volume_capability",
            pb::NodeStageVolumeRequest { volume_capability: None, ..stage() },
            Code::InvalidArgument,
            "volume_capability",
        ),
        (
            "block capability",
            pb::NodeStageVolumeRequest { volume_capability: Some(block_cap(Mode::SingleNodeWriter)), ..stage() },
            Code::InvalidArgument,
            "",
        ),
        ("unknown volume", stage_req(&unknown, &staging), Code::NotFound, ""),
    ];
    for (case, req, code, needle) in cases {
        let r = twice!(c.node, node_stage_volume, req);
        expect_code(&format!("NodeStageVolume {case}"), &r, code, needle);
    }
    assert!(sb.mounts().is_empty(), "refused stages mount nothing: {:?}", sb.mounts());

    let publish = || publish_req(&vol, &staging, &target, false);
    let cases: Vec<(&str, pb::NodePublishVolumeRequest, Code, &str)> = vec![
        (
            "no volume_id",
            pb::NodePublishVolumeRequest { volume_id: String::new(), ..publish() },
            Code::InvalidArgument,
            "volume_id",
        ),
        (
            "no target_path",
            pb::NodePublishVolumeRequest { target_path: String::new(), ..publish() },
            Code::InvalidArgument,
            "target_path",
        ),
        (
            "no volume_capability",
            pb::NodePublishVolumeRequest { volume_capability: None, ..publish() },
            Code::InvalidArgument,
            "volume_capability",
        ),
        // csi-sanity sends a fresh id with only the capability missing: the field check comes first.
        (
            "unknown volume, no volume_capability",
            pb::NodePublishVolumeRequest { volume_capability: None, ..publish_req(&unknown, &staging, &target, false) },
            Code::InvalidArgument,
            "volume_capability",
        ),
        (
            "no staging_target_path",
            pb::NodePublishVolumeRequest { staging_target_path: String::new(), ..publish() },
            Code::InvalidArgument,
            "staging_target_path",
        ),
        (
            "block capability",
            pb::NodePublishVolumeRequest { volume_capability: Some(block_cap(Mode::SingleNodeWriter)), ..publish() },
            Code::InvalidArgument,
            "",
        ),
        ("unknown volume", publish_req(&unknown, &staging, &target, false), Code::NotFound, ""),
        ("not staged", publish(), Code::FailedPrecondition, ""),
    ];
    for (case, req, code, needle) in cases {
        let r = twice!(c.node, node_publish_volume, req);
        expect_code(&format!("NodePublishVolume {case}"), &r, code, needle);
    }
    assert!(sb.mounts().is_empty(), "refused publishes mount nothing: {:?}", sb.mounts());

    let plain_dir = sb.path("pods/uid-2/volumes/pvc-args/mount");
    let cases: Vec<(&str, pb::NodeUnpublishVolumeRequest, Code, &str)> = vec![
        ("no volume_id", unpublish_req("", &target), Code::InvalidArgument, "volume_id"),
        ("no target_path", unpublish_req(&vol.volume_id, Path::new("")), Code::InvalidArgument, "target_path"),
        ("unknown volume", unpublish_req(&unknown.volume_id, &target), Code::Ok, ""),
        ("known volume, target never created", unpublish_req(&vol.volume_id, &target), Code::Ok, ""),
        ("known volume, target not mounted", unpublish_req(&vol.volume_id, &plain_dir), Code::Ok, ""),
    ];
    for (case, req, code, needle) in cases {
        let r = twice!(c.node, node_unpublish_volume, req);
        expect_code(&format!("NodeUnpublishVolume {case}"), &r, code, needle);
    }

    let cases: Vec<(&str, pb::NodeUnstageVolumeRequest, Code, &str)> = vec![
        (
            "no volume_id",
            pb::NodeUnstageVolumeRequest { volume_id: String::new(), ..unstage_req(&vol, &staging) },
            Code::InvalidArgument,
            "volume_id",
        ),
        ("no staging_target_path", unstage_req(&vol, Path::new("")), Code::InvalidArgument, "staging_target_path"),
        ("unknown volume", unstage_req(&unknown, &staging), Code::Ok, ""),
        ("known volume, not staged", unstage_req(&vol, &staging), Code::Ok, ""),
    ];
    for (case, req, code, needle) in cases {
        let r = twice!(c.node, node_unstage_volume, req);
        expect_code(&format!("NodeUnstageVolume {case}"), &r, code, needle);
    }

    let elsewhere = sb.path("elsewhere");
    let cases: Vec<(&str, pb::NodeGetVolumeStatsRequest, Code, &str)> = vec![
        ("no volume_id", stats_req("", &path_str(&staging)), Code::InvalidArgument, "volume_id"),
        ("no volume_path", stats_req(&vol.volume_id, ""), Code::InvalidArgument, "volume_path"),
        ("unknown volume (csi-sanity)", stats_req(&unknown.volume_id, "some/path"), Code::NotFound, ""),
        ("known volume, not mounted anywhere", stats_req(&vol.volume_id, &path_str(&staging)), Code::NotFound, ""),
    ];
    for (case, req, code, needle) in cases {
        let r = twice_code!(c.node, node_get_volume_stats, req);
        expect_code(&format!("NodeGetVolumeStats {case}"), &r, code, needle);
    }

    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage()));
    let cases: Vec<(&str, pb::NodeGetVolumeStatsRequest, Code)> = vec![
        ("staged, path does not exist (csi-sanity)", stats_req(&vol.volume_id, "some/path"), Code::NotFound),
        ("staged, another directory", stats_req(&vol.volume_id, &path_str(&elsewhere)), Code::NotFound),
        ("staged, the staging path", stats_req(&vol.volume_id, &path_str(&staging)), Code::Ok),
    ];
    for (case, req, code) in cases {
        let r = twice_code!(c.node, node_get_volume_stats, req);
        expect_code(&format!("NodeGetVolumeStats {case}"), &r, code, "");
    }
    // Another volume's mount is not this volume's path either.
    let other =
        ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-args-2", &[("cacheName", "m2")])))
            .volume
            .expect("volume");
    let r = twice_code!(c.node, node_get_volume_stats, stats_req(&other.volume_id, &path_str(&staging)));
    expect_code("NodeGetVolumeStats another volume's staging path", &r, Code::NotFound, "");

    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&vol, &staging)));
    assert_not_mounted(&staging, "after NodeUnstageVolume");
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&vol.volume_id)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&other.volume_id)));
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

// ---------------------------------------------------------------------------------------------
// Persistent volumes: stage, publish, unpublish, unstage, delete
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_volume_lifecycle_publishes_on_delete() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;

    let info = ok("NodeGetInfo", twice!(c.node, node_get_info, pb::NodeGetInfoRequest {}));
    let req = pb::CreateVolumeRequest {
        capacity_range: capacity(64 * MIB, 0),
        accessibility_requirements: Some(pb::TopologyRequirement {
            requisite: info.accessible_topology.clone().into_iter().collect(),
            ..Default::default()
        }),
        ..create_req("pvc-build-1", &[("cacheName", "m2"), (PVC_NAMESPACE, "ci")])
    };
    let vol = ok("CreateVolume", twice!(c.controller, create_volume, req)).volume.expect("volume");
    assert_eq!(vol.volume_context.get("namespace").map(String::as_str), Some("ci"));
    assert_eq!(version(&sb, "ci", "m2"), 0);

    // Kubelet's paths do not exist yet: the driver creates them.
    let staging = sb.dir.path().join("kubelet/plugins/kubernetes.io/csi/jobcachefs.dev/abc/globalmount");
    let target = sb.dir.path().join("kubelet/pods/uid-1/volumes/kubernetes.io~csi/pvc-build-1/mount");
    let target_ro = sb.dir.path().join("kubelet/pods/uid-2/volumes/kubernetes.io~csi/pvc-build-1/mount");

    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&vol, &staging)));
    assert!(staging.is_dir(), "the staging dir is created");
    let m = assert_one_mount(&staging, "after NodeStageVolume twice");
    assert_eq!(m.fstype, "overlay", "the cache is an overlay: {m:?}");
    assert_eq!(fs::read_dir(&staging).expect("read staging").count(), 0, "a new cache is empty");

    ok("NodePublishVolume", twice!(c.node, node_publish_volume, publish_req(&vol, &staging, &target, false)));
    assert!(target.is_dir(), "the target dir is created");
    assert_one_mount(&target, "after NodePublishVolume twice");
    // The job writes through the target; the staging mount shows the same tree.
    fs::create_dir_all(target.join("repository/org/dep/1.0")).expect("mkdir in target");
    write(&target.join("repository/org/dep/1.0/dep-1.0.jar"), "jar-1.0");
    let blob = vec![7u8; 2 * MIB as usize];
    fs::write(target.join("blob.bin"), &blob).expect("write blob");
    assert_eq!(read(&staging.join("repository/org/dep/1.0/dep-1.0.jar")), "jar-1.0");

    // A read-only publish of the same volume: same content, writes refused with EROFS.
    ok(
        "NodePublishVolume readonly",
        twice!(c.node, node_publish_volume, publish_req(&vol, &staging, &target_ro, true)),
    );
    let ro = assert_one_mount(&target_ro, "after a read-only NodePublishVolume twice");
    assert!(ro.is_readonly(), "mounted read-only: {ro:?}");
    assert_eq!(read(&target_ro.join("repository/org/dep/1.0/dep-1.0.jar")), "jar-1.0");
    let err = fs::write(target_ro.join("nope"), "x").expect_err("a read-only target refuses writes");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(!target.join("nope").exists());
    let rw = assert_one_mount(&target, "the writable target is still writable");
    assert!(!rw.is_readonly(), "{rw:?}");

    // A reader-only access mode is read-only too, even without the readonly flag.
    let target_reader = sb.dir.path().join("kubelet/pods/uid-4/volumes/kubernetes.io~csi/pvc-build-1/mount");
    let reader = pb::NodePublishVolumeRequest {
        volume_capability: Some(mount_cap(Mode::SingleNodeReaderOnly)),
        ..publish_req(&vol, &staging, &target_reader, false)
    };
    ok("NodePublishVolume reader-only mode", twice!(c.node, node_publish_volume, reader));
    let m = assert_one_mount(&target_reader, "after a reader-only NodePublishVolume twice");
    assert!(m.is_readonly(), "a SINGLE_NODE_READER_ONLY publish is read-only: {m:?}");
    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&vol.volume_id, &target_reader)));
    assert!(!target_reader.exists());

    // Same targets, readonly flipped: incompatible.
    let r = twice!(c.node, node_publish_volume, publish_req(&vol, &staging, &target, true));
    expect_code("NodePublishVolume same target, now readonly", &r, Code::AlreadyExists, "");
    let r = twice!(c.node, node_publish_volume, publish_req(&vol, &staging, &target_ro, false));
    expect_code("NodePublishVolume same read-only target, now writable", &r, Code::AlreadyExists, "");
    assert_one_mount(&target, "a refused publish adds no mount");
    assert_one_mount(&target_ro, "a refused publish adds no mount");

    // Stats for each published path.
    for p in [&target, &target_ro, &staging] {
        let stats = ok(
            "NodeGetVolumeStats",
            twice_code!(c.node, node_get_volume_stats, stats_req(&vol.volume_id, &path_str(p))),
        );
        let bytes = stats
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
            .unwrap_or_else(|| panic!("a BYTES entry: {stats:?}"));
        assert!(bytes.total > 0, "{bytes:?}");
        assert!(bytes.used >= 2 * MIB, "used counts what the job wrote: {bytes:?}");
        assert!(bytes.available >= 0 && bytes.available <= bytes.total, "{bytes:?}");
        let inodes = stats
            .usage
            .iter()
            .find(|u| u.unit == pb::volume_usage::Unit::Inodes as i32)
            .unwrap_or_else(|| panic!("an INODES entry: {stats:?}"));
        assert!(inodes.used >= 0 && inodes.available >= 0, "{inodes:?}");
    }

    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&vol.volume_id, &target_ro)));
    assert_not_mounted(&target_ro, "after NodeUnpublishVolume");
    assert!(!target_ro.exists(), "NodeUnpublishVolume removes the target dir");
    assert_eq!(read(&target.join("repository/org/dep/1.0/dep-1.0.jar")), "jar-1.0", "the other target is untouched");
    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&vol.volume_id, &target)));
    assert_not_mounted(&target, "after NodeUnpublishVolume");
    assert!(!target.exists(), "NodeUnpublishVolume removes the target dir");
    assert_one_mount(&staging, "unpublish leaves the staging mount");

    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&vol, &staging)));
    assert_not_mounted(&staging, "after NodeUnstageVolume");
    assert_eq!(version(&sb, "ci", "m2"), 0, "the data is published by DeleteVolume, not by NodeUnstageVolume");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());

    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&vol.volume_id)));
    assert_eq!(version(&sb, "ci", "m2"), 1, "DeleteVolume published what the job wrote");
    let r = twice!(c.node, node_stage_volume, stage_req(&vol, &staging));
    expect_code("NodeStageVolume after DeleteVolume", &r, Code::NotFound, "");

    // The next job's volume starts from that version; the namespace isolates the cache.
    let next = ok(
        "CreateVolume next job",
        twice!(c.controller, create_volume, create_req("pvc-build-2", &[("cacheName", "m2"), (PVC_NAMESPACE, "ci")])),
    )
    .volume
    .expect("volume");
    let other_ns = ok(
        "CreateVolume other namespace",
        twice!(
            c.controller,
            create_volume,
            create_req("pvc-build-3", &[("cacheName", "m2"), (PVC_NAMESPACE, "other")])
        ),
    )
    .volume
    .expect("volume");
    let staging2 = sb.dir.path().join("kubelet/plugins/kubernetes.io/csi/jobcachefs.dev/def/globalmount");
    let staging3 = sb.dir.path().join("kubelet/plugins/kubernetes.io/csi/jobcachefs.dev/ghi/globalmount");
    let target2 = sb.dir.path().join("kubelet/pods/uid-3/volumes/kubernetes.io~csi/pvc-build-2/mount");
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&next, &staging2)));
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&other_ns, &staging3)));
    ok("NodePublishVolume", twice!(c.node, node_publish_volume, publish_req(&next, &staging2, &target2, false)));
    assert_eq!(read(&target2.join("repository/org/dep/1.0/dep-1.0.jar")), "jar-1.0", "the next job sees v1");
    assert_eq!(fs::read(target2.join("blob.bin")).expect("blob").len(), blob.len());
    assert_eq!(fs::read_dir(&staging3).expect("read").count(), 0, "namespace other has its own, empty cache");

    // A job that changes nothing publishes nothing.
    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&next.volume_id, &target2)));
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&next, &staging2)));
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&other_ns, &staging3)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&next.volume_id)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&other_ns.volume_id)));
    assert_eq!(version(&sb, "ci", "m2"), 1, "an unchanged volume does not make a new version");
    assert_eq!(version(&sb, "other", "m2"), 0);
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_decide_what_a_volume_restores_and_publishes() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;

    // Seed v1.
    let seed = ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-seed", &[("cacheName", "go")])))
        .volume
        .expect("volume");
    let staging = sb.dir.path().join("staging/seed");
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&seed, &staging)));
    write(&staging.join("seed.txt"), "seed");
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&seed, &staging)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&seed.volume_id)));
    assert_eq!(version(&sb, "default", "go"), 1);

    let ro = ok(
        "CreateVolume publish=false",
        twice!(
            c.controller,
            create_volume,
            create_req("pvc-readonly-cache", &[("cacheName", "go"), ("publish", "false")])
        ),
    )
    .volume
    .expect("volume");
    let staging = sb.dir.path().join("staging/ro");
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&ro, &staging)));
    assert_eq!(read(&staging.join("seed.txt")), "seed", "a non-publishing volume still restores the cache");
    write(&staging.join("poison.txt"), "poison");
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&ro, &staging)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&ro.volume_id)));
    assert_eq!(version(&sb, "default", "go"), 1, "publish=false never makes a version");

    // ignoreCache: starts empty, and its publish replaces the content.
    let fresh = ok(
        "CreateVolume ignoreCache",
        twice!(c.controller, create_volume, create_req("pvc-fresh", &[("cacheName", "go"), ("ignoreCache", "true")])),
    )
    .volume
    .expect("volume");
    let staging = sb.dir.path().join("staging/fresh");
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&fresh, &staging)));
    assert_eq!(fs::read_dir(&staging).expect("read").count(), 0, "ignoreCache starts empty");
    write(&staging.join("fresh.txt"), "fresh");
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&fresh, &staging)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&fresh.volume_id)));
    assert_eq!(version(&sb, "default", "go"), 2);

    let check =
        ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-check", &[("cacheName", "go")])))
            .volume
            .expect("volume");
    let staging = sb.dir.path().join("staging/check");
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&check, &staging)));
    assert_eq!(read(&staging.join("fresh.txt")), "fresh");
    assert!(!staging.join("seed.txt").exists(), "the fresh start replaced the old content");
    assert!(!staging.join("poison.txt").exists(), "the publish=false volume's file never reached the cache");
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&check, &staging)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&check.volume_id)));

    // maxBytes: a volume that adds more than its limit still works but is not published.
    let seen = job(
        &mut c,
        &sb,
        "pvc-too-big",
        &[("cacheName", "go"), ("maxBytes", "4KiB")],
        &[("big.bin", &"x".repeat(64 * 1024))],
    )
    .await;
    assert!(seen.contains("fresh.txt"), "{seen:?}");
    assert_eq!(version(&sb, "default", "go"), 2, "a volume over maxBytes is not published");
    job(&mut c, &sb, "pvc-small", &[("cacheName", "go"), ("maxBytes", "1MiB")], &[("small.txt", "small")]).await;
    assert_eq!(version(&sb, "default", "go"), 3, "a volume under maxBytes is published");

    // fallbackCaches: a cache with no version yet starts from its fallback, and its first
    // version keeps what it restored.
    let pr = [("cacheName", "go-pr-1"), ("fallbackCaches", "go-missing,go")];
    let seen = job(&mut c, &sb, "pvc-pr-1", &pr, &[("pr.txt", "pr")]).await;
    assert!(seen.contains("fresh.txt") && seen.contains("small.txt"), "restored from the fallback: {seen:?}");
    assert!(!seen.contains("big.bin"), "{seen:?}");
    assert_eq!(version(&sb, "default", "go-pr-1"), 1);
    assert_eq!(version(&sb, "default", "go"), 3, "the fallback itself is untouched");
    let seen = job(&mut c, &sb, "pvc-pr-2", &pr, &[]).await;
    assert!(seen.contains("pr.txt") && seen.contains("fresh.txt"), "the PR cache's own version: {seen:?}");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

/// One job on a persistent volume, every call twice: create, stage, list what it sees, write
/// `files`, unstage, delete. Returns the names it saw at the top of the cache.
async fn job(
    c: &mut Csi,
    sb: &Sandbox,
    name: &str,
    params: &[(&str, &str)],
    files: &[(&str, &str)],
) -> BTreeSet<String> {
    let vol = ok(&format!("CreateVolume {name}"), twice!(c.controller, create_volume, create_req(name, params)))
        .volume
        .expect("volume");
    let staging = sb.dir.path().join("staging").join(name);
    ok(&format!("NodeStageVolume {name}"), twice!(c.node, node_stage_volume, stage_req(&vol, &staging)));
    let seen = fs::read_dir(&staging)
        .expect("read staging")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for (file, text) in files {
        write(&staging.join(file), text);
    }
    ok(&format!("NodeUnstageVolume {name}"), twice!(c.node, node_unstage_volume, unstage_req(&vol, &staging)));
    ok(&format!("DeleteVolume {name}"), twice!(c.controller, delete_volume, delete_req(&vol.volume_id)));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_volume_never_rolls_the_cache_back() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;

    let a = ok("CreateVolume a", twice!(c.controller, create_volume, create_req("pvc-job-a", &[("cacheName", "npm")])))
        .volume
        .expect("volume");
    let b = ok("CreateVolume b", twice!(c.controller, create_volume, create_req("pvc-job-b", &[("cacheName", "npm")])))
        .volume
        .expect("volume");
    let (sa, sb_) = (sb.dir.path().join("staging/a"), sb.dir.path().join("staging/b"));
    // Both jobs start from the same (empty) base.
    ok("NodeStageVolume a", twice!(c.node, node_stage_volume, stage_req(&a, &sa)));
    ok("NodeStageVolume b", twice!(c.node, node_stage_volume, stage_req(&b, &sb_)));
    write(&sa.join("a.txt"), "from a");
    write(&sb_.join("b.txt"), "from b");
    assert!(!sb_.join("a.txt").exists(), "volumes are private until published");
    ok("NodeUnstageVolume a", twice!(c.node, node_unstage_volume, unstage_req(&a, &sa)));
    ok("NodeUnstageVolume b", twice!(c.node, node_unstage_volume, unstage_req(&b, &sb_)));

    ok("DeleteVolume a", twice!(c.controller, delete_volume, delete_req(&a.volume_id)));
    assert_eq!(version(&sb, "default", "npm"), 1, "the first release publishes");
    ok("DeleteVolume b", twice!(c.controller, delete_volume, delete_req(&b.volume_id)));
    assert_eq!(version(&sb, "default", "npm"), 1, "the stale release is skipped, not an error, and rolls nothing back");

    let check =
        ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-job-c", &[("cacheName", "npm")])))
            .volume
            .expect("volume");
    let sc = sb.dir.path().join("staging/c");
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&check, &sc)));
    assert_eq!(read(&sc.join("a.txt")), "from a");
    assert!(!sc.join("b.txt").exists(), "the stale volume's delta was not published");
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&check, &sc)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&check.volume_id)));
    assert_eq!(version(&sb, "default", "npm"), 1);

    // onStale=stack: the stale volume's delta goes on top of the newer version instead.
    let d = ok("CreateVolume d", twice!(c.controller, create_volume, create_req("pvc-job-d", &[("cacheName", "npm")])))
        .volume
        .expect("volume");
    let e = ok(
        "CreateVolume e",
        twice!(c.controller, create_volume, create_req("pvc-job-e", &[("cacheName", "npm"), ("onStale", "stack")])),
    )
    .volume
    .expect("volume");
    let (sd, se) = (sb.dir.path().join("staging/d"), sb.dir.path().join("staging/e"));
    ok("NodeStageVolume d", twice!(c.node, node_stage_volume, stage_req(&d, &sd)));
    ok("NodeStageVolume e", twice!(c.node, node_stage_volume, stage_req(&e, &se)));
    write(&sd.join("d.txt"), "from d");
    write(&se.join("e.txt"), "from e");
    ok("NodeUnstageVolume d", twice!(c.node, node_unstage_volume, unstage_req(&d, &sd)));
    ok("NodeUnstageVolume e", twice!(c.node, node_unstage_volume, unstage_req(&e, &se)));
    ok("DeleteVolume d", twice!(c.controller, delete_volume, delete_req(&d.volume_id)));
    assert_eq!(version(&sb, "default", "npm"), 2);
    ok("DeleteVolume e", twice!(c.controller, delete_volume, delete_req(&e.volume_id)));
    assert_eq!(version(&sb, "default", "npm"), 3, "onStale=stack publishes on top of the newer version");
    let seen = job(&mut c, &sb, "pvc-job-f", &[("cacheName", "npm")], &[]).await;
    let want: BTreeSet<String> = ["a.txt", "d.txt", "e.txt"].iter().map(|s| s.to_string()).collect();
    assert_eq!(seen, want, "stacked: both deltas, never the skipped one");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_holding_another_volume_is_refused() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;
    let a = ok("CreateVolume a", twice!(c.controller, create_volume, create_req("pvc-a", &[("cacheName", "x")])))
        .volume
        .expect("volume");
    let b = ok("CreateVolume b", twice!(c.controller, create_volume, create_req("pvc-b", &[("cacheName", "x")])))
        .volume
        .expect("volume");
    let (sa, sb_) = (sb.dir.path().join("staging/a"), sb.dir.path().join("staging/b"));
    let (ta, tb) = (sb.dir.path().join("pods/a"), sb.dir.path().join("pods/b"));
    ok("NodeStageVolume a", twice!(c.node, node_stage_volume, stage_req(&a, &sa)));
    write(&sa.join("a.txt"), "a");

    let r = twice!(c.node, node_stage_volume, stage_req(&b, &sa));
    expect_code("NodeStageVolume b onto a's staging path", &r, Code::AlreadyExists, "");
    assert_one_mount(&sa, "a refused stage adds no mount");
    assert_eq!(read(&sa.join("a.txt")), "a");

    ok("NodeStageVolume b", twice!(c.node, node_stage_volume, stage_req(&b, &sb_)));
    ok("NodePublishVolume a", twice!(c.node, node_publish_volume, publish_req(&a, &sa, &ta, false)));
    let r = twice!(c.node, node_publish_volume, publish_req(&b, &sb_, &ta, false));
    expect_code("NodePublishVolume b onto a's target", &r, Code::AlreadyExists, "");
    assert_one_mount(&ta, "a refused publish adds no mount");
    assert_eq!(read(&ta.join("a.txt")), "a", "a's target still shows a");
    // b's staging path published for a: not a's staging path.
    let r = twice!(c.node, node_publish_volume, publish_req(&a, &sb_, &tb, false));
    assert!(r.is_err(), "publishing a from b's staging path must be refused, got {r:?}");
    assert!(mounts_at(&tb).is_empty(), "nothing mounted at {}", tb.display());

    ok("NodeUnpublishVolume a", twice!(c.node, node_unpublish_volume, unpublish_req(&a.volume_id, &ta)));
    ok("NodeUnstageVolume a", twice!(c.node, node_unstage_volume, unstage_req(&a, &sa)));
    ok("NodeUnstageVolume b", twice!(c.node, node_unstage_volume, unstage_req(&b, &sb_)));
    ok("DeleteVolume a", twice!(c.controller, delete_volume, delete_req(&a.volume_id)));
    ok("DeleteVolume b", twice!(c.controller, delete_volume, delete_req(&b.volume_id)));
    assert_eq!(version(&sb, "default", "x"), 1, "a published; b changed nothing");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlays_are_nosuid_nodev_unless_the_class_opts_out() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;
    let with_flags = |flags: &[&str]| {
        let mut cap = writer();
        if let Some(pb::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
            m.mount_flags = flags.iter().map(|f| f.to_string()).collect();
        }
        cap
    };
    let options = |path: &Path, what: &str| -> BTreeSet<String> {
        assert_one_mount(path, what).mount_options.split(',').map(str::to_string).collect()
    };
    let has = |opts: &BTreeSet<String>, flag: &str| opts.contains(flag);

    // The default: a cache written by one job and executed by the next gets no setuid or devices.
    let a = ok("CreateVolume a", twice!(c.controller, create_volume, create_req("pvc-a", &[("cacheName", "x")])))
        .volume
        .expect("volume");
    let (sa, ta) = (sb.dir.path().join("staging/a"), sb.dir.path().join("pods/a"));
    ok("NodeStageVolume a", twice!(c.node, node_stage_volume, stage_req(&a, &sa)));
    ok("NodePublishVolume a", twice!(c.node, node_publish_volume, publish_req(&a, &sa, &ta, false)));
    for (path, what) in [(&sa, "staging"), (&ta, "target")] {
        let opts = options(path, what);
        assert!(has(&opts, "nosuid") && has(&opts, "nodev"), "{what} of a default volume: {opts:?}");
    }
    let t7 = sb.dir.path().join("pods/inline/volume");
    ok(
        "inline NodePublishVolume",
        twice!(c.node, node_publish_volume, inline_req(&kubelet_id(7), &t7, "default", &[("cacheName", "y")])),
    );
    let opts = options(&t7, "inline target");
    assert!(has(&opts, "nosuid") && has(&opts, "nodev"), "inline volume: {opts:?}");

    // A StorageClass's mountOptions reach the driver as the capability's mount flags.
    let b = ok("CreateVolume b", twice!(c.controller, create_volume, create_req("pvc-b", &[("cacheName", "x")])))
        .volume
        .expect("volume");
    let (sbb, tb) = (sb.dir.path().join("staging/b"), sb.dir.path().join("pods/b"));
    let mut stage_b = stage_req(&b, &sbb);
    stage_b.volume_capability = Some(with_flags(&["suid", "dev", "noatime"]));
    ok("NodeStageVolume b with suid,dev,noatime", twice!(c.node, node_stage_volume, stage_b.clone()));
    let opts = options(&sbb, "staging of b");
    assert!(!has(&opts, "nosuid") && !has(&opts, "nodev") && has(&opts, "noatime"), "opted out: {opts:?}");
    let mut publish_b = publish_req(&b, &sbb, &tb, false);
    publish_b.volume_capability = Some(with_flags(&["suid", "dev", "noatime"]));
    ok("NodePublishVolume b", twice!(c.node, node_publish_volume, publish_b));
    let opts = options(&tb, "target of b");
    assert!(!has(&opts, "nosuid") && !has(&opts, "nodev"), "the pod sees the class's flags: {opts:?}");
    // Staged with other flags than asked now: refused, not silently kept.
    let r = twice!(c.node, node_stage_volume, stage_req(&b, &sbb));
    expect_code("NodeStageVolume b again with the default flags", &r, Code::AlreadyExists, "nosuid");

    // Anything off the allow-list is refused, naming the field and the flag, and mounts nothing.
    let d = ok("CreateVolume d", twice!(c.controller, create_volume, create_req("pvc-d", &[("cacheName", "x")])))
        .volume
        .expect("volume");
    let sd = sb.dir.path().join("staging/d");
    for bad in ["sync", "rw,suid", "uid=0", "loop"] {
        let mut req = stage_req(&d, &sd);
        req.volume_capability = Some(with_flags(&["noatime", bad]));
        let r = twice!(c.node, node_stage_volume, req);
        expect_code(&format!("NodeStageVolume with mount flag {bad:?}"), &r, Code::InvalidArgument, "mount_flags");
        expect_code(&format!("NodeStageVolume with mount flag {bad:?}"), &r, Code::InvalidArgument, bad);
        assert!(mounts_at(&sd).is_empty(), "a refused flag mounts nothing");
    }

    ok("NodeUnpublishVolume a", twice!(c.node, node_unpublish_volume, unpublish_req(&a.volume_id, &ta)));
    ok("NodeUnpublishVolume inline", twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(7), &t7)));
    ok("NodeUnpublishVolume b", twice!(c.node, node_unpublish_volume, unpublish_req(&b.volume_id, &tb)));
    ok("NodeUnstageVolume a", twice!(c.node, node_unstage_volume, unstage_req(&a, &sa)));
    ok("NodeUnstageVolume b", twice!(c.node, node_unstage_volume, unstage_req(&b, &sbb)));
    for v in [&a, &b, &d] {
        ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&v.volume_id)));
    }
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

// ---------------------------------------------------------------------------------------------
// Inline ephemeral volumes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_volumes_publish_only_where_the_driver_allows() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let mut srv = Server::start(&sb, &["--allow-inline-publish", "team-a"]).await;
    let mut c = srv.connect().await;
    let pod_target = |n: u8| sb.dir.path().join(format!("kubelet/pods/uid-{n}/volumes/kubernetes.io~csi/cache/mount"));

    // Argument checks specific to inline volumes.
    let t0 = pod_target(0);
    let cases: Vec<(&str, pb::NodePublishVolumeRequest, Code, &str)> = vec![
        ("no cacheName", inline_req(&kubelet_id(0), &t0, "team-a", &[]), Code::InvalidArgument, "cacheName"),
        (
            "bad cacheName",
            inline_req(&kubelet_id(0), &t0, "team-a", &[("cacheName", "No Such/Name")]),
            Code::InvalidArgument,
            "cacheName",
        ),
        (
            "unknown attribute",
            inline_req(&kubelet_id(0), &t0, "team-a", &[("cacheName", "npm"), ("colour", "blue")]),
            Code::InvalidArgument,
            "colour",
        ),
        (
            "bad publish",
            inline_req(&kubelet_id(0), &t0, "team-a", &[("cacheName", "npm"), ("publish", "always")]),
            Code::InvalidArgument,
            "publish",
        ),
        (
            "no volume_capability",
            pb::NodePublishVolumeRequest {
                volume_capability: None,
                ..inline_req(&kubelet_id(0), &t0, "team-a", &[("cacheName", "npm")])
            },
            Code::InvalidArgument,
            "volume_capability",
        ),
    ];
    for (case, req, code, needle) in cases {
        let r = twice!(c.node, node_publish_volume, req);
        expect_code(&format!("NodePublishVolume inline {case}"), &r, code, needle);
    }
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());

    // team-a may publish: the overlay is mounted at the target itself, released on unpublish.
    let t1 = pod_target(1);
    let r = twice!(c.node, node_publish_volume, inline_req(&kubelet_id(1), &t1, "team-a", &[("cacheName", "npm")]));
    ok("NodePublishVolume inline team-a", r);
    let m = assert_one_mount(&t1, "inline publish twice");
    assert_eq!(m.fstype, "overlay", "{m:?}");
    write(&t1.join("a1.txt"), "a1");
    let stats = ok(
        "NodeGetVolumeStats inline",
        twice_code!(c.node, node_get_volume_stats, stats_req(&kubelet_id(1), &path_str(&t1))),
    );
    assert!(stats.usage.iter().any(|u| u.unit == pb::volume_usage::Unit::Bytes as i32), "{stats:?}");
    ok("NodeUnpublishVolume inline team-a", twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(1), &t1)));
    assert_not_mounted(&t1, "inline unpublish");
    assert!(!t1.exists(), "NodeUnpublishVolume removes the inline target");
    assert_eq!(version(&sb, "team-a", "npm"), 1, "an allowed inline volume publishes on unpublish");

    let t2 = pod_target(2);
    ok(
        "NodePublishVolume inline team-a again",
        twice!(c.node, node_publish_volume, inline_req(&kubelet_id(2), &t2, "team-a", &[("cacheName", "npm")])),
    );
    assert_eq!(read(&t2.join("a1.txt")), "a1", "the next pod sees v1");
    write(&t2.join("a2.txt"), "a2");
    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(2), &t2)));
    assert_eq!(version(&sb, "team-a", "npm"), 2);

    // team-a with publish=false: a read-only use of the cache.
    let t3 = pod_target(3);
    ok(
        "NodePublishVolume inline publish=false",
        twice!(
            c.node,
            node_publish_volume,
            inline_req(&kubelet_id(3), &t3, "team-a", &[("cacheName", "npm"), ("publish", "false")])
        ),
    );
    assert_eq!(read(&t3.join("a2.txt")), "a2");
    write(&t3.join("nope.txt"), "nope");
    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(3), &t3)));
    assert_eq!(version(&sb, "team-a", "npm"), 2, "publish=false is honoured for inline volumes");

    // publishWhen=on-success cannot prove success without the pod's phase: it never publishes.
    // A read-only inline volume (readonly, or a reader-only access mode) refuses writes.
    let t7 = pod_target(7);
    ok(
        "NodePublishVolume inline on-success",
        twice!(
            c.node,
            node_publish_volume,
            inline_req(&kubelet_id(7), &t7, "team-a", &[("cacheName", "npm"), ("publishWhen", "on-success")])
        ),
    );
    write(&t7.join("unproven.txt"), "x");
    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(7), &t7)));
    assert_eq!(version(&sb, "team-a", "npm"), 2, "on-success without a known pod phase does not publish");
    for (n, req) in [
        (
            8u8,
            pb::NodePublishVolumeRequest {
                readonly: true,
                ..inline_req(&kubelet_id(8), &pod_target(8), "team-a", &[("cacheName", "npm")])
            },
        ),
        (
            10,
            pb::NodePublishVolumeRequest {
                volume_capability: Some(mount_cap(Mode::SingleNodeReaderOnly)),
                ..inline_req(&kubelet_id(10), &pod_target(10), "team-a", &[("cacheName", "npm")])
            },
        ),
    ] {
        let t = pod_target(n);
        ok("NodePublishVolume inline read-only", twice!(c.node, node_publish_volume, req));
        let m = assert_one_mount(&t, "inline read-only");
        assert!(m.is_readonly(), "inline volume {n} asked read-only is mounted read-only: {m:?}");
        assert_eq!(read(&t.join("a2.txt")), "a2");
        let err = fs::write(t.join("nope"), "x").expect_err("a read-only inline volume refuses writes");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(n), &t)));
        assert!(!t.exists());
    }
    assert_eq!(version(&sb, "team-a", "npm"), 2, "read-only inline volumes publish nothing");

    // team-b is not allowed to publish: a pod author there cannot poison the cache. Naming
    // another namespace in the attributes does not reach team-a's cache either.
    for (n, attrs) in [(4u8, vec![("cacheName", "npm")]), (5, vec![("cacheName", "npm"), ("namespace", "team-a")])] {
        let t = pod_target(n);
        let r = twice!(c.node, node_publish_volume, inline_req(&kubelet_id(n), &t, "team-b", &attrs));
        if n == 5 && r.is_err() {
            // Refusing the attribute outright is as good as ignoring it.
            expect_code("NodePublishVolume inline namespace attribute", &r, Code::InvalidArgument, "namespace");
            continue;
        }
        ok(&format!("NodePublishVolume inline team-b {attrs:?}"), r);
        assert!(!t.join("a1.txt").exists(), "team-b does not read team-a's cache ({attrs:?})");
        write(&t.join("poison.txt"), "poison");
        ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(n), &t)));
        assert!(!t.exists());
    }
    assert_eq!(version(&sb, "team-b", "npm"), 0, "inline volumes of team-b never publish");
    assert_eq!(version(&sb, "team-a", "npm"), 2, "nor reach team-a's cache");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());

    // A server started without --allow-inline-publish never publishes inline volumes.
    let status = srv.stop().await;
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");
    drop(srv);
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;
    let t6 = pod_target(6);
    ok(
        "NodePublishVolume inline without the flag",
        twice!(c.node, node_publish_volume, inline_req(&kubelet_id(6), &t6, "team-a", &[("cacheName", "npm")])),
    );
    assert_eq!(read(&t6.join("a2.txt")), "a2", "it still restores the cache");
    write(&t6.join("poison.txt"), "poison");
    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(6), &t6)));
    assert!(!t6.exists());
    assert_eq!(version(&sb, "team-a", "npm"), 2, "without the flag an inline volume never publishes");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

// ---------------------------------------------------------------------------------------------
// Restart, vanished mounts, concurrency
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_finishes_what_the_old_one_started() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let flags = ["--allow-inline-publish", "default"];
    let mut srv = Server::start(&sb, &flags).await;
    let mut c = srv.connect().await;

    let vol =
        ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-restart", &[("cacheName", "gradle")])))
            .volume
            .expect("volume");
    let staging = sb.dir.path().join("staging/restart");
    let target = sb.dir.path().join("pods/uid-1/restart");
    let inline_target = sb.dir.path().join("pods/uid-2/inline");
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&vol, &staging)));
    ok("NodePublishVolume", twice!(c.node, node_publish_volume, publish_req(&vol, &staging, &target, false)));
    write(&target.join("p.txt"), "persistent");
    ok(
        "NodePublishVolume inline",
        twice!(
            c.node,
            node_publish_volume,
            inline_req(&kubelet_id(9), &inline_target, "default", &[("cacheName", "ccache")])
        ),
    );
    write(&inline_target.join("i.txt"), "inline");

    let status = srv.stop().await;
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");
    drop(srv);
    // The pods keep running: their mounts outlive the driver.
    assert_one_mount(&staging, "staging survives the driver");
    assert_one_mount(&target, "target survives the driver");
    assert_one_mount(&inline_target, "inline target survives the driver");

    let srv = Server::start(&sb, &flags).await;
    let mut c = srv.connect().await;
    let stats = ok(
        "NodeGetVolumeStats after restart",
        twice_code!(c.node, node_get_volume_stats, stats_req(&vol.volume_id, &path_str(&target))),
    );
    assert!(stats.usage.iter().any(|u| u.unit == pb::volume_usage::Unit::Bytes as i32), "{stats:?}");
    ok(
        "NodePublishVolume after restart",
        twice!(c.node, node_publish_volume, publish_req(&vol, &staging, &target, false)),
    );
    assert_one_mount(&target, "a repeated publish after restart adds no mount");
    ok("NodeUnpublishVolume", twice!(c.node, node_unpublish_volume, unpublish_req(&vol.volume_id, &target)));
    assert!(!target.exists());
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&vol, &staging)));
    assert_not_mounted(&staging, "after NodeUnstageVolume");
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&vol.volume_id)));
    assert_eq!(version(&sb, "default", "gradle"), 1, "the new server published the persistent volume");
    ok(
        "NodeUnpublishVolume inline",
        twice!(c.node, node_unpublish_volume, unpublish_req(&kubelet_id(9), &inline_target)),
    );
    assert!(!inline_target.exists());
    assert_eq!(version(&sb, "default", "ccache"), 1, "the new server published the inline volume");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());

    // The staging mount vanished (node reboot, someone unmounted it): staging again restores it,
    // with what the job had written kept in the upper.
    let q =
        ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-vanish", &[("cacheName", "gradle")])))
            .volume
            .expect("volume");
    let staging = sb.dir.path().join("staging/vanish");
    ok("NodeStageVolume", twice!(c.node, node_stage_volume, stage_req(&q, &staging)));
    assert_eq!(read(&staging.join("p.txt")), "persistent", "the next volume starts from v1");
    write(&staging.join("q.txt"), "kept");
    SysMounter.unmount(&staging).expect("unmount staging behind the driver's back");
    assert_not_mounted(&staging, "unmounted by hand");
    ok("NodeStageVolume after the mount vanished", twice!(c.node, node_stage_volume, stage_req(&q, &staging)));
    assert_one_mount(&staging, "staged again");
    assert_eq!(read(&staging.join("q.txt")), "kept", "the upper survived");
    assert_eq!(read(&staging.join("p.txt")), "persistent");
    ok("NodeUnstageVolume", twice!(c.node, node_unstage_volume, unstage_req(&q, &staging)));
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&q.volume_id)));
    assert_eq!(version(&sb, "default", "gradle"), 2);
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stages_of_one_volume_end_ok_or_aborted() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let srv = Server::start(&sb, &[]).await;
    let mut c = srv.connect().await;
    let vol = ok("CreateVolume", twice!(c.controller, create_volume, create_req("pvc-race", &[("cacheName", "race")])))
        .volume
        .expect("volume");
    let staging = sb.dir.path().join("staging/race");

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut node = c.node.clone();
        let req = stage_req(&vol, &staging);
        tasks.push(tokio::spawn(async move { node.node_stage_volume(req).await.map(|_| ()) }));
    }
    let mut oks = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => oks += 1,
            Err(s) => assert_eq!(s.code(), Code::Aborted, "a concurrent stage is OK or ABORTED: {}", s.message()),
        }
    }
    assert!(oks >= 1, "one of the concurrent stages did the work");
    assert_one_mount(&staging, "concurrent stages mount once");
    ok("NodeStageVolume after the race", twice!(c.node, node_stage_volume, stage_req(&vol, &staging)));
    assert_one_mount(&staging, "still once");

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut node = c.node.clone();
        let req = unstage_req(&vol, &staging);
        tasks.push(tokio::spawn(async move { node.node_unstage_volume(req).await.map(|_| ()) }));
    }
    for t in tasks {
        if let Err(s) = t.await.expect("task") {
            assert_eq!(s.code(), Code::Aborted, "a concurrent unstage is OK or ABORTED: {}", s.message());
        }
    }
    ok("NodeUnstageVolume after the race", twice!(c.node, node_unstage_volume, unstage_req(&vol, &staging)));
    assert_not_mounted(&staging, "unstaged");
    ok("DeleteVolume", twice!(c.controller, delete_volume, delete_req(&vol.volume_id)));
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

#[test]
fn serve_refuses_to_replace_a_file_that_is_not_a_socket() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let socket = sb.dir.path().join("csi.sock");
    write(&socket, "precious");
    let kubelet = sb.dir.path().to_str().unwrap();
    let out = sb.cli(&[
        "serve",
        "--endpoint",
        &format!("unix://{}", socket.display()),
        "--node-id",
        NODE,
        "--kubelet-dir",
        kubelet,
    ]);
    assert!(!out.status.success(), "serve must refuse: {}", stderr(&out));
    assert!(stderr(&out).contains("not a socket"), "{}", stderr(&out));
    assert_eq!(read(&socket), "precious", "a file that is not a socket is left alone");
    let out = sb.cli(&["serve", "--endpoint", "tcp://127.0.0.1:1234", "--node-id", NODE, "--kubelet-dir", kubelet]);
    assert!(!out.status.success(), "only unix sockets are served: {}", stderr(&out));
    assert!(stderr(&out).contains("unix://"), "{}", stderr(&out));
}
