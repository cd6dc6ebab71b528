//! A `jobcachefs serve` process for tests that drive the driver as kubelet would.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jobcachefs::csi::pb;
use tonic::transport::Channel;

/// A running server; SIGTERM and wait when dropped.
pub struct Server {
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// Starts `jobcachefs --state-dir STATE serve` on `dir/<node>.sock` with extra args and env.
pub async fn serve(dir: &Path, state: &Path, node: &str, extra: &[&str], env: &[(&str, &Path)]) -> (Server, Channel) {
    let socket = dir.join(format!("{node}.sock"));
    let log = dir.join(format!("{node}.log"));
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jobcachefs"));
    cmd.arg("--state-dir")
        .arg(state)
        .args(["serve", "--endpoint", &format!("unix://{}", socket.display()), "--node-id", node])
        .arg("--kubelet-dir")
        .arg(dir)
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let server = Server { child: cmd.spawn().expect("start server"), log };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "server did not start: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel = jobcachefs::csi::client::connect(&format!("unix://{}", socket.display())).await.expect("connect");
    (server, channel)
}

/// A single-node-writer mount capability.
pub fn mount_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

/// Kubelet's NodePublish of an inline volume of `cache` for pod ns/pod at `target`.
pub async fn inline_publish(
    node: &mut pb::node_client::NodeClient<Channel>,
    id: &str,
    target: &Path,
    ns: &str,
    pod: &str,
    attrs: &[(&str, &str)],
) {
    let mut ctx: HashMap<String, String> = [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.namespace", ns),
        ("csi.storage.k8s.io/pod.name", pod),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    ctx.extend(attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    node.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(mount_cap()),
        volume_context: ctx,
        ..Default::default()
    })
    .await
    .expect("inline NodePublishVolume");
}

/// Kubelet's NodeUnpublish of an inline volume: this is where it commits.
pub async fn inline_unpublish(node: &mut pb::node_client::NodeClient<Channel>, id: &str, target: &Path) {
    node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .expect("inline NodeUnpublishVolume");
    assert!(!target.exists(), "NodeUnpublish removes the target");
}
