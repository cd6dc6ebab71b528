//! Two driver processes as two nodes with separate state dirs and no shared filesystem share
//! a cache through a real registry (the Debian `docker-registry`), with Lease locks from a
//! fake API server: versions cross, deletions and replaced directories survive the round
//! trip, a stale publish never moves the registry's head back, and what we push is a
//! manifest skopeo reads. The command line does the same with `run`, `cache ls|pull|push`.

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;
#[path = "common/fake_api.rs"]
mod fake_api;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::registry::TestRegistry;
use common::*;
use csi_server::{inline_publish, inline_unpublish};
use jobcachefs::registry::{Registry, RegistryConfig};
use jobcachefs::store::{CacheKey, Layout, Store};

const ATTRS: &[(&str, &str)] = &[("cacheName", "npm"), ("publishWhen", "always")];

fn registry_at(addr: &str) -> Registry {
    Registry::new(RegistryConfig {
        host: addr.to_string(),
        prefix: "jcfs".into(),
        auth_file: None,
        ca_file: None,
        insecure: true,
        timeout: Duration::from_secs(5),
    })
    .expect("registry client")
}

fn local_version(state: &Path) -> u64 {
    let store = Store::open(Layout::new(state).unwrap()).unwrap();
    store.head(&CacheKey::new("ci", "npm").unwrap()).unwrap().map_or(0, |h| h.version)
}

async fn remote_version(registry: &Registry) -> u64 {
    let head = registry.read_version(&CacheKey::new("ci", "npm").unwrap(), "head").await.expect("read head");
    head.map_or(0, |(v, _)| v.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_without_a_shared_filesystem_share_a_cache_through_a_registry() {
    if !can_mount() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let registry = registry_at(&reg.url());
    let sb = Sandbox::new();
    let (a_state, b_state) = (sb.dir.path().join("node-a"), sb.dir.path().join("node-b"));
    let (_api, url) = fake_api::start_http().await;
    let kc = fake_api::kubeconfig(sb.dir.path(), &url);
    let spec = format!("--registry={}/jcfs", reg.url());
    let args = [spec.as_str(), "--registry-insecure", "--lock", "lease", "--allow-inline-publish", "ci"];
    let env = [("KUBECONFIG", kc.as_path())];
    let (server_a, chan_a) = csi_server::serve(sb.dir.path(), &a_state, "node-a", &args, &env).await;
    let (server_b, chan_b) = csi_server::serve(sb.dir.path(), &b_state, "node-b", &args, &env).await;
    let mut a = jobcachefs::csi::pb::node_client::NodeClient::new(chan_a);
    let mut b = jobcachefs::csi::pb::node_client::NodeClient::new(chan_b);
    let pod = |n: &str| sb.dir.path().join(format!("pods/{n}/mount"));

    // Node A publishes v1: a tree with a symlink, a hard link and a file of some size.
    inline_publish(&mut a, "csi-a1", &pod("a1"), "ci", "a1", ATTRS).await;
    fs::create_dir_all(pod("a1").join("lib/deep")).unwrap();
    fs::write(pod("a1").join("lib/left-pad.js"), "v1").unwrap();
    fs::write(pod("a1").join("lib/deep/blob.bin"), vec![7u8; 3 << 20]).unwrap();
    fs::hard_link(pod("a1").join("lib/left-pad.js"), pod("a1").join("lib/alias.js")).unwrap();
    std::os::unix::fs::symlink("lib/left-pad.js", pod("a1").join("main.js")).unwrap();
    fs::write(pod("a1").join("old.txt"), "old").unwrap();
    inline_unpublish(&mut a, "csi-a1", &pod("a1")).await;
    assert_eq!(local_version(&a_state), 1);
    assert_eq!(remote_version(&registry).await, 1, "v1 is in the registry");

    // Node B, which never saw the cache, restores it from the registry, deletes a file and
    // replaces a directory, and publishes v2.
    inline_publish(&mut b, "csi-b1", &pod("b1"), "ci", "b1", ATTRS).await;
    assert_eq!(fs::read_to_string(pod("b1").join("main.js")).unwrap(), "v1", "B sees A's version");
    assert_eq!(fs::read(pod("b1").join("lib/deep/blob.bin")).unwrap(), vec![7u8; 3 << 20]);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(pod("b1").join("lib/alias.js")).unwrap().nlink(), 2, "hard link kept");
    fs::remove_file(pod("b1").join("old.txt")).unwrap();
    fs::remove_dir_all(pod("b1").join("lib")).unwrap();
    fs::create_dir(pod("b1").join("lib")).unwrap();
    fs::write(pod("b1").join("lib/right-pad.js"), "v2").unwrap();
    inline_unpublish(&mut b, "csi-b1", &pod("b1")).await;
    assert_eq!(local_version(&b_state), 2);
    assert_eq!(remote_version(&registry).await, 2);

    // Node A sees B's deletions: whiteouts and the opaque directory crossed as .wh. entries.
    inline_publish(&mut a, "csi-a2", &pod("a2"), "ci", "a2", ATTRS).await;
    assert!(!pod("a2").join("old.txt").exists(), "deleted on B, gone on A");
    let names: Vec<_> = fs::read_dir(pod("a2").join("lib")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("right-pad.js")], "the replaced directory holds only B's file");

    // Both from v2: A publishes first; B's publish is stale and the registry's head stays A's.
    inline_publish(&mut b, "csi-b2", &pod("b2"), "ci", "b2", ATTRS).await;
    fs::write(pod("a2").join("from-a"), "a").unwrap();
    fs::write(pod("b2").join("from-b"), "b").unwrap();
    inline_unpublish(&mut a, "csi-a2", &pod("a2")).await;
    assert_eq!(remote_version(&registry).await, 3);
    inline_unpublish(&mut b, "csi-b2", &pod("b2")).await;
    assert_eq!(remote_version(&registry).await, 3, "stale publish from B skipped, no rollback");
    let log_b = fs::read_to_string(&server_b.log).unwrap();
    assert!(log_b.contains("stale") || log_b.contains("Stale"), "B says its publish was stale:\n{log_b}");

    // A later reader on B gets A's v3 and not B's stale change.
    inline_publish(&mut b, "csi-b3", &pod("b3"), "ci", "b3", &[("cacheName", "npm"), ("publish", "false")]).await;
    assert_eq!(fs::read_to_string(pod("b3").join("from-a")).unwrap(), "a");
    assert!(!pod("b3").join("from-b").exists());
    inline_unpublish(&mut b, "csi-b3", &pod("b3")).await;
    assert_eq!(local_version(&b_state), 3);

    // What we pushed is an OCI image manifest other tools read.
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/jcfs/ci/npm:head", reg.url())])
        .output()
        .expect("run skopeo (Debian package skopeo)");
    assert!(out.status.success(), "skopeo inspect --raw: {}", String::from_utf8_lossy(&out.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(manifest["artifactType"], "application/vnd.jobcachefs.cache.v1");
    assert_eq!(manifest["annotations"]["dev.jobcachefs.version"], "3");
    drop((server_a, server_b));
}

#[test]
fn the_command_line_shares_a_cache_through_a_registry() {
    if !can_mount() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let (a, b) = (Sandbox::new(), Sandbox::new());
    let spec = format!("{}/jcfs", reg.url());
    let with = |sb: &Sandbox, args: &[&str]| {
        let mut all = vec!["--registry", spec.as_str(), "--registry-insecure"];
        all.extend_from_slice(args);
        sb.cli(&all)
    };
    let out = with(
        &a,
        &["run", "--cache", "npm", "--namespace", "ci", "--", "sh", "-c", "echo built > $JOBCACHE_DIR/out.txt"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = with(&b, &["run", "--cache", "npm", "--namespace", "ci", "--", "sh", "-c", "cat $JOBCACHE_DIR/out.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "built\n", "node B's job reads what node A's job wrote");

    let out = with(&b, &["cache", "ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ls = stdout(&out);
    assert!(ls.contains("REGISTRY") && ls.contains("ci/npm") && ls.contains("v1 (sha256:"), "{ls}");

    // A node that pulls explicitly, and one that has nothing newer to say.
    let c = Sandbox::new();
    let out = with(&c, &["cache", "pull", "npm", "--namespace", "ci"]);
    assert!(out.status.success() && stdout(&out).contains("pulled v1"), "{}{}", stdout(&out), stderr(&out));
    let out = with(&c, &["cache", "pull", "npm", "--namespace", "ci"]);
    assert!(stdout(&out).contains("v1 is current"), "{}", stdout(&out));
    let out = with(&c, &["cache", "push", "npm", "--namespace", "ci"]);
    assert!(out.status.success() && stdout(&out).contains("already has v1"), "{}{}", stdout(&out), stderr(&out));

    // A rollback on one node is a new version in the registry, which every node then takes.
    let out =
        with(&a, &["run", "--cache", "npm", "--namespace", "ci", "--", "sh", "-c", "echo bad > $JOBCACHE_DIR/out.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = with(&a, &["cache", "rollback", "npm", "--namespace", "ci", "--to", "1"]);
    assert!(out.status.success() && stdout(&out).contains("as v3"), "{}{}", stdout(&out), stderr(&out));
    let out = with(&b, &["run", "--cache", "npm", "--namespace", "ci", "--", "sh", "-c", "cat $JOBCACHE_DIR/out.txt"]);
    assert_eq!(stdout(&out), "built\n", "node B gets the rolled-back content: {}", stderr(&out));

    // Without the registry flag nothing changes: a node's own caches only.
    let d = Sandbox::new();
    let out =
        d.cli(&["run", "--cache", "npm", "--namespace", "ci", "--", "sh", "-c", "test ! -e $JOBCACHE_DIR/out.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A bad registry spec names the flag.
    let out = d.cli(&["--registry", "", "cache", "ls"]);
    assert!(!out.status.success() && stderr(&out).contains("--registry"), "{}", stderr(&out));
}
