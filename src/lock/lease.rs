//! The cluster backend: one `coordination.k8s.io/v1` Lease per cache, in the cache's namespace.
//! Taken by create, or by an update carrying the `resourceVersion` we read when the Lease is
//! free or expired; a 409 means someone else won the race, so re-read and try again. Renewed
//! while held; released by clearing the holder. Every API call runs under a timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use super::{backoff, LockError, LockGuard, PublishLock};
use crate::store::CacheKey;

/// Timing of a Lease lock.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// How long a Lease stays valid without renewal (a dead holder blocks others this long).
    pub duration: Duration,
    /// Longest any single API call may take.
    pub call_timeout: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self { duration: Duration::from_secs(15), call_timeout: Duration::from_secs(5) }
    }
}

/// A publish lock held as a Kubernetes Lease.
#[derive(Clone)]
pub struct LeaseLock {
    client: kube::Client,
    holder: String,
    timing: LeaseTiming,
}

/// The Lease name for a cache: readable, a valid DNS subdomain, and collision-free (the hash
/// tells apart names that differ only in characters a Lease name cannot hold, like `_`).
pub fn lease_name(cache: &CacheKey) -> String {
    use sha2::Digest;
    let name = cache.name.as_str();
    let readable: String = name.chars().map(|c| if c == '_' { '-' } else { c }).collect();
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("jobcachefs-{}-{hash}", readable.trim_end_matches(['.', '-']))
}

impl LeaseLock {
    /// A Lease lock acting as `holder` (unique per driver process: node name plus a random part).
    pub fn new(client: kube::Client, holder: String, timing: LeaseTiming) -> Self {
        Self { client, holder, timing }
    }

    /// A holder identity for this process on `node`.
    pub fn holder_for(node: &str) -> String {
        format!("{node}/{}-{}", std::process::id(), crate::store::LayerId::generate())
    }
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn expired(spec: &LeaseSpec) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else { return true };
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    now().as_millisecond() > renewed.0.as_millisecond() + secs * 1000
}

fn is_free(spec: Option<&LeaseSpec>) -> bool {
    spec.is_none_or(|s| s.holder_identity.as_deref().unwrap_or("").is_empty() || expired(s))
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

struct Calls<'a> {
    cache: &'a CacheKey,
    timeout: Duration,
}

impl Calls<'_> {
    async fn run<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, LockError> {
        tokio::time::timeout(self.timeout, call).await.map_err(|_| LockError::Api {
            cache: self.cache.clone(),
            op,
            message: format!("no answer from the API server within {:?}", self.timeout),
        })
    }

    fn fail(&self, op: &'static str, e: kube::Error) -> LockError {
        LockError::Api { cache: self.cache.clone(), op, message: e.to_string() }
    }
}

#[async_trait::async_trait]
impl PublishLock for LeaseLock {
    async fn acquire(&self, cache: &CacheKey, timeout: Duration) -> Result<Box<dyn LockGuard>, LockError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), cache.namespace.as_str());
        let name = lease_name(cache);
        let calls = Calls { cache, timeout: self.timeout_for_call() };
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let won = match calls.run("get lease", api.get_opt(&name)).await? {
                Err(e) => return Err(calls.fail("get lease", e)),
                Ok(None) => {
                    let lease = self.lease(&name, None, None);
                    match calls.run("create lease", api.create(&PostParams::default(), &lease)).await? {
                        Ok(created) => Some(created),
                        Err(e) if conflict(&e) => None,
                        Err(e) => return Err(calls.fail("create lease", e)),
                    }
                }
                Ok(Some(current)) if is_free(current.spec.as_ref()) => {
                    let transitions = current.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
                    let lease = self.lease(&name, current.metadata.resource_version.clone(), Some(transitions + 1));
                    match calls.run("update lease", api.replace(&name, &PostParams::default(), &lease)).await? {
                        Ok(updated) => Some(updated),
                        // Someone else took it between our read and our write.
                        Err(e) if conflict(&e) => None,
                        Err(e) => return Err(calls.fail("update lease", e)),
                    }
                }
                Ok(Some(_)) => None,
            };
            if let Some(lease) = won {
                return Ok(Box::new(LeaseGuard::start(api.clone(), name, self.clone(), cache.clone(), lease)));
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(LockError::Timeout { cache: cache.clone(), waited });
            }
            tokio::time::sleep(backoff(attempt).min(timeout - waited)).await;
            attempt += 1;
        }
    }
}

impl LeaseLock {
    fn timeout_for_call(&self) -> Duration {
        self.timing.call_timeout
    }

    fn lease(&self, name: &str, resource_version: Option<String>, transitions: Option<i32>) -> Lease {
        let t = MicroTime(now());
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                resource_version,
                labels: Some([("app.kubernetes.io/managed-by".to_string(), "jobcachefs".to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.holder.clone()),
                lease_duration_seconds: Some(self.timing.duration.as_secs().max(1) as i32),
                acquire_time: Some(t.clone()),
                renew_time: Some(t),
                lease_transitions: transitions.or(Some(0)),
                ..LeaseSpec::default()
            }),
        }
    }
}

/// What the renewer and the guard share.
struct Held {
    lease: Mutex<Lease>,
    lost: AtomicBool,
    renewed_at: Mutex<Instant>,
}

/// A held Lease, renewed in the background until released.
pub struct LeaseGuard {
    api: Api<Lease>,
    name: String,
    lock: LeaseLock,
    cache: CacheKey,
    held: Arc<Held>,
    renewer: tokio::task::JoinHandle<()>,
}

impl LeaseGuard {
    fn start(api: Api<Lease>, name: String, lock: LeaseLock, cache: CacheKey, lease: Lease) -> Self {
        let held = Arc::new(Held {
            lease: Mutex::new(lease),
            lost: AtomicBool::new(false),
            renewed_at: Mutex::new(Instant::now()),
        });
        let renewer = tokio::spawn(renew(api.clone(), name.clone(), lock.clone(), cache.clone(), held.clone()));
        Self { api, name, lock, cache, held, renewer }
    }
}

/// Renews every third of the Lease's duration; a conflict or a renewal that cannot land in
/// time means the Lease is lost and HEAD must not be written.
async fn renew(api: Api<Lease>, name: String, lock: LeaseLock, cache: CacheKey, held: Arc<Held>) {
    let every = lock.timing.duration / 3;
    let calls = Calls { cache: &cache, timeout: lock.timing.call_timeout.min(every) };
    loop {
        tokio::time::sleep(every).await;
        let mut lease = held.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(MicroTime(now()));
        }
        match calls.run("renew lease", api.replace(&name, &PostParams::default(), &lease)).await {
            Ok(Ok(renewed)) => {
                *held.lease.lock().unwrap_or_else(|p| p.into_inner()) = renewed;
                *held.renewed_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
            Ok(Err(e)) if conflict(&e) => {
                held.lost.store(true, Ordering::SeqCst);
                return;
            }
            // A failed renewal is survivable while the Lease is still within its duration.
            _ => {
                let since = held.renewed_at.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                if since >= lock.timing.duration {
                    held.lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // A guard dropped without release stops renewing; the Lease then expires on its own.
        self.renewer.abort();
    }
}

#[async_trait::async_trait]
impl LockGuard for LeaseGuard {
    fn ensure_held(&self) -> Result<(), LockError> {
        let since = self.held.renewed_at.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
        // Leave a margin: the write that follows must land before anyone may take over.
        let margin = self.lock.timing.call_timeout.min(self.lock.timing.duration / 3);
        if self.held.lost.load(Ordering::SeqCst) || since + margin >= self.lock.timing.duration {
            return Err(LockError::Lost { cache: self.cache.clone() });
        }
        Ok(())
    }

    async fn release(self: Box<Self>) -> Result<(), LockError> {
        self.renewer.abort();
        let calls = Calls { cache: &self.cache, timeout: self.lock.timing.call_timeout };
        for _ in 0..3 {
            let current = match calls.run("get lease", self.api.get_opt(&self.name)).await? {
                Ok(Some(l)) => l,
                Ok(None) => return Ok(()),
                Err(e) => return Err(calls.fail("get lease", e)),
            };
            let ours =
                current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.lock.holder.as_str());
            if !ours {
                return Ok(());
            }
            let mut cleared = current;
            if let Some(spec) = cleared.spec.as_mut() {
                spec.holder_identity = None;
                spec.acquire_time = None;
                spec.renew_time = None;
            }
            match calls.run("release lease", self.api.replace(&self.name, &PostParams::default(), &cleared)).await? {
                Ok(_) => return Ok(()),
                Err(e) if conflict(&e) => continue,
                Err(e) => return Err(calls.fail("release lease", e)),
            }
        }
        Err(LockError::Api { cache: self.cache.clone(), op: "release lease", message: "kept conflicting".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_valid_and_collision_free() {
        let a = lease_name(&CacheKey::new("ns", "a_b").unwrap());
        let b = lease_name(&CacheKey::new("ns", "a-b").unwrap());
        assert_ne!(a, b);
        for n in [&a, &b, &lease_name(&CacheKey::new("ns", &"x".repeat(63)).unwrap())] {
            assert!(n.len() <= 253 && n.starts_with("jobcachefs-"), "{n}");
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'), "{n}");
            assert!(n.chars().last().is_some_and(|c| c.is_ascii_alphanumeric()), "{n}");
        }
        assert_eq!(lease_name(&CacheKey::new("ns", "m2").unwrap()), lease_name(&CacheKey::new("other", "m2").unwrap()));
    }

    #[test]
    fn free_and_expired_leases() {
        let mut spec = LeaseSpec {
            holder_identity: Some("node-a/1".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now())),
            ..LeaseSpec::default()
        };
        assert!(!is_free(Some(&spec)));
        spec.renew_time = Some(MicroTime(Timestamp::from_second(now().as_second() - 60).unwrap()));
        assert!(is_free(Some(&spec)), "expired");
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(now()));
        assert!(is_free(Some(&spec)), "released");
        assert!(is_free(None));
    }
}
