//! The Kubernetes Lease lock against a fake API server that answers as kube-apiserver does:
//! contention, expiry judged on our own clock whatever the holder's clock says, API failures
//! ridden out, a cluster that is not set up reported at once and in words an admin can act on,
//! and the whole commit protocol across two "nodes".
//!
//! The fake is served in process (no sockets) and every wait goes through tokio's clock, so
//! these tests can run on tokio's paused clock (`start_paused = true`) once `tokio/test-util` is a
//! dev-dependency; until then they wait in real time, a few seconds in all.

mod common;
#[path = "common/fake_api.rs"]
mod fake_api;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use jobcachefs::lock::lease::lease_name;
use jobcachefs::lock::{LeaseLock, LeaseTiming, LockError, PublishLock};
use jobcachefs::store::CacheKey;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use serde_json::{json, Value};
use tokio::time::Instant;

fn cache() -> CacheKey {
    CacheKey::new("ci", "maven").unwrap()
}

fn timing(secs: u64) -> LeaseTiming {
    LeaseTiming { duration: Duration::from_secs(secs), call_timeout: Duration::from_millis(500) }
}

/// A MicroTime as the real server writes it.
fn micro(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Whether `s` has the real server's MicroTime form: UTC, exactly six fractional digits.
fn is_micro_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27 && b[19] == b'.' && b[20..26].iter().all(u8::is_ascii_digit) && b[26] == b'Z'
}

/// A Lease of cache ci/maven held by another node whose clock reads `renewed` now.
fn held_by_other(renewed: Timestamp, duration_secs: u64) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": lease_name(&cache())},
        "spec": {"holderIdentity": "node-x/1", "leaseDurationSeconds": duration_secs,
            "acquireTime": micro(renewed), "renewTime": micro(renewed), "leaseTransitions": 4}})
}

fn holder(api: &fake_api::FakeApi) -> Value {
    api.lease("ci", &lease_name(&cache())).expect("the Lease exists")["spec"]["holderIdentity"].clone()
}

#[tokio::test(start_paused = true)]
async fn first_acquire_creates_and_release_clears_the_holder() {
    let (api, client) = fake_api::start().await;
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
    let guard = lock.acquire(&cache(), Duration::from_secs(2)).await.unwrap();
    let lease = api.lease("ci", &lease_name(&cache())).expect("lease created in the cache's namespace");
    assert_eq!(lease["spec"]["holderIdentity"], "node-a/1");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(lease["metadata"]["resourceVersion"], "1", "the server sets the version");
    assert!(is_micro_time(lease["spec"]["renewTime"].as_str().unwrap()), "{lease}");
    guard.ensure_held().unwrap();
    guard.release().await.unwrap();
    let lease = api.lease("ci", &lease_name(&cache())).unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "released: {lease}");
    assert_eq!(lease["metadata"]["labels"]["app.kubernetes.io/managed-by"], "jobcachefs");
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn a_waiter_times_out_while_the_lease_is_held_and_renewed() {
    let (api, client) = fake_api::start().await;
    let a = LeaseLock::new(client.clone(), "node-a/1".into(), timing(2));
    let b = LeaseLock::new(client, "node-b/1".into(), timing(2));
    let held = a.acquire(&cache(), Duration::from_secs(1)).await.unwrap();
    // Longer than the Lease's duration: only renewal keeps it.
    let err = b.acquire(&cache(), Duration::from_secs(3)).await.err().expect("must time out");
    assert!(matches!(err, LockError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("cache ci/maven: publish lock still held"), "{err}");
    assert_eq!(holder(&api), "node-a/1");
    held.ensure_held().expect("renewed, still ours");
    held.release().await.unwrap();
    b.acquire(&cache(), Duration::from_secs(1)).await.expect("free after release");
}

#[tokio::test(start_paused = true)]
async fn a_dead_holder_is_taken_over_after_expiry() {
    let (api, client) = fake_api::start().await;
    let a = LeaseLock::new(client.clone(), "node-a/1".into(), timing(1));
    let b = LeaseLock::new(client, "node-b/1".into(), timing(1));
    // The holder dies: its guard is dropped without a release, so renewal stops.
    drop(a.acquire(&cache(), Duration::from_secs(1)).await.unwrap());
    let started = Instant::now();
    let guard = b.acquire(&cache(), Duration::from_secs(5)).await.expect("takeover after expiry");
    assert!(started.elapsed() >= Duration::from_secs(1), "not before a whole duration of silence");
    let lease = api.lease("ci", &lease_name(&cache())).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "node-b/1");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_holder_with_a_skewed_clock_is_taken_over_after_exactly_the_lease_duration() {
    let hour = SignedDuration::from_hours(1);
    for (clock, renewed) in [("ahead", Timestamp::now() + hour), ("behind", Timestamp::now() - hour)] {
        let (api, client) = fake_api::start().await;
        // The other node's clock is an hour off; it died just now.
        api.put_lease("ci", held_by_other(renewed, 2));
        let b = LeaseLock::new(client, "node-b/1".into(), timing(15));
        let started = Instant::now();
        let guard = b.acquire(&cache(), Duration::from_secs(10)).await.expect("takeover");
        let waited = started.elapsed();
        // The Lease's own 2 s, not our 15 s, and counted from when we first saw it, not from
        // its renewTime: neither at once (behind) nor an hour late (ahead).
        assert!(waited >= Duration::from_secs(2), "clock {clock}: took over after {waited:?}");
        assert!(waited < Duration::from_millis(2600), "clock {clock}: took over after {waited:?}");
        let lease = api.lease("ci", &lease_name(&cache())).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "node-b/1", "clock {clock}");
        assert_eq!(lease["spec"]["leaseTransitions"], 5, "clock {clock}");
        guard.release().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_live_holder_whose_renew_time_looks_old_is_not_taken_over() {
    let (api, client) = fake_api::start().await;
    let behind = SignedDuration::from_hours(1);
    api.put_lease("ci", held_by_other(Timestamp::now() - behind, 1));
    // The holder is alive and renews every 300 ms, but its clock is an hour behind ours.
    let last_renewal = Arc::new(std::sync::Mutex::new(Instant::now()));
    let renewer = {
        let (api, last_renewal) = (api.clone(), last_renewal.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                *last_renewal.lock().unwrap() = Instant::now();
                api.edit_lease("ci", &lease_name(&cache()), |l| {
                    l["spec"]["renewTime"] = json!(micro(Timestamp::now() - behind));
                });
            }
        })
    };
    let b = LeaseLock::new(client, "node-b/1".into(), timing(15));
    let err = b.acquire(&cache(), Duration::from_millis(2500)).await.err().expect("a live holder keeps it");
    assert!(matches!(err, LockError::Timeout { .. }), "{err}");
    assert_eq!(holder(&api), "node-x/1");
    // Once it stops renewing, one Lease duration of silence frees it.
    renewer.abort();
    let _ = renewer.await;
    let guard = b.acquire(&cache(), Duration::from_secs(5)).await.expect("takeover once silent");
    // Counted from the holder's last write (this lock remembers what it saw while it waited).
    let silence = last_renewal.lock().unwrap().elapsed();
    assert!(silence >= Duration::from_secs(1), "taken after {silence:?} of silence");
    assert_eq!(holder(&api), "node-b/1");
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn transient_api_failures_during_acquire_are_ridden_out() {
    let (api, client) = fake_api::start().await;
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
    api.fail_next.store(3, Ordering::SeqCst);
    api.throttle_next.store(1, Ordering::SeqCst);
    api.hang_next.store(1, Ordering::SeqCst);
    let started = Instant::now();
    let guard = lock.acquire(&cache(), Duration::from_secs(10)).await.expect("500s, a 429 and silence ridden out");
    assert!(started.elapsed() >= Duration::from_secs(1), "the 429's Retry-After is honoured");
    assert_eq!(holder(&api), "node-a/1");
    let gets = api.requests().iter().filter(|r| r.starts_with("GET ")).count();
    assert_eq!(gets, 6, "one GET per failure, then the one that worked: {:?}", api.requests());
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_server_that_keeps_failing_ends_the_wait_with_the_last_failure() {
    let (api, client) = fake_api::start().await;
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
    api.fail_next.store(1000, Ordering::SeqCst);
    let err = lock.acquire(&cache(), Duration::from_secs(1)).await.err().expect("a failing server ends the wait");
    let text = err.to_string();
    assert!(matches!(err, LockError::Api { .. }), "{text}");
    assert!(text.starts_with("cache ci/maven: get lease: 500 InternalError"), "{text}");
    assert!(text.contains("etcdserver: request timed out") && text.contains("still failing after"), "{text}");
    assert!(api.requests().len() > 2, "retried, not given up at the first failure");
    api.fail_next.store(0, Ordering::SeqCst);
    api.hang_next.store(1000, Ordering::SeqCst);
    let err = lock.acquire(&cache(), Duration::from_secs(1)).await.err().expect("a silent server ends the wait");
    assert!(err.to_string().contains("get lease: no answer from the API server within 500ms"), "{err}");
    api.hang_next.store(0, Ordering::SeqCst);
    lock.acquire(&cache(), Duration::from_secs(1)).await.expect("works again once the server answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_until_the_timeout_and_named() {
    // A port nothing listens on: every connection is refused at once. Real sockets: this test
    // stays on the real clock, which a paused one would run ahead of while the socket is waited on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let lock = LeaseLock::new(kube::Client::try_from(config).unwrap(), "node-a/1".into(), timing(15));
    let err = lock.acquire(&cache(), Duration::from_secs(1)).await.err().expect("no server");
    let text = err.to_string();
    assert!(matches!(err, LockError::Api { .. }), "{text}");
    assert!(text.starts_with("cache ci/maven: get lease: ") && text.contains("still failing after"), "{text}");
    assert!(text.contains("Connection refused"), "the cause is named: {text}");
}

#[tokio::test(start_paused = true)]
async fn rbac_denials_are_configuration_errors_naming_the_verb_at_once() {
    for verb in ["get", "create", "update"] {
        let (api, client) = fake_api::start().await;
        if verb == "update" {
            // A released Lease exists: taking it is an update.
            let mut lease = held_by_other(Timestamp::now(), 15);
            lease["spec"]["holderIdentity"] = Value::Null;
            api.put_lease("ci", lease);
        }
        api.forbid(verb);
        let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
        let started = Instant::now();
        let err = lock.acquire(&cache(), Duration::from_secs(60)).await.err().expect("denied");
        assert!(started.elapsed() < Duration::from_secs(1), "{verb}: no waiting for the lock timeout");
        let text = err.to_string();
        assert!(matches!(err, LockError::Config { .. }), "{text}");
        let want = format!(
            "cache ci/maven: {verb} lease: the driver's service account may not `{verb}` \
             leases.coordination.k8s.io in namespace ci (403 Forbidden): grant it in the driver's RBAC"
        );
        assert!(text.starts_with(&want), "{text}");
        assert!(text.contains(fake_api::USER), "names who was denied: {text}");
        let last = api.requests().pop().unwrap();
        let method = match verb {
            "get" => "GET",
            "create" => "POST",
            _ => "PUT",
        };
        assert!(last.starts_with(method), "{verb}: ended at the denied call: {:?}", api.requests());
        assert_eq!(api.requests().len(), if verb == "get" { 1 } else { 2 }, "{verb}: not retried");
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_namespace_is_a_configuration_error_naming_it() {
    let (api, client) = fake_api::start().await;
    api.set_namespaces(&["default", "kube-system"]);
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
    let err = lock.acquire(&cache(), Duration::from_secs(60)).await.err().expect("no namespace ci");
    let text = err.to_string();
    assert!(matches!(err, LockError::Config { .. }), "{text}");
    assert!(text.starts_with("cache ci/maven: create lease: namespace ci does not exist"), "{text}");
    assert!(text.contains("namespaces \"ci\" not found"), "{text}");
    assert_eq!(api.requests().len(), 2, "not retried: {:?}", api.requests());
}

#[tokio::test(start_paused = true)]
async fn revoked_credentials_are_a_configuration_error() {
    let (api, client) = fake_api::start().await;
    api.unauthorized.store(true, Ordering::SeqCst);
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
    let err = lock.acquire(&cache(), Duration::from_secs(60)).await.err().expect("refused");
    assert!(matches!(err, LockError::Config { .. }), "{err}");
    assert!(err.to_string().contains("does not accept the driver's credentials (401 Unauthorized)"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn tricky_cache_names_get_leases_the_strict_server_accepts() {
    let (api, client) = fake_api::start().await;
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(15));
    let long = "a-".repeat(31) + "b";
    for name in ["a.-b", "a-.b", "a_b", "a._b", "x.", "0.0", long.as_str()] {
        let key = CacheKey::new("ci", name).unwrap();
        let guard = lock.acquire(&key, Duration::from_secs(2)).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let lease = api.lease("ci", &lease_name(&key)).unwrap_or_else(|| panic!("{name}: no Lease"));
        assert_eq!(lease["spec"]["holderIdentity"], "node-a/1", "{name}");
        assert!(fake_api::is_dns1123_subdomain(&lease_name(&key)), "{name}");
        guard.release().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn the_fake_answers_like_kube_apiserver() {
    let (api, client) = fake_api::start().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ci");
    let pp = PostParams::default();
    let named = |name: &str| serde_json::from_value::<Lease>(json!({"metadata": {"name": name}})).unwrap();
    let status = |r: Result<Lease, kube::Error>| match r {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected an API error, got {other:?}"),
    };

    let s = status(leases.create(&pp, &named("a.-b")).await);
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    let rule = "Lease.coordination.k8s.io \"a.-b\" is invalid: metadata.name: Invalid value: \"a.-b\": \
                a lowercase RFC 1123 subdomain";
    assert!(s.message.starts_with(rule), "{}", s.message);
    assert_eq!(s.details.as_ref().unwrap().causes[0].field, "metadata.name");

    let created = leases.create(&pp, &named("ok")).await.unwrap();
    assert_eq!(created.metadata.resource_version.as_deref(), Some("1"), "set by the server");
    let s = status(leases.create(&pp, &named("ok")).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(s.message, "leases.coordination.k8s.io \"ok\" already exists");

    // An update must say which version it replaces: Leases forbid unconditional updates.
    let s = status(leases.replace("ok", &pp, &named("ok")).await);
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    let rule = "leases.coordination.k8s.io \"ok\" is invalid: \
                metadata.resourceVersion: Invalid value: 0x0: must be specified for an update";
    assert_eq!(s.message, rule);
    let updated = leases.replace("ok", &pp, &created).await.expect("the version read");
    assert_eq!(updated.metadata.resource_version.as_deref(), Some("2"));
    let s = status(leases.replace("ok", &pp, &created).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"), "a stale version");
    assert!(s.message.contains("the object has been modified"), "{}", s.message);

    api.set_namespaces(&["ci"]);
    let s = status(Api::<Lease>::namespaced(client.clone(), "gone").create(&pp, &named("x")).await);
    assert_eq!((s.code, s.message.as_str()), (404, "namespaces \"gone\" not found"));
    assert_eq!(s.details.as_ref().unwrap().kind, "namespaces");
    let s = status(Api::<Lease>::namespaced(client.clone(), "gone").get("x").await);
    assert_eq!((s.code, s.message.as_str()), (404, "leases.coordination.k8s.io \"x\" not found"));

    api.forbid("get");
    let s = status(leases.get("ok").await);
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert!(s.message.starts_with("leases.coordination.k8s.io \"ok\" is forbidden: User \""), "{}", s.message);
    let denial = "cannot get resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"ci\"";
    assert!(s.message.ends_with(denial), "{}", s.message);
}

#[tokio::test(start_paused = true)]
async fn micro_time_round_trips_in_the_real_format() {
    let (api, client) = fake_api::start().await;
    let path = "/apis/coordination.k8s.io/v1/namespaces/ci/leases";
    let body = |t: &str| json!({"metadata": {"name": "t"}, "spec": {"holderIdentity": "x", "renewTime": t}});
    // Any offset is read; the server writes UTC with exactly six fractional digits.
    let (code, stored) = api.call(Method::POST, path, Some(body("2026-12-03T10:00:00.123456+02:00"))).await;
    assert_eq!(code, 201, "{stored}");
    assert_eq!(stored["spec"]["renewTime"], "2026-12-03T08:00:00.123456Z");
    let leases: Api<Lease> = Api::namespaced(client, "ci");
    let mut lease = leases.get("t").await.unwrap();
    let renewed = lease.spec.as_ref().unwrap().renew_time.clone().unwrap();
    assert_eq!(renewed.0, "2026-12-03T08:00:00.123456Z".parse::<Timestamp>().unwrap());
    // What the client writes back is what the server stores.
    lease.spec.as_mut().unwrap().renew_time = Some(renewed);
    leases.replace("t", &PostParams::default(), &lease).await.unwrap();
    assert_eq!(api.lease("ci", "t").unwrap()["spec"]["renewTime"], "2026-12-03T08:00:00.123456Z");
    for bad in [
        "2026-12-03T08:00:00Z",
        "2026-12-03T08:00:00.123Z",
        "2026-12-03T08:00:00.1234567Z",
        "2026-12-03 08:00:00.123456Z",
        "2026-12-03T08:00:00.123456",
        "yesterday",
    ] {
        let mut b = body(bad);
        b["metadata"]["name"] = json!("u");
        let (code, answer) = api.call(Method::POST, path, Some(b)).await;
        assert_eq!((code, answer["reason"].as_str()), (400, Some("BadRequest")), "{bad}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("cannot be handled as a Lease"), "{answer}");
    }
    assert!(api.lease("ci", "u").is_none(), "nothing malformed was stored");
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn a_held_lease_rides_out_failed_renewals() {
    let (api, client) = fake_api::start().await;
    let lock = LeaseLock::new(client, "node-a/1".into(), timing(3));
    let guard = lock.acquire(&cache(), Duration::from_secs(1)).await.unwrap();
    // The first renewal (after 1 s) fails twice; quick retries land one well within the 3 s.
    api.fail_next.store(2, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    guard.ensure_held().expect("renewed after the failures");
    assert_eq!(api.fail_next.load(Ordering::SeqCst), 0, "the renewer met both failures");
    guard.release().await.unwrap();
    assert!(holder(&api).is_null());
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
