//! CSI Controller: create and delete volumes on this node (node-deployment mode).

use std::collections::{HashMap, HashSet};

use tonic::{Request, Response, Status};

use super::listing::{page, parse_token, snapshot_id_for, snapshot_message};
use super::params::{Kind, VolumeParams};
use super::pb::{self, controller_server::Controller, controller_service_capability};
use super::status::CsiError;
use super::{check_capabilities, handle, Driver};
use crate::store::{Content, NewVolume, VolumeId, VolumeRequest};

/// Controller service.
pub struct ControllerService(pub std::sync::Arc<Driver>);

/// A deterministic volume id for a CreateVolume name, so a repeat finds the same volume.
pub fn volume_id_for(name: &str) -> VolumeId {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    VolumeId::new(format!("jc-{hex}")).expect("hex is a valid volume id")
}

/// Capacity granted for a range: the required size, else the limit, else unspecified (0).
fn granted(range: Option<&pb::CapacityRange>, node_bytes: u64) -> Result<u64, CsiError> {
    let Some(r) = range else { return Ok(0) };
    let (req, lim) = (r.required_bytes, r.limit_bytes);
    if req < 0 || lim < 0 {
        return Err(CsiError::Invalid { field: "capacity_range".into(), rule: "must not be negative".into() });
    }
    if lim > 0 && lim < req {
        return Err(CsiError::Invalid {
            field: "capacity_range".into(),
            rule: format!("limit_bytes {lim} is below required_bytes {req}"),
        });
    }
    if req as u64 > node_bytes {
        return Err(CsiError::OutOfRange(format!(
            "required_bytes {req} is more than this node's cache filesystem holds ({node_bytes} bytes)"
        )));
    }
    Ok(if req > 0 { req as u64 } else { lim as u64 })
}

/// A new volume's content source: a snapshot or a volume (a clone), with how the volume's
/// request records it. Ids that could never exist are not found.
fn content_of(source: Option<&pb::VolumeContentSource>) -> Result<Option<(Content, String)>, CsiError> {
    use pb::volume_content_source::Type;
    let Some(source) = source else { return Ok(None) };
    let not_found = |what: &str, id: &str| CsiError::NotFound(format!("{what} {id:?} does not exist"));
    match &source.r#type {
        Some(Type::Snapshot(s)) if s.snapshot_id.is_empty() => {
            Err(CsiError::Missing("volume_content_source.snapshot.snapshot_id"))
        }
        Some(Type::Snapshot(s)) => {
            let id = VolumeId::new(&s.snapshot_id).map_err(|_| not_found("snapshot", &s.snapshot_id))?;
            Ok(Some((Content::Snapshot(id.clone()), format!("snapshot {id}"))))
        }
        Some(Type::Volume(v)) if v.volume_id.is_empty() => {
            Err(CsiError::Missing("volume_content_source.volume.volume_id"))
        }
        Some(Type::Volume(v)) => {
            let id = VolumeId::new(&v.volume_id).map_err(|_| not_found("volume", &v.volume_id))?;
            Ok(Some((Content::Volume(id.clone()), format!("volume {id}"))))
        }
        None => Err(CsiError::Invalid {
            field: "volume_content_source".into(),
            rule: "must name a snapshot or a volume".into(),
        }),
    }
}

/// The PVC the provisioner names (`--extra-create-metadata`), for Events users can see.
fn pvc_of(parameters: &std::collections::HashMap<String, String>) -> Option<(String, String)> {
    let namespace = parameters.get("csi.storage.k8s.io/pvc/namespace")?;
    let name = parameters.get("csi.storage.k8s.io/pvc/name")?;
    Some((namespace.clone(), name.clone()))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("CreateVolume", &req.name.clone(), async move {
            if req.name.is_empty() {
                return Err(CsiError::Missing("name"));
            }
            check_capabilities(&req.volume_capabilities, "volume_capabilities")?;
            let content = content_of(req.volume_content_source.as_ref())?;
            let mut parameters = req.parameters.clone();
            if !parameters.contains_key("cacheName") {
                if let Some(name) = driver.cache_name_from_pvc(&parameters).await? {
                    parameters.insert("cacheName".into(), name);
                }
            }
            let params = VolumeParams::parse(&parameters, Kind::Persistent, &HashSet::new())?;
            if content.is_some() && params.policy.fresh {
                return Err(CsiError::Invalid {
                    field: "parameter ignoreCache".into(),
                    rule:
                        "cannot be combined with volume_content_source: the volume starts from the snapshot or volume"
                            .into(),
                });
            }
            let capacity = granted(req.capacity_range.as_ref(), driver.engine.capacity_bytes().await?)?;
            let id = volume_id_for(&req.name);
            let new = NewVolume {
                id: id.clone(),
                cache: params.cache.clone(),
                policy: params.policy.clone(),
                fallbacks: params.fallbacks.clone(),
                mount_path: None,
                owner: None,
                request: Some(VolumeRequest {
                    name: req.name.clone(),
                    capacity_bytes: capacity,
                    parameters: params.given.clone(),
                    ephemeral: false,
                    pod: None,
                    pvc: pvc_of(&req.parameters),
                    content: content.as_ref().map(|(_, what)| what.clone()),
                }),
                flags: crate::mount::MountOptions::default(),
                root: params.root,
                content: content.map(|(c, _)| c),
                cache_size: params.cache_size,
            };
            let record = driver.engine.create(new).await?;
            tracing::info!(volume.id = %id, cache.namespace = %record.cache.namespace, cache.name = %record.cache.name,
                head.version = record.base.version, "created");
            Ok(pb::CreateVolumeResponse {
                volume: Some(pb::Volume {
                    capacity_bytes: capacity as i64,
                    volume_id: id.to_string(),
                    volume_context: params.context(),
                    content_source: req.volume_content_source,
                    accessible_topology: vec![driver.topology()],
                }),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("DeleteVolume", &req.volume_id.clone(), async move {
            if req.volume_id.is_empty() {
                return Err(CsiError::Missing("volume_id"));
            }
            // An id we could never have made names nothing: deleting it is already done.
            let Ok(id) = VolumeId::new(&req.volume_id) else { return Ok(pb::DeleteVolumeResponse {}) };
            let started = std::time::Instant::now();
            Driver::log_release(driver.engine.delete(&id).await?, started);
            Ok(pb::DeleteVolumeResponse {})
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("ValidateVolumeCapabilities", &req.volume_id.clone(), async move {
            if req.volume_id.is_empty() {
                return Err(CsiError::Missing("volume_id"));
            }
            if req.volume_capabilities.is_empty() {
                return Err(CsiError::Missing("volume_capabilities"));
            }
            driver.engine.volume(&super::known_id(&req.volume_id)?).await?;
            Ok(match check_capabilities(&req.volume_capabilities, "volume_capabilities") {
                Ok(()) => pb::ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                        volume_context: req.volume_context,
                        volume_capabilities: req.volume_capabilities,
                        parameters: req.parameters,
                        mutable_parameters: HashMap::new(),
                    }),
                    message: String::new(),
                },
                Err(e) => pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message: e.to_string() },
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::CloneVolume,
            Type::GetCapacity,
            Type::ListVolumes,
            Type::ListVolumesPublishedNodes,
            Type::VolumeCondition,
        ]
        .into_iter()
        .map(|t| pb::ControllerServiceCapability { r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })) })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("ListVolumes", "", async move {
            let start = parse_token(&req.starting_token)?;
            let listed = driver.engine.listed_volumes().await?;
            let (listed, next_token) = page(listed, |l| l.record.id.to_string(), start, req.max_entries)?;
            let entries = listed
                .into_iter()
                .map(|l| {
                    let request = l.record.request.clone().unwrap_or_default();
                    let mut context: HashMap<String, String> = request.parameters.into_iter().collect();
                    context.insert("namespace".into(), l.record.cache.namespace.to_string());
                    pb::list_volumes_response::Entry {
                        volume: Some(pb::Volume {
                            capacity_bytes: i64::try_from(request.capacity_bytes).unwrap_or(i64::MAX),
                            volume_id: l.record.id.to_string(),
                            volume_context: context,
                            content_source: None,
                            accessible_topology: vec![driver.topology()],
                        }),
                        status: Some(pb::list_volumes_response::VolumeStatus {
                            published_node_ids: if l.mounted_at.is_empty() {
                                vec![]
                            } else {
                                vec![driver.node_id.clone()]
                            },
                            volume_condition: Some(pb::VolumeCondition {
                                abnormal: l.abnormal.is_some(),
                                message: l.abnormal.unwrap_or_else(|| "healthy".into()),
                            }),
                        }),
                    }
                })
                .collect();
            Ok(pb::ListVolumesResponse { entries, next_token })
        })
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("GetCapacity", "", async move {
            if !req.volume_capabilities.is_empty() {
                // Capabilities we cannot serve have no capacity at all.
                if check_capabilities(&req.volume_capabilities, "volume_capabilities").is_err() {
                    return Ok(pb::GetCapacityResponse::default());
                }
            }
            // Another node's topology is not ours to report.
            if let Some(topology) = &req.accessible_topology {
                if topology.segments.get(super::TOPOLOGY_KEY).is_some_and(|n| n != &driver.node_id) {
                    return Ok(pb::GetCapacityResponse::default());
                }
            }
            let free = driver.engine.available_bytes().await?.saturating_sub(driver.capacity_reserve);
            let free = i64::try_from(free).unwrap_or(i64::MAX);
            Ok(pb::GetCapacityResponse {
                available_capacity: free,
                maximum_volume_size: Some(free),
                minimum_volume_size: None,
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("CreateSnapshot", &req.source_volume_id.clone(), async move {
            if req.name.is_empty() {
                return Err(CsiError::Missing("name"));
            }
            if req.source_volume_id.is_empty() {
                return Err(CsiError::Missing("source_volume_id"));
            }
            let Ok(source) = VolumeId::new(&req.source_volume_id) else {
                return Err(CsiError::NotFound(format!("volume {:?} does not exist", req.source_volume_id)));
            };
            let snapshot = driver.engine.create_snapshot(&source, snapshot_id_for(&req.name), &req.name).await?;
            tracing::info!(snapshot.id = %snapshot.id, cache.namespace = %snapshot.cache.namespace,
                cache.name = %snapshot.cache.name, layers = snapshot.layers.len(), "snapshot");
            Ok(pb::CreateSnapshotResponse { snapshot: Some(snapshot_message(&snapshot)) })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("DeleteSnapshot", &req.snapshot_id.clone(), async move {
            if req.snapshot_id.is_empty() {
                return Err(CsiError::Missing("snapshot_id"));
            }
            // An id we could never have made names nothing: deleting it is already done.
            let Ok(id) = VolumeId::new(&req.snapshot_id) else { return Ok(pb::DeleteSnapshotResponse {}) };
            driver.engine.delete_snapshot(&id).await?;
            Ok(pb::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let driver = self.0.clone();
        handle("ListSnapshots", &req.snapshot_id.clone(), async move {
            let start = parse_token(&req.starting_token)?;
            let snapshots: Vec<_> = driver
                .engine
                .snapshots()
                .await?
                .into_iter()
                .filter(|s| req.snapshot_id.is_empty() || s.id.as_str() == req.snapshot_id)
                .filter(|s| req.source_volume_id.is_empty() || s.source_volume.as_str() == req.source_volume_id)
                .collect();
            let (snapshots, next_token) = page(snapshots, |s| s.id.to_string(), start, req.max_entries)?;
            let entries = snapshots
                .iter()
                .map(|s| pb::list_snapshots_response::Entry { snapshot: Some(snapshot_message(s)) })
                .collect();
            Ok(pb::ListSnapshotsResponse { entries, next_token })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_valid_and_distinct() {
        let a = volume_id_for("pvc-1234");
        assert_eq!(a, volume_id_for("pvc-1234"));
        assert_ne!(a, volume_id_for("pvc-1235"));
        assert_eq!(a.as_str().len(), 35);
        assert!(VolumeId::new(volume_id_for(&"x".repeat(5000)).as_str()).is_ok());
    }

    #[test]
    fn capacity_rules() {
        let r = |req, lim| pb::CapacityRange { required_bytes: req, limit_bytes: lim };
        assert_eq!(granted(None, 100).unwrap(), 0);
        assert_eq!(granted(Some(&r(10, 0)), 100).unwrap(), 10);
        assert_eq!(granted(Some(&r(0, 50)), 100).unwrap(), 50);
        assert_eq!(granted(Some(&r(10, 50)), 100).unwrap(), 10);
        assert_eq!(granted(Some(&r(60, 50)), 100).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(granted(Some(&r(200, 0)), 100).unwrap_err().code(), tonic::Code::OutOfRange);
    }
}
