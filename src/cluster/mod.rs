//! Kubernetes look-ups the driver needs: a PVC's cache-name annotation and whether a pod
//! succeeded. (Named `cluster`, not `kube`, so it does not shadow the kube crate.)

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::Api;

/// The PVC annotation that names a cache when the StorageClass does not.
pub const CACHE_NAME_ANNOTATION: &str = "jobcachefs.dev/cache-name";

/// Look-up errors, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API server answered with an error.
    #[error("get {kind} {namespace}/{name}: {message}")]
    Api { kind: &'static str, namespace: String, name: String, message: String },
    /// The API server did not answer in time.
    #[error("get {kind} {namespace}/{name}: no answer from the API server within {timeout:?}")]
    Timeout { kind: &'static str, namespace: String, name: String, timeout: Duration },
}

/// How a pod's run ended, as far as the API server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodOutcome {
    /// Every container exited 0 (or the phase is Succeeded).
    Succeeded,
    /// A container failed, or the phase is Failed.
    Failed,
    /// Still running, or not known.
    Unknown,
    /// The pod is gone.
    Gone,
}

/// The Kubernetes look-ups, behind a trait so a driver without cluster access can say so.
#[async_trait::async_trait]
pub trait Cluster: Send + Sync {
    /// The value of `key` on PVC namespace/name, `None` if absent (or the PVC is gone).
    async fn pvc_annotation(&self, namespace: &str, name: &str, key: &str) -> Result<Option<String>, ClusterError>;
    /// How pod namespace/name ended.
    async fn pod_outcome(&self, namespace: &str, name: &str) -> Result<PodOutcome, ClusterError>;
}

/// The real cluster, through kube-rs.
pub struct KubeCluster {
    client: kube::Client,
    timeout: Duration,
}

impl KubeCluster {
    /// Look-ups through `client`, each under `timeout`.
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    async fn get<K>(&self, kind: &'static str, namespace: &str, name: &str) -> Result<Option<K>, ClusterError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let what = || (kind, namespace.to_string(), name.to_string());
        match tokio::time::timeout(self.timeout, api.get_opt(name)).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(e)) => {
                let (kind, namespace, name) = what();
                Err(ClusterError::Api { kind, namespace, name, message: e.to_string() })
            }
            Err(_) => {
                let (kind, namespace, name) = what();
                Err(ClusterError::Timeout { kind, namespace, name, timeout: self.timeout })
            }
        }
    }
}

/// Reads a pod's outcome from its status: the phase, else its containers' exit codes
/// (kubelet tears volumes down once containers exit, sometimes before the phase is set).
pub fn outcome_of(pod: &Pod) -> PodOutcome {
    let Some(status) = pod.status.as_ref() else { return PodOutcome::Unknown };
    match status.phase.as_deref() {
        Some("Succeeded") => return PodOutcome::Succeeded,
        Some("Failed") => return PodOutcome::Failed,
        _ => {}
    }
    let containers = status.container_statuses.as_deref().unwrap_or(&[]);
    if containers.is_empty() {
        return PodOutcome::Unknown;
    }
    let mut all_zero = true;
    for c in containers {
        match c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            Some(t) if t.exit_code != 0 => return PodOutcome::Failed,
            Some(_) => {}
            None => all_zero = false,
        }
    }
    if all_zero {
        PodOutcome::Succeeded
    } else {
        PodOutcome::Unknown
    }
}

#[async_trait::async_trait]
impl Cluster for KubeCluster {
    async fn pvc_annotation(&self, namespace: &str, name: &str, key: &str) -> Result<Option<String>, ClusterError> {
        let pvc: Option<PersistentVolumeClaim> = self.get("persistentvolumeclaim", namespace, name).await?;
        Ok(pvc.and_then(|p| p.metadata.annotations).and_then(|mut a| a.remove(key)))
    }

    async fn pod_outcome(&self, namespace: &str, name: &str) -> Result<PodOutcome, ClusterError> {
        let pod: Option<Pod> = self.get("pod", namespace, name).await?;
        Ok(pod.as_ref().map_or(PodOutcome::Gone, outcome_of))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus};

    fn pod(phase: &str, exits: &[Option<i32>]) -> Pod {
        let statuses = exits
            .iter()
            .map(|e| ContainerStatus {
                state: Some(ContainerState {
                    terminated: e.map(|code| ContainerStateTerminated { exit_code: code, ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(statuses),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome_of(&pod("Succeeded", &[])), PodOutcome::Succeeded);
        assert_eq!(outcome_of(&pod("Failed", &[Some(0)])), PodOutcome::Failed);
        assert_eq!(outcome_of(&pod("Running", &[Some(0), Some(0)])), PodOutcome::Succeeded);
        assert_eq!(outcome_of(&pod("Running", &[Some(0), Some(2)])), PodOutcome::Failed);
        assert_eq!(outcome_of(&pod("Running", &[Some(0), None])), PodOutcome::Unknown);
        assert_eq!(outcome_of(&Pod::default()), PodOutcome::Unknown);
    }
}
