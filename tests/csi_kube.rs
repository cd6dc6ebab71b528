//! The driver with Kubernetes access (a fake API server over HTTP, reached through a
//! kubeconfig as in a real deployment): cache names from PVC annotations, publishWhen=on-success
//! from the pod's outcome, the inline publish allow-list from the config file, and Lease locks.

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;
#[path = "common/fake_api.rs"]
mod fake_api;

use std::collections::HashMap;

use common::*;
use csi_server::{mount_cap, Server};
use jobcachefs::csi::pb;
use serde_json::json;

async fn serve(sb: &Sandbox, kubeconfig: &std::path::Path, extra: &[&str]) -> (Server, tonic::transport::Channel) {
    csi_server::serve(sb.dir.path(), &sb.state, "node-1", extra, &[("KUBECONFIG", kubeconfig)]).await
}

fn version(sb: &Sandbox, ns: &str, name: &str) -> u64 {
    sb.store().head(&jobcachefs::store::CacheKey::new(ns, name).unwrap()).unwrap().map_or(0, |h| h.version)
}

async fn inline_job(
    node: &mut pb::node_client::NodeClient<tonic::transport::Channel>,
    sb: &Sandbox,
    id: &str,
    pod: &str,
    ns: &str,
) {
    let target = sb.dir.path().join(format!("pods/{id}/mount"));
    csi_server::inline_publish(node, id, &target, ns, pod, &[("cacheName", "npm"), ("publishWhen", "on-success")])
        .await;
    std::fs::write(target.join(format!("{pod}.txt")), pod).unwrap();
    csi_server::inline_unpublish(node, id, &target).await;
}

fn pod(phase: &str, exit: Option<i32>) -> serde_json::Value {
    let state = match exit {
        Some(code) => json!({"terminated": {"exitCode": code}}),
        None => json!({"running": {}}),
    };
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": {"phase": phase,
        "containerStatuses": [{"name": "build", "image": "maven", "imageID": "", "ready": false, "restartCount": 0, "state": state}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_name_comes_from_the_pvc_annotation() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (api, url) = fake_api::start_http().await;
    api.put_object(
        "/api/v1/namespaces/team/persistentvolumeclaims/build-cache",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "build-cache", "namespace": "team", "annotations": {"jobcachefs.dev/cache-name": "maven-main"}}}),
    );
    let kc = fake_api::kubeconfig(sb.dir.path(), &url);
    let (_server, channel) = serve(&sb, &kc, &[]).await;
    let mut controller = pb::controller_client::ControllerClient::new(channel);
    let meta = |pvc: &str| -> HashMap<String, String> {
        [("csi.storage.k8s.io/pvc/name", pvc), ("csi.storage.k8s.io/pvc/namespace", "team")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let req = |name: &str, pvc: &str| pb::CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![mount_cap()],
        parameters: meta(pvc),
        ..Default::default()
    };
    let vol = controller.create_volume(req("pvc-1", "build-cache")).await.expect("create").into_inner().volume.unwrap();
    assert_eq!(vol.volume_context.get("cacheName").map(String::as_str), Some("maven-main"));
    assert_eq!(vol.volume_context.get("namespace").map(String::as_str), Some("team"));
    let again =
        controller.create_volume(req("pvc-1", "build-cache")).await.expect("repeat").into_inner().volume.unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    let err = controller.create_volume(req("pvc-2", "no-such-pvc")).await.expect_err("no annotation, no cacheName");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("cacheName"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_success_publishes_only_for_pods_that_succeeded() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (api, url) = fake_api::start_http().await;
    api.put_object("/api/v1/namespaces/ci/pods/ok-1", pod("Succeeded", Some(0)));
    api.put_object("/api/v1/namespaces/ci/pods/running-done", pod("Running", Some(0)));
    api.put_object("/api/v1/namespaces/ci/pods/bad-1", pod("Failed", Some(1)));
    api.put_object("/api/v1/namespaces/ci/pods/still-running", pod("Running", None));
    let kc = fake_api::kubeconfig(sb.dir.path(), &url);
    let config = sb.dir.path().join("config.json");
    std::fs::write(&config, r#"{"inlinePublishNamespaces": ["ci"]}"#).unwrap();
    let (_server, channel) = serve(&sb, &kc, &["--config", config.to_str().unwrap()]).await;
    let mut node = pb::node_client::NodeClient::new(channel);
    inline_job(&mut node, &sb, "csi-a1", "bad-1", "ci").await;
    assert_eq!(version(&sb, "ci", "npm"), 0, "a failed pod does not publish");
    inline_job(&mut node, &sb, "csi-a2", "still-running", "ci").await;
    assert_eq!(version(&sb, "ci", "npm"), 0, "an unknown outcome does not publish");
    inline_job(&mut node, &sb, "csi-a3", "gone-pod", "ci").await;
    assert_eq!(version(&sb, "ci", "npm"), 0, "a pod that is gone does not publish");
    inline_job(&mut node, &sb, "csi-a4", "ok-1", "ci").await;
    assert_eq!(version(&sb, "ci", "npm"), 1, "a succeeded pod publishes");
    inline_job(&mut node, &sb, "csi-a5", "running-done", "ci").await;
    assert_eq!(version(&sb, "ci", "npm"), 2, "all containers exited 0 counts as success");
    // The allow-list is re-read: once the admin removes the namespace, nothing more publishes.
    std::fs::write(&config, r#"{"inlinePublishNamespaces": []}"#).unwrap();
    inline_job(&mut node, &sb, "csi-a6", "ok-1", "ci").await;
    assert_eq!(version(&sb, "ci", "npm"), 2, "namespace no longer allowed");
    // A broken config file fails closed.
    std::fs::write(&config, "{not json").unwrap();
    inline_job(&mut node, &sb, "csi-a7", "ok-1", "ci").await;
    assert_eq!(version(&sb, "ci", "npm"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lock_guards_publishes_through_the_driver() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (api, url) = fake_api::start_http().await;
    let kc = fake_api::kubeconfig(sb.dir.path(), &url);
    let (_server, channel) = serve(&sb, &kc, &["--lock", "lease", "--allow-inline-publish", "ci"]).await;
    let mut node = pb::node_client::NodeClient::new(channel);
    api.put_object("/api/v1/namespaces/ci/pods/ok-1", pod("Succeeded", Some(0)));
    inline_job(&mut node, &sb, "csi-b1", "ok-1", "ci").await;
    assert_eq!(version(&sb, "ci", "npm"), 1);
    let name = jobcachefs::lock::lease::lease_name(&jobcachefs::store::CacheKey::new("ci", "npm").unwrap());
    let lease = api.lease("ci", &name).expect("the publish took the cache's Lease");
    assert!(lease["spec"]["holderIdentity"].is_null(), "and released it: {lease}");
    assert_eq!(lease["metadata"]["labels"]["app.kubernetes.io/managed-by"], "jobcachefs");
}

/// A generic ephemeral volume's life (a PVC made from the pod's template) for pod ci/`pod`,
/// with the pod info kubelet adds to NodePublish (`podInfoOnMount`); the job writes one file.
async fn pvc_job(channel: &tonic::transport::Channel, sb: &Sandbox, name: &str, pod: &str, params: &[(&str, &str)]) {
    let mut controller = pb::controller_client::ControllerClient::new(channel.clone());
    let mut node = pb::node_client::NodeClient::new(channel.clone());
    let mut parameters: HashMap<String, String> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    parameters.insert("cacheName".into(), "gradle".into());
    parameters.insert("csi.storage.k8s.io/pvc/namespace".into(), "ci".into());
    let vol = controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![mount_cap()],
            parameters,
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let id = vol.volume_id.clone();
    let staging = sb.dir.path().join(format!("plugins/staging/{name}"));
    let target = sb.dir.path().join(format!("pods/{pod}/volumes/{name}"));
    node.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(mount_cap()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .expect("NodeStageVolume");
    let mut context = vol.volume_context.clone();
    context.insert("csi.storage.k8s.io/pod.name".into(), pod.into());
    context.insert("csi.storage.k8s.io/pod.namespace".into(), "ci".into());
    context.insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
    node.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(mount_cap()),
        volume_context: context,
        ..Default::default()
    })
    .await
    .expect("NodePublishVolume");
    std::fs::write(target.join(format!("{pod}.txt")), pod).expect("the job writes");
    node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .expect("NodeUnpublishVolume");
    node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .expect("NodeUnstageVolume");
    // The pod is gone by the time the PVC is deleted: its outcome was read at NodeUnpublish.
    controller
        .delete_volume(pb::DeleteVolumeRequest { volume_id: id, ..Default::default() })
        .await
        .expect("DeleteVolume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pvc_publishes_only_if_its_pod_succeeded_by_default() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (api, url) = fake_api::start_http().await;
    api.put_object("/api/v1/namespaces/ci/pods/failed", pod("Failed", Some(1)));
    api.put_object("/api/v1/namespaces/ci/pods/passed", pod("Succeeded", Some(0)));
    let kc = fake_api::kubeconfig(sb.dir.path(), &url);
    let (_server, channel) = serve(&sb, &kc, &[]).await;
    let store = sb.store();
    let gradle = jobcachefs::store::CacheKey::new("ci", "gradle").unwrap();
    let files = |store: &jobcachefs::store::Store| -> Vec<String> {
        let head = store.head(&gradle).unwrap().expect("a version");
        let mut names: Vec<String> = head
            .layers
            .iter()
            .flat_map(|l| std::fs::read_dir(sb.layout().layer_dir(l)).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    pvc_job(&channel, &sb, "pvc-failed", "failed", &[]).await;
    assert_eq!(version(&sb, "ci", "gradle"), 0, "a Job that exits 1 publishes nothing (on-success by default)");
    pvc_job(&channel, &sb, "pvc-unknown", "vanished", &[]).await;
    assert_eq!(version(&sb, "ci", "gradle"), 0, "no answer from the API: no publish");
    pvc_job(&channel, &sb, "pvc-passed", "passed", &[]).await;
    assert_eq!(version(&sb, "ci", "gradle"), 1, "a pod that succeeded publishes");
    assert_eq!(files(&store), ["passed.txt"]);
    // A class that wants every outcome says so.
    pvc_job(&channel, &sb, "pvc-always", "failed", &[("publishWhen", "always")]).await;
    assert_eq!(version(&sb, "ci", "gradle"), 2, "publishWhen=always publishes a failed pod's change");
    assert_eq!(files(&store), ["failed.txt", "passed.txt"]);
}

/// Waits (up to 10 s) until the fake API server holds `n` Events: they are written in the
/// background, after the CSI call has answered.
async fn events(api: &fake_api::FakeApi, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..200 {
        let got = api.events();
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("expected {n} Events, got {:#?}", api.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_users_what_happened_to_their_cache() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (api, url) = fake_api::start_http().await;
    let pvc = |name: &str, uid: &str| json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "ci", "uid": uid}});
    api.put_object("/api/v1/namespaces/ci/persistentvolumeclaims/build-a", pvc("build-a", "uid-pvc-a"));
    let mut ok = pod("Succeeded", Some(0));
    ok["metadata"] = json!({"name": "ok-1", "namespace": "ci", "uid": "uid-pod-1"});
    api.put_object("/api/v1/namespaces/ci/pods/ok-1", ok);
    let kc = fake_api::kubeconfig(sb.dir.path(), &url);
    let (server, channel) = serve(&sb, &kc, &["--allow-inline-publish", "ci"]).await;
    let mut node = pb::node_client::NodeClient::new(channel.clone());
    let mut controller = pb::controller_client::ControllerClient::new(channel.clone());

    // A PVC: restored (empty) at NodeStage, published at DeleteVolume; both on the PVC.
    let params: HashMap<String, String> = [
        ("cacheName", "npm"),
        ("publishWhen", "always"),
        ("csi.storage.k8s.io/pvc/name", "build-a"),
        ("csi.storage.k8s.io/pvc/namespace", "ci"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let vol = controller
        .create_volume(pb::CreateVolumeRequest {
            name: "pvc-a".into(),
            volume_capabilities: vec![mount_cap()],
            parameters: params,
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    let staging = sb.dir.path().join("plugins/staging/pvc-a");
    node.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(mount_cap()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .expect("NodeStage");
    std::fs::write(staging.join("index.json"), "{}").unwrap();
    node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    })
    .await
    .expect("NodeUnstage");
    controller
        .delete_volume(pb::DeleteVolumeRequest { volume_id: vol.volume_id.clone(), ..Default::default() })
        .await
        .expect("DeleteVolume");
    let got = events(&api, 2).await;
    let on = |e: &serde_json::Value| {
        (
            e["involvedObject"]["kind"].as_str().unwrap_or("").to_string(),
            e["involvedObject"]["name"].as_str().unwrap_or("").to_string(),
            e["involvedObject"]["uid"].as_str().unwrap_or("").to_string(),
            e["reason"].as_str().unwrap_or("").to_string(),
            e["type"].as_str().unwrap_or("").to_string(),
        )
    };
    let pvc_uid = "uid-pvc-a".to_string();
    assert_eq!(
        on(&got[0]),
        ("PersistentVolumeClaim".into(), "build-a".into(), pvc_uid.clone(), "CacheRestored".into(), "Normal".into())
    );
    assert!(got[0]["message"].as_str().unwrap().contains("cache ci/npm has no version yet"), "{}", got[0]);
    assert_eq!(
        on(&got[1]),
        ("PersistentVolumeClaim".into(), "build-a".into(), pvc_uid, "CachePublished".into(), "Normal".into())
    );
    assert!(got[1]["message"].as_str().unwrap().contains("published cache ci/npm v1"), "{}", got[1]);
    assert_eq!(got[1]["reportingComponent"], "jobcachefs.dev");
    assert_eq!(got[1]["source"]["host"], "node-1");

    // Inline volumes: Events on the pod, with its uid. Two from v1: one publishes, one is stale.
    let attrs = [("cacheName", "npm"), ("publishWhen", "always")];
    let (ta, tb) = (sb.dir.path().join("pods/a/mount"), sb.dir.path().join("pods/b/mount"));
    csi_server::inline_publish(&mut node, "csi-e1", &ta, "ci", "ok-1", &attrs).await;
    csi_server::inline_publish(&mut node, "csi-e2", &tb, "ci", "ok-1", &attrs).await;
    std::fs::write(ta.join("a"), "a").unwrap();
    std::fs::write(tb.join("b"), "b").unwrap();
    csi_server::inline_unpublish(&mut node, "csi-e1", &ta).await;
    csi_server::inline_unpublish(&mut node, "csi-e2", &tb).await;
    let got = events(&api, 6).await;
    let pod_events: Vec<_> = got[2..].iter().map(on).collect();
    assert!(pod_events.iter().all(|e| e.0 == "Pod" && e.1 == "ok-1" && e.2 == "uid-pod-1"), "{pod_events:?}");
    let reasons: Vec<&str> = got[2..].iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["CacheRestored", "CacheRestored", "CachePublished", "CachePublishSkipped"]);
    assert!(got[2]["message"].as_str().unwrap().contains("restored cache ci/npm v1 (1 layers"), "{}", got[2]);
    assert!(got[5]["message"].as_str().unwrap().contains("base 1 is stale, current is 2"), "{}", got[5]);

    // A fallback restore says so.
    let fb = sb.dir.path().join("pods/c/mount");
    let fattrs = [("cacheName", "pr-7"), ("fallbackCaches", "npm"), ("publish", "false")];
    csi_server::inline_publish(&mut node, "csi-e3", &fb, "ci", "ok-1", &fattrs).await;
    let got = events(&api, 7).await;
    assert_eq!(got[6]["reason"], "CacheFallback");
    assert!(
        got[6]["message"].as_str().unwrap().contains("cache ci/pr-7 has no version yet: restored ci/npm v2"),
        "{}",
        got[6]
    );
    csi_server::inline_unpublish(&mut node, "csi-e3", &fb).await;
    let got = events(&api, 8).await;
    assert!(got[7]["message"].as_str().unwrap().contains("not allowed"), "{}", got[7]);

    // An API server that refuses Events changes nothing for the CSI calls, and says so once.
    api.forbid_events.store(true, std::sync::atomic::Ordering::SeqCst);
    for n in 0..3 {
        let t = sb.dir.path().join(format!("pods/f{n}/mount"));
        let id = format!("csi-f{n}");
        csi_server::inline_publish(&mut node, &id, &t, "ci", "ok-1", &attrs).await;
        csi_server::inline_unpublish(&mut node, &id, &t).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(api.events().len(), 8, "refused Events are not stored");
    assert_eq!(version(&sb, "ci", "npm"), 2, "nothing published (no change), nothing failed");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert_eq!(log.matches("cannot write Events").count(), 1, "logged once, not per call:\n{log}");
}
