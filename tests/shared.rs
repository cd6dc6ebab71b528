//! Two driver processes as two nodes sharing caches/ and layers/ on another filesystem (a
//! tmpfs standing in for NFS/CephFS), with Lease locks from a fake API server: versions made
//! on one node are restored on the other, whiteouts travel, stale publishes never roll back,
//! and gc on one node never takes layers a volume on the other node still uses.

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;
#[path = "common/fake_api.rs"]
mod fake_api;

use std::fs;
use std::path::Path;

use common::*;
use csi_server::{inline_publish, inline_unpublish};
use jobcachefs::mount::{Mounter, SysMounter};

// The pods are not scripted in the API server: with the default (on-success) nothing would
// publish, and this test is about sharing, not about pod outcomes.
const ATTRS: &[(&str, &str)] = &[("cacheName", "npm"), ("publishWhen", "always")];

/// The command line as one node of a shared store runs it.
fn shared_cli(state: &Path, shared: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_jobcachefs"))
        .arg("--state-dir")
        .arg(state)
        .arg("--shared-dir")
        .arg(shared)
        .args(args)
        .output()
        .expect("run cli")
}

fn version(shared: &Path, local: &Path) -> u64 {
    let layout = jobcachefs::store::Layout::new(local).unwrap().with_shared(shared).unwrap();
    let store = jobcachefs::store::Store::open(layout).unwrap();
    store.head(&jobcachefs::store::CacheKey::new("ci", "npm").unwrap()).unwrap().map_or(0, |h| h.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_versions_through_a_shared_store() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let shared = sb.path("shared");
    nix::mount::mount(Some("tmpfs"), &shared, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=64m"))
        .expect("mount tmpfs as the shared filesystem");
    let (a_state, b_state) = (sb.dir.path().join("node-a"), sb.dir.path().join("node-b"));
    let (_api, url) = fake_api::start_http().await;
    let kc = fake_api::kubeconfig(sb.dir.path(), &url);
    let shared_arg = shared.to_str().unwrap();
    let args = ["--shared-dir", shared_arg, "--lock", "lease", "--allow-inline-publish", "ci"];
    let env = [("KUBECONFIG", kc.as_path())];
    let (server_a, chan_a) = csi_server::serve(sb.dir.path(), &a_state, "node-a", &args, &env).await;
    let (server_b, chan_b) = csi_server::serve(sb.dir.path(), &b_state, "node-b", &args, &env).await;
    let mut a = jobcachefs::csi::pb::node_client::NodeClient::new(chan_a);
    let mut b = jobcachefs::csi::pb::node_client::NodeClient::new(chan_b);
    let pod = |n: &str| sb.dir.path().join(format!("pods/{n}/mount"));

    // Node A publishes v1.
    inline_publish(&mut a, "csi-a1", &pod("a1"), "ci", "a1", ATTRS).await;
    fs::create_dir_all(pod("a1").join("lib")).unwrap();
    fs::write(pod("a1").join("lib/left-pad.js"), "v1").unwrap();
    fs::write(pod("a1").join("old.txt"), "old").unwrap();
    inline_unpublish(&mut a, "csi-a1", &pod("a1")).await;
    assert_eq!(version(&shared, &a_state), 1);
    assert!(
        fs::read_dir(a_state.join("layers")).map(|d| d.count()).unwrap_or(0) == 0,
        "layers live on the shared filesystem, not the node"
    );

    // Node B restores it, deletes a file and replaces a directory, publishes v2.
    inline_publish(&mut b, "csi-b1", &pod("b1"), "ci", "b1", ATTRS).await;
    assert_eq!(fs::read_to_string(pod("b1").join("lib/left-pad.js")).unwrap(), "v1", "B sees A's version");
    fs::remove_file(pod("b1").join("old.txt")).unwrap();
    fs::remove_dir_all(pod("b1").join("lib")).unwrap();
    fs::create_dir(pod("b1").join("lib")).unwrap();
    fs::write(pod("b1").join("lib/right-pad.js"), "v2").unwrap();
    inline_unpublish(&mut b, "csi-b1", &pod("b1")).await;
    assert_eq!(version(&shared, &b_state), 2);

    // Node A sees B's deletions too: whiteouts and opaque directories crossed filesystems.
    inline_publish(&mut a, "csi-a2", &pod("a2"), "ci", "a2", ATTRS).await;
    assert!(!pod("a2").join("old.txt").exists(), "deleted on B, gone on A");
    let names: Vec<_> = fs::read_dir(pod("a2").join("lib")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("right-pad.js")]);

    // Both nodes work from v2; A publishes first, B's publish is stale and rolls nothing back.
    inline_publish(&mut b, "csi-b2", &pod("b2"), "ci", "b2", ATTRS).await;
    fs::write(pod("a2").join("from-a"), "a").unwrap();
    fs::write(pod("b2").join("from-b"), "b").unwrap();
    inline_unpublish(&mut a, "csi-a2", &pod("a2")).await;
    assert_eq!(version(&shared, &a_state), 3);

    // B still has v2 mounted while A squashes and collects: B's pinned layers must survive.
    let cli = |state: &Path, args: &[&str]| shared_cli(state, &shared, args);
    let out = cli(&a_state, &["cache", "squash", "npm", "--namespace", "ci", "--max-depth", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&a_state, &["cache", "gc"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        fs::read_to_string(pod("b2").join("lib/right-pad.js")).unwrap(),
        "v2",
        "B's mounted layers survived A's gc"
    );
    inline_unpublish(&mut b, "csi-b2", &pod("b2")).await;
    assert_eq!(version(&shared, &b_state), 3, "stale publish from B skipped, no rollback");

    // A later reader on B sees A's v3 (squashed) and not B's stale change.
    inline_publish(&mut b, "csi-b3", &pod("b3"), "ci", "b3", &[("cacheName", "npm"), ("publish", "false")]).await;
    assert_eq!(fs::read_to_string(pod("b3").join("from-a")).unwrap(), "a");
    assert!(!pod("b3").join("from-b").exists());
    inline_unpublish(&mut b, "csi-b3", &pod("b3")).await;
    let out = cli(&b_state, &["cache", "gc", "--json"]);
    assert!(out.status.success());
    let mut on_disk: Vec<String> = fs::read_dir(shared.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".json"))
        .collect();
    on_disk.sort();
    let layout = jobcachefs::store::Layout::new(&b_state).unwrap().with_shared(&shared).unwrap();
    let named = named_layers(&jobcachefs::store::Store::open(layout).unwrap());
    assert_eq!(on_disk, named, "once nothing pins them, only the layers of HEAD and its kept versions remain");
    drop((server_a, server_b));
    let _ = SysMounter.unmount(&shared);
}

#[test]
fn eviction_on_one_node_keeps_a_cache_another_node_has_mounted() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let shared = sb.path("shared");
    nix::mount::mount(Some("tmpfs"), &shared, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=64m"))
        .expect("mount tmpfs as the shared filesystem");
    let (a_state, b_state) = (sb.dir.path().join("node-a"), sb.dir.path().join("node-b"));
    let cli = |state: &Path, args: &[&str]| {
        let out = shared_cli(state, &shared, args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let run = ["run", "--cache", "npm", "--namespace", "ci", "--no-maintenance", "--", "sh", "-c"];
    cli(&a_state, &[&run[..], &["echo 1 > $JOBCACHE_DIR/one"]].concat());
    assert_eq!(version(&shared, &a_state), 1);

    // Node B has the cache mounted; node A's eviction, over any budget, must see B's pin.
    let mounted = sb.path("b-job");
    cli(&b_state, &["mount", "--cache", "npm", "--namespace", "ci", mounted.to_str().unwrap()]);
    let gc: serde_json::Value =
        serde_json::from_str(&cli(&a_state, &["cache", "gc", "--budget", "1B", "--json"])).expect("gc report");
    assert_eq!(gc["evicted"], serde_json::json!([]), "a cache in use on another node is kept: {gc}");
    assert_eq!(version(&shared, &a_state), 1);
    assert_eq!(fs::read_to_string(mounted.join("one")).unwrap(), "1\n", "B's volume still reads its layers");

    // Once B lets it go, A may evict it.
    cli(&b_state, &["release", "--no-publish", mounted.to_str().unwrap()]);
    let gc: serde_json::Value =
        serde_json::from_str(&cli(&a_state, &["cache", "gc", "--budget", "1B", "--json"])).expect("gc report");
    assert_eq!(gc["evicted"].as_array().map(Vec::len), Some(1), "{gc}");
    assert_eq!(version(&shared, &a_state), 0);
    let _ = SysMounter.unmount(&shared);
}

#[test]
fn a_sized_cache_on_a_shared_store_publishes_where_every_node_reads() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let shared = sb.path("shared");
    nix::mount::mount(Some("tmpfs"), &shared, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=64m"))
        .expect("mount tmpfs as the shared filesystem");
    let (a_state, b_state) = (sb.dir.path().join("node-a"), sb.dir.path().join("node-b"));
    let run = |state: &Path, extra: &[&str], script: &str| {
        let args =
            [&["run", "--cache", "npm", "--namespace", "ci", "--no-maintenance"], extra, &["--", "sh", "-c", script]];
        shared_cli(state, &shared, &args.concat())
    };
    // Node A's jobs write into a 20 MiB image: over it they get ENOSPC, under it they publish
    // to the shared layers, not into A's image, so node B reads what A published.
    let full =
        run(&a_state, &["--cache-size", "20Mi"], "dd if=/dev/zero of=$JOBCACHE_DIR/big bs=1M count=32 2>&1; true");
    assert!(String::from_utf8_lossy(&full.stdout).contains("No space left on device"), "{full:?}");
    let out = run(&a_state, &["--cache-size", "20Mi"], "echo from-a > $JOBCACHE_DIR/one");
    assert!(String::from_utf8_lossy(&out.stderr).contains("published v1"), "{out:?}");
    let seen = run(&b_state, &[], "cat $JOBCACHE_DIR/one");
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "from-a\n", "{seen:?}");
    let again = run(&a_state, &[], "cat $JOBCACHE_DIR/one && echo more > $JOBCACHE_DIR/two");
    assert_eq!(String::from_utf8_lossy(&again.stdout), "from-a\n", "{again:?}");
    let both = run(&b_state, &[], "cat $JOBCACHE_DIR/one $JOBCACHE_DIR/two");
    assert_eq!(String::from_utf8_lossy(&both.stdout), "from-a\nmore\n", "{both:?}");
    assert!(sb.mounts().iter().all(|m| m == &shared), "{:?}", sb.mounts());
    let _ = SysMounter.unmount(&shared);
}
