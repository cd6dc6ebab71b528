//! CSI Node: stage mounts the overlay, publish binds it (or, for inline volumes, mounts and
//! later commits it), unpublish and unstage take them down again. Each handler checks and
//! translates its request, then calls one operation of `ops`.

use tonic::{Request, Response, Status};

use super::params::{Kind, VolumeParams, EPHEMERAL_KEY};
use super::pb::{self, node_server::Node, node_service_capability};
use super::status::CsiError;
use super::{check_capabilities, handle, known_id, Driver};
use crate::mount::MountOptions;
use crate::ops::Unpublished;
use crate::store::{NewVolume, VolumeId, VolumeRequest};

/// Node service.
pub struct NodeService(pub std::sync::Arc<Driver>);

fn required_id(value: &str) -> Result<&str, CsiError> {
    if value.is_empty() {
        return Err(CsiError::Missing("volume_id"));
    }
    Ok(value)
}

/// The pod kubelet names in a volume's context (podInfoOnMount).
fn pod_of(context: &std::collections::HashMap<String, String>) -> Option<(String, String)> {
    let ns = context.get("csi.storage.k8s.io/pod.namespace")?;
    let name = context.get("csi.storage.k8s.io/pod.name")?;
    Some((ns.clone(), name.clone()))
}

fn read_only_mode(cap: &pb::VolumeCapability) -> bool {
    use pb::volume_capability::access_mode::Mode;
    cap.access_mode.as_ref().is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32)
}

/// The overlay's flags: nosuid,nodev unless the StorageClass's `mountOptions` opt out.
fn mount_flags(cap: &pb::VolumeCapability, field: &str) -> Result<MountOptions, CsiError> {
    let flags = match &cap.access_type {
        Some(pb::volume_capability::AccessType::Mount(m)) => m.mount_flags.as_slice(),
        _ => &[],
    };
    MountOptions::parse(flags).map_err(|flag| CsiError::Invalid {
        field: format!("{field}.mount.mount_flags"),
        rule: format!(
            "{flag:?} is not an allowed mount flag (allowed: {})",
            crate::mount::ALLOWED_MOUNT_FLAGS.join(", ")
        ),
    })
}

/// The pod's fsGroup, which kubelet passes because we advertise VOLUME_MOUNT_GROUP.
fn mount_group(cap: &pb::VolumeCapability, field: &str) -> Result<Option<u32>, CsiError> {
    let group = match &cap.access_type {
        Some(pb::volume_capability::AccessType::Mount(m)) => m.volume_mount_group.as_str(),
        _ => "",
    };
    if group.is_empty() {
        return Ok(None);
    }
    match group.parse::<u32>() {
        Ok(gid) if gid != u32::MAX && group.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(gid)),
        _ => Err(CsiError::Invalid {
            field: format!("{field}.mount.volume_mount_group"),
            rule: "must be a decimal group id from 0 to 4294967294".into(),
        }),
    }
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
            required_id(&req.volume_id)?;
            let staging = driver.check_path(&req.staging_target_path, "staging_target_path")?;
            let cap = req.volume_capability.ok_or(CsiError::Missing("volume_capability"))?;
            check_capabilities(std::slice::from_ref(&cap), "volume_capability")?;
            let flags = mount_flags(&cap, "volume_capability")?;
            let group = mount_group(&cap, "volume_capability")?;
            let id = known_id(&req.volume_id)?;
            driver.engine.stage(&id, &staging, flags, group).await?;
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
            // The upper stays: DeleteVolume publishes it.
            driver.engine.unstage(&id, &staging).await?;
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
            let flags = mount_flags(&cap, "volume_capability")?;
            let group = mount_group(&cap, "volume_capability")?;
            let readonly = req.readonly || read_only_mode(&cap);
            let pod = pod_of(&req.volume_context);
            if req.volume_context.get(EPHEMERAL_KEY).is_some_and(|v| v == "true") {
                let id = VolumeId::new(id)
                    .map_err(|e| CsiError::Invalid { field: "volume_id".into(), rule: e.to_string() })?;
                let allowed = driver.inline_publish().await;
                let params = VolumeParams::parse(&req.volume_context, Kind::Ephemeral, &allowed)?;
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
                        pod: pod.clone(),
                        pvc: None,
                        content: None,
                    }),
                    flags,
                    root: params.root,
                    content: None,
                    cache_size: params.cache_size,
                };
                driver.engine.publish_inline(new, pod, group).await?;
                return Ok(pb::NodePublishVolumeResponse {});
            }
            let staging = driver.check_path(&req.staging_target_path, "staging_target_path")?;
            let id = known_id(id)?;
            driver.engine.publish(&id, &staging, &target, readonly, pod, group).await?;
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
            let started = std::time::Instant::now();
            if let Unpublished::Released(released) = driver.engine.unpublish(id.as_ref(), &target).await? {
                Driver::log_release(released, started);
            }
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
            required_id(&req.volume_id)?;
            if req.volume_path.is_empty() {
                return Err(CsiError::Missing("volume_path"));
            }
            let id = known_id(&req.volume_id)?;
            // Any path the volume is not mounted at, relative ones included, is simply not found.
            let stats = driver.engine.stats(&id, std::path::Path::new(&req.volume_path)).await?;
            use pb::volume_usage::Unit;
            Ok(pb::NodeGetVolumeStatsResponse {
                usage: vec![
                    pb::VolumeUsage {
                        available: stats.available_bytes as i64,
                        total: stats.total_bytes as i64,
                        used: stats.used_bytes as i64,
                        unit: Unit::Bytes as i32,
                    },
                    pb::VolumeUsage {
                        available: stats.available_inodes as i64,
                        total: stats.total_inodes as i64,
                        used: stats.used_files as i64,
                        unit: Unit::Inodes as i32,
                    },
                ],
                volume_condition: Some(pb::VolumeCondition {
                    abnormal: stats.abnormal.is_some(),
                    message: stats.abnormal.unwrap_or_else(|| "healthy".into()),
                }),
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::{rpc::Type, Rpc, Type as Cap};
        // VOLUME_MOUNT_GROUP: kubelet hands the pod's fsGroup to us instead of walking the
        // whole cache to chown it, which would copy every lower file up into the volume.
        let capabilities =
            [Type::StageUnstageVolume, Type::GetVolumeStats, Type::VolumeMountGroup, Type::VolumeCondition]
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
