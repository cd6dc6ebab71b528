//! Callers that give up and retry, over the real socket: external-provisioner gives DeleteVolume
//! a deadline and retries with backoff, kubelet cancels node calls. A commit big enough to
//! outlast the deadline (tens of thousands of new files: a cold cache's first publish) must
//! still publish exactly once, every answer must be one a retrying caller understands, and
//! the job's files must end up in the new version.

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use csi_server::mount_cap;
use jobcachefs::csi::pb;
use jobcachefs::store::CacheKey;
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::Code;

/// Answers a caller that gives up and retries may see; anything else (INTERNAL above all) is a bug.
const RETRYABLE: [Code; 4] = [Code::Ok, Code::Aborted, Code::DeadlineExceeded, Code::Cancelled];

#[derive(Clone)]
struct Csi {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

/// A persistent volume and where kubelet stages and publishes it.
struct Pvc {
    vol: pb::Volume,
    staging: PathBuf,
    target: PathBuf,
}

impl Pvc {
    fn id(&self) -> &str {
        &self.vol.volume_id
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn params(cache: &str) -> HashMap<String, String> {
    [("cacheName".to_string(), cache.to_string())].into()
}

async fn create(c: &mut Csi, sb: &Sandbox, name: &str, cache: &str) -> Pvc {
    let vol = c
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![mount_cap()],
            parameters: params(cache),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    Pvc {
        vol,
        staging: sb.dir.path().join(format!("plugins/staging/{name}")),
        target: sb.dir.path().join(format!("pods/{name}/volume")),
    }
}

async fn stage(c: &mut Csi, v: &Pvc, staging: &Path) -> Result<(), tonic::Status> {
    c.node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: v.id().into(),
            staging_target_path: s(staging),
            volume_capability: Some(mount_cap()),
            volume_context: v.vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn publish(c: &mut Csi, v: &Pvc) -> Result<(), tonic::Status> {
    c.node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: v.id().into(),
            staging_target_path: s(&v.staging),
            target_path: s(&v.target),
            volume_capability: Some(mount_cap()),
            volume_context: v.vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn unpublish(c: &mut Csi, v: &Pvc) -> Result<(), tonic::Status> {
    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest { volume_id: v.id().into(), target_path: s(&v.target) })
        .await
        .map(drop)
}

async fn unstage(c: &mut Csi, v: &Pvc) -> Result<(), tonic::Status> {
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: v.id().into(),
            staging_target_path: s(&v.staging),
        })
        .await
        .map(drop)
}

fn delete_req(id: &str) -> pb::DeleteVolumeRequest {
    pb::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() }
}

/// How a caller gives up on one call.
#[derive(Debug, Clone, Copy)]
enum GiveUp {
    /// Sends `grpc-timeout`: the server drops the handler when it expires (tonic answers CANCELLED).
    Header(Duration),
    /// Stops waiting and resets the stream, as a Go client's context deadline does.
    Drop(Duration),
}

async fn delete_once(c: &mut ControllerClient<Channel>, id: &str, how: GiveUp) -> (Code, String) {
    match how {
        GiveUp::Header(after) => {
            let mut req = tonic::Request::new(delete_req(id));
            req.set_timeout(after);
            match c.delete_volume(req).await {
                Ok(_) => (Code::Ok, String::new()),
                Err(e) => (e.code(), e.message().to_string()),
            }
        }
        GiveUp::Drop(after) => match tokio::time::timeout(after, c.delete_volume(delete_req(id))).await {
            Ok(Ok(_)) => (Code::Ok, String::new()),
            Ok(Err(e)) => (e.code(), e.message().to_string()),
            Err(_) => (Code::DeadlineExceeded, "the caller gave up".into()),
        },
    }
}

/// DeleteVolume as external-provisioner makes it when the commit outlasts its deadline: a 20 ms
/// deadline, retried at once both ways, then with backoff (10 s deadlines) until it answers OK.
/// Returns every answer; panics on one a retrying caller could not understand.
async fn delete_like_the_provisioner(mut c: ControllerClient<Channel>, id: String) -> Vec<Code> {
    let short = Duration::from_millis(20);
    let mut answers = Vec::new();
    let judge = |(code, message): (Code, String), answers: &mut Vec<Code>| {
        assert!(RETRYABLE.contains(&code), "DeleteVolume {id}: answered {code:?}: {message}");
        answers.push(code);
        code == Code::Ok
    };
    for how in [GiveUp::Header(short), GiveUp::Drop(short), GiveUp::Header(short), GiveUp::Drop(short)] {
        if judge(delete_once(&mut c, &id, how).await, &mut answers) {
            return answers;
        }
    }
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        assert!(started.elapsed() < Duration::from_secs(300), "DeleteVolume {id} never succeeded: {answers:?}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
        if judge(delete_once(&mut c, &id, GiveUp::Header(Duration::from_secs(10))).await, &mut answers) {
            return answers;
        }
    }
}

/// The file a job writes as number `i` of `tag`, and its content.
fn job_file(tag: &str, i: usize) -> (String, String) {
    (format!("{tag}/d{:03}/f{i:05}", i / 500), format!("{tag} file {i}\n"))
}

/// Writes `count` small files (a cold cache's first publish: many new files).
fn write_files(root: &Path, tag: &str, count: usize) {
    for i in 0..count {
        let (rel, text) = job_file(tag, i);
        let path = root.join(rel);
        if i % 500 == 0 {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        }
        std::fs::write(&path, text).expect("write job file");
    }
}

/// The job's files found in `dir`, with the number whose content was wrong.
fn files_of(dir: &Path, tag: &str, count: usize) -> (usize, usize) {
    let (mut found, mut wrong) = (0, 0);
    for i in 0..count {
        let (rel, text) = job_file(tag, i);
        match std::fs::read_to_string(dir.join(rel)) {
            Ok(got) if got == text => found += 1,
            Ok(_) => wrong += 1,
            Err(_) => {}
        }
    }
    (found, wrong)
}

/// Layer ids on disk (directories under layers/).
fn layers_on_disk(sb: &Sandbox) -> BTreeSet<String> {
    std::fs::read_dir(sb.layout().layers_dir())
        .expect("layers dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn head_layers(sb: &Sandbox, cache: &str) -> (u64, Vec<String>) {
    let head = sb.store().head(&CacheKey::new("default", cache).expect("key")).expect("head");
    head.map_or((0, Vec::new()), |h| (h.version, h.layers.iter().map(|l| l.as_str().to_string()).collect()))
}

/// A PVC's whole life up to DeleteVolume: staged, published, `count` files written by the job,
/// unpublished and unstaged, so only the commit is left.
async fn job_on_pvc(c: &mut Csi, sb: &Sandbox, name: &str, cache: &str, count: usize) -> Pvc {
    let v = create(c, sb, name, cache).await;
    stage(c, &v, &v.staging).await.expect("NodeStageVolume");
    publish(c, &v).await.expect("NodePublishVolume");
    let target = v.target.clone();
    let tag = name.to_string();
    tokio::task::spawn_blocking(move || write_files(&target, &tag, count)).await.expect("writer");
    unpublish(c, &v).await.expect("NodeUnpublishVolume");
    unstage(c, &v).await.expect("NodeUnstageVolume");
    v
}

async fn connect(sb: &Sandbox) -> (csi_server::Server, Csi) {
    let (server, channel) = csi_server::serve(sb.dir.path(), &sb.state, "node-a", &[], &[]).await;
    (server, Csi { controller: ControllerClient::new(channel.clone()), node: NodeClient::new(channel) })
}

const FILES: usize = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cut_short_by_its_deadline_publishes_once_with_every_file() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (_server, mut c) = connect(&sb).await;
    let v = job_on_pvc(&mut c, &sb, "pvc-big", "m2", FILES).await;
    let upper = sb.layout().upper_dir(&jobcachefs::store::VolumeId::new(v.id()).expect("id"), None);
    assert!(upper.exists(), "the change waits in the volume's upper");

    let answers = delete_like_the_provisioner(c.controller.clone(), v.id().to_string()).await;
    eprintln!("DeleteVolume answers, in order: {answers:?}");
    assert_ne!(answers[0], Code::Ok, "a {FILES}-file commit outlasts a 20 ms deadline, or this tests nothing");

    let (version, layers) = head_layers(&sb, "m2");
    assert_eq!(version, 1, "exactly one publish");
    assert_eq!(layers.len(), 1);
    let on_disk = layers_on_disk(&sb);
    assert_eq!(on_disk, layers.iter().cloned().collect(), "no second layer made from the same change");
    let layer_dir = sb.layout().layers_dir().join(&layers[0]);
    let (found, wrong) = files_of(&layer_dir, "pvc-big", FILES);
    assert_eq!((found, wrong), (FILES, 0), "every file the job wrote is in the new version, whole");
    assert!(!upper.exists(), "the volume is gone once released");

    // The volume is gone: every later retry (the provisioner may still have one queued) is OK
    // and changes nothing.
    for how in [GiveUp::Header(Duration::from_millis(20)), GiveUp::Header(Duration::from_secs(10))] {
        let (code, message) = delete_once(&mut c.controller, v.id(), how).await;
        assert_eq!(code, Code::Ok, "DeleteVolume of a released volume: {message}");
    }
    assert_eq!(head_layers(&sb, "m2").0, 1);
    assert!(sb.mounts().is_empty(), "nothing left mounted: {:?}", sb.mounts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deletes_from_one_base_cut_short_commit_once_and_skip_once() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (_server, mut c) = connect(&sb).await;
    // Version 1 is the base both volumes start from.
    let seed = job_on_pvc(&mut c, &sb, "pvc-seed", "go", 10).await;
    delete_like_the_provisioner(c.controller.clone(), seed.id().to_string()).await;
    let (base, base_layers) = head_layers(&sb, "go");
    assert_eq!(base, 1);

    let count = FILES / 2;
    let a = job_on_pvc(&mut c, &sb, "pvc-a", "go", count).await;
    let b = job_on_pvc(&mut c, &sb, "pvc-b", "go", count).await;
    let ta = tokio::spawn(delete_like_the_provisioner(c.controller.clone(), a.id().to_string()));
    let tb = tokio::spawn(delete_like_the_provisioner(c.controller.clone(), b.id().to_string()));
    let (answers_a, answers_b) = (ta.await.expect("a"), tb.await.expect("b"));
    eprintln!("a answered {answers_a:?}, b answered {answers_b:?}");

    let (version, layers) = head_layers(&sb, "go");
    assert_eq!(version, 2, "one of the two published; the other was stale (never two writes of v2)");
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0], base_layers[0], "the new version stacks on the base");
    let top = sb.layout().layers_dir().join(&layers[1]);
    let of_a = files_of(&top, "pvc-a", count);
    let of_b = files_of(&top, "pvc-b", count);
    assert!(
        (of_a == (count, 0) && of_b == (0, 0)) || (of_b == (count, 0) && of_a == (0, 0)),
        "the new layer is exactly one volume's change: a {of_a:?}, b {of_b:?}"
    );
    assert_eq!(
        layers_on_disk(&sb),
        layers.iter().cloned().collect(),
        "the stale volume's layer is dropped; nothing else was made"
    );
    assert!(!sb.layout().volumes_dir().join(a.id()).exists() && !sb.layout().volumes_dir().join(b.id()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_still_mounted_somewhere_is_never_staged_twice_nor_committed() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (_server, mut c) = connect(&sb).await;
    let v = create(&mut c, &sb, "pvc-left", "npm").await;
    stage(&mut c, &v, &v.staging).await.expect("NodeStageVolume");

    // A second staging path would mount the same upper twice: refused, nothing mounted there.
    let second = sb.dir.path().join("plugins/staging/elsewhere");
    for attempt in 1..=2 {
        let e = stage(&mut c, &v, &second).await.expect_err("NodeStageVolume at a second path");
        assert_eq!(e.code(), Code::AlreadyExists, "attempt {attempt}: {}", e.message());
        assert!(e.message().contains(&s(&v.staging)), "names where it is staged: {}", e.message());
    }
    assert!(jobcachefs::mount::info::read_mountinfo().expect("mountinfo").iter().all(|m| m.mount_point != second));

    publish(&mut c, &v).await.expect("NodePublishVolume");
    std::fs::write(v.target.join("before.txt"), "before").expect("write");
    // The pod is force-deleted and its node forgets it: the staging comes down but the target
    // is left behind, still writable. The PVC is deleted.
    unstage(&mut c, &v).await.expect("NodeUnstageVolume");
    for attempt in 1..=2 {
        let e = c.controller.delete_volume(delete_req(v.id())).await.expect_err("DeleteVolume with a live target");
        assert_eq!(e.code(), Code::FailedPrecondition, "attempt {attempt}: {}", e.message());
        assert!(e.message().contains(&s(&v.target)), "names the target: {}", e.message());
    }
    assert_eq!(head_layers(&sb, "npm").0, 0, "nothing published from an upper still in use");
    // The change is kept and the volume still works.
    std::fs::write(v.target.join("after.txt"), "after").expect("the target is still writable");

    unpublish(&mut c, &v).await.expect("NodeUnpublishVolume");
    c.controller.delete_volume(delete_req(v.id())).await.expect("DeleteVolume once nothing is mounted");
    let (version, layers) = head_layers(&sb, "npm");
    assert_eq!(version, 1);
    let top = sb.layout().layers_dir().join(&layers[0]);
    assert_eq!(std::fs::read_to_string(top.join("before.txt")).expect("before"), "before");
    assert_eq!(std::fs::read_to_string(top.join("after.txt")).expect("after"), "after");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}
