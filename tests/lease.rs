//! The Kubernetes Lease lock against a fake API server over HTTP: contention, expiry,
//! a dying holder, API errors, and the whole commit protocol across two "nodes".

mod common;
#[path = "common/fake_api.rs"]
mod fake_api;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jobcachefs::lock::lease::lease_name;
use jobcachefs::lock::{LeaseLock, LeaseTiming, LockError, PublishLock};
use jobcachefs::store::CacheKey;

fn cache() -> CacheKey {
    CacheKey::new("ci", "maven").unwrap()
}

fn timing(secs: u64) -> LeaseTiming {
    LeaseTiming { duration: Duration::from_secs(secs), call_timeout: Duration::from_millis(500) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_acquire_creates_and_release_clears_the_holder() {
    let (api, client) = fake_api::start().await;
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
    let guard = lock.acquire(&cache(), Duration::from_secs(2)).await.unwrap();
    let lease = api.lease("ci", &lease_name(&cache())).expect("lease created in the cache's namespace");
    assert_eq!(lease["spec"]["holderIdentity"], "node-a/1");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    guard.ensure_held().unwrap();
    guard.release().await.unwrap();
    let lease = api.lease("ci", &lease_name(&cache())).unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "released: {lease}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contending_holders_take_turns_one_at_a_time() {
    let (api, client) = fake_api::start().await;
    let inside = Arc::new(AtomicUsize::new(0));
    let turns = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..4 {
        let lock = LeaseLock::new(client.clone(), format!("node-{n}/1"), timing(15));
        let (inside, turns) = (inside.clone(), turns.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let guard = lock.acquire(&cache(), Duration::from_secs(20)).await.expect("acquire");
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders at once");
                tokio::time::sleep(Duration::from_millis(10)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                turns.fetch_add(1, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(turns.load(Ordering::SeqCst), 12);
    assert!(api.writes.load(Ordering::SeqCst) >= 24, "each turn took and released the Lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_times_out_while_the_lease_is_held_and_renewed() {
    let (_api, client) = fake_api::start().await;
    let a = LeaseLock::new(client.clone(), "node-a/1".into(), timing(2));
    let b = LeaseLock::new(client, "node-b/1".into(), timing(2));
    let held = a.acquire(&cache(), Duration::from_secs(1)).await.unwrap();
    // Longer than the Lease's duration: only renewal keeps it.
    let err = b.acquire(&cache(), Duration::from_secs(3)).await.err().expect("must time out");
    assert!(matches!(err, LockError::Timeout { .. }), "{err}");
    held.ensure_held().expect("renewed, still ours");
    held.release().await.unwrap();
    b.acquire(&cache(), Duration::from_secs(1)).await.expect("free after release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_is_taken_over_after_expiry() {
    let (api, client) = fake_api::start().await;
    let a = LeaseLock::new(client.clone(), "node-a/1".into(), timing(1));
    let b = LeaseLock::new(client, "node-b/1".into(), timing(1));
    // The holder dies: its guard is dropped without a release, so renewal stops.
    drop(a.acquire(&cache(), Duration::from_secs(1)).await.unwrap());
    let started = std::time::Instant::now();
    let guard = b.acquire(&cache(), Duration::from_secs(5)).await.expect("takeover after expiry");
    assert!(started.elapsed() >= Duration::from_millis(500), "not before the Lease expired");
    let lease = api.lease("ci", &lease_name(&cache())).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "node-b/1");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_silence_surface_as_clear_errors() {
    let (api, client) = fake_api::start().await;
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
    api.fail_next.store(1, Ordering::SeqCst);
    let err = lock.acquire(&cache(), Duration::from_secs(1)).await.err().expect("500 surfaces");
    let text = err.to_string();
    assert!(matches!(err, LockError::Api { .. }), "{text}");
    assert!(text.contains("cache ci/maven: get lease") && text.contains("etcdserver"), "{text}");
    api.delay_ms.store(2000, Ordering::SeqCst);
    let err = lock.acquire(&cache(), Duration::from_secs(1)).await.err().expect("a slow server times out");
    assert!(err.to_string().contains("no answer from the API server within"), "{err}");
    api.delay_ms.store(0, Ordering::SeqCst);
    lock.acquire(&cache(), Duration::from_secs(1)).await.expect("works again once the server answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_mid_section_is_reported_before_head_is_written() {
    let (api, client) = fake_api::start().await;
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(1));
    let guard = lock.acquire(&cache(), Duration::from_secs(1)).await.unwrap();
    // The API server stops answering renewals; the Lease runs out under us.
    api.fail_next.store(1000, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = guard.ensure_held().expect_err("lost");
    assert!(matches!(err, LockError::Lost { .. }), "{err}");
    api.fail_next.store(0, Ordering::SeqCst);
}

#[test]
fn two_nodes_publishing_from_one_base_advance_head_once() {
    if !common::can_mount() {
        return;
    }
    let sb = common::Sandbox::new();
    let rt = common::rt();
    let (_api, client) = rt.block_on(fake_api::start());
    let c = CacheKey::new("ci", "maven").unwrap();
    let layout = sb.layout();
    let engines: Vec<_> = ["node-a", "node-b"]
        .iter()
        .map(|node| {
            let lock = LeaseLock::new(client.clone(), LeaseLock::holder_for(node), timing(15));
            jobcachefs::ops::Engine::new(
                jobcachefs::store::Store::open(layout.clone()).unwrap(),
                Arc::new(jobcachefs::mount::SysMounter),
                Arc::new(lock),
                Duration::from_secs(10),
            )
        })
        .collect();
    for (i, engine) in engines.iter().enumerate() {
        let t = sb.path(&format!("n{i}"));
        rt.block_on(engine.restore(common::volume(&format!("n{i}"), &c, common::publishing(), &t))).unwrap();
        std::fs::write(t.join(format!("from-{i}")), "x").unwrap();
    }
    let results = rt.block_on(async {
        let (v0, v1) =
            (jobcachefs::store::VolumeId::new("n0").unwrap(), jobcachefs::store::VolumeId::new("n1").unwrap());
        let a = engines[0].release(&v0, true);
        let b = engines[1].release(&v1, true);
        let (a, b) = tokio::join!(a, b);
        [a.unwrap().unwrap(), b.unwrap().unwrap()]
    });
    use jobcachefs::ops::Released;
    let committed = results.iter().filter(|r| matches!(r, Released::Committed { version: 1, .. })).count();
    let stale = results.iter().filter(|r| matches!(r, Released::Stale { base: 0, current: 1, .. })).count();
    assert_eq!((committed, stale), (1, 1), "{results:?}");
    assert_eq!(sb.store().head(&c).unwrap().unwrap().version, 1, "exactly one advance, no rollback");
}
