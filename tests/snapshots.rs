//! CSI snapshots, clones, listing and capacity over the real socket, shaped after what
//! kubernetes-csi/csi-test's `pkg/sanity` sends and expects (controller.go: CreateSnapshot,
//! DeleteSnapshot, ListSnapshots, ListVolumes, GetCapacity, CreateVolume from a snapshot or a
//! volume), and what a user of the external-snapshotter sees: a snapshot holds exactly the
//! content the volume would publish, a volume restored from it starts from that content, and
//! its publish makes that content the cache's next version (a rollback over CSI).

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::*;
use csi_server::mount_cap;
use jobcachefs::csi::pb;
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::Code;

const GIB: i64 = 1 << 30;

struct Csi {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    dir: PathBuf,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn code<T>(r: &Result<T, tonic::Status>) -> Code {
    r.as_ref().err().map_or(Code::Ok, |e| e.code())
}

impl Csi {
    async fn start(sb: &Sandbox) -> (csi_server::Server, Self) {
        let (server, ch) = csi_server::serve(sb.dir.path(), &sb.state, "node-a", &[], &[]).await;
        let c = Self {
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
            dir: sb.dir.path().into(),
        };
        (server, c)
    }

    fn create_req(name: &str, cache: &str, source: Option<pb::volume_content_source::Type>) -> pb::CreateVolumeRequest {
        pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange { required_bytes: 10 * GIB, limit_bytes: 10 * GIB }),
            volume_capabilities: vec![mount_cap()],
            parameters: [("cacheName".to_string(), cache.to_string())].into(),
            volume_content_source: source.map(|t| pb::VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        }
    }

    async fn create(&mut self, name: &str, cache: &str) -> pb::Volume {
        let r = self.controller.create_volume(Self::create_req(name, cache, None)).await;
        r.expect("CreateVolume").into_inner().volume.expect("volume")
    }

    async fn create_from(
        &mut self,
        name: &str,
        cache: &str,
        source: pb::volume_content_source::Type,
    ) -> Result<pb::Volume, tonic::Status> {
        let r = self.controller.create_volume(Self::create_req(name, cache, Some(source))).await;
        r.map(|r| r.into_inner().volume.expect("volume"))
    }

    async fn snapshot(&mut self, name: &str, source: &str) -> Result<pb::Snapshot, tonic::Status> {
        let req =
            pb::CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() };
        self.controller.create_snapshot(req).await.map(|r| r.into_inner().snapshot.expect("snapshot"))
    }

    async fn delete_snapshot(&mut self, id: &str) -> Result<(), tonic::Status> {
        let req = pb::DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
        self.controller.delete_snapshot(req).await.map(drop)
    }

    async fn list_snapshots(
        &mut self,
        req: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsResponse, tonic::Status> {
        self.controller.list_snapshots(req).await.map(|r| r.into_inner())
    }

    async fn list_volumes(&mut self, max: i32, token: &str) -> Result<pb::ListVolumesResponse, tonic::Status> {
        let req = pb::ListVolumesRequest { max_entries: max, starting_token: token.into() };
        self.controller.list_volumes(req).await.map(|r| r.into_inner())
    }

    fn staging(&self, v: &pb::Volume) -> PathBuf {
        self.dir.join(format!("plugins/staging/{}", v.volume_id))
    }

    async fn stage(&mut self, v: &pb::Volume) {
        let req = pb::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: s(&self.staging(v)),
            volume_capability: Some(mount_cap()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        };
        self.node.node_stage_volume(req).await.expect("NodeStageVolume");
    }

    async fn unstage(&mut self, v: &pb::Volume) {
        let req =
            pb::NodeUnstageVolumeRequest { volume_id: v.volume_id.clone(), staging_target_path: s(&self.staging(v)) };
        self.node.node_unstage_volume(req).await.expect("NodeUnstageVolume");
    }

    async fn delete(&mut self, v: &pb::Volume) {
        let req = pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() };
        self.controller.delete_volume(req).await.expect("DeleteVolume");
    }

    /// A job on volume `v`: staged, `files` written, unstaged, deleted (published).
    async fn job(&mut self, v: &pb::Volume, files: &[(&str, &str)]) {
        self.stage(v).await;
        for (name, text) in files {
            std::fs::write(self.staging(v).join(name), text).unwrap();
        }
        self.unstage(v).await;
        self.delete(v).await;
    }

    /// The files a fresh volume of `cache` sees, as name=content.
    async fn content(&mut self, name: &str, cache: &str) -> BTreeSet<String> {
        let v = self.create(name, cache).await;
        self.stage(&v).await;
        let out = read_dir(&self.staging(&v));
        self.unstage(&v).await;
        self.delete(&v).await;
        out
    }
}

fn read_dir(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            format!("{}={}", e.file_name().to_string_lossy(), std::fs::read_to_string(e.path()).unwrap_or_default())
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn version(sb: &Sandbox, cache: &str) -> u64 {
    sb.store().head(&jobcachefs::store::CacheKey::new("default", cache).unwrap()).unwrap().map_or(0, |h| h.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_pin_content_and_a_restore_rolls_the_cache_back() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (_server, mut c) = Csi::start(&sb).await;
    let caps = c.controller.controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}).await.unwrap();
    let rpcs: BTreeSet<i32> = caps
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    use pb::controller_service_capability::rpc::Type;
    for want in
        [Type::CreateDeleteSnapshot, Type::ListSnapshots, Type::CloneVolume, Type::GetCapacity, Type::ListVolumes]
    {
        assert!(rpcs.contains(&(want as i32)), "{want:?} advertised: {rpcs:?}");
    }

    // v1: good content. A snapshot of a released-but-not-deleted volume holds its change.
    let v1 = c.create("pvc-v1", "m2").await;
    c.job(&v1, &[("index", "good")]).await;
    let keep = c.create("pvc-keep", "m2").await;
    c.stage(&keep).await;
    std::fs::write(c.staging(&keep).join("extra"), "x").unwrap();
    // While mounted writable with a change: refused, never copied torn.
    let r = c.snapshot("snap-live", &keep.volume_id).await;
    assert_eq!(code(&r), Code::FailedPrecondition, "{r:?}");
    assert!(r.unwrap_err().message().contains("mounted writable"));
    c.unstage(&keep).await;
    let snap = c.snapshot("snap-good", &keep.volume_id).await.expect("CreateSnapshot");
    assert!(snap.ready_to_use && snap.creation_time.is_some() && snap.source_volume_id == keep.volume_id);
    let again = c.snapshot("snap-good", &keep.volume_id).await.expect("same name, same source");
    assert_eq!(again.snapshot_id, snap.snapshot_id, "idempotent by name");
    let r = c.snapshot("snap-good", &v1.volume_id).await;
    assert_eq!(code(&r), Code::AlreadyExists, "same name, another source: {r:?}");
    for (req, want) in [
        (pb::CreateSnapshotRequest { source_volume_id: "testId".into(), ..Default::default() }, Code::InvalidArgument),
        (pb::CreateSnapshotRequest { name: "name".into(), ..Default::default() }, Code::InvalidArgument),
        (
            pb::CreateSnapshotRequest {
                name: "n2".into(),
                source_volume_id: "fake-vol-id-1".into(),
                ..Default::default()
            },
            Code::NotFound,
        ),
    ] {
        let r = c.controller.create_snapshot(req.clone()).await;
        assert_eq!(code(&r), want, "{req:?}: {r:?}");
    }
    c.delete(&keep).await;

    // The cache is then poisoned twice.
    for (n, text) in [(2, "bad"), (3, "worse")] {
        let v = c.create(&format!("pvc-v{n}"), "m2").await;
        c.job(&v, &[("index", text)]).await;
    }
    assert_eq!(version(&sb, "m2"), 4, "v1, keep's change (v2), two poisoned versions");
    assert_eq!(c.content("peek-1", "m2").await, set(&["extra=x", "index=worse"]));

    // gc keeps what the snapshot pins.
    let gc = sb.cli(&["cache", "gc"]);
    assert!(gc.status.success());

    // A volume restored from the snapshot sees exactly its content, and its publish — even
    // without changes — makes that content the cache's next version.
    let restore = c
        .create_from(
            "pvc-restore",
            "m2",
            pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            }),
        )
        .await
        .expect("CreateVolume from snapshot");
    assert!(restore.content_source.is_some(), "the response echoes the content source");
    c.stage(&restore).await;
    assert_eq!(read_dir(&c.staging(&restore)), set(&["extra=x", "index=good"]));
    c.unstage(&restore).await;
    c.delete(&restore).await;
    assert_eq!(version(&sb, "m2"), 5);
    assert_eq!(c.content("peek-2", "m2").await, set(&["extra=x", "index=good"]), "rolled back");

    // A restore whose cache moves on meanwhile is stale: it never rolls a newer version back.
    let late = c
        .create_from(
            "pvc-late",
            "m2",
            pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            }),
        )
        .await
        .unwrap();
    let v6 = c.create("pvc-v6", "m2").await;
    c.job(&v6, &[("index", "newer")]).await;
    c.job(&late, &[]).await;
    assert_eq!(version(&sb, "m2"), 6);
    assert_eq!(c.content("peek-3", "m2").await, set(&["extra=x", "index=newer"]));

    // Not found sources.
    let r = c
        .create_from(
            "pvc-x",
            "m2",
            pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
                snapshot_id: "non-existing-snapshot-id".into(),
            }),
        )
        .await;
    assert_eq!(code(&r), Code::NotFound, "{r:?}");
    let r = c
        .create_from(
            "pvc-y",
            "m2",
            pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                volume_id: "fake-vol-id-0123456789".into(),
            }),
        )
        .await;
    assert_eq!(code(&r), Code::NotFound, "{r:?}");

    // DeleteSnapshot: idempotent, empty id refused; the pinned layers go at the next gc.
    assert_eq!(code(&c.delete_snapshot("").await), Code::InvalidArgument);
    c.delete_snapshot(&snap.snapshot_id).await.expect("DeleteSnapshot");
    c.delete_snapshot(&snap.snapshot_id).await.expect("again: already gone is OK");
    c.delete_snapshot("reallyfakesnapshotid").await.expect("unknown is OK");
    let list = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap();
    assert!(list.entries.is_empty(), "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_listing_pagination_and_capacity() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (_server, mut c) = Csi::start(&sb).await;

    // A clone starts from the source's content: its base plus its change.
    let base = c.create("pvc-base", "go").await;
    c.job(&base, &[("go.sum", "v1")]).await;
    let source = c.create("pvc-source", "go").await;
    c.stage(&source).await;
    std::fs::write(c.staging(&source).join("wip"), "draft").unwrap();
    let r = c
        .create_from(
            "pvc-clone",
            "go",
            pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                volume_id: source.volume_id.clone(),
            }),
        )
        .await;
    assert_eq!(code(&r), Code::FailedPrecondition, "a source mounted writable with changes: {r:?}");
    c.unstage(&source).await;
    let clone = c
        .create_from(
            "pvc-clone",
            "go",
            pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                volume_id: source.volume_id.clone(),
            }),
        )
        .await
        .expect("clone");
    c.stage(&clone).await;
    assert_eq!(read_dir(&c.staging(&clone)), set(&["go.sum=v1", "wip=draft"]));
    // The source is untouched and still publishes its own change.
    c.job(&source, &[]).await;
    assert_eq!(version(&sb, "go"), 2);

    // ListVolumes: all with max 0; pages of 2 whose tokens survive deleting a page's last
    // volume; a token we never gave is ABORTED; the staged clone is published on this node.
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(c.create(&format!("pvc-list-{n}"), "go").await);
    }
    let all = c.list_volumes(0, "").await.unwrap();
    assert_eq!(all.entries.len(), 5, "the clone and four more: {all:?}");
    assert!(all.next_token.is_empty());
    let clone_entry = all.entries.iter().find(|e| e.volume.as_ref().unwrap().volume_id == clone.volume_id).unwrap();
    assert_eq!(clone_entry.status.as_ref().unwrap().published_node_ids, ["node-a"]);
    let unstaged = all.entries.iter().find(|e| e.volume.as_ref().unwrap().volume_id == ids[0].volume_id).unwrap();
    assert!(unstaged.status.as_ref().unwrap().published_node_ids.is_empty());
    assert!(!unstaged.status.as_ref().unwrap().volume_condition.as_ref().unwrap().abnormal);
    let first = c.list_volumes(2, "").await.unwrap();
    assert_eq!(first.entries.len(), 2);
    assert!(!first.next_token.is_empty());
    let last_of_page = first.entries[1].volume.clone().unwrap();
    c.delete(&last_of_page).await;
    let rest = c.list_volumes(0, &first.next_token).await.expect("the token outlives the deleted volume");
    let seen: BTreeSet<String> =
        first.entries.iter().chain(&rest.entries).map(|e| e.volume.as_ref().unwrap().volume_id.clone()).collect();
    assert_eq!(seen.len(), first.entries.len() + rest.entries.len(), "no volume twice");
    assert_eq!(rest.entries.len(), 3);
    let bad = c.list_volumes(0, "invalid-token").await;
    assert_eq!(code(&bad), Code::Aborted, "{bad:?}");

    // ListSnapshots: filters and pagination.
    let mut snaps = Vec::new();
    for (n, v) in ids.iter().enumerate().filter(|(_, v)| v.volume_id != last_of_page.volume_id) {
        snaps.push(c.snapshot(&format!("snap-{n}"), &v.volume_id).await.unwrap());
    }
    assert_eq!(snaps.len(), 3);
    let all = c.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap();
    assert_eq!(all.entries.len(), 3);
    let one = c
        .list_snapshots(pb::ListSnapshotsRequest { snapshot_id: snaps[1].snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(one.entries.len(), 1);
    assert_eq!(one.entries[0].snapshot.as_ref().unwrap().snapshot_id, snaps[1].snapshot_id);
    let by_source = c
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: snaps[2].source_volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_source.entries.len(), 1);
    for req in [
        pb::ListSnapshotsRequest { snapshot_id: "none-exist-id".into(), ..Default::default() },
        pb::ListSnapshotsRequest { source_volume_id: "fake-vol-id-0123456789".into(), ..Default::default() },
    ] {
        assert!(c.list_snapshots(req).await.unwrap().entries.is_empty(), "unknown filters match nothing");
    }
    let page = c.list_snapshots(pb::ListSnapshotsRequest { max_entries: 2, ..Default::default() }).await.unwrap();
    assert_eq!(page.entries.len(), 2);
    let rest = c
        .list_snapshots(pb::ListSnapshotsRequest { starting_token: page.next_token, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(rest.entries.len(), 1);
    let bad = c
        .list_snapshots(pb::ListSnapshotsRequest { starting_token: "invalid-token".into(), ..Default::default() })
        .await;
    assert_eq!(code(&bad), Code::Aborted);

    // GetCapacity: the state filesystem's free bytes less the reserve (1 GiB by default).
    let free = || {
        let fs = nix::sys::statvfs::statvfs(&sb.state).unwrap();
        fs.blocks_available() as i64 * fs.fragment_size() as i64
    };
    // Other work on the machine moves the free space: bound it from both sides of the call.
    let before = free();
    let cap = c.controller.get_capacity(pb::GetCapacityRequest::default()).await.unwrap().into_inner();
    let after = free();
    let (low, high) = (before.min(after), before.max(after));
    assert!(cap.available_capacity > 0, "{cap:?}");
    assert!(
        cap.available_capacity <= high - GIB && cap.available_capacity >= low - GIB - 256 * (1 << 20),
        "free space less the 1 GiB reserve: {cap:?} vs {low}..{high}"
    );
    assert_eq!(cap.maximum_volume_size, Some(cap.available_capacity));
    let other_node = pb::GetCapacityRequest {
        accessible_topology: Some(pb::Topology {
            segments: HashMap::from([("jobcachefs.dev/node".to_string(), "node-b".to_string())]),
        }),
        ..Default::default()
    };
    let cap = c.controller.get_capacity(other_node).await.unwrap().into_inner();
    assert_eq!(cap.available_capacity, 0, "another node's capacity is not ours to report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_start_cannot_be_combined_with_a_content_source() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let (_server, mut c) = Csi::start(&sb).await;
    let source = c.create("pvc-src", "npm").await;
    let mut req = Csi::create_req(
        "pvc-fresh-clone",
        "npm",
        Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: source.volume_id.clone(),
        })),
    );
    req.parameters.insert("ignoreCache".into(), "true".into());
    let err = c.controller.create_volume(req).await.expect_err("ignoreCache with a content source");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("ignoreCache") && err.message().contains("volume_content_source"),
        "{}",
        err.message()
    );
    let listed = c.list_volumes(0, "").await.unwrap();
    assert_eq!(listed.entries.len(), 1, "nothing was created");
}
