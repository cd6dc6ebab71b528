//! Hostile input through the CSI API and the command line.
//!
//! Volume ids, CreateVolume names, parameters and staging/target paths carrying `..`, `/`, NUL,
//! 10 KB strings, control characters and unicode; paths that are or pass through symlinks (to
//! `/`, `/etc`, the state dir, outside the sandbox), point into the state dir, lie outside
//! `--kubelet-dir`, are relative or the kubelet dir itself. Every refused request must answer
//! INVALID_ARGUMENT naming the field (teardown of an id that cannot exist may answer OK, stats
//! NOT_FOUND), the same twice, and leave the world as it was: the sandbox outside the state dir,
//! a canary tree outside the sandbox, `/etc` and `/`, and the mount table.
//!
//! Mismatches are collected and reported together at the end of a test, so one run shows every
//! case the server gets wrong.

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use jobcachefs::csi::pb;
use jobcachefs::mount::{info, Mounter, SysMounter};
use pb::controller_client::ControllerClient;
use pb::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

const NODE: &str = "node-hostile";
const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// A line a volume id tries to forge in the server's log.
const FORGED: &str = "FORGED-LOG-LINE level=INFO all good";

// ---------------------------------------------------------------------------------------------
// Hostile values
// ---------------------------------------------------------------------------------------------

/// Strings no cache name, namespace or volume id may be: (case, value).
fn hostile_strings() -> Vec<(&'static str, String)> {
    vec![
        ("dot dot", "..".into()),
        ("dot", ".".into()),
        ("parent path", "../../etc".into()),
        ("slash", "a/b".into()),
        ("absolute path", "/etc/passwd".into()),
        ("NUL", "a\0b".into()),
        ("10 KB", "a".repeat(10 * 1024)),
        ("newline", "a\nb".into()),
        ("forged log line", format!("x\n{FORGED}")),
        ("terminal escape", "\x1b[2J\x1b[31mred".into()),
        ("unicode", "ünïcødé-名前".into()),
        ("right-to-left override", "a\u{202e}b".into()),
        ("space", "a b".into()),
        ("percent-encoded parent", "..%2f..%2fetc".into()),
        ("backslashes", "..\\..\\etc".into()),
        ("overlay option separators", "a,b:c".into()),
    ]
}

/// `hostile_strings` plus what only an id breaks: 129 characters of the allowed alphabet.
fn hostile_ids() -> Vec<(&'static str, String)> {
    let mut ids = hostile_strings();
    ids.push(("129 characters", "a".repeat(129)));
    ids
}

// ---------------------------------------------------------------------------------------------
// The world outside the state dir
// ---------------------------------------------------------------------------------------------

/// Everything a hostile request could change outside the state dir.
#[derive(Debug, Clone, PartialEq, Eq)]
struct World {
    /// Every entry below the watched roots (never following symlinks): kind, mode, size, mtime, link.
    entries: BTreeMap<PathBuf, String>,
    /// Names in `/etc` and in `/`.
    etc: BTreeSet<OsString>,
    root: BTreeSet<OsString>,
    /// `/etc/passwd` and `/etc/shadow`: mtime, size and content.
    passwd: String,
    /// Mounts (point, type, source) outside other tests' temp dirs.
    mounts: BTreeSet<(PathBuf, String, String)>,
}

/// What a test watches: the roots to walk (skipping `skip` names at their top) and whose mounts count.
struct Watch {
    roots: Vec<PathBuf>,
    skip: Vec<PathBuf>,
    mine: Vec<String>,
}

impl Watch {
    fn take(&self) -> World {
        let mut entries = BTreeMap::new();
        for root in &self.roots {
            walk(root, &self.skip, &mut entries);
        }
        let names = |dir: &str| -> BTreeSet<OsString> {
            fs::read_dir(dir).expect("read_dir").map(|e| e.expect("entry").file_name()).collect()
        };
        let mut passwd = String::new();
        for f in ["/etc/passwd", "/etc/shadow"] {
            if let Ok(m) = fs::symlink_metadata(f) {
                let content = fs::read(f).unwrap_or_default();
                passwd.push_str(&format!("{f} {}.{} {} {:?}\n", m.mtime(), m.mtime_nsec(), m.len(), content));
            }
        }
        let mounts = info::read_mountinfo()
            .expect("mountinfo")
            .into_iter()
            .filter(|m| self.counts(&m.mount_point))
            .map(|m| (m.mount_point, m.fstype, m.source))
            .collect();
        World { entries, etc: names("/etc"), root: names("/"), passwd, mounts }
    }

    /// Mounts under our own dirs count, and everything outside the temp dirs other tests use.
    fn counts(&self, point: &Path) -> bool {
        let text = point.to_string_lossy();
        self.mine.iter().any(|m| text.starts_with(m.as_str()))
            || !(point.starts_with("/tmp") || point.starts_with("/var/tmp"))
    }

    /// Unmounts what a wrongly accepted request mounted, deepest first, so later cases start clean.
    fn undo_mounts(&self, before: &World, after: &World) {
        let mut new: Vec<&PathBuf> =
            after.mounts.iter().filter(|m| !before.mounts.contains(*m)).map(|(p, _, _)| p).collect();
        new.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in new {
            let _ = SysMounter.unmount(p);
        }
    }
}

fn walk(path: &Path, skip: &[PathBuf], out: &mut BTreeMap<PathBuf, String>) {
    let Ok(m) = fs::symlink_metadata(path) else { return };
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        format!("link -> {:?}", fs::read_link(path).ok())
    } else if ft.is_dir() {
        "dir".into()
    } else if ft.is_file() {
        format!("file {} bytes", m.len())
    } else {
        "other".into()
    };
    out.insert(
        path.to_path_buf(),
        format!("{kind} mode={:o} uid={} mtime={}.{}", m.permissions().mode(), m.uid(), m.mtime(), m.mtime_nsec()),
    );
    if ft.is_dir() {
        let Ok(dir) = fs::read_dir(path) else { return };
        for e in dir.flatten() {
            let p = e.path();
            if skip.contains(&p) {
                continue;
            }
            walk(&p, skip, out);
        }
    }
}

/// What changed between two snapshots, briefly.
fn diff(before: &World, after: &World) -> String {
    let mut out = Vec::new();
    for (k, v) in &after.entries {
        match before.entries.get(k) {
            None => out.push(format!("new {}: {v}", k.display())),
            Some(b) if b != v => out.push(format!("changed {}: {b} -> {v}", k.display())),
            _ => {}
        }
    }
    for k in before.entries.keys().filter(|k| !after.entries.contains_key(*k)) {
        out.push(format!("gone {}", k.display()));
    }
    for m in after.mounts.difference(&before.mounts) {
        out.push(format!("new mount {m:?}"));
    }
    for m in before.mounts.difference(&after.mounts) {
        out.push(format!("lost mount {m:?}"));
    }
    if before.etc != after.etc {
        out.push(format!("/etc changed: {:?}", after.etc.symmetric_difference(&before.etc).collect::<Vec<_>>()));
    }
    if before.root != after.root {
        out.push(format!("/ changed: {:?}", after.root.symmetric_difference(&before.root).collect::<Vec<_>>()));
    }
    if before.passwd != after.passwd {
        out.push("/etc/passwd or /etc/shadow changed".into());
    }
    out.truncate(12);
    out.join("; ")
}

/// A canary tree: files, a subdirectory, a directory symlinks point at, and a symlink.
fn canary(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::create_dir_all(dir.join("victim")).unwrap();
    fs::write(dir.join("secret"), "do not touch\n").unwrap();
    fs::write(dir.join("sub/f"), "nested\n").unwrap();
    fs::write(dir.join("victim/keep"), "keep\n").unwrap();
    std::os::unix::fs::symlink(dir.join("victim"), dir.join("link-to-victim")).unwrap();
}

/// Shortens a case's value for a report line.
fn show(s: &str) -> String {
    let short: String = s.chars().take(40).collect();
    if short.len() < s.len() {
        format!("{short:?}... ({} bytes)", s.len())
    } else {
        format!("{short:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and judging
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Clients {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

/// One request of any RPC.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Call {
    Create(pb::CreateVolumeRequest),
    Delete(pb::DeleteVolumeRequest),
    Validate(pb::ValidateVolumeCapabilitiesRequest),
    Stage(pb::NodeStageVolumeRequest),
    Unstage(pb::NodeUnstageVolumeRequest),
    Publish(pb::NodePublishVolumeRequest),
    Unpublish(pb::NodeUnpublishVolumeRequest),
    Stats(pb::NodeGetVolumeStatsRequest),
}

impl Call {
    async fn send(self, c: &mut Clients) -> Result<(), Status> {
        match self {
            Call::Create(r) => c.controller.create_volume(r).await.map(drop),
            Call::Delete(r) => c.controller.delete_volume(r).await.map(drop),
            Call::Validate(r) => c.controller.validate_volume_capabilities(r).await.map(drop),
            Call::Stage(r) => c.node.node_stage_volume(r).await.map(drop),
            Call::Unstage(r) => c.node.node_unstage_volume(r).await.map(drop),
            Call::Publish(r) => c.node.node_publish_volume(r).await.map(drop),
            Call::Unpublish(r) => c.node.node_unpublish_volume(r).await.map(drop),
            Call::Stats(r) => c.node.node_get_volume_stats(r).await.map(drop),
        }
    }
}

/// What a hostile request may answer.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// INVALID_ARGUMENT naming the field.
    Invalid(&'static str),
    /// OK (teardown of an id that cannot exist) or INVALID_ARGUMENT naming the field.
    OkOrInvalid(&'static str),
    /// NOT_FOUND or INVALID_ARGUMENT naming the field (NodeGetVolumeStats).
    NotFoundOrInvalid(&'static str),
}

/// Lower case without `_`, ` `, `-`, so "volume_id" and "volume id" both match.
fn squash(s: &str) -> String {
    s.to_lowercase().chars().filter(|c| !matches!(c, '_' | ' ' | '-')).collect()
}

fn judge(r: &Result<(), Status>, want: Want) -> Result<(), String> {
    let names = |s: &Status, field: &str| squash(s.message()).contains(&squash(field));
    let got = match r {
        Ok(()) => "OK".to_string(),
        Err(s) => format!("{:?}: {}", s.code(), show(s.message())),
    };
    let fine = match (r, want) {
        (Ok(()), Want::OkOrInvalid(_)) => true,
        (Err(s), Want::Invalid(f) | Want::OkOrInvalid(f) | Want::NotFoundOrInvalid(f)) => {
            (s.code() == Code::InvalidArgument && names(s, f))
                || (s.code() == Code::NotFound && matches!(want, Want::NotFoundOrInvalid(_)))
        }
        _ => false,
    };
    if fine {
        Ok(())
    } else {
        Err(format!("want {want:?}, got {got}"))
    }
}

/// Runs each case twice, judges both answers, and checks the world did not change; returns the
/// failures as report lines.
async fn run_cases(c: &mut Clients, watch: &Watch, cases: Vec<(String, Call, Want)>) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, call, want) in cases {
        let before = watch.take();
        let first = call.clone().send(c).await;
        let second = call.send(c).await;
        let after = watch.take();
        // The repeated call is judged only when it answers differently from the first.
        if let Err(e) = judge(&first, want) {
            failures.push(format!("{name}: {e}"));
        }
        let code = |r: &Result<(), Status>| r.as_ref().err().map_or(Code::Ok, Status::code);
        if code(&first) != code(&second) {
            failures.push(format!(
                "{name}: the repeated call answered {:?}, the first {:?}",
                code(&second),
                code(&first)
            ));
        }
        if before != after {
            failures.push(format!("{name}: changed the world: {}", diff(&before, &after)));
            watch.undo_mounts(&before, &after);
        }
    }
    failures
}

fn writer() -> pb::VolumeCapability {
    csi_server::mount_cap()
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn create(name: &str, params: HashMap<String, String>) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_string(),
        volume_capabilities: vec![writer()],
        parameters: params,
        ..Default::default()
    }
}

fn stage(id: &str, staging: &str) -> Call {
    Call::Stage(pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: Some(writer()),
        ..Default::default()
    })
}

fn publish(id: &str, staging: &str, target: &str) -> Call {
    Call::Publish(pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(writer()),
        ..Default::default()
    })
}

fn inline(id: &str, target: &str, attrs: HashMap<String, String>) -> Call {
    let mut ctx = map(&[(EPHEMERAL, "true"), (POD_NAMESPACE, "ci"), ("csi.storage.k8s.io/pod.name", "build-1")]);
    ctx.extend(attrs);
    Call::Publish(pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
        volume_capability: Some(writer()),
        volume_context: ctx,
        ..Default::default()
    })
}

fn unpublish(id: &str, target: &str) -> Call {
    Call::Unpublish(pb::NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target.into() })
}

fn unstage(id: &str, staging: &str) -> Call {
    Call::Unstage(pb::NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: staging.into() })
}

fn stats(id: &str, path: &str) -> Call {
    Call::Stats(pb::NodeGetVolumeStatsRequest { volume_id: id.into(), volume_path: path.into(), ..Default::default() })
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

#[track_caller]
fn ok<T>(what: &str, r: Result<tonic::Response<T>, Status>) -> T {
    match r {
        Ok(v) => v.into_inner(),
        Err(st) => panic!("{what}: expected OK, got {:?}: {}", st.code(), st.message()),
    }
}

/// A sandbox whose dir is kubelet's, a canary tree outside it, symlinks planted inside it, and a
/// running server with one staged-and-published volume (`good`) and one created volume (`spare`).
struct Setup {
    sb: Sandbox,
    _outside: tempfile::TempDir,
    outside: PathBuf,
    kub: PathBuf,
    watch: Watch,
    server: csi_server::Server,
    c: Clients,
    good: String,
    spare: String,
    staging: PathBuf,
    target: PathBuf,
}

impl Setup {
    async fn new() -> Self {
        let sb = Sandbox::new();
        let kub = sb.dir.path().to_path_buf();
        let outside_dir = tempfile::Builder::new().prefix("jcfs-outside").tempdir_in("/var/tmp").expect("temp dir");
        let outside = outside_dir.path().to_path_buf();
        canary(&outside);
        canary(&kub.join("canary"));
        let staging = kub.join("staging/good");
        let target = kub.join("pods/p1/volumes/good/mount");
        let plant = |link: &str, to: &Path| {
            let at = kub.join(link);
            fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(to, at).unwrap();
        };
        plant("link-root", Path::new("/"));
        plant("link-etc", Path::new("/etc"));
        plant("link-state", &sb.state);
        plant("link-outside", &outside.join("victim"));
        plant("link-victim", &kub.join("canary/victim"));
        plant("dangling", &outside.join("not-yet"));
        plant("link-rel", Path::new("../.."));
        plant("pods/p9/volumes/link", Path::new("/etc"));
        plant("link-staging", &staging);
        plant("link-target", &target);

        let (server, channel) = csi_server::serve(&kub, &sb.state, NODE, &[], &[]).await;
        let mut c = Clients { controller: ControllerClient::new(channel.clone()), node: NodeClient::new(channel) };
        let vol = |r: pb::CreateVolumeResponse| r.volume.expect("volume").volume_id;
        let good = vol(ok(
            "CreateVolume good",
            c.controller.create_volume(create("pvc-good", map(&[("cacheName", "good")]))).await,
        ));
        let spare = vol(ok(
            "CreateVolume spare",
            c.controller.create_volume(create("pvc-spare", map(&[("cacheName", "spare")]))).await,
        ));
        stage(&good, &s(&staging)).send(&mut c).await.expect("stage good");
        publish(&good, &s(&staging), &s(&target)).send(&mut c).await.expect("publish good");
        fs::write(target.join("job-file"), "written by the job\n").unwrap();

        let kub_text = s(&kub);
        let watch = Watch {
            roots: vec![kub.clone(), outside.clone(), PathBuf::from(format!("{kub_text}-evil"))],
            skip: vec![sb.state.clone(), kub.join(format!("{NODE}.log")), kub.join(format!("{NODE}.sock"))],
            mine: vec![kub_text.clone(), s(&outside)],
        };
        Setup { sb, _outside: outside_dir, outside, kub, watch, server, c, good, spare, staging, target }
    }

    fn k(&self, rel: &str) -> String {
        format!("{}/{rel}", s(&self.kub))
    }

    /// Takes the good volume down and deletes both; nothing stays mounted.
    async fn finish(&mut self, mut failures: Vec<String>) {
        let (good, spare) = (self.good.clone(), self.spare.clone());
        let steps = [
            unpublish(&good, &s(&self.target)),
            unstage(&good, &s(&self.staging)),
            Call::Delete(pb::DeleteVolumeRequest { volume_id: good.clone(), ..Default::default() }),
            Call::Delete(pb::DeleteVolumeRequest { volume_id: spare, ..Default::default() }),
        ];
        for call in steps {
            if let Err(e) = call.send(&mut self.c).await {
                failures.push(format!("teardown: {:?}: {}", e.code(), e.message()));
            }
        }
        let log = fs::read_to_string(&self.server.log).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.starts_with(FORGED)) {
            failures.push(format!("a volume id forged a line in the server log: {line:?}"));
        }
        if log.contains('\x1b') {
            failures.push("a request put a raw terminal escape (ESC) into the server log".into());
        }
        if log.contains("panicked") {
            failures.push("the server panicked".into());
        }
        assert!(self.sb.mounts().is_empty(), "nothing stays mounted: {:?}", self.sb.mounts());
        assert_eq!(fs::read_to_string(self.outside.join("secret")).unwrap(), "do not touch\n");
        assert!(failures.is_empty(), "{} hostile case(s) went wrong:\n  {}", failures.len(), failures.join("\n  "));
    }
}

// ---------------------------------------------------------------------------------------------
// Volume ids and CreateVolume names
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_volume_ids_are_refused_or_name_nothing() {
    if !can_mount() {
        return;
    }
    let mut t = Setup::new().await;
    let (staging, target) = (s(&t.staging), s(&t.target));
    let absent = t.k("pods/p2/volumes/absent/mount");
    let mut cases = Vec::new();
    for (case, id) in hostile_ids() {
        let v = show(&id);
        let validate = pb::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![writer()],
            ..Default::default()
        };
        cases.extend([
            (format!("ValidateVolumeCapabilities id {case} {v}"), Call::Validate(validate), Want::Invalid("volume_id")),
            (format!("NodeStageVolume id {case} {v}"), stage(&id, &t.k("staging/hostile")), Want::Invalid("volume_id")),
            (
                format!("NodePublishVolume id {case} {v}"),
                publish(&id, &staging, &t.k("pods/p3/volumes/x/mount")),
                Want::Invalid("volume_id"),
            ),
            (
                format!("inline NodePublishVolume id {case} {v}"),
                inline(&id, &t.k("pods/p4/volumes/x/mount"), map(&[("cacheName", "inline")])),
                Want::Invalid("volume_id"),
            ),
            (format!("NodeGetVolumeStats id {case} {v}"), stats(&id, &staging), Want::NotFoundOrInvalid("volume_id")),
            (format!("NodeUnpublishVolume id {case} {v}"), unpublish(&id, &absent), Want::OkOrInvalid("volume_id")),
            // The good volume's staging: an id that names nothing must not take it down.
            (format!("NodeUnstageVolume id {case} {v}"), unstage(&id, &staging), Want::OkOrInvalid("volume_id")),
            (
                format!("DeleteVolume id {case} {v}"),
                Call::Delete(pb::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }),
                Want::OkOrInvalid("volume_id"),
            ),
        ]);
    }
    // An id that names nothing must not take down the good volume's published target either.
    cases.push((
        "NodeUnpublishVolume of an id that cannot exist, at another volume's target".into(),
        unpublish("../../etc", &target),
        Want::OkOrInvalid("volume_id"),
    ));
    let mut failures = run_cases(&mut t.c, &t.watch, cases).await;

    // CreateVolume names are arbitrary strings: accepted, hashed into an id, nothing outside the
    // state dir. Each is created twice (same id), then deleted twice.
    for (i, (case, name)) in hostile_strings().into_iter().enumerate() {
        let before = t.watch.take();
        let volumes_before: BTreeSet<OsString> = fs::read_dir(t.sb.layout().volumes_dir())
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let req = create(&name, map(&[("cacheName", &format!("named-{i}"))]));
        let first = t.c.controller.create_volume(req.clone()).await.map(tonic::Response::into_inner);
        let second = t.c.controller.create_volume(req).await.map(tonic::Response::into_inner);
        let what = format!("CreateVolume name {case} {}", show(&name));
        match (&first, &second) {
            (Ok(a), Ok(b)) => {
                let id = a.volume.as_ref().expect("volume").volume_id.clone();
                if a != b {
                    failures.push(format!("{what}: the repeated call answered differently"));
                }
                if id != jobcachefs::csi::volume_id_for(&name).to_string() {
                    failures.push(format!("{what}: volume id {id} is not the hash of the name"));
                }
                let volumes_after: BTreeSet<OsString> = fs::read_dir(t.sb.layout().volumes_dir())
                    .map(|d| d.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                let new: Vec<_> = volumes_after.difference(&volumes_before).collect();
                if new != [&OsString::from(&id)] {
                    failures.push(format!("{what}: created {new:?} in the state dir's volumes, want only {id}"));
                }
                for _ in 0..2 {
                    let del = pb::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() };
                    if let Err(e) = t.c.controller.delete_volume(del).await {
                        failures.push(format!("{what}: DeleteVolume {:?}: {}", e.code(), e.message()));
                    }
                }
            }
            (a, b) => failures.push(format!(
                "{what}: want OK twice (names are arbitrary), got {:?} then {:?}",
                a.as_ref().err().map(|e| (e.code(), show(e.message()))),
                b.as_ref().err().map(|e| (e.code(), show(e.message())))
            )),
        }
        let after = t.watch.take();
        if before != after {
            failures.push(format!("{what}: changed the world: {}", diff(&before, &after)));
        }
    }
    t.finish(failures).await;
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_parameters_are_refused_naming_the_parameter() {
    if !can_mount() {
        return;
    }
    let mut t = Setup::new().await;
    let target = t.k("pods/p5/volumes/inline/mount");
    let mut cases = Vec::new();
    let pvc = |params: &[(&str, &str)]| Call::Create(create("pvc-hostile-params", map(params)));
    let inl = |params: &[(&str, &str)]| inline("csi-hostile-inline", &target, map(params));
    for (case, h) in hostile_strings() {
        let v = show(&h);
        let h = h.as_str();
        let c = "cache";
        cases.extend([
            (
                format!("CreateVolume cacheName {case} {v}"),
                pvc(&[("cacheName", h)]),
                Want::Invalid("parameter cacheName"),
            ),
            (
                format!("CreateVolume {PVC_NAMESPACE} {case} {v}"),
                pvc(&[("cacheName", c), (PVC_NAMESPACE, h)]),
                Want::Invalid("namespace"),
            ),
            (
                format!("CreateVolume namespace {case} {v}"),
                pvc(&[("cacheName", c), ("namespace", h)]),
                Want::Invalid("namespace"),
            ),
            (
                format!("CreateVolume onStale {case} {v}"),
                pvc(&[("cacheName", c), ("onStale", h)]),
                Want::Invalid("parameter onStale"),
            ),
            (
                format!("CreateVolume maxBytes {case} {v}"),
                pvc(&[("cacheName", c), ("maxBytes", h)]),
                Want::Invalid("parameter maxBytes"),
            ),
            (
                format!("CreateVolume parameter key {case} {v}"),
                pvc(&[("cacheName", c), (h, "x")]),
                Want::Invalid("parameter"),
            ),
            (format!("inline cacheName {case} {v}"), inl(&[("cacheName", h)]), Want::Invalid("parameter cacheName")),
            (
                format!("inline {POD_NAMESPACE} {case} {v}"),
                inl(&[("cacheName", c), (POD_NAMESPACE, h)]),
                Want::Invalid("namespace"),
            ),
            (
                format!("inline fallbackCaches {case} {v}"),
                inl(&[("cacheName", c), ("fallbackCaches", h)]),
                Want::Invalid("parameter fallbackCaches"),
            ),
            (
                format!("inline onStale {case} {v}"),
                inl(&[("cacheName", c), ("onStale", h)]),
                Want::Invalid("parameter onStale"),
            ),
            (
                format!("inline maxBytes {case} {v}"),
                inl(&[("cacheName", c), ("maxBytes", h)]),
                Want::Invalid("parameter maxBytes"),
            ),
        ]);
        // A StorageClass may name NAMESPACE/NAME: "a/b" is a legal fallback there.
        if h != "a/b" {
            cases.push((
                format!("CreateVolume fallbackCaches {case} {v}"),
                pvc(&[("cacheName", c), ("fallbackCaches", h)]),
                Want::Invalid("parameter fallbackCaches"),
            ));
        }
    }
    for (case, v) in [("negative", "-1"), ("NaN", "NaN"), ("empty", "")] {
        cases.push((
            format!("CreateVolume maxBytes {case}"),
            pvc(&[("cacheName", "cache"), ("maxBytes", v)]),
            Want::Invalid("parameter maxBytes"),
        ));
    }
    cases.push((
        "CreateVolume empty cacheName".into(),
        pvc(&[("cacheName", "")]),
        Want::Invalid("parameter cacheName"),
    ));
    cases.push((
        "CreateVolume fallbackCaches to ../etc in a list".into(),
        pvc(&[("cacheName", "cache"), ("fallbackCaches", "main, ../etc")]),
        Want::Invalid("parameter fallbackCaches"),
    ));
    let failures = run_cases(&mut t.c, &t.watch, cases).await;
    t.finish(failures).await;
}

// ---------------------------------------------------------------------------------------------
// Staging and target paths
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_are_refused_naming_the_field() {
    if !can_mount() {
        return;
    }
    let mut t = Setup::new().await;
    let kub = s(&t.kub);
    let state = s(&t.sb.state);
    let paths: Vec<(&str, String)> = vec![
        ("relative", "staging/x".into()),
        ("relative with dot", "./x".into()),
        ("relative with ..", "x/../y".into()),
        ("empty-looking", " ".into()),
        (".. out of the kubelet dir", t.k("pods/../../../etc/jcfs-hostile")),
        ("ends in ..", t.k("pods/..")),
        ("root", "/".into()),
        ("/etc", "/etc".into()),
        ("new dir in /etc", "/etc/jcfs-hostile".into()),
        ("/proc/self/root", "/proc/self/root/etc".into()),
        ("outside the sandbox", s(&t.outside.join("victim"))),
        ("new dir outside the sandbox", s(&t.outside.join("made-by-driver"))),
        ("sibling sharing the kubelet dir's prefix", format!("{kub}-evil/x")),
        ("the state dir", state.clone()),
        ("the state dir's volumes", format!("{state}/volumes")),
        ("the state dir's empty layer", format!("{state}/empty")),
        ("new dir in the state dir's layers", format!("{state}/layers/x")),
        ("symlink to /", t.k("link-root")),
        ("through a symlink to /", t.k("link-root/etc")),
        ("through a symlink to /, new dir", t.k("link-root/jcfs-hostile")),
        ("symlink to /etc", t.k("link-etc")),
        ("through a symlink to /etc, new dir", t.k("link-etc/jcfs-hostile")),
        ("symlink to the state dir", t.k("link-state")),
        ("through a symlink to the state dir", t.k("link-state/volumes")),
        ("through a symlink to the state dir, new dir", t.k("link-state/new")),
        ("symlink outside the sandbox", t.k("link-outside")),
        ("through a symlink outside the sandbox, new dir", t.k("link-outside/new")),
        ("symlink to a canary dir", t.k("link-victim")),
        ("dangling symlink", t.k("dangling")),
        ("through a dangling symlink", t.k("dangling/x")),
        ("relative symlink up", t.k("link-rel")),
        ("through a relative symlink up", t.k("link-rel/etc")),
        ("through a symlink deep in pods/", t.k("pods/p9/volumes/link/mount")),
        ("symlink to the good volume's staging", t.k("link-staging")),
        ("symlink to the good volume's target", t.k("link-target")),
        ("NUL", t.k("a\0b")),
        ("newline", t.k("a\nb")),
        ("terminal escape", t.k("\x1b[2Jx")),
        ("10 KB", t.k(&"a".repeat(10 * 1024))),
        // Last: accepted, it would mount over the whole kubelet dir (and the state dir in it).
        ("the kubelet dir itself, trailing slash", format!("{kub}/")),
        ("the kubelet dir itself", kub.clone()),
    ];
    let (good, spare) = (t.good.clone(), t.spare.clone());
    let staging = s(&t.staging);
    let mut cases = Vec::new();
    for (case, p) in &paths {
        let v = show(p);
        cases.extend([
            (format!("NodeStageVolume staging {case} {v}"), stage(&spare, p), Want::Invalid("staging_target_path")),
            (format!("NodePublishVolume target {case} {v}"), publish(&good, &staging, p), Want::Invalid("target_path")),
            (
                format!("NodePublishVolume staging {case} {v}"),
                publish(&good, p, &t.k("pods/p6/volumes/x/mount")),
                Want::Invalid("staging_target_path"),
            ),
            (
                format!("inline NodePublishVolume target {case} {v}"),
                inline("csi-hostile-path", p, map(&[("cacheName", "inline")])),
                Want::Invalid("target_path"),
            ),
            (format!("NodeUnpublishVolume target {case} {v}"), unpublish(&good, p), Want::Invalid("target_path")),
            (format!("NodeUnstageVolume staging {case} {v}"), unstage(&good, p), Want::Invalid("staging_target_path")),
        ]);
    }
    // Stats only reads, and any path the volume is not mounted at is simply not found.
    let file = t.k("canary/secret/x");
    for (case, p) in [
        ("relative", "staging/good"),
        ("..", &*t.k("staging/../staging/x")),
        ("/etc", "/etc"),
        ("the state dir", &*state),
        ("NUL", &*t.k("a\0b")),
        ("10 KB", &*t.k(&"a".repeat(10 * 1024))),
        ("through a regular file", &*file),
        ("symlink to /", &*t.k("link-root")),
    ] {
        cases.push((
            format!("NodeGetVolumeStats path {case}"),
            stats(&good, p),
            Want::NotFoundOrInvalid("volume_path"),
        ));
    }
    let mut failures = run_cases(&mut t.c, &t.watch, cases).await;
    // The good volume survived every case: still staged and published, the job's file there.
    if fs::read_to_string(t.target.join("job-file")).ok().as_deref() != Some("written by the job\n") {
        failures.push("the good volume's target lost its content".into());
    }
    t.finish(failures).await;
}

// ---------------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_command_line_names_get_the_rule_and_run_nothing() {
    let sb = Sandbox::new();
    let ran = sb.dir.path().join("ran");
    let marker = ran.to_str().unwrap().to_string();
    let long = "a".repeat(10 * 1024);
    let mut cases: Vec<(Vec<String>, &str)> = Vec::new();
    let run = |opts: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["run".into()];
        v.extend(opts.iter().map(|s| s.to_string()));
        v.extend(["--".into(), "touch".into(), marker.clone()]);
        v
    };
    let bad: &[(&str, &str)] = &[
        (&long, "at most 63 characters"),
        ("a\x1bb", "must match"),
        ("\x1b[2J", "must match"),
        ("a\nb", "must match"),
        ("a\tb", "must match"),
        ("ünïcødé", "must match"),
        ("名前", "must match"),
        ("a\u{202e}b", "must match"),
        ("-", "must match"),
        (".hidden", "must match"),
        ("a..b", "must not contain '..'"),
    ];
    for (v, rule) in bad {
        cases.push((run(&["--cache", v]), rule));
        cases.push((run(&["--cache", "ok", "--namespace", v]), rule));
        cases.push((run(&["--cache", "ok", "--fallback", v]), rule));
        cases.push((run(&["--cache", "ok", "--fallback", &format!("main,{v}")]), rule));
        cases.push((vec!["cache".into(), "show".into(), v.to_string()], rule));
        cases.push((vec!["cache".into(), "rm".into(), v.to_string()], rule));
        cases.push((vec!["cache".into(), "squash".into(), v.to_string()], rule));
        let path = sb.dir.path().join("mnt");
        cases.push((vec!["mount".into(), "--cache".into(), v.to_string(), path.to_str().unwrap().into()], rule));
    }
    let mut failures = Vec::new();
    for (args, rule) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = sb.cli(&argv);
        let err = stderr(&out);
        let what = format!("{:?}", argv.iter().map(|a| show(a)).collect::<Vec<_>>());
        if out.status.code() != Some(1) {
            failures.push(format!("{what}: exit {:?}, want 1: {}", out.status.code(), show(&err)));
        }
        if !err.contains(rule) {
            failures.push(format!("{what}: stderr does not give the rule {rule:?}: {}", show(&err)));
        }
        if err.contains("panicked") {
            failures.push(format!("{what}: panicked"));
        }
        if err.contains('\x1b') {
            failures.push(format!("{what}: echoed a raw terminal escape"));
        }
        if err.len() > 2000 {
            failures.push(format!("{what}: a {} byte error; the value must be shortened", err.len()));
        }
    }
    assert!(!ran.exists(), "a refused run must not run its command");
    let caches = fs::read_dir(sb.layout().caches_dir()).map(|d| d.count()).unwrap_or(0);
    assert_eq!(caches, 0, "no cache directory was created for bad input");
    assert!(failures.is_empty(), "{} case(s) went wrong:\n  {}", failures.len(), failures.join("\n  "));
}

#[test]
fn hostile_state_dirs_get_the_rule_and_are_not_created() {
    let sb = Sandbox::new();
    let base = sb.dir.path().to_str().unwrap().to_string();
    let cases: Vec<(String, &str)> = vec![
        ("relative/state".into(), "must be an absolute path"),
        ("./state".into(), "must be an absolute path"),
        (format!("{base}/a,b"), "must not contain ','"),
        (format!("{base}/a:b"), "must not contain ','"),
        (format!("{base}/a\\b"), "must not contain ','"),
        (format!("{base}/a\nb"), "must not contain ','"),
        (format!("{base}/a\x1bb"), "must not contain ','"),
        (format!("{base}/{}", "s".repeat(100)), "at most 96 bytes"),
        (format!("{base}/{}", "s".repeat(10 * 1024)), "at most 96 bytes"),
    ];
    let mut failures = Vec::new();
    for (dir, rule) in &cases {
        for args in [&["cache", "ls"][..], &["run", "--cache", "c", "--", "true"], &["cache", "gc"]] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_jobcachefs"))
                .arg("--state-dir")
                .arg(dir)
                .args(args)
                .env_remove("RUST_LOG")
                .output()
                .expect("run jobcachefs");
            let err = stderr(&out);
            let what = format!("--state-dir {} {args:?}", show(dir));
            if out.status.code() != Some(1) {
                failures.push(format!("{what}: exit {:?}, want 1: {}", out.status.code(), show(&err)));
            }
            if !err.contains(rule) {
                failures.push(format!("{what}: stderr does not give the rule {rule:?}: {}", show(&err)));
            }
            if err.contains("panicked") {
                failures.push(format!("{what}: panicked"));
            }
            if !dir.is_empty() && Path::new(dir).is_absolute() && Path::new(dir).exists() {
                failures.push(format!("{what}: created the refused state dir"));
            }
        }
    }
    assert!(!Path::new("relative").exists() && !Path::new("state").exists(), "no relative state dir was created");
    assert!(failures.is_empty(), "{} case(s) went wrong:\n  {}", failures.len(), failures.join("\n  "));
}
