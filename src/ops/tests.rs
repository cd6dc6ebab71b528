//! The lifecycle on the recording mounter: the exact mount sequence of each operation, what
//! is refused before anything is mounted, rollback on injected failures, and that a caller
//! who gives up cannot cut an operation short.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::lock::{FileLock, LockGuard};
use crate::mount::record::{Call, CallKind, RecordingMounter};
use crate::mount::MountOptions;
use crate::store::{Layout, NewVolume, Policy, VolumeRequest};

struct Bed {
    _dir: tempfile::TempDir,
    root: PathBuf,
    mounter: Arc<RecordingMounter>,
    engine: Engine,
}

fn bed_with_lock(lock: impl FnOnce(Layout) -> Arc<dyn PublishLock>) -> Bed {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    let layout = Layout::new(root.join("state")).expect("layout");
    let store = Store::open(layout.clone()).expect("store");
    let mounter = Arc::new(RecordingMounter::new());
    let engine = Engine::new(store, mounter.clone(), lock(layout), Duration::from_millis(300));
    Bed { _dir: dir, root, mounter, engine }
}

fn bed() -> Bed {
    bed_with_lock(|layout| Arc::new(FileLock::new(layout)))
}

fn cache() -> CacheKey {
    CacheKey::new("ci", "m2").expect("key")
}

fn vid(id: &str) -> VolumeId {
    VolumeId::new(id).expect("id")
}

fn pvc(id: &str) -> NewVolume {
    NewVolume {
        id: vid(id),
        cache: cache(),
        policy: Policy { publish: true, ..Policy::default() },
        fallbacks: Vec::new(),
        mount_path: None,
        owner: None,
        request: Some(VolumeRequest { name: id.into(), ..VolumeRequest::default() }),
        flags: MountOptions::default(),
        root: Default::default(),
        content: None,
        cache_size: None,
    }
}

impl Bed {
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn upper(&self, id: &str) -> PathBuf {
        self.engine.store().layout().upper_dir(&vid(id), None)
    }

    /// What a job writes through the mount lands in the upper; the double mounts nothing.
    fn job_writes(&self, id: &str, name: &str) {
        std::fs::write(self.upper(id).join(name), name).expect("write into upper");
    }

    fn version(&self) -> u64 {
        self.engine.store().head(&cache()).expect("head").map_or(0, |h| h.version)
    }

    fn overlay(&self, id: &str, target: &Path) -> Call {
        let layout = self.engine.store().layout();
        Call::Overlay {
            spec: OverlaySpec {
                readonly: false,
                lower: vec![layout.empty_layer()],
                upper: Some(UpperDirs {
                    upper: layout.upper_dir(&vid(id), None),
                    work: layout.work_dir(&vid(id), None),
                }),
                flags: MountOptions::default(),
            },
            target: target.to_path_buf(),
        }
    }
}

#[tokio::test]
async fn a_persistent_volume_mounts_binds_and_comes_down_in_order() {
    let b = bed();
    let (staging, target) = (b.path("staging"), b.path("target"));
    b.engine.create(pvc("v1")).await.expect("create");
    b.engine.stage(&vid("v1"), &staging, MountOptions::default(), None).await.expect("stage");
    b.engine.stage(&vid("v1"), &staging, MountOptions::default(), None).await.expect("stage again is a no-op");
    b.engine.publish(&vid("v1"), &staging, &target, false, None, None).await.expect("publish");
    b.engine.publish(&vid("v1"), &staging, &target, false, None, None).await.expect("publish again is a no-op");
    b.job_writes("v1", "a.txt");
    assert_eq!(b.engine.unpublish(Some(&vid("v1")), &target).await.expect("unpublish"), Unpublished::Unbound);
    b.engine.unstage(&vid("v1"), &staging).await.expect("unstage");
    let released = b.engine.delete(&vid("v1")).await.expect("delete");
    assert!(matches!(released, Some(Released::Committed { version: 1, .. })), "{released:?}");
    assert_eq!(b.engine.delete(&vid("v1")).await.expect("delete again"), None, "already released");
    assert_eq!(
        b.mounter.take_calls(),
        vec![
            b.overlay("v1", &staging),
            Call::Bind { source: staging.clone(), target: target.clone(), readonly: false },
            Call::Unmount { target: target.clone() },
            Call::Unmount { target: staging.clone() },
        ]
    );
    assert!(!target.exists(), "unpublish removes the target directory");
    assert_eq!(b.version(), 1);
}

#[tokio::test]
async fn one_upper_is_never_mounted_twice() {
    let b = bed();
    let (staging, other) = (b.path("staging"), b.path("other"));
    b.engine.create(pvc("v1")).await.expect("create");
    b.engine.stage(&vid("v1"), &staging, MountOptions::default(), None).await.expect("stage");
    b.mounter.take_calls();
    let err = b.engine.stage(&vid("v1"), &other, MountOptions::default(), None).await.expect_err("second path");
    assert!(matches!(&err, OpsError::StagedElsewhere { at, .. } if *at == staging), "{err}");
    assert!(b.mounter.take_calls().is_empty(), "nothing mounted at the second path");
    let record = b.engine.volume(&vid("v1")).await.expect("record");
    assert_eq!(record.mount_path.as_deref(), Some(staging.as_path()), "the record still names the first path");

    // Other flags for the same path are refused too, rather than silently ignored.
    let suid = MountOptions::parse(&["suid"]).expect("flags");
    let err = b.engine.stage(&vid("v1"), &staging, suid, None).await.expect_err("other flags");
    assert!(matches!(err, OpsError::FlagsDiffer { .. }), "{err}");
}

#[tokio::test]
async fn delete_refuses_while_a_bind_is_left_and_keeps_the_upper() {
    let b = bed();
    let (staging, target) = (b.path("staging"), b.path("target"));
    b.engine.create(pvc("v1")).await.expect("create");
    b.engine.stage(&vid("v1"), &staging, MountOptions::default(), None).await.expect("stage");
    b.engine.publish(&vid("v1"), &staging, &target, false, None, None).await.expect("publish");
    b.job_writes("v1", "a.txt");
    b.mounter.take_calls();
    // A force-deleted pod: kubelet never unpublished, the staging path was unmounted by hand.
    b.mounter.unmount(&staging).expect("unmount staging");
    b.mounter.take_calls();
    let err = b.engine.delete(&vid("v1")).await.expect_err("still mounted");
    assert!(matches!(&err, OpsError::StillMounted { at, .. } if *at == target), "{err}");
    assert!(b.mounter.take_calls().is_empty(), "nothing was unmounted");
    assert!(b.upper("v1").join("a.txt").exists(), "the upper is untouched");
    assert_eq!(b.version(), 0);

    b.engine.unpublish(Some(&vid("v1")), &target).await.expect("unpublish");
    let released = b.engine.delete(&vid("v1")).await.expect("delete");
    assert!(matches!(released, Some(Released::Committed { version: 1, .. })), "{released:?}");
}

#[tokio::test]
async fn a_failed_inline_mount_leaves_no_volume_behind() {
    let b = bed();
    let target = b.path("pod/inline");
    let mut req = pvc("csi-1");
    req.mount_path = Some(target.clone());
    b.mounter.fail_next(CallKind::Overlay, 1, libc::ENOMEM);
    let err = b.engine.publish_inline(req.clone(), None, None).await.expect_err("injected");
    assert!(matches!(err, OpsError::Mount { .. }), "{err}");
    assert!(b.engine.store().volume(&vid("csi-1")).expect("read").is_none(), "rolled back: nothing pins layers");
    b.engine.publish_inline(req, None, None).await.expect("a retry mounts");
    assert_eq!(b.mounter.mounted(), [target]);
}

#[tokio::test]
async fn a_busy_unmount_keeps_the_change_for_the_retry() {
    let b = bed();
    let target = b.path("pod/inline");
    let mut req = pvc("csi-1");
    req.mount_path = Some(target.clone());
    req.request = Some(VolumeRequest { ephemeral: true, ..VolumeRequest::default() });
    b.engine.publish_inline(req, None, None).await.expect("inline publish");
    b.job_writes("csi-1", "a.txt");
    b.mounter.fail_next(CallKind::Unmount, 10, libc::EBUSY);
    let err = b.engine.unpublish(Some(&vid("csi-1")), &target).await.expect_err("busy");
    assert!(matches!(err, OpsError::Mount { source: MountError::Busy { .. }, .. }), "{err}");
    assert!(b.upper("csi-1").join("a.txt").exists(), "never a lazy unmount: the change is kept");
    assert!(target.exists(), "the target stays while mounted");
    let released = b.engine.unpublish(Some(&vid("csi-1")), &target).await.expect("retry");
    assert!(matches!(released, Unpublished::Released(Some(Released::Committed { version: 1, .. }))), "{released:?}");
}

/// A lock that counts acquires and can be told to fail the next release.
struct FlakyLock {
    inner: FileLock,
    fail_release: Arc<AtomicUsize>,
    fail_acquire: Arc<AtomicUsize>,
}

struct FlakyGuard {
    inner: Box<dyn LockGuard>,
    fail: bool,
    cache: CacheKey,
}

#[async_trait::async_trait]
impl PublishLock for FlakyLock {
    async fn acquire(&self, cache: &CacheKey, timeout: Duration) -> Result<Box<dyn LockGuard>, LockError> {
        if self.fail_acquire.load(Ordering::SeqCst) > 0 {
            self.fail_acquire.fetch_sub(1, Ordering::SeqCst);
            return Err(LockError::Timeout { cache: cache.clone(), waited: timeout });
        }
        let inner = self.inner.acquire(cache, timeout).await?;
        let fail = self.fail_release.load(Ordering::SeqCst) > 0;
        if fail {
            self.fail_release.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(Box::new(FlakyGuard { inner, fail, cache: cache.clone() }))
    }
}

#[async_trait::async_trait]
impl LockGuard for FlakyGuard {
    fn ensure_held(&self) -> Result<(), LockError> {
        self.inner.ensure_held()
    }
    async fn release(self: Box<Self>) -> Result<(), LockError> {
        self.inner.release().await?;
        if self.fail {
            return Err(LockError::Api { cache: self.cache, op: "update lease", message: "503".into() });
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_lock_release_after_the_head_write_keeps_the_commit() {
    let (fail_release, fail_acquire) = (Arc::new(AtomicUsize::new(1)), Arc::new(AtomicUsize::new(0)));
    let (fr, fa) = (fail_release.clone(), fail_acquire.clone());
    let b = bed_with_lock(move |layout| {
        Arc::new(FlakyLock { inner: FileLock::new(layout), fail_release: fr, fail_acquire: fa })
    });
    let b = Bed { engine: b.engine.clone().with_publish_deadline(Duration::ZERO), ..b };
    let target = b.path("t");
    let mut req = pvc("v1");
    req.mount_path = Some(target.clone());
    b.engine.restore(req).await.expect("restore");
    b.job_writes("v1", "a.txt");
    let released = b.engine.release(&vid("v1"), true).await.expect("the HEAD write is what counts");
    assert!(matches!(released, Some(Released::Committed { version: 1, .. })), "{released:?}");
    let head = b.engine.store().head(&cache()).expect("head").expect("v1");
    assert!(b.engine.store().layout().layer_dir(&head.layers[0]).join("a.txt").exists());

    // And a retry that comes back past the deadline while the lock is busy never drops a layer
    // HEAD names: the decision was recorded.
    fail_acquire.store(5, Ordering::SeqCst);
    let mut req = pvc("v2");
    req.mount_path = Some(b.path("t2"));
    b.engine.restore(req).await.expect("restore v2");
    b.job_writes("v2", "b.txt");
    let released = b.engine.release(&vid("v2"), true).await.expect("past the deadline the release succeeds");
    assert!(
        matches!(released, Some(Released::NotPublished { why: NotPublished::DeadlinePassed { .. } })),
        "{released:?}"
    );
    let head = b.engine.store().head(&cache()).expect("head").expect("v1");
    assert_eq!(head.version, 1);
    assert!(b.engine.store().layout().layer_dir(&head.layers[0]).join("a.txt").exists(), "v1's layer is intact");
}

#[tokio::test]
async fn a_stale_decision_recorded_before_a_crash_is_finished_by_the_retry() {
    let b = bed();
    for id in ["v1", "v2"] {
        let mut req = pvc(id);
        req.mount_path = Some(b.path(id));
        b.engine.restore(req).await.expect("restore");
        b.job_writes(id, &format!("{id}.txt"));
    }
    assert!(matches!(b.engine.release(&vid("v1"), true).await.unwrap(), Some(Released::Committed { .. })));
    // v2 promotes and is found stale; the decision is recorded, then the process dies before
    // the layer goes: promote and decide by hand, stopping there.
    let store = b.engine.store();
    let Prepared::Publish(promoted) = store.promote(&vid("v2"), true).expect("promote") else { panic!("publish") };
    let record = store.volume(&vid("v2")).unwrap().unwrap();
    let Advanced::Stale { base, current, other_lifetime } = store.advance_head(&record, &promoted).unwrap() else {
        panic!("stale")
    };
    store.decide(&vid("v2"), Decision::Stale { base, current, other_lifetime }).expect("decide");
    assert!(store.layout().layer_dir(&promoted.layer).exists(), "a stale result changes nothing by itself");

    let released = b.engine.release(&vid("v2"), true).await.expect("the retry resumes");
    assert_eq!(released, Some(Released::Stale { base: 0, current: 1, other_lifetime: false }));
    assert!(!store.layout().layer_dir(&promoted.layer).exists(), "the stale layer is gone");
    assert!(store.volume(&vid("v2")).unwrap().is_none());
    assert_eq!(b.version(), 1);
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_stop_the_release() {
    let b = bed();
    let target = b.path("t");
    let mut req = pvc("v1");
    req.mount_path = Some(target.clone());
    b.engine.restore(req).await.expect("restore");
    for i in 0..2000 {
        b.job_writes("v1", &format!("f{i}"));
    }
    // The request's future is dropped almost at once, as tonic does at a deadline.
    let gave_up = tokio::time::timeout(Duration::from_micros(1), b.engine.release(&vid("v1"), true)).await;
    assert!(gave_up.is_err(), "the caller gave up");
    // While the owned task runs, another call is refused; once it is done, a retry sees the outcome.
    let mut outcome = None;
    for _ in 0..500 {
        match b.engine.release(&vid("v1"), true).await {
            Err(OpsError::InFlight { running, .. }) => assert_eq!(running, "release"),
            Ok(r) => {
                outcome = Some(r);
                break;
            }
            Err(e) => panic!("only in-flight or the outcome, got {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(outcome, Some(None), "the retry finds the volume released");
    assert_eq!(b.version(), 1, "exactly one publish");
    let head = b.engine.store().head(&cache()).unwrap().unwrap();
    let layer = b.engine.store().layout().layer_dir(&head.layers[0]);
    assert_eq!(std::fs::read_dir(layer).unwrap().count(), 2000, "every file is in the new version");
}

#[tokio::test]
async fn a_version_of_another_lifetime_is_stale() {
    let b = bed();
    let one = |id: &str| {
        let mut req = pvc(id);
        req.mount_path = Some(b.path(id));
        req
    };
    b.engine.restore(one("v1")).await.unwrap();
    b.job_writes("v1", "first");
    b.engine.release(&vid("v1"), true).await.unwrap();
    b.engine.restore(one("old")).await.unwrap();
    assert!(b.engine.remove_cache(&cache()).await.unwrap());
    b.engine.restore(one("new")).await.unwrap();
    b.job_writes("new", "second");
    b.engine.release(&vid("new"), true).await.unwrap();
    assert_eq!(b.version(), 1, "numbering restarts after rm");
    b.job_writes("old", "stale");
    let released = b.engine.release(&vid("old"), true).await.unwrap();
    assert_eq!(
        released,
        Some(Released::Stale { base: 1, current: 1, other_lifetime: true }),
        "same number, other lineage"
    );

    // onStale=stack puts a delta on a newer HEAD of the same lifetime, never on another one's.
    let mut stacker = one("stacker");
    stacker.policy.on_stale = crate::store::OnStale::Stack;
    b.engine.restore(stacker).await.unwrap();
    assert!(b.engine.remove_cache(&cache()).await.unwrap());
    b.engine.restore(one("newer")).await.unwrap();
    b.job_writes("newer", "third");
    b.engine.release(&vid("newer"), true).await.unwrap();
    b.job_writes("stacker", "poison");
    let released = b.engine.release(&vid("stacker"), true).await.unwrap();
    assert_eq!(released, Some(Released::Stale { base: 1, current: 1, other_lifetime: true }), "not stacked");
    let head = b.engine.store().head(&cache()).unwrap().unwrap();
    assert_eq!(head.layers.len(), 1, "the new lifetime holds only its own layer");
}

/// A lock the driver may not use at all, as a Lease without RBAC.
struct ForbiddenLock;

#[async_trait::async_trait]
impl PublishLock for ForbiddenLock {
    async fn acquire(&self, cache: &CacheKey, _timeout: Duration) -> Result<Box<dyn LockGuard>, LockError> {
        Err(LockError::Config {
            cache: cache.clone(),
            op: "create lease",
            message: "the driver's service account may not `create` leases".into(),
        })
    }
}

#[tokio::test]
async fn an_unusable_lock_is_retried_then_dropped_past_the_deadline_saying_why() {
    let b = bed_with_lock(|_| Arc::new(ForbiddenLock));
    let mut req = pvc("v1");
    req.mount_path = Some(b.path("t"));
    b.engine.restore(req).await.expect("restore");
    b.job_writes("v1", "a.txt");
    // Before the deadline: the caller retries with the change kept (an admin may fix RBAC).
    let err = b.engine.clone().with_publish_deadline(Duration::from_secs(3600)).release(&vid("v1"), true).await;
    let err = err.expect_err("retry while the deadline has not passed");
    assert!(matches!(&err, OpsError::Lock { source: LockError::Config { .. }, .. }), "{err}");
    assert!(err.to_string().contains("may not `create` leases"), "{err}");
    // Past it: dropped, and the outcome names the lock, not a busy one.
    let released = b.engine.clone().with_publish_deadline(Duration::ZERO).release(&vid("v1"), true).await;
    let released = released.expect("a cache never fails a job").expect("released");
    assert!(
        matches!(&released, Released::NotPublished { why: NotPublished::LockUnusable { message } } if message.contains("create")),
        "{released:?}"
    );
    assert!(released.to_string().contains("the publish lock cannot be used"), "{released}");
    assert_eq!(released.outcome(0), "failed");
    assert_eq!(b.version(), 0);
}
