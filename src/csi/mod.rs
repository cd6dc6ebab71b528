//! The CSI driver: Identity, Controller and Node services over a unix socket, mapping
//! requests onto the engine (`ops`); errors become a Status only in `status`.

pub mod client;
mod controller;
mod identity;
mod listing;
mod node;
pub mod params;
pub mod status;
mod timed;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::Response;
use tracing::Instrument;

pub use controller::volume_id_for;
use status::CsiError;

use crate::cluster::Cluster;
use crate::ops::Engine;
use crate::store::VolumeId;

/// The generated CSI v1 messages, servers and clients.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

/// The plugin name kubelet and the sidecars know us by.
pub const PLUGIN_NAME: &str = "jobcachefs.dev";
/// The topology key naming the node that holds a volume's upper directory.
pub const TOPOLOGY_KEY: &str = "jobcachefs.dev/node";

/// Who may publish, and what the driver can ask Kubernetes.
#[derive(Default, Clone)]
pub struct Access {
    /// Namespaces whose inline volumes may publish, from the command line.
    pub inline_publish: HashSet<String>,
    /// The driver config file (a mounted ConfigMap), re-read on every inline publish decision.
    pub config_file: Option<PathBuf>,
    /// Kubernetes look-ups; `None` when the driver runs without cluster access.
    pub cluster: Option<Arc<dyn Cluster>>,
    /// Staging and target paths must lie under this directory (kubelet's), canonical.
    pub kubelet_dir: Option<PathBuf>,
}

/// The driver config file: `{"inlinePublishNamespaces": ["ci"]}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriverConfig {
    /// Namespaces whose inline volumes may publish.
    #[serde(default)]
    pub inline_publish_namespaces: Vec<String>,
}

/// Background upkeep: when to squash, how often to collect, what to evict.
#[derive(Debug, Clone, Copy)]
pub struct Maintenance {
    /// Squash a cache deeper than this many layers, after the commit that made it so.
    pub max_depth: usize,
    /// How often to collect garbage and evict (also once at start-up, for a crash's orphans).
    pub gc_interval: std::time::Duration,
    /// Evict caches unused for longer than this.
    pub max_idle: Option<std::time::Duration>,
    /// Evict least recently used caches until the rest fit in this many bytes.
    pub budget_bytes: Option<u64>,
}

impl Default for Maintenance {
    fn default() -> Self {
        Self {
            max_depth: crate::store::squash::DEFAULT_MAX_DEPTH,
            gc_interval: std::time::Duration::from_secs(600),
            max_idle: None,
            budget_bytes: None,
        }
    }
}

/// Bytes GetCapacity keeps back from the state filesystem's free space by default, so a
/// node that reports room still has some for its own work.
pub const DEFAULT_CAPACITY_RESERVE: u64 = 1 << 30;

/// Shared state of the three services.
pub struct Driver {
    engine: Engine,
    node_id: String,
    access: Access,
    maintenance: Maintenance,
    capacity_reserve: u64,
}

/// Serving errors.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint is not `unix:///absolute/path`.
    #[error("endpoint {0:?} is invalid: must be unix:///absolute/path")]
    Endpoint(String),
    /// Something that is not a socket sits where the socket goes; it is not ours to delete.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// A socket file operation failed.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Driver {
    /// A driver for node `node_id`; commits that leave a cache deeper than the maintenance's
    /// `max_depth` are squashed by a task of this process, and pod outcomes come from the cluster.
    pub fn new(engine: Engine, node_id: String, access: Access, maintenance: Maintenance) -> Self {
        let mut engine = engine.with_background_squash(maintenance.max_depth, crate::ops::Background::InProcess);
        if let Some(cluster) = &access.cluster {
            engine = engine.with_pods(cluster.clone());
        }
        Self { engine, node_id, access, maintenance, capacity_reserve: DEFAULT_CAPACITY_RESERVE }
    }

    /// Keeps `bytes` of the state filesystem out of the capacity GetCapacity reports.
    pub fn with_capacity_reserve(mut self, bytes: u64) -> Self {
        self.capacity_reserve = bytes;
        self
    }

    /// Collects garbage and evicts now and then every `gc_interval`, until the task is dropped.
    pub async fn run_maintenance(self: Arc<Self>) {
        let m = self.maintenance;
        loop {
            let span = tracing::info_span!("gc");
            match self.engine.collect(m.max_idle, m.budget_bytes).instrument(span.clone()).await {
                Ok((evicted, report)) => span.in_scope(|| {
                    tracing::info!(
                        evicted = evicted.len(),
                        layers_removed = report.layers_removed.len(),
                        bytes_freed = report.bytes_freed,
                        volumes_reclaimed = report.volumes_reclaimed.len(),
                        deferred = ?report.deferred,
                        "gc"
                    )
                }),
                Err(e) => span.in_scope(|| tracing::warn!(error = %e, "gc failed; retrying next round")),
            }
            tokio::time::sleep(m.gc_interval).await;
        }
    }

    /// Namespaces whose inline volumes may publish now: the flags plus the config file. A config
    /// file that cannot be read allows nothing beyond the flags (fail closed) and is logged.
    async fn inline_publish(&self) -> HashSet<String> {
        let mut allowed = self.access.inline_publish.clone();
        let Some(path) = self.access.config_file.clone() else { return allowed };
        let read = self
            .blocking(move || {
                let text =
                    std::fs::read(&path).map_err(|source| CsiError::Io { op: "read", path: path.clone(), source })?;
                serde_json::from_slice::<DriverConfig>(&text).map_err(|e| CsiError::Invalid {
                    field: format!("config file {}", path.display()),
                    rule: e.to_string(),
                })
            })
            .await;
        match read {
            Ok(config) => allowed.extend(config.inline_publish_namespaces),
            Err(e) => tracing::error!(error = %e, "driver config unreadable; inline volumes publish only per flags"),
        }
        allowed
    }

    fn topology(&self) -> pb::Topology {
        pb::Topology { segments: HashMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())]) }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
    ) -> Result<T, CsiError> {
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(f))
            .await
            .map_err(|e| CsiError::Ops(crate::ops::OpsError::Join(e.to_string())))?
    }

    /// Logs how a release ended.
    fn log_release(released: Option<crate::ops::Released>, started: std::time::Instant) {
        let ms = started.elapsed().as_millis() as u64;
        match released {
            Some(r) => tracing::info!(elapsed_ms = ms, "commit: {r}"),
            None => tracing::debug!("already released"),
        }
    }

    /// Validates a staging or target path: absolute, no `..`, under the kubelet dir, never
    /// through a symlink (a pod could plant one to aim our mounts elsewhere), and never inside
    /// the state or shared dir.
    fn check_path(&self, value: &str, field: &'static str) -> Result<PathBuf, CsiError> {
        use std::path::Component;
        let invalid = |rule: String| CsiError::Invalid { field: field.into(), rule };
        if value.is_empty() {
            return Err(CsiError::Missing(field));
        }
        if value.len() > 4096 || value.contains('\0') || value.chars().any(char::is_control) {
            return Err(invalid("must be a path of at most 4096 bytes without NUL or control characters".into()));
        }
        let path = PathBuf::from(value);
        if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(invalid("must be an absolute path without '.' or '..' components".into()));
        }
        let layout = self.engine.store().layout();
        for root in [Some(layout.root()), layout.shared_root()].into_iter().flatten() {
            if path.starts_with(root) {
                return Err(invalid(format!("must not be inside the driver's state dir {}", root.display())));
            }
        }
        let Some(kubelet) = &self.access.kubelet_dir else { return Ok(path) };
        let rest = match path.strip_prefix(kubelet) {
            Ok(rest) if rest.components().next().is_some() => rest,
            _ => return Err(invalid(format!("must be below the kubelet directory {}", kubelet.display()))),
        };
        let mut walk = kubelet.clone();
        for part in rest.components() {
            walk.push(part);
            match std::fs::symlink_metadata(&walk) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(invalid(format!("must not be or pass through a symlink ({})", walk.display())))
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(path)
    }

    /// The cache name a PVC's annotation gives, when the StorageClass gave none.
    async fn cache_name_from_pvc(&self, params: &HashMap<String, String>) -> Result<Option<String>, CsiError> {
        let (Some(ns), Some(name)) =
            (params.get("csi.storage.k8s.io/pvc/namespace"), params.get("csi.storage.k8s.io/pvc/name"))
        else {
            return Ok(None);
        };
        let Some(cluster) = &self.access.cluster else { return Ok(None) };
        cluster
            .pvc_annotation(ns, name, crate::cluster::CACHE_NAME_ANNOTATION)
            .await
            .map_err(|e| CsiError::Unavailable(e.to_string()))
    }
}

/// A volume id of a volume that must exist: missing or breaking the id rule is INVALID_ARGUMENT
/// naming the field.
fn known_id(value: &str) -> Result<VolumeId, CsiError> {
    if value.is_empty() {
        return Err(CsiError::Missing("volume_id"));
    }
    VolumeId::new(value).map_err(|e| CsiError::Invalid { field: "volume_id".into(), rule: e.rule.to_string() })
}

/// Checks capabilities: mount access only, single-node access modes only.
fn check_capabilities(caps: &[pb::VolumeCapability], field: &'static str) -> Result<(), CsiError> {
    use pb::volume_capability::{access_mode::Mode, AccessType};
    if caps.is_empty() {
        return Err(CsiError::Missing(field));
    }
    for cap in caps {
        match cap.access_type {
            Some(AccessType::Mount(_)) => {}
            Some(AccessType::Block(_)) => {
                return Err(CsiError::Invalid { field: field.into(), rule: "block access is not supported".into() })
            }
            None => return Err(CsiError::Missing("volume_capability.access_type")),
        }
        let mode = cap.access_mode.as_ref().ok_or(CsiError::Missing("volume_capability.access_mode"))?.mode;
        let single = [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ];
        if !single.iter().any(|m| *m as i32 == mode) {
            let name = Mode::try_from(mode).map(|m| m.as_str_name().to_string()).unwrap_or_else(|_| mode.to_string());
            return Err(CsiError::Invalid {
                field: format!("{field}.access_mode"),
                rule: format!("{name} is not supported: a cache volume lives on one node (use SINGLE_NODE_*)"),
            });
        }
    }
    Ok(())
}

/// Runs one request in its span and logs a failure once, here at the edge.
async fn handle<T>(
    method: &'static str,
    volume: &str,
    work: impl Future<Output = Result<T, CsiError>>,
) -> Result<Response<T>, tonic::Status> {
    let span = tracing::info_span!("csi", method, volume.id = volume);
    async move {
        match work.await {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                let status = tonic::Status::from(e);
                // Messages quote what the caller sent; escaped, a newline cannot forge a log line.
                let message = status.message().escape_debug();
                if status.code() == tonic::Code::Internal {
                    tracing::error!(code = ?status.code(), "{message}");
                } else {
                    tracing::warn!(code = ?status.code(), "{message}");
                }
                Err(status)
            }
        }
    }
    .instrument(span)
    .await
}

/// Parses `unix:///path` (or a bare absolute path) into the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(ServeError::Endpoint(endpoint.to_string()));
    }
    Ok(path)
}

/// Binds the socket (0600, replacing a stale socket but nothing else) and serves until `shutdown`.
pub async fn serve(
    socket: &Path,
    driver: Arc<Driver>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |op, source| ServeError::Io { op, path: socket.to_path_buf(), source };
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(socket).map_err(|e| io("remove stale socket", e))?,
        Ok(_) => return Err(ServeError::NotASocket(socket.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("stat", e)),
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create directory for", e))?;
    }
    // Bind under a tight umask so the socket is never world-accessible, even for an instant.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(|e| io("bind", e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|e| io("chmod", e))?;
    tracing::info!(socket = %socket.display(), node = %driver.node_id, "serving CSI");
    let metrics = driver.engine.metrics().clone();
    tonic::transport::Server::builder()
        .layer(timed::TimedLayer(metrics))
        .add_service(pb::identity_server::IdentityServer::new(identity::IdentityService(driver.clone())))
        .add_service(pb::controller_server::ControllerServer::new(controller::ControllerService(driver.clone())))
        .add_service(pb::node_server::NodeServer::new(node::NodeService(driver)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}
