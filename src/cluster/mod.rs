//! Kubernetes look-ups and writes the driver needs: a PVC's cache-name annotation, whether a
//! pod succeeded, and the Events that tell users what happened to their cache. (Named
//! `cluster`, not `kube`, so it does not shadow the kube crate.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};

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

/// The object an Event is about: the one `kubectl describe` shows it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTarget {
    /// `PersistentVolumeClaim` or `Pod`.
    pub kind: &'static str,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// One thing that happened to a cache, as an Event's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEvent {
    /// `CacheRestored`, `CacheFallback`, `CachePublished` or `CachePublishSkipped`.
    pub reason: &'static str,
    /// What happened, for people.
    pub message: String,
    /// A Warning rather than a Normal event (a change dropped for a reason to act on).
    pub warning: bool,
}

/// The Kubernetes look-ups, behind a trait so a driver without cluster access can say so.
#[async_trait::async_trait]
pub trait Cluster: Send + Sync {
    /// The value of `key` on PVC namespace/name, `None` if absent (or the PVC is gone).
    async fn pvc_annotation(&self, namespace: &str, name: &str, key: &str) -> Result<Option<String>, ClusterError>;
    /// How pod namespace/name ended.
    async fn pod_outcome(&self, namespace: &str, name: &str) -> Result<PodOutcome, ClusterError>;
    /// Records an Event on `target` without waiting: never delays or fails the caller.
    fn event(&self, _target: EventTarget, _event: CacheEvent) {}
}

/// Events waiting to be written; beyond this many the newest are dropped (and counted in
/// the log), so a slow API server cannot make the driver's memory grow.
const EVENT_QUEUE: usize = 256;

/// The real cluster, through kube-rs.
pub struct KubeCluster {
    client: kube::Client,
    timeout: Duration,
    events: Option<tokio::sync::mpsc::Sender<(EventTarget, CacheEvent)>>,
}

impl KubeCluster {
    /// Look-ups through `client`, each under `timeout`.
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        Self { client, timeout, events: None }
    }

    /// Also writes Events, reported as coming from `node`, from a task of its own (must be
    /// called inside a tokio runtime).
    pub fn with_events(mut self, node: &str) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let writer = EventWriter {
            client: self.client.clone(),
            timeout: self.timeout,
            node: node.to_string(),
            refused: Arc::new(AtomicBool::new(false)),
        };
        tokio::spawn(writer.run(rx));
        self.events = Some(tx);
        self
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

    fn event(&self, target: EventTarget, event: CacheEvent) {
        let Some(tx) = &self.events else { return };
        if tx.try_send((target, event)).is_err() {
            tracing::debug!("event queue full; an Event was dropped");
        }
    }
}

/// Writes Events one at a time, off every request's path.
struct EventWriter {
    client: kube::Client,
    timeout: Duration,
    node: String,
    /// Whether the API server's last answer was a refusal: logged once, not per event.
    refused: Arc<AtomicBool>,
}

impl EventWriter {
    async fn run(self, mut rx: tokio::sync::mpsc::Receiver<(EventTarget, CacheEvent)>) {
        while let Some((target, event)) = rx.recv().await {
            match tokio::time::timeout(self.timeout, self.write(&target, &event)).await {
                Ok(Ok(())) => {
                    if self.refused.swap(false, Ordering::SeqCst) {
                        tracing::info!("the API server accepts Events again");
                    }
                }
                Ok(Err(e)) => self.refused_once(&target, &e.to_string()),
                Err(_) => self.refused_once(&target, &format!("no answer within {:?}", self.timeout)),
            }
        }
    }

    fn refused_once(&self, target: &EventTarget, why: &str) {
        if !self.refused.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                kind = target.kind,
                namespace = %target.namespace,
                "cannot write Events ({why}); the driver needs create on events (logged once until one succeeds)"
            );
        }
    }

    /// The uid makes `kubectl describe` find the Event; the object may already be gone.
    async fn uid(&self, target: &EventTarget) -> Option<String> {
        match target.kind {
            "Pod" => Api::<Pod>::namespaced(self.client.clone(), &target.namespace)
                .get_opt(&target.name)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.metadata.uid),
            _ => Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &target.namespace)
                .get_opt(&target.name)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.metadata.uid),
        }
    }

    async fn write(&self, target: &EventTarget, event: &CacheEvent) -> Result<(), kube::Error> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let suffix = format!("{:x}", now.0.as_nanosecond());
        // Event names are DNS subdomains of at most 253 characters: a long object name is cut.
        let mut prefix: String = target.name.chars().take(253 - 1 - suffix.len()).collect();
        while prefix.ends_with(['.', '-']) {
            prefix.pop();
        }
        let mut message = event.message.clone();
        // The API server refuses messages over 1 KiB.
        if message.len() > 1024 {
            let mut end = 1021;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("...");
        }
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(format!("{prefix}.{suffix}")),
                namespace: Some(target.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some(target.kind.into()),
                namespace: Some(target.namespace.clone()),
                name: Some(target.name.clone()),
                uid: self.uid(target).await,
                ..ObjectReference::default()
            },
            reason: Some(event.reason.into()),
            message: Some(message),
            type_: Some(if event.warning { "Warning" } else { "Normal" }.into()),
            source: Some(EventSource { component: Some("jobcachefs".into()), host: Some(self.node.clone()) }),
            reporting_component: Some(crate::csi::PLUGIN_NAME.into()),
            reporting_instance: Some(self.node.clone()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &target.namespace)
            .create(&PostParams::default(), &ev)
            .await
            .map(drop)
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
