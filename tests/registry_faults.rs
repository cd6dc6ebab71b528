//! Two nodes (two state dirs in one process, no shared filesystem) share a cache through a
//! real registry (the Debian `docker-registry`), with a proxy in front of it that answers
//! 503, answers slowly or cuts connections mid-transfer. What a user sees: a registry in
//! trouble never fails a job nor wedges a volume, a restore never waits long on it, and
//! nothing it sends (corrupt blobs, hostile tars) touches a node's caches.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fault_proxy::{FaultProxy, Mode};
use common::registry::TestRegistry;
use common::*;
use jobcachefs::lock::FileLock;
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::remote::{RemoteConfig, Synced};
use jobcachefs::ops::{Engine, OpsError, Released};
use jobcachefs::registry::archive::Limits;
use jobcachefs::registry::{Registry, RegistryConfig};
use jobcachefs::store::commit::NotPublished;
use jobcachefs::store::{CacheKey, Layout, Store, VolumeId};

fn registry_at(addr: &str) -> Registry {
    Registry::new(RegistryConfig {
        host: addr.to_string(),
        prefix: "jcfs".into(),
        auth_file: None,
        ca_file: None,
        insecure: true,
        timeout: Duration::from_secs(3),
    })
    .expect("registry client")
}

/// A node: its own state dir, a file lock (one writer per test step), the registry at `addr`.
fn node(sb: &Sandbox, name: &str, addr: &str, prefetch: Option<Duration>) -> Engine {
    let layout = Layout::new(sb.dir.path().join(name)).expect("state dir");
    Engine::new(
        Store::open(layout.clone()).expect("store"),
        Arc::new(SysMounter),
        Arc::new(FileLock::new(layout)),
        Duration::from_secs(10),
    )
    .with_registry(RemoteConfig {
        registry: registry_at(addr),
        restore_timeout: Duration::from_secs(1),
        keep: 5,
        limits: Limits::default(),
        prefetch,
    })
}

fn cache() -> CacheKey {
    CacheKey::new("ci", "m2").unwrap()
}

/// Random bytes that do not compress: a transfer of them takes real time.
fn noise(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x: u64 = 0x9e3779b97f4a7c15 ^ len as u64;
    for b in out.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    out
}

/// Restores `cache()` as volume `id` at `sb/<id>`, runs `job` in it, releases it.
async fn job(engine: &Engine, sb: &Sandbox, id: &str, work: impl FnOnce(&Path)) -> Result<Option<Released>, OpsError> {
    let target = sb.path(id);
    engine.restore(volume(id, &cache(), publishing(), &target)).await.expect("restore");
    work(&target);
    engine.release(&VolumeId::new(id).unwrap(), true).await
}

fn version(engine: &Engine) -> u64 {
    engine.store().head(&cache()).unwrap().map_or(0, |h| h.version)
}

fn scratch(sb: &Sandbox, name: &str) -> Vec<String> {
    fs::read_dir(sb.dir.path().join(name).join("tmp"))
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_registry_keeps_the_change_for_a_retry_then_takes_it() {
    if !can_mount() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let proxy = FaultProxy::start(&reg.url()).await;
    let sb = Sandbox::new();
    let a = node(&sb, "a", &proxy.addr, None);
    let target = sb.path("v1");
    a.restore(volume("v1", &cache(), publishing(), &target)).await.unwrap();
    fs::write(target.join("big.jar"), noise(8 << 20)).unwrap();
    fs::write(target.join("pom.xml"), "<project/>").unwrap();

    // 503s: the release says retry, the volume and its change stay.
    proxy.set(Mode::Unavailable);
    let err = a.release(&VolumeId::new("v1").unwrap(), true).await.expect_err("503 must not publish");
    assert!(matches!(err, OpsError::Remote { .. }), "{err}");
    assert!(err.to_string().contains("503") || err.to_string().to_lowercase().contains("unavailable"), "{err}");
    assert!(a.store().volume(&VolumeId::new("v1").unwrap()).unwrap().is_some(), "the volume is kept for the retry");

    // The registry dies in the middle of the upload: again a retry, nothing half-published.
    proxy.set(Mode::CutAfter(1 << 20));
    let err = a.release(&VolumeId::new("v1").unwrap(), true).await.expect_err("a cut upload must not publish");
    assert!(matches!(err, OpsError::Remote { .. }), "{err}");
    assert_eq!(registry_at(&reg.url()).read_version(&cache(), "head").await.unwrap(), None, "no head yet");

    // Back: the retry publishes v1, and another node gets exactly what the job wrote.
    proxy.set(Mode::Pass);
    let released = a.release(&VolumeId::new("v1").unwrap(), true).await.unwrap();
    assert!(matches!(released, Some(Released::Committed { version: 1, .. })), "{released:?}");
    let b = node(&sb, "b", &reg.url(), None);
    job(&b, &sb, "b1", |dir| {
        assert_eq!(fs::read(dir.join("big.jar")).unwrap(), noise(8 << 20));
        assert_eq!(fs::read_to_string(dir.join("pom.xml")).unwrap(), "<project/>");
    })
    .await
    .unwrap();

    // Past the publish deadline a registry still down drops the change: the job is done.
    let a = a.with_publish_deadline(Duration::ZERO);
    proxy.set(Mode::Unavailable);
    let released = job(&a, &sb, "v2", |dir| fs::write(dir.join("new.txt"), "x").unwrap()).await.unwrap();
    assert!(
        matches!(&released, Some(Released::NotPublished { why: NotPublished::RegistryFailed { message } }) if !message.is_empty()),
        "{released:?}"
    );
    assert!(a.store().volume(&VolumeId::new("v2").unwrap()).unwrap().is_none(), "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_uses_the_local_version_when_the_registry_is_slow_down_or_cut() {
    if !can_mount() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let proxy = FaultProxy::start(&reg.url()).await;
    let sb = Sandbox::new();
    let a = node(&sb, "a", &reg.url(), None);
    let b = node(&sb, "b", &proxy.addr, None);
    job(&a, &sb, "a1", |dir| fs::write(dir.join("v"), "1").unwrap()).await.unwrap();
    job(&b, &sb, "b1", |dir| assert_eq!(fs::read_to_string(dir.join("v")).unwrap(), "1")).await.unwrap();
    assert_eq!(version(&b), 1, "B pulled v1");
    job(&a, &sb, "a2", |dir| {
        fs::write(dir.join("v"), "2").unwrap();
        fs::write(dir.join("big"), noise(16 << 20)).unwrap();
    })
    .await
    .unwrap();
    let layers_before = fs::read_dir(sb.dir.path().join("b/layers")).unwrap().count();

    for mode in [Mode::Slow(Duration::from_secs(10)), Mode::Unavailable, Mode::CutAfter(2 << 20)] {
        proxy.set(mode);
        let started = Instant::now();
        let target = sb.path("b2");
        b.restore(volume("b2", &cache(), publishing(), &target)).await.expect("restore never fails on the registry");
        let took = started.elapsed();
        assert_eq!(fs::read_to_string(target.join("v")).unwrap(), "1", "{mode:?}: B's own newest version");
        assert!(took < Duration::from_secs(8), "{mode:?}: the restore waited {took:?}");
        b.release(&VolumeId::new("b2").unwrap(), false).await.unwrap();
        assert_eq!(version(&b), 1, "{mode:?}");
        assert_eq!(fs::read_dir(sb.dir.path().join("b/layers")).unwrap().count(), layers_before, "{mode:?}");
        assert!(scratch(&sb, "b").iter().all(|n| !n.starts_with("pull-")), "{mode:?}: {:?}", scratch(&sb, "b"));
    }

    proxy.set(Mode::Pass);
    job(&b, &sb, "b3", |dir| assert_eq!(fs::read_to_string(dir.join("v")).unwrap(), "2")).await.unwrap();
    assert_eq!(version(&b), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_is_refused_and_the_node_keeps_its_version() {
    if !can_mount() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let sb = Sandbox::new();
    let a = node(&sb, "a", &reg.url(), None);
    let b = node(&sb, "b", &reg.url(), None);
    job(&a, &sb, "a1", |dir| fs::write(dir.join("v"), "1").unwrap()).await.unwrap();
    b.sync_cache(&cache()).await.unwrap();
    job(&a, &sb, "a2", |dir| fs::write(dir.join("v"), "2").unwrap()).await.unwrap();
    let head = registry_at(&reg.url()).read_version(&cache(), "head").await.unwrap().unwrap().0;
    let top = &head.layers.last().unwrap().blob.digest;
    let hex = top.strip_prefix("sha256:").unwrap();
    let data = reg.storage().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let mut bytes = fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&data, bytes).unwrap();

    let err = b.sync_cache(&cache()).await.expect_err("a corrupt blob must be refused");
    assert!(err.to_string().contains(hex), "the error names the blob: {err}");
    assert_eq!(version(&b), 1, "B's HEAD untouched");
    assert!(scratch(&sb, "b").iter().all(|n| !n.starts_with("pull-")), "{:?}", scratch(&sb, "b"));
    job(&b, &sb, "b1", |dir| assert_eq!(fs::read_to_string(dir.join("v")).unwrap(), "1")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_makes_the_next_restore_a_mount_and_without_it_only_the_delta_is_pulled() {
    if !can_mount() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let proxy = FaultProxy::start(&reg.url()).await;
    let sb = Sandbox::new();
    let a = node(&sb, "a", &reg.url(), None);
    let b = node(&sb, "b", &proxy.addr, Some(Duration::from_secs(600)));
    job(&a, &sb, "a1", |dir| fs::write(dir.join("base"), noise(4 << 20)).unwrap()).await.unwrap();
    job(&b, &sb, "b1", |_| {}).await.unwrap();
    let before = fs::read_dir(sb.dir.path().join("b/layers")).unwrap().count();
    job(&a, &sb, "a2", |dir| fs::write(dir.join("delta"), "d").unwrap()).await.unwrap();

    let found = b.prefetch_once().await;
    assert!(
        matches!(found.as_slice(), [(k, Ok(Synced::Pulled { version: 2, layers: 1, .. }))] if *k == cache()),
        "one new layer prefetched: {found:?}"
    );
    // Only the new layer (and its record) came over.
    assert_eq!(fs::read_dir(sb.dir.path().join("b/layers")).unwrap().count(), before + 2);

    // A restore now is a mount: it pulls nothing, and even a registry that hangs holds it up
    // only briefly (the version prefetch found current is restored).
    proxy.set(Mode::Slow(Duration::from_secs(10)));
    let started = Instant::now();
    job(&b, &sb, "b2", |dir| assert_eq!(fs::read_to_string(dir.join("delta")).unwrap(), "d")).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(fs::read_dir(sb.dir.path().join("b/layers")).unwrap().count(), before + 2, "nothing pulled");

    // Without prefetch a restore after another node's publish pulls just the new layer.
    let c = node(&sb, "c", &reg.url(), None);
    job(&c, &sb, "c1", |_| {}).await.unwrap();
    let held = fs::read_dir(sb.dir.path().join("c/layers")).unwrap().count();
    job(&a, &sb, "a3", |dir| fs::write(dir.join("delta3"), "3").unwrap()).await.unwrap();
    job(&c, &sb, "c2", |dir| assert_eq!(fs::read_to_string(dir.join("delta3")).unwrap(), "3")).await.unwrap();
    assert_eq!(fs::read_dir(sb.dir.path().join("c/layers")).unwrap().count(), held + 2, "one layer and its record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_lose_their_tags_past_the_retention() {
    if !can_mount() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let sb = Sandbox::new();
    let a = node(&sb, "a", &reg.url(), None);
    for n in 1..=7 {
        job(&a, &sb, &format!("a{n}"), |dir| fs::write(dir.join("n"), n.to_string()).unwrap()).await.unwrap();
    }
    let registry = registry_at(&reg.url());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut tags = registry.tags(&cache()).await.unwrap();
        tags.sort();
        if tags == ["head", "v3", "v4", "v5", "v6", "v7"] {
            break;
        }
        assert!(Instant::now() < deadline, "tags left: {tags:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (head, _) = registry.read_version(&cache(), "head").await.unwrap().unwrap();
    assert_eq!(head.version, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_stopped_and_restarted_loses_no_publish_and_fails_no_restore() {
    if !can_mount() {
        return;
    }
    let Some(mut reg) = TestRegistry::start() else { return };
    let sb = Sandbox::new();
    let a = node(&sb, "a", &reg.url(), None);
    let b = node(&sb, "b", &reg.url(), None);
    job(&a, &sb, "a1", |dir| fs::write(dir.join("v"), "1").unwrap()).await.unwrap();

    reg.stop();
    let target = sb.path("a2");
    a.restore(volume("a2", &cache(), publishing(), &target)).await.expect("a restore needs no registry");
    fs::write(target.join("v"), "2").unwrap();
    let err = a.release(&VolumeId::new("a2").unwrap(), true).await.expect_err("no registry, no publish yet");
    assert!(matches!(err, OpsError::Remote { .. }), "{err}");
    let empty = sb.path("b1");
    b.restore(volume("b1", &cache(), publishing(), &empty)).await.expect("B restores what it has: nothing");
    assert!(!empty.join("v").exists());
    b.release(&VolumeId::new("b1").unwrap(), false).await.unwrap();

    reg.restart();
    let released = a.release(&VolumeId::new("a2").unwrap(), true).await.unwrap();
    assert!(matches!(released, Some(Released::Committed { version: 2, .. })), "{released:?}");
    job(&b, &sb, "b2", |dir| assert_eq!(fs::read_to_string(dir.join("v")).unwrap(), "2")).await.unwrap();
}

/// A zstd-compressed tar whose one entry is named `name` (written raw: the tar crate refuses
/// `..` in paths it builds).
fn hostile_blob(name: &str) -> Vec<u8> {
    let mut header = tar::Header::new_ustar();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(5);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut tar = tar::Builder::new(Vec::new());
    tar.append(&header, &b"pwned"[..]).unwrap();
    zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_layer_in_the_registry_is_refused_and_touches_nothing() {
    use jobcachefs::registry::{Blob, RemoteLayer, RemoteVersion};
    use sha2::Digest;
    if !can_mount() {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let sb = Sandbox::new();
    let a = node(&sb, "a", &reg.url(), None);
    let b = node(&sb, "b", &reg.url(), None);
    job(&a, &sb, "a1", |dir| fs::write(dir.join("v"), "1").unwrap()).await.unwrap();
    job(&b, &sb, "b1", |_| {}).await.unwrap();

    // Someone with push rights puts a v2 whose new layer escapes its directory.
    let registry = registry_at(&reg.url());
    let (v1, _) = registry.read_version(&cache(), "head").await.unwrap().unwrap();
    let bytes = hostile_blob("../../../../escaped.txt");
    let path = sb.path("blobs").join("evil.tar.zst");
    fs::write(&path, &bytes).unwrap();
    let blob = Blob {
        digest: format!("sha256:{:x}", sha2::Sha256::digest(&bytes)),
        size: bytes.len() as u64,
        diff_id: format!("sha256:{}", "0".repeat(64)),
    };
    registry.push_blob(&cache(), &path, &blob, &[]).await.unwrap();
    let mut layers = v1.layers.clone();
    layers.push(RemoteLayer { id: jobcachefs::store::LayerId::new("evil0001").unwrap(), blob });
    let v2 = RemoteVersion { version: 2, lineage: v1.lineage.clone(), layers };
    registry.put_version(&cache(), &v2, &["v2".into(), "head".into()]).await.unwrap();

    let err = b.sync_cache(&cache()).await.expect_err("a layer escaping its directory is refused");
    assert!(err.to_string().contains("escaped.txt") && err.to_string().contains(".."), "{err}");
    assert_eq!(version(&b), 1, "B keeps its version");
    assert!(!sb.dir.path().join("escaped.txt").exists() && !Path::new("/escaped.txt").exists());
    assert!(scratch(&sb, "b").iter().all(|n| !n.starts_with("pull-")), "{:?}", scratch(&sb, "b"));
    // And a job on B still gets v1, with the log saying why.
    job(&b, &sb, "b2", |dir| assert_eq!(fs::read_to_string(dir.join("v")).unwrap(), "1")).await.unwrap();
}
