//! What an admin sees: `/metrics` of a real server after a scripted lifecycle, read back
//! through the Python `prometheus_client` OpenMetrics parser (the format is checked by a
//! parser that is not ours), and compared with what `cache ls --json` prints.

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use jobcachefs::csi::pb;
use pb::node_client::NodeClient;
use tonic::transport::Channel;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, serde::Deserialize)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parses OpenMetrics text with prometheus_client's parser; panics if it does not parse.
fn parse_openmetrics(text: &str) -> Vec<Sample> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with prometheus_client: pip install prometheus_client)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write metrics");
    let out = child.wait_with_output().expect("parser");
    assert!(out.status.success(), "not valid OpenMetrics: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("parser output")
}

/// The value of the one sample named `name` whose labels include `labels`; 0 when absent.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} matches {} samples: {found:?}", found.len());
    found.first().map_or(0.0, |s| s.value)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

async fn scrape(port: u16) -> (String, String) {
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        text
    })
    .await
    .expect("scrape");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // hyper may chunk the body: undo it.
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_string() };
    (head.to_string(), body)
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// An inline volume's whole life: published, `write` run in it, unpublished (the commit).
async fn job(
    node: &mut NodeClient<Channel>,
    dir: &Path,
    n: u32,
    ns: &str,
    attrs: &[(&str, &str)],
    write: impl Fn(&Path),
) {
    let id = format!("csi-{n:02x}{}", "7a".repeat(31));
    let target = dir.join(format!("pods/job-{n}/volume"));
    let mut all = vec![("cacheName", "npm"), ("publishWhen", "always")];
    all.extend_from_slice(attrs);
    csi_server::inline_publish(node, &id, &target, ns, &format!("job-{n}"), &all).await;
    write(&target);
    csi_server::inline_unpublish(node, &id, &target).await;
}

async fn publish_only(node: &mut NodeClient<Channel>, dir: &Path, n: u32) -> (String, std::path::PathBuf) {
    let id = format!("csi-{n:02x}{}", "7a".repeat(31));
    let target = dir.join(format!("pods/job-{n}/volume"));
    csi_server::inline_publish(
        node,
        &id,
        &target,
        "ci",
        &format!("job-{n}"),
        &[("cacheName", "npm"), ("publishWhen", "always")],
    )
    .await;
    (id, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_lifecycle_exactly() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let (_server, channel) = csi_server::serve(
        sb.dir.path(),
        &sb.state,
        "node-a",
        &["--allow-inline-publish", "ci", "--metrics-address", &address],
        &[],
    )
    .await;
    let mut node = NodeClient::new(channel);
    let dir = sb.dir.path().to_path_buf();
    let file =
        |name: &'static str, bytes: usize| move |t: &Path| std::fs::write(t.join(name), vec![b'x'; bytes]).unwrap();

    // miss + committed (v1)
    job(&mut node, &dir, 1, "ci", &[], file("a", 100)).await;
    // two volumes from v1: one commits (v2), the other is stale
    let (b, tb) = publish_only(&mut node, &dir, 2).await;
    let (c, tc) = publish_only(&mut node, &dir, 3).await;
    std::fs::write(tb.join("b"), "b").unwrap();
    std::fs::write(tc.join("c"), "c").unwrap();
    csi_server::inline_unpublish(&mut node, &b, &tb).await;
    csi_server::inline_unpublish(&mut node, &c, &tc).await;
    // not allowed: namespace dev may not publish inline volumes (and its cache is empty: a miss)
    job(&mut node, &dir, 4, "dev", &[], file("d", 10)).await;
    // over the limit
    job(&mut node, &dir, 5, "ci", &[("maxBytes", "1KiB")], file("big", 10 * 1024)).await;
    // nothing changed
    job(&mut node, &dir, 6, "ci", &[], |_| {}).await;
    // a refused call
    let bad = node
        .node_publish_volume(pb::NodePublishVolumeRequest { volume_id: String::new(), ..Default::default() })
        .await
        .expect_err("no volume id");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let (head, text) = scrape(port).await;
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    let samples = parse_openmetrics(&text);
    let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);

    let ci = [("namespace", "ci")];
    assert_eq!(v("jobcachefs_restores_total", &[ci[0], ("result", "miss")]), 1.0, "{text}");
    assert_eq!(v("jobcachefs_restores_total", &[ci[0], ("result", "hit")]), 4.0, "{text}");
    assert_eq!(v("jobcachefs_restores_total", &[("namespace", "dev"), ("result", "miss")]), 1.0);
    for (outcome, n) in
        [("committed", 2.0), ("stale", 1.0), ("over_limit", 1.0), ("nothing_changed", 1.0), ("failed", 0.0)]
    {
        assert_eq!(v("jobcachefs_publishes_total", &[ci[0], ("outcome", outcome)]), n, "{outcome}: {text}");
    }
    assert_eq!(v("jobcachefs_publishes_total", &[("namespace", "dev"), ("outcome", "not_allowed")]), 1.0);
    assert_eq!(v("jobcachefs_publish_duration_seconds_count", &ci), 5.0);
    assert_eq!(v("jobcachefs_restore_duration_seconds_count", &ci), 5.0);
    assert_eq!(v("jobcachefs_publish_lock_wait_seconds_count", &[]), 3.0, "committed twice, stale once");
    assert_eq!(v("jobcachefs_layers_created_total", &[]), 2.0);
    assert!(v("jobcachefs_published_bytes_total", &ci) >= 101.0);

    let csi = |method: &str, code: &str| {
        v(
            "csi_plugin_operations_seconds_count",
            &[("driver_name", "jobcachefs.dev"), ("method_name", method), ("grpc_status_code", code)],
        )
    };
    assert_eq!(csi("/csi.v1.Node/NodePublishVolume", "OK"), 6.0, "{text}");
    assert_eq!(csi("/csi.v1.Node/NodeUnpublishVolume", "OK"), 6.0);
    assert_eq!(csi("/csi.v1.Node/NodePublishVolume", "InvalidArgument"), 1.0);
    let le = |bound: &str| {
        v(
            "csi_plugin_operations_seconds_bucket",
            &[("method_name", "/csi.v1.Node/NodePublishVolume"), ("grpc_status_code", "OK"), ("le", bound)],
        )
    };
    assert_eq!(le("+Inf"), 6.0, "csi-lib-utils buckets end at 600 s, then +Inf");
    assert_eq!(le("600.0"), 6.0);

    // The gauges agree with `cache ls --json`: one place computes sizes.
    let ls: serde_json::Value = serde_json::from_slice(&sb.cli(&["cache", "ls", "--json"]).stdout).expect("cache ls");
    let caches: Vec<&serde_json::Value> =
        ls.as_array().unwrap().iter().filter(|c| c["version"].as_u64() > Some(0)).collect();
    assert_eq!(v("jobcachefs_caches", &[]), caches.len() as f64);
    let bytes: u64 = caches.iter().map(|c| c["bytes"].as_u64().unwrap()).sum();
    assert_eq!(v("jobcachefs_store_bytes", &[]), bytes as f64, "{ls}");
    assert_eq!(v("jobcachefs_layers", &[]), 2.0);
    assert_eq!(v("jobcachefs_deepest_stack_layers", &[]), 2.0);
    assert_eq!(v("jobcachefs_volumes", &[]), 0.0);
    assert!(!text.contains("cache=\""), "no cache names by default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_stats_report_health_without_walking_the_upper_on_every_poll() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (_server, channel) =
        csi_server::serve(sb.dir.path(), &sb.state, "node-a", &["--allow-inline-publish", "ci"], &[]).await;
    let mut node = NodeClient::new(channel.clone());
    let mut controller = pb::controller_client::ControllerClient::new(channel);
    let dir = sb.dir.path().to_path_buf();
    // A version to restore from, so the volume reads from a layer.
    job(&mut node, &dir, 1, "ci", &[], |t| std::fs::write(t.join("base"), "base").unwrap()).await;

    let params: HashMap<String, String> = [("cacheName", "npm"), ("csi.storage.k8s.io/pvc/namespace", "ci")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let vol = controller
        .create_volume(pb::CreateVolumeRequest {
            name: "pvc-h".into(),
            volume_capabilities: vec![csi_server::mount_cap()],
            parameters: params,
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    let staging = dir.join("plugins/staging/pvc-h");
    node.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(csi_server::mount_cap()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .expect("NodeStage");
    let stats = |node: &mut NodeClient<Channel>| {
        let req = pb::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: staging.to_string_lossy().into(),
            ..Default::default()
        };
        let mut node = node.clone();
        async move { node.node_get_volume_stats(req).await.expect("NodeGetVolumeStats").into_inner() }
    };

    std::fs::write(staging.join("a"), vec![b'a'; 10_000]).unwrap();
    let first = stats(&mut node).await;
    let condition = first.volume_condition.clone().expect("VOLUME_CONDITION is reported");
    assert!(!condition.abnormal, "{condition:?}");
    let used = first.usage[0].used;
    assert!(used >= 10_000, "the upper's bytes: {first:?}");
    assert!(first.usage[0].available > 0 && first.usage[0].total >= first.usage[0].available);
    // Within the measurement's lifetime a poll does not walk the upper again: the number
    // stays what it was (refreshed in the background after two minutes).
    std::fs::write(staging.join("b"), vec![b'b'; 50_000]).unwrap();
    assert_eq!(stats(&mut node).await.usage[0].used, used, "served from the last measurement");

    // A layer deleted by hand: abnormal, naming it.
    let head = sb.store().head(&jobcachefs::store::CacheKey::new("ci", "npm").unwrap()).unwrap().unwrap();
    let layer = sb.layout().layer_dir(&head.layers[0]);
    std::fs::remove_dir_all(&layer).unwrap();
    let condition = stats(&mut node).await.volume_condition.unwrap();
    assert!(condition.abnormal, "{condition:?}");
    assert!(
        condition.message.contains(head.layers[0].as_str()) && condition.message.contains("missing"),
        "{condition:?}"
    );

    // The mount gone behind the driver's back: abnormal too.
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).expect("unmount by hand");
    let condition = stats(&mut node).await.volume_condition.unwrap();
    assert!(condition.abnormal && condition.message.contains("no longer mounted"), "{condition:?}");

    // A path the volume never was at is still NOT_FOUND.
    let err = node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: dir.join("elsewhere").to_string_lossy().into(),
            ..Default::default()
        })
        .await
        .expect_err("not there");
    assert_eq!(err.code(), tonic::Code::NotFound);
}
