//! CSI Node: stage mounts the overlay, publish binds it (or, for inline volumes, mounts and
//! later commits it), unpublish and unstage take them down again.

use std::path::{Path, PathBuf};

use tonic::{Request, Response, Status};

use super::params::{Kind, VolumeParams, EPHEMERAL_KEY};
use super::pb::{self, node_server::Node, node_service_capability};
use super::status::CsiError;
use super::{check_capabilities, handle, Driver};
use crate::store::{NewVolume, VolumeId, VolumeRequest};

/// Node service.
pub struct NodeService(pub std::sync::Arc<Driver>);

fn required_id(value: &str) -> Result<&str, CsiError> {
    if value.is_empty() {
        return Err(CsiError::Missing("volume_id"));
    }
    Ok(value)
}

/// The pod kubelet names in an inline volume's context (podInfoOnMount).
fn pod_of(context: &std::collections::HashMap<String, String>) -> Option<(String, String)> {
    let ns = context.get("csi.storage.k8s.io/pod.namespace")?;
    let name = context.get("csi.storage.k8s.io/pod.name")?;
    Some((ns.clone(), name.clone()))
}

fn read_only_mode(cap: &pb::VolumeCapability) -> bool {
    use pb::volume_capability::access_mode::Mode;
    cap.access_mode.as_ref().is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32)
}

async fn create_dir(path: &Path) -> Result<(), CsiError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::create_dir_all(&p).map_err(|e| (p, e)))
        .await
        .map_err(|e| CsiError::Ops(crate::ops::OpsError::Join(e.to_string())))?
        .map_err(|(path, source)| CsiError::Io { op: "create directory", path, source })
}

/// Removes an unmounted target directory; never recursively, so a mount that did not come off
/// cannot lose its data.
async fn remove_target(path: &Path) -> Result<(), CsiError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || match std::fs::remove_dir(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err((p, e)),
    })
    .await
    .map_err(|e| CsiError::Ops(crate::ops::OpsError::Join(e.to_string())))?
    .map_err(|(path, source)| CsiError::Io { op: "remove target directory", path, source })
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("NodeStageVolume", &req.volume_id.clone(), async move {
            let id = required_id(&req.volume_id)?;
            let staging = driver.check_path(&req.staging_target_path, "staging_target_path")?;
            let cap = req.volume_capability.ok_or(CsiError::Missing("volume_capability"))?;
            check_capabilities(std::slice::from_ref(&cap), "volume_capability")?;
            let record = driver.existing(id).await?;
            let _guard = driver.inflight.begin(id)?;
            create_dir(&staging).await?;
            driver.engine.attach(&record.id, &staging).await?;
            Ok(pb::NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("NodeUnstageVolume", &req.volume_id.clone(), async move {
            let id = required_id(&req.volume_id)?;
            let staging = driver.check_path(&req.staging_target_path, "staging_target_path")?;
            let Ok(id) = VolumeId::new(id) else { return Ok(pb::NodeUnstageVolumeResponse {}) };
            let _guard = driver.inflight.begin(id.as_str())?;
            // The upper stays: DeleteVolume publishes it.
            driver.engine.detach(&id, &staging).await?;
            Ok(pb::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("NodePublishVolume", &req.volume_id.clone(), async move {
            let id = required_id(&req.volume_id)?;
            let target = driver.check_path(&req.target_path, "target_path")?;
            let cap = req.volume_capability.ok_or(CsiError::Missing("volume_capability"))?;
            check_capabilities(std::slice::from_ref(&cap), "volume_capability")?;
            let readonly = req.readonly || read_only_mode(&cap);
            if req.volume_context.get(EPHEMERAL_KEY).is_some_and(|v| v == "true") {
                let id = VolumeId::new(id)
                    .map_err(|e| CsiError::Invalid { field: "volume_id".into(), rule: e.to_string() })?;
                let allowed = driver.inline_publish().await;
                let params = VolumeParams::parse(&req.volume_context, Kind::Ephemeral, &allowed)?;
                let _guard = driver.inflight.begin(id.as_str())?;
                create_dir(&target).await?;
                let mut policy = params.policy.clone();
                // A read-only volume is mounted read-only and can therefore never publish.
                if readonly {
                    policy.read_only = true;
                    policy.publish = false;
                }
                let new = NewVolume {
                    id,
                    cache: params.cache.clone(),
                    policy,
                    fallbacks: params.fallbacks.clone(),
                    mount_path: Some(target),
                    owner: None,
                    request: Some(VolumeRequest {
                        name: String::new(),
                        capacity_bytes: 0,
                        parameters: params.given.clone(),
                        ephemeral: true,
                        pod: pod_of(&req.volume_context),
                    }),
                };
                driver.engine.restore(new).await?;
                return Ok(pb::NodePublishVolumeResponse {});
            }
            let staging = driver.check_path(&req.staging_target_path, "staging_target_path")?;
            let record = driver.existing(id).await?;
            let _guard = driver.inflight.begin(id)?;
            let engine = driver.engine.clone();
            let (rec, staging2) = (record.clone(), staging.clone());
            if !driver.blocking(move || Ok(engine.is_mounted_at(&rec, &staging2)?)).await? {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is not staged at {}: call NodeStageVolume first",
                    staging.display()
                )));
            }
            create_dir(&target).await?;
            let engine = driver.engine.clone();
            let (rec, tgt) = (record.clone(), target.clone());
            driver
                .blocking(move || {
                    let found = engine
                        .mounter()
                        .mount_at(&tgt)
                        .map_err(|source| crate::ops::OpsError::Mount { volume: rec.id.clone(), source })?;
                    match found {
                        Some(m) if engine.is_mounted_at(&rec, &tgt)? && m.is_readonly() == readonly => Ok(()),
                        Some(m) => Err(CsiError::AlreadyExists(format!(
                            "{} already has {} mounted ({}); unpublish it first",
                            tgt.display(),
                            m.source,
                            if m.is_readonly() { "read-only" } else { "read-write" }
                        ))),
                        None => engine
                            .mounter()
                            .bind(&staging, &tgt, readonly)
                            .map_err(|source| crate::ops::OpsError::Mount { volume: rec.id.clone(), source }.into()),
                    }
                })
                .await?;
            Ok(pb::NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("NodeUnpublishVolume", &req.volume_id.clone(), async move {
            let id = required_id(&req.volume_id)?;
            let target = driver.check_path(&req.target_path, "target_path")?;
            let id = VolumeId::new(id).ok();
            let _guard = match &id {
                Some(id) => Some(driver.inflight.begin(id.as_str())?),
                None => None,
            };
            let record = match &id {
                Some(id) => driver.engine.store().volume(id)?,
                None => None,
            };
            match record {
                // An inline volume's unpublish is its release: unmount, commit, drop.
                Some(rec)
                    if rec.request.as_ref().is_some_and(|r| r.ephemeral)
                        && rec.mount_path.as_deref() == Some(target.as_path()) =>
                {
                    let allow = driver.pod_allows_publish(&rec).await;
                    driver.release(&rec.id, allow).await?;
                }
                // A bind of a persistent volume: take it down only if it really is this volume's,
                // so an id naming another volume (or nothing) cannot unmount someone else's target.
                Some(rec) => {
                    let engine = driver.engine.clone();
                    let tgt = target.clone();
                    driver
                        .blocking(move || {
                            if engine.is_mounted_at(&rec, &tgt)? {
                                crate::ops::unmount_patiently(engine.mounter(), &tgt)
                                    .map_err(|source| crate::ops::OpsError::Mount { volume: rec.id.clone(), source })?;
                            }
                            Ok(())
                        })
                        .await?;
                }
                None => {}
            }
            // Whatever is still mounted there is not ours to remove.
            let engine = driver.engine.clone();
            let tgt = target.clone();
            let still_mounted = driver
                .blocking(move || {
                    Ok(engine.mounter().mount_at(&tgt).map_err(|e| CsiError::NotFound(e.to_string()))?.is_some())
                })
                .await?;
            if still_mounted {
                return Ok(pb::NodeUnpublishVolumeResponse {});
            }
            remove_target(&target).await?;
            Ok(pb::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("NodeGetVolumeStats", &req.volume_id.clone(), async move {
            let id = required_id(&req.volume_id)?;
            if req.volume_path.is_empty() {
                return Err(CsiError::Missing("volume_path"));
            }
            let record = driver.existing(id).await?;
            // Any path the volume is not mounted at, relative ones included, is simply not found.
            let path = PathBuf::from(&req.volume_path);
            let engine = driver.engine.clone();
            driver
                .blocking(move || {
                    // A path that cannot even be resolved is certainly not where the volume is.
                    if !engine.is_mounted_at(&record, &path).unwrap_or(false) {
                        return Err(CsiError::NotFound(format!(
                            "volume {} is not mounted at {}",
                            record.id,
                            path.display()
                        )));
                    }
                    let fs = nix::sys::statvfs::statvfs(&path).map_err(|e| CsiError::Io {
                        op: "statvfs",
                        path: path.clone(),
                        source: e.into(),
                    })?;
                    let upper = engine.store().layout().upper_dir(&record.id);
                    let used = crate::store::tree::measure(&upper).map_err(crate::store::StoreError::from)?;
                    let frsize = fs.fragment_size() as i64;
                    use pb::volume_usage::Unit;
                    Ok(pb::NodeGetVolumeStatsResponse {
                        usage: vec![
                            pb::VolumeUsage {
                                available: fs.blocks_available() as i64 * frsize,
                                total: fs.blocks() as i64 * frsize,
                                used: used.bytes as i64,
                                unit: Unit::Bytes as i32,
                            },
                            pb::VolumeUsage {
                                available: fs.files_available() as i64,
                                total: fs.files() as i64,
                                used: used.files as i64,
                                unit: Unit::Inodes as i32,
                            },
                        ],
                        volume_condition: None,
                    })
                })
                .await
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::{rpc::Type, Rpc, Type as Cap};
        let capabilities = [Type::StageUnstageVolume, Type::GetVolumeStats]
            .into_iter()
            .map(|t| pb::NodeServiceCapability { r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })) })
            .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.0.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(self.0.topology()),
        }))
    }
}
