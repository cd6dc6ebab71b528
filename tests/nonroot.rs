//! Jobs that do not run as root: through the command line (`run --user`, `--owner`, `--mode`)
//! and through the CSI socket (kubelet's `volume_mount_group` for a pod's fsGroup, and the
//! `uid`/`gid`/`mode` parameters). What a user sees: who owns the cache's root and files,
//! whether a uid-1000 job can write, modify and delete, and that it all survives versions,
//! fresh starts, fallbacks, squash and a driver restart.

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use jobcachefs::csi::pb;
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::Code;

/// A sandbox whose directories other users can traverse (tempdirs are 0700), as
/// /var/lib/jobcachefs and kubelet's pod directories are.
fn open_sandbox() -> Sandbox {
    let sb = Sandbox::new();
    fs::set_permissions(sb.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod sandbox");
    sb
}

/// `uid:gid mode` of a path, as `stat -c '%u:%g %a'` prints it (mode in octal, with setgid).
fn owner_mode(path: &Path) -> String {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    format!("{}:{} {:o}", m.uid(), m.gid(), m.mode() & 0o7777)
}

/// Runs `script` in `sh` as uid:gid with exactly `groups` as supplementary groups, like a
/// container with runAsUser, runAsGroup and fsGroup. Returns (success, stderr).
fn as_user(uid: u32, gid: u32, groups: &[u32], script: &str) -> (bool, String) {
    let groups: Vec<nix::unistd::Gid> = groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
            Ok(())
        });
    }
    let out = cmd.output().expect("run sh");
    (out.status.success(), stderr(&out))
}

fn head_top(sb: &Sandbox, ns: &str, name: &str) -> PathBuf {
    let head = sb.store().head(&jobcachefs::store::CacheKey::new(ns, name).unwrap()).unwrap().expect("a version");
    sb.layout().layer_dir(head.layers.last().expect("a layer"))
}

// ---------------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------------

#[test]
fn run_as_a_user_writes_and_a_later_job_as_that_user_changes_it() {
    if !can_mount() {
        return;
    }
    let sb = open_sandbox();
    let run = |args: &[&str], script: &str| {
        let mut all = vec!["run", "--cache", "m2", "--no-maintenance"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "sh", "-c", script]);
        let out = sb.cli(&all);
        assert!(out.status.success(), "{args:?} {script}: {}", stderr(&out));
        stdout(&out)
    };
    run(
        &["--user", "1000:1000"],
        "id -u > $JOBCACHE_DIR/who && mkdir $JOBCACHE_DIR/repo && echo one > $JOBCACHE_DIR/repo/a.jar",
    );
    let top = head_top(&sb, "default", "m2");
    assert_eq!(owner_mode(&top), "1000:1000 755", "the root is the job user's");
    assert_eq!(owner_mode(&top.join("repo/a.jar")).split(' ').next(), Some("1000:1000"));
    assert_eq!(fs::read_to_string(top.join("who")).unwrap(), "1000\n", "the command ran as uid 1000");

    // A root job (an init container, say) changes nothing about who owns the root.
    assert_eq!(run(&[], "stat -c '%u:%g %a' $JOBCACHE_DIR"), "1000:1000 755\n");
    // The next uid-1000 job modifies and deletes the first one's files (copy-up keeps owners).
    run(
        &["--user", "1000:1000"],
        "echo two >> $JOBCACHE_DIR/repo/a.jar && rm $JOBCACHE_DIR/who && touch $JOBCACHE_DIR/repo/b.jar",
    );
    assert_eq!(
        run(
            &["--user", "1000:1000"],
            "cat $JOBCACHE_DIR/repo/a.jar; ls $JOBCACHE_DIR; stat -c %u $JOBCACHE_DIR/repo/b.jar"
        ),
        "one\ntwo\nrepo\n1000\n"
    );
    // Another user cannot write there: the root is not world-writable.
    let script = "setpriv --reuid=2000 --regid=2000 --clear-groups touch $JOBCACHE_DIR/x";
    let out = sb.cli(&["run", "--cache", "m2", "--no-publish", "--", "sh", "-c", script]);
    assert!(!out.status.success(), "uid 2000 is not the owner");
    assert!(stderr(&out).contains("Permission denied"), "{}", stderr(&out));

    // A fresh start and a fallback restore keep the root's owner and mode: they are the version's.
    assert_eq!(
        run(&["--fresh", "--no-publish"], "ls -A $JOBCACHE_DIR; stat -c '%u:%g %a' $JOBCACHE_DIR"),
        "1000:1000 755\n"
    );
    let out = sb.cli(&[
        "run",
        "--cache",
        "pr-1",
        "--fallback",
        "m2",
        "--no-publish",
        "--",
        "sh",
        "-c",
        "stat -c '%u:%g %a' $JOBCACHE_DIR",
    ]);
    assert_eq!(stdout(&out), "1000:1000 755\n", "{}", stderr(&out));

    // A squash keeps every owner and mode, the root's included.
    let sq = sb.cli(&["cache", "squash", "m2", "--max-depth", "1"]);
    assert!(sq.status.success(), "{}", stderr(&sq));
    let top = head_top(&sb, "default", "m2");
    assert_eq!(
        sb.store().head(&jobcachefs::store::CacheKey::new("default", "m2").unwrap()).unwrap().unwrap().layers.len(),
        1
    );
    assert_eq!(owner_mode(&top), "1000:1000 755", "squashed root");
    assert_eq!(owner_mode(&top.join("repo/b.jar")).split(' ').next(), Some("1000:1000"), "squashed file");
}

#[test]
fn mount_with_an_owner_and_mode_and_bad_values_refused() {
    if !can_mount() {
        return;
    }
    let sb = open_sandbox();
    let path = sb.path("work");
    let p = path.to_str().unwrap();
    let out = sb.cli(&["mount", "--cache", "npm", "--owner", "1001:121", "--mode", "2775", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(owner_mode(&path), "1001:121 2775", "the root as asked, setgid kept");
    let (ok, err) = as_user(1001, 1001, &[], &format!("touch {p}/owner-writes"));
    assert!(ok, "the owner writes: {err}");
    let (ok, err) = as_user(1500, 1500, &[121], &format!("mkdir {p}/group-writes && touch {p}/group-writes/f"));
    assert!(ok, "a member of the group writes: {err}");
    assert_eq!(
        owner_mode(&path.join("group-writes/f")).split(' ').next(),
        Some("1500:121"),
        "setgid passes the group on"
    );
    let out = sb.cli(&["release", p]);
    assert!(stdout(&out).contains("published v1"), "{}", stdout(&out));

    for (args, names) in [
        (vec!["--owner", "1000"], "--owner"),
        (vec!["--owner", "a:b"], "--owner"),
        (vec!["--owner", "4294967295:0"], "--owner"),
        (vec!["--owner=-1:0"], "--owner"),
        (vec!["--mode", "0999"], "--mode"),
        (vec!["--mode", "17777"], "--mode"),
    ] {
        let mut all = vec!["mount", "--cache", "npm"];
        all.extend_from_slice(&args);
        all.push(p);
        let out = sb.cli(&all);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(stderr(&out).contains(names), "{args:?}: the error names {names}: {}", stderr(&out));
    }
    let out = sb.cli(&["run", "--cache", "npm", "--user", "root", "--", "true"]);
    assert!(!out.status.success() && stderr(&out).contains("--user"), "{}", stderr(&out));
    assert!(sb.mounts().is_empty(), "a refused call mounts nothing: {:?}", sb.mounts());
    let ls = stdout(&sb.cli(&["cache", "ls", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(v[0]["version"], 1, "and publishes nothing: {v}");
}

// ---------------------------------------------------------------------------------------------
// The CSI socket
// ---------------------------------------------------------------------------------------------

fn cap(group: &str) -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume { volume_mount_group: group.into(), ..Default::default() })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

struct Node {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Node {
    async fn start(sb: &Sandbox, extra: &[&str]) -> (csi_server::Server, Self) {
        let (server, ch) = csi_server::serve(sb.dir.path(), &sb.state, "node-a", extra, &[]).await;
        (server, Self { controller: ControllerClient::new(ch.clone()), node: NodeClient::new(ch) })
    }

    async fn create(&mut self, name: &str, params: &[(&str, &str)]) -> Result<pb::Volume, tonic::Status> {
        self.controller
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                volume_capabilities: vec![cap("")],
                parameters: map(params),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().volume.expect("volume"))
    }

    async fn stage(&mut self, v: &pb::Volume, staging: &Path, group: &str) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: s(staging),
                volume_capability: Some(cap(group)),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn publish(
        &mut self,
        v: &pb::Volume,
        staging: &Path,
        target: &Path,
        group: &str,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: s(staging),
                target_path: s(target),
                volume_capability: Some(cap(group)),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn unpublish(&mut self, id: &str, target: &Path) {
        self.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: s(target) })
            .await
            .expect("NodeUnpublishVolume");
    }

    async fn teardown(&mut self, v: &pb::Volume, staging: &Path) {
        self.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: s(staging),
            })
            .await
            .expect("NodeUnstageVolume");
        self.controller
            .delete_volume(pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() })
            .await
            .expect("DeleteVolume");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_fs_group_owns_the_volume_root_and_what_it_writes() {
    if !can_mount() {
        return;
    }
    let sb = open_sandbox();
    let (server, mut n) = Node::start(&sb, &[]).await;
    let caps = n.node.node_get_capabilities(pb::NodeGetCapabilitiesRequest {}).await.expect("caps").into_inner();
    let advertised = caps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(pb::node_service_capability::Type::Rpc(r))
            if r.r#type == pb::node_service_capability::rpc::Type::VolumeMountGroup as i32)
    });
    assert!(advertised, "kubelet passes fsGroup only to drivers advertising VOLUME_MOUNT_GROUP: {caps:?}");

    // A generic ephemeral volume for a pod with runAsUser 1000, runAsGroup 3000, fsGroup 2000.
    let v = n.create("pvc-1", &[("cacheName", "gradle")]).await.expect("CreateVolume");
    let (staging, target) = (sb.dir.path().join("staging/pvc-1"), sb.dir.path().join("pods/p1/volume"));
    for attempt in 1..=2 {
        n.stage(&v, &staging, "2000").await.unwrap_or_else(|e| panic!("NodeStage {attempt}: {e:?}"));
        n.publish(&v, &staging, &target, "2000").await.unwrap_or_else(|e| panic!("NodePublish {attempt}: {e:?}"));
    }
    assert_eq!(owner_mode(&target), "0:2000 2775", "root keeps its owner, gains the group, setgid and g+rwx");
    let t = s(&target);
    let (ok, err) = as_user(1000, 3000, &[2000], &format!("mkdir {t}/.gradle && echo x > {t}/.gradle/f"));
    assert!(ok, "a job with only the fsGroup writes: {err}");
    assert_eq!(owner_mode(&target.join(".gradle")), "1000:2000 2755", "new directories inherit the group");
    assert_eq!(owner_mode(&target.join(".gradle/f")).split(' ').next(), Some("1000:2000"), "and new files");
    let (ok, _) = as_user(1000, 3000, &[], &format!("touch {t}/no-group"));
    assert!(!ok, "without the fsGroup the root is not writable");

    // A second pod with another fsGroup while the first has it published: refused, unchanged.
    let other = sb.dir.path().join("pods/p2/volume");
    let e = n.publish(&v, &staging, &other, "2001").await.expect_err("another group while in use");
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(e.message().contains("2000") && e.message().contains("2001"), "names both groups: {}", e.message());
    assert_eq!(owner_mode(&target), "0:2000 2775");

    // A driver restart: the root is on disk, a repeated stage and publish change nothing.
    drop(server);
    let (server, mut n) = Node::start(&sb, &[]).await;
    n.stage(&v, &staging, "2000").await.expect("NodeStage after restart");
    n.publish(&v, &staging, &target, "2000").await.expect("NodePublish after restart");
    assert_eq!(owner_mode(&target), "0:2000 2775", "after a restart");
    n.unpublish(&v.volume_id, &target).await;
    n.teardown(&v, &staging).await;

    // The group is part of the version: the next volume's root has it before any fsGroup.
    let top = head_top(&sb, "default", "gradle");
    assert_eq!(owner_mode(&top), "0:2000 2775");
    let v2 = n.create("pvc-2", &[("cacheName", "gradle")]).await.expect("CreateVolume 2");
    let (staging2, target2) = (sb.dir.path().join("staging/pvc-2"), sb.dir.path().join("pods/p3/volume"));
    n.stage(&v2, &staging2, "").await.expect("NodeStage without fsGroup");
    n.publish(&v2, &staging2, &target2, "").await.expect("NodePublish without fsGroup");
    assert_eq!(owner_mode(&target2), "0:2000 2775", "restored from the version");
    let t2 = s(&target2);
    let (ok, err) = as_user(1000, 3000, &[2000], &format!("echo y >> {t2}/.gradle/f && rm {t2}/.gradle/f"));
    assert!(ok, "the next job of the group modifies and deletes: {err}");
    n.unpublish(&v2.volume_id, &target2).await;
    n.teardown(&v2, &staging2).await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_parameters_set_the_root_and_bad_values_are_refused() {
    if !can_mount() {
        return;
    }
    let sb = open_sandbox();
    let (_server, mut n) = Node::start(&sb, &["--allow-inline-publish", "ci"]).await;

    // A StorageClass with uid/gid/mode.
    let v = n
        .create("pvc-o", &[("cacheName", "go"), ("uid", "1001"), ("gid", "1001"), ("mode", "0750")])
        .await
        .expect("create");
    let (staging, target) = (sb.dir.path().join("staging/pvc-o"), sb.dir.path().join("pods/o/volume"));
    n.stage(&v, &staging, "").await.expect("stage");
    n.publish(&v, &staging, &target, "").await.expect("publish");
    assert_eq!(owner_mode(&target), "1001:1001 750");
    let (ok, err) = as_user(1001, 1001, &[], &format!("touch {}/built", s(&target)));
    assert!(ok, "{err}");
    n.unpublish(&v.volume_id, &target).await;
    n.teardown(&v, &staging).await;

    // An inline volume with uid/gid in its volumeAttributes.
    let id = format!("csi-{}", "ab".repeat(32));
    let inline_target = sb.dir.path().join("pods/inline/volume");
    let inline = |attrs: &[(&str, &str)], group: &str| {
        let mut ctx = map(&[
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.namespace", "ci"),
            ("csi.storage.k8s.io/pod.name", "build"),
            ("cacheName", "npm"),
            ("publishWhen", "always"),
        ]);
        ctx.extend(map(attrs));
        pb::NodePublishVolumeRequest {
            volume_id: id.clone(),
            target_path: s(&inline_target),
            volume_capability: Some(cap(group)),
            volume_context: ctx,
            ..Default::default()
        }
    };
    n.node.node_publish_volume(inline(&[("uid", "1000"), ("gid", "1000")], "")).await.expect("inline publish");
    assert_eq!(owner_mode(&inline_target), "1000:1000 755");
    let (ok, err) = as_user(1000, 1000, &[], &format!("echo hi > {}/npmrc", s(&inline_target)));
    assert!(ok, "{err}");
    n.unpublish(&id, &inline_target).await;
    let top = head_top(&sb, "ci", "npm");
    assert_eq!(owner_mode(&top), "1000:1000 755", "published with its owner");
    assert_eq!(owner_mode(&top.join("npmrc")).split(' ').next(), Some("1000:1000"));

    // Bad values: INVALID_ARGUMENT naming the key or field, and nothing mounted or created.
    for (params, field) in [
        (vec![("uid", "x")], "uid"),
        (vec![("gid", "-1")], "gid"),
        (vec![("mode", "0o8")], "mode"),
        (vec![("mode", "0777")], "world-writable"),
    ] {
        let mut all = vec![("cacheName", "go")];
        all.extend(params.iter().copied());
        let e = n.create("pvc-bad", &all).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{params:?}: {}", e.message());
        assert!(e.message().contains(field), "{params:?}: names {field}: {}", e.message());
    }
    let e = n.node.node_publish_volume(inline(&[("mode", "0777"), ("worldWritable", "true")], "")).await;
    let e = e.expect_err("a pod author cannot allow world-writable");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("worldWritable"), "{}", e.message());
    for group in ["abc", "-1", "4294967295", "1.5"] {
        let e = n.node.node_publish_volume(inline(&[], group)).await.expect_err("bad volume_mount_group");
        assert_eq!(e.code(), Code::InvalidArgument, "{group}: {}", e.message());
        assert!(e.message().contains("volume_mount_group"), "{group}: {}", e.message());
    }
    let v = n.create("pvc-g", &[("cacheName", "go")]).await.expect("create");
    let staging = sb.dir.path().join("staging/pvc-g");
    let e = n.stage(&v, &staging, "wheel").await.expect_err("bad group at stage");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("volume_mount_group"), "{}", e.message());
    assert!(sb.mounts().is_empty(), "nothing mounted by refused calls: {:?}", sb.mounts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_given_after_the_volume_is_mounted_takes_effect_at_once() {
    if !can_mount() {
        return;
    }
    let sb = open_sandbox();
    let (_server, mut n) = Node::start(&sb, &[]).await;
    let v = n.create("pvc-late-group", &[("cacheName", "late")]).await.expect("create");
    let (staging, target) = (sb.dir.path().join("staging/late"), sb.dir.path().join("pods/late/volume"));
    // Staged without an fsGroup; the pod that comes later has one.
    n.stage(&v, &staging, "").await.expect("stage");
    n.publish(&v, &staging, &target, "3000").await.expect("publish with a group");
    assert_eq!(owner_mode(&target), "0:3000 2775", "the mounted root shows the group");
    let (ok, err) = as_user(1000, 1000, &[3000], &format!("touch {}/made", s(&target)));
    assert!(ok, "the overlay sees the change, not only the upper beneath it: {err}");
    n.unpublish(&v.volume_id, &target).await;
    n.teardown(&v, &staging).await;
}
