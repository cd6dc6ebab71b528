//! The driver's background upkeep: a commit that makes a cache too deep starts a squash,
//! and periodic gc evicts idle caches and collects what nothing uses.

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;

use std::time::{Duration, Instant};

use common::*;
use csi_server::{inline_publish, inline_unpublish};

fn head(sb: &Sandbox) -> Option<jobcachefs::store::Head> {
    sb.store().head(&jobcachefs::store::CacheKey::new("ci", "go").unwrap()).unwrap()
}

async fn publish_version(
    node: &mut jobcachefs::csi::pb::node_client::NodeClient<tonic::transport::Channel>,
    sb: &Sandbox,
    i: u32,
) {
    let target = sb.dir.path().join(format!("pods/p{i}/mount"));
    inline_publish(node, &format!("csi-p{i}"), &target, "ci", &format!("p{i}"), &[("cacheName", "go")]).await;
    std::fs::write(target.join(format!("v{i}")), i.to_string()).unwrap();
    inline_unpublish(node, &format!("csi-p{i}"), &target).await;
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_cache_is_squashed_in_the_background_with_its_content() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    // One version kept: the layers the squash replaced are then named by nothing.
    let args = ["--allow-inline-publish", "ci", "--max-depth", "2", "--keep-versions", "1"];
    let (_server, channel) = csi_server::serve(sb.dir.path(), &sb.state, "node-1", &args, &[]).await;
    let mut node = jobcachefs::csi::pb::node_client::NodeClient::new(channel);
    for i in 1..=3 {
        publish_version(&mut node, &sb, i).await;
    }
    // The third commit made it 3 deep (> 2): the driver squashes without anyone asking.
    wait_for("the background squash", || head(&sb).is_some_and(|h| h.layers.len() == 1)).await;
    assert_eq!(head(&sb).unwrap().version, 3, "squash keeps the version");
    let target = sb.dir.path().join("pods/reader/mount");
    inline_publish(&mut node, "csi-reader", &target, "ci", "reader", &[("cacheName", "go"), ("publish", "false")])
        .await;
    for i in 1..=3 {
        assert_eq!(std::fs::read_to_string(target.join(format!("v{i}"))).unwrap(), i.to_string());
    }
    inline_unpublish(&mut node, "csi-reader", &target).await;
    // The replaced layers were collected after the squash.
    wait_for("gc after squash", || {
        std::fs::read_dir(sb.layout().layers_dir())
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".json"))
            .count()
            == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_gc_evicts_idle_caches_and_collects_orphans() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let orphan = sb.layout().layers_dir().join("orphan99");
    std::fs::create_dir_all(&orphan).unwrap();
    let args = ["--allow-inline-publish", "ci", "--gc-interval", "300ms", "--max-idle", "1s"];
    let (_server, channel) = csi_server::serve(sb.dir.path(), &sb.state, "node-1", &args, &[]).await;
    // The start-up pass collects what a previous crash left.
    wait_for("the start-up gc", || !orphan.exists()).await;
    let mut node = jobcachefs::csi::pb::node_client::NodeClient::new(channel);
    publish_version(&mut node, &sb, 1).await;
    assert_eq!(head(&sb).map(|h| h.version), Some(1));
    // Unused for longer than --max-idle: evicted, and its layer collected.
    wait_for("eviction of the idle cache", || head(&sb).is_none()).await;
    wait_for("its layers collected", || std::fs::read_dir(sb.layout().layers_dir()).unwrap().count() == 0).await;
}
