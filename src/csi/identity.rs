//! CSI Identity: who we are, what we offer, and whether we are ready.

use tonic::{Request, Response, Status};

use super::pb::{self, identity_server::Identity, plugin_capability};
use super::{Driver, PLUGIN_NAME};

/// Identity service.
pub struct IdentityService(pub std::sync::Arc<Driver>);

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: PLUGIN_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        let capabilities = [Type::ControllerService, Type::VolumeAccessibilityConstraints]
            .into_iter()
            .map(|t| pb::PluginCapability {
                r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(pb::GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _request: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        let ready = self.0.engine.check_state_dir().await;
        if let Err(e) = &ready {
            tracing::warn!(error = %e, "probe: state dir not usable");
        }
        Ok(Response::new(pb::ProbeResponse { ready: Some(ready.is_ok()) }))
    }
}
