//! CSI Controller: create and delete volumes on this node (node-deployment mode).

use std::collections::{HashMap, HashSet};

use tonic::{Request, Response, Status};

use super::params::{Kind, VolumeParams};
use super::pb::{self, controller_server::Controller, controller_service_capability};
use super::status::CsiError;
use super::{check_capabilities, handle, Driver};
use crate::store::{NewVolume, VolumeId, VolumeRequest};

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
            if req.volume_content_source.is_some() {
                return Err(CsiError::Invalid {
                    field: "volume_content_source".into(),
                    rule: "snapshots and clones are not supported; caches restore from their own versions".into(),
                });
            }
            let mut parameters = req.parameters.clone();
            if !parameters.contains_key("cacheName") {
                if let Some(name) = driver.cache_name_from_pvc(&parameters).await? {
                    parameters.insert("cacheName".into(), name);
                }
            }
            let params = VolumeParams::parse(&parameters, Kind::Persistent, &HashSet::new())?;
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
                }),
                flags: crate::mount::MountOptions::default(),
                root: params.root,
            };
            let record = driver.engine.create(new).await?;
            tracing::info!(volume.id = %id, cache.namespace = %record.cache.namespace, cache.name = %record.cache.name,
                head.version = record.base.version, "created");
            Ok(pb::CreateVolumeResponse {
                volume: Some(pb::Volume {
                    capacity_bytes: capacity as i64,
                    volume_id: id.to_string(),
                    volume_context: params.context(),
                    content_source: None,
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
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![pb::ControllerServiceCapability {
                r#type: Some(Cap::Rpc(Rpc { r#type: Type::CreateDeleteVolume as i32 })),
            }],
        }))
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
