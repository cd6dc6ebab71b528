//! `jobcachefs csi`: a small client to walk a volume through its life from a shell.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use tonic::transport::{Channel, Endpoint, Uri};

use super::pb;

/// Where the driver listens, and what to ask it.
#[derive(Debug, Args)]
pub struct CsiArgs {
    /// The driver's socket: unix:///absolute/path/csi.sock.
    #[arg(long)]
    pub endpoint: String,
    #[command(subcommand)]
    pub call: Call,
}

/// One CSI call.
#[derive(Debug, Subcommand)]
pub enum Call {
    /// GetPluginInfo, Probe and NodeGetInfo.
    Info,
    /// CreateVolume NAME with parameters (cacheName=..., publish=...).
    Create {
        /// The volume's name (a PVC's name in a cluster).
        name: String,
        /// KEY=VALUE parameters, as a StorageClass would give them.
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
    },
    /// NodeStageVolume: mount the cache at STAGING.
    Stage { volume_id: String, staging: PathBuf },
    /// NodePublishVolume: bind STAGING onto TARGET.
    Publish {
        volume_id: String,
        staging: PathBuf,
        target: PathBuf,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
    },
    /// NodeUnpublishVolume.
    Unpublish { volume_id: String, target: PathBuf },
    /// NodeUnstageVolume (keeps the changes for DeleteVolume).
    Unstage { volume_id: String, staging: PathBuf },
    /// DeleteVolume: publish the changes as the cache's next version, free the volume.
    Delete { volume_id: String },
    /// NodeGetVolumeStats.
    Stats { volume_id: String, path: PathBuf },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| "must be KEY=VALUE".to_string())
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the driver.
    #[error("connect {endpoint}: {source}")]
    Connect { endpoint: String, source: tonic::transport::Error },
    /// The driver answered with an error.
    #[error("{call}: {} ({})", .status.message(), .status.code())]
    Call { call: &'static str, status: tonic::Status },
    /// Bad endpoint.
    #[error(transparent)]
    Endpoint(#[from] super::ServeError),
}

/// Connects to a driver's unix socket.
pub async fn connect(endpoint: &str) -> Result<Channel, ClientError> {
    let path = super::socket_path(endpoint)?;
    let err = |source| ClientError::Connect { endpoint: endpoint.to_string(), source };
    // The URI is a placeholder: the connector below always dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(err)
}

fn mount_cap(readonly: bool) -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    let mode = if readonly { Mode::SingleNodeReaderOnly } else { Mode::SingleNodeWriter };
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs one call and prints its answer.
pub async fn run(args: CsiArgs) -> Result<(), ClientError> {
    let channel = connect(&args.endpoint).await?;
    let mut identity = pb::identity_client::IdentityClient::new(channel.clone());
    let mut controller = pb::controller_client::ControllerClient::new(channel.clone());
    let mut node = pb::node_client::NodeClient::new(channel);
    let fail = |call| move |status| ClientError::Call { call, status };
    match args.call {
        Call::Info => {
            let info = identity.get_plugin_info(pb::GetPluginInfoRequest {}).await.map_err(fail("GetPluginInfo"))?;
            let probe = identity.probe(pb::ProbeRequest {}).await.map_err(fail("Probe"))?;
            let node_info = node.node_get_info(pb::NodeGetInfoRequest {}).await.map_err(fail("NodeGetInfo"))?;
            let (info, node_info) = (info.into_inner(), node_info.into_inner());
            println!(
                "{} {} ready={} node={}",
                info.name,
                info.vendor_version,
                probe.into_inner().ready.unwrap_or(false),
                node_info.node_id
            );
        }
        Call::Create { name, params } => {
            let req = pb::CreateVolumeRequest {
                name,
                volume_capabilities: vec![mount_cap(false)],
                parameters: params.into_iter().collect::<HashMap<_, _>>(),
                ..Default::default()
            };
            let vol = controller.create_volume(req).await.map_err(fail("CreateVolume"))?.into_inner().volume;
            let vol = vol.unwrap_or_default();
            println!("volume_id={} capacity_bytes={}", vol.volume_id, vol.capacity_bytes);
        }
        Call::Stage { volume_id, staging } => {
            let req = pb::NodeStageVolumeRequest {
                volume_id,
                staging_target_path: path_str(&staging),
                volume_capability: Some(mount_cap(false)),
                ..Default::default()
            };
            node.node_stage_volume(req).await.map_err(fail("NodeStageVolume"))?;
            println!("staged at {}", staging.display());
        }
        Call::Publish { volume_id, staging, target, readonly } => {
            let req = pb::NodePublishVolumeRequest {
                volume_id,
                staging_target_path: path_str(&staging),
                target_path: path_str(&target),
                volume_capability: Some(mount_cap(readonly)),
                readonly,
                ..Default::default()
            };
            node.node_publish_volume(req).await.map_err(fail("NodePublishVolume"))?;
            println!("published at {}", target.display());
        }
        Call::Unpublish { volume_id, target } => {
            let req = pb::NodeUnpublishVolumeRequest { volume_id, target_path: path_str(&target) };
            node.node_unpublish_volume(req).await.map_err(fail("NodeUnpublishVolume"))?;
            println!("unpublished {}", target.display());
        }
        Call::Unstage { volume_id, staging } => {
            let req = pb::NodeUnstageVolumeRequest { volume_id, staging_target_path: path_str(&staging) };
            node.node_unstage_volume(req).await.map_err(fail("NodeUnstageVolume"))?;
            println!("unstaged {}", staging.display());
        }
        Call::Delete { volume_id } => {
            let req = pb::DeleteVolumeRequest { volume_id: volume_id.clone(), ..Default::default() };
            controller.delete_volume(req).await.map_err(fail("DeleteVolume"))?;
            println!("deleted {volume_id}");
        }
        Call::Stats { volume_id, path } => {
            let req = pb::NodeGetVolumeStatsRequest { volume_id, volume_path: path_str(&path), ..Default::default() };
            let stats = node.node_get_volume_stats(req).await.map_err(fail("NodeGetVolumeStats"))?.into_inner();
            for u in stats.usage {
                let unit = pb::volume_usage::Unit::try_from(u.unit).map(|u| u.as_str_name()).unwrap_or("UNKNOWN");
                println!("{unit}: used={} available={} total={}", u.used, u.available, u.total);
            }
        }
    }
    Ok(())
}
