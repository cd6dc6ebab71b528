//! The cluster backend: one `coordination.k8s.io/v1` Lease per cache, in the cache's namespace.
//! Taken by create, or by an update carrying the `resourceVersion` we read when the Lease is
//! free or expired; a 409 means someone else won the race, so re-read and try again. Renewed
//! while held; released by clearing the holder. Every API call runs under a timeout.
//!
//! Expiry is judged as client-go's leader election judges it: from when this process saw the
//! holder's record last change, on our monotonic clock. The holder's `renewTime` comes from its
//! own wall clock, which may be skewed from ours by any amount, so it is never compared with ours.
//!
//! Failures are sorted by what helps: a busy or absent API server (5xx, 429, timeouts, broken
//! connections) is retried with backoff until the lock's timeout; a cluster that is not set up
//! for the driver (RBAC, credentials, a missing namespace, a rejected Lease) is reported at once
//! as [`LockError::Config`], saying what an administrator must change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
// Tokio's clock, not std's: it is the same monotonic clock in production, and tests can pause it.
use tokio::time::Instant;

use super::{api_backoff, backoff, LockError, LockGuard, PublishLock};
use crate::store::CacheKey;

/// The resource as RBAC rules and API errors name it.
const RESOURCE: &str = "leases.coordination.k8s.io";

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
    /// Leases seen held by someone, by (namespace, name). Kept across acquires so a caller that
    /// retries after a lock timeout shorter than the Lease's duration still sees a dead holder
    /// expire, instead of starting to count again at every retry.
    seen: Arc<Mutex<HashMap<(String, String), Seen>>>,
}

/// The parts of a Lease that change whenever its holder renews or hands it over.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: String,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
}

/// A record as last seen, since when it has stayed unchanged, and how long its holder claims it.
#[derive(Debug, Clone)]
struct Seen {
    record: Record,
    since: Instant,
    duration: Duration,
}

/// The Lease name for a cache: readable, a valid DNS-1123 subdomain, and collision-free (the
/// hash of the cache name tells apart names that differ only in characters the Lease name
/// cannot hold where they stand, like `_`, or a `.` beside a `-`).
///
/// A name this function once produced must never change: during a rolling upgrade, old and new
/// drivers would otherwise lock the same cache under two Leases. So dots stay where they were
/// valid (between two alphanumerics) and only the invalid spots, which never worked, change.
pub fn lease_name(cache: &CacheKey) -> String {
    use sha2::Digest;
    let name = cache.name.as_str();
    let chars: Vec<char> = name.chars().collect();
    let alnum = |i: Option<usize>| i.and_then(|i| chars.get(i)).is_some_and(|c| c.is_ascii_alphanumeric());
    let readable: String = chars
        .iter()
        .enumerate()
        .map(|(i, &c)| match c {
            '_' => '-',
            // Every dot-separated label must start and end alphanumeric.
            '.' if !(alnum(i.checked_sub(1)) && alnum(Some(i + 1))) => '-',
            c => c,
        })
        .collect();
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("jobcachefs-{}-{hash}", readable.trim_end_matches('-'))
}

impl LeaseLock {
    /// A Lease lock acting as `holder` (unique per driver process: node name plus a random part).
    pub fn new(client: kube::Client, holder: String, timing: LeaseTiming) -> Self {
        Self { client, holder, timing, seen: Arc::default() }
    }

    /// A holder identity for this process on `node`.
    pub fn holder_for(node: &str) -> String {
        format!("{node}/{}-{}", std::process::id(), crate::store::LayerId::generate())
    }
}

fn now() -> Timestamp {
    Timestamp::now()
}

/// Whether `lease` may be taken now, given what was seen of it before; returns what to remember.
/// A Lease without a holder is free at once. A held one is free only once the same record has
/// stayed unchanged for the holder's `leaseDurationSeconds` (or `fallback` when it names none)
/// on our clock: any write by the holder starts the count again, whatever its `renewTime` says.
fn judge(before: Option<Seen>, lease: &Lease, at: Instant, fallback: Duration) -> (bool, Option<Seen>) {
    let spec = lease.spec.as_ref();
    let holder = spec.and_then(|s| s.holder_identity.as_deref()).unwrap_or_default();
    if holder.is_empty() {
        return (true, None);
    }
    let record = Record {
        holder: holder.to_string(),
        renew_time: spec.and_then(|s| s.renew_time.clone()),
        resource_version: lease.metadata.resource_version.clone(),
    };
    match before {
        Some(seen) if seen.record == record => (at.saturating_duration_since(seen.since) >= seen.duration, Some(seen)),
        _ => {
            let duration = spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|secs| u64::try_from(secs).ok())
                .filter(|&secs| secs > 0)
                .map_or(fallback, Duration::from_secs);
            (false, Some(Seen { record, since: at, duration }))
        }
    }
}

/// One kind of API call: what an error says was being done, and the RBAC verb it needs.
#[derive(Debug, Clone, Copy)]
struct Call {
    op: &'static str,
    verb: &'static str,
}

const GET: Call = Call { op: "get lease", verb: "get" };
const CREATE: Call = Call { op: "create lease", verb: "create" };
const UPDATE: Call = Call { op: "update lease", verb: "update" };
const RENEW: Call = Call { op: "renew lease", verb: "update" };
const RELEASE: Call = Call { op: "release lease", verb: "update" };

/// Why an API call failed, sorted by what to do next.
#[derive(Debug)]
enum Failure {
    /// Someone else wrote the Lease since we read it (409): read it again.
    Conflict,
    /// The server is busy, away or slow: worth another try until the lock's timeout.
    Transient { call: Call, message: String, retry_after: Option<Duration> },
    /// Trying again cannot help.
    Fatal(LockError),
}

/// "403 Forbidden" from a Status; just the code when its reason is not a real one (a body that
/// was not a Status, which kube reports with a sentence as the reason).
fn code_and_reason(s: &kube::core::Status) -> String {
    if s.reason.is_empty() || s.reason.contains(' ') {
        s.code.to_string()
    } else {
        format!("{} {}", s.code, s.reason)
    }
}

/// An error and its sources joined by ": ": a connection error's cause (refused, reset, TLS) is
/// only in its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        // Some errors repeat their source in their own message.
        if !text.ends_with(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}

/// Sorts a failed call by what helps, and words what the user must know.
fn classify(cache: &CacheKey, call: Call, e: &kube::Error) -> Failure {
    let ns = cache.namespace.as_str();
    let config = |message: String| Failure::Fatal(LockError::Config { cache: cache.clone(), op: call.op, message });
    let transient = |message: String, retry_after| Failure::Transient { call, message, retry_after };
    let kube::Error::Api(s) = e else {
        return match e {
            kube::Error::Auth(_) => config(format!("the driver's credentials could not be loaded: {e}")),
            // A connection refused or reset, or an answer cut short: the server may be restarting.
            kube::Error::HyperError(_)
            | kube::Error::Service(_)
            | kube::Error::SerdeError(_)
            | kube::Error::FromUtf8(_)
            | kube::Error::ReadEvents(_) => transient(chain(e), None),
            _ => Failure::Fatal(LockError::Api { cache: cache.clone(), op: call.op, message: chain(e) }),
        };
    };
    let head = code_and_reason(s);
    let said = &s.message;
    let details = s.details.as_ref();
    match s.code {
        409 => Failure::Conflict,
        401 => config(format!(
            "the API server does not accept the driver's credentials ({head}): check its service account token; \
             the API server said: {said}"
        )),
        403 => config(format!(
            "the driver's service account may not `{}` {RESOURCE} in namespace {ns} ({head}): grant it in the \
             driver's RBAC; the API server said: {said}",
            call.verb
        )),
        // NamespaceLifecycle admission refuses writes into a namespace that does not exist.
        404 if details.is_some_and(|d| d.kind == "namespaces") || said.starts_with("namespaces \"") => config(format!(
            "namespace {ns} does not exist ({head}: {said}): the Lease of cache {cache} must live in the cache's \
             namespace; create it or use a cache in an existing one"
        )),
        404 => config(format!(
            "the API server does not serve {RESOURCE}/v1 ({head}: {said}): the Lease lock needs Kubernetes 1.14 \
             or later"
        )),
        422 => {
            let causes = details.map(|d| d.causes.as_slice()).unwrap_or_default();
            let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
            let fields = if fields.is_empty() { "Lease".to_string() } else { fields.join(", ") };
            config(format!(
                "the API server rejects the Lease's {fields} ({head}: {said}): an admission policy may forbid it, \
                 otherwise this is a jobcachefs bug"
            ))
        }
        408 | 429 | 500..=599 => {
            let retry_after = details.map(|d| d.retry_after_seconds).filter(|&secs| secs > 0);
            transient(format!("{head}: {said}"), retry_after.map(|secs| Duration::from_secs(secs.into())))
        }
        _ => Failure::Fatal(LockError::Api { cache: cache.clone(), op: call.op, message: format!("{head}: {said}") }),
    }
}

/// Runs API calls for one cache, each under a timeout, sorting their failures.
struct Calls<'a> {
    cache: &'a CacheKey,
    timeout: Duration,
}

impl Calls<'_> {
    async fn run<T>(
        &self,
        call: Call,
        work: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(classify(self.cache, call, &e)),
            Err(_) => Err(Failure::Transient {
                call,
                message: format!("no answer from the API server within {:?}", self.timeout),
                retry_after: None,
            }),
        }
    }
}

/// How one attempt to take the Lease ended.
enum Step {
    /// The Lease is ours; `sent` is when the winning write left, which bounds its validity.
    Won { lease: Box<Lease>, sent: Instant },
    /// Someone else holds it, or won the race to it.
    Busy,
}

#[async_trait::async_trait]
impl PublishLock for LeaseLock {
    async fn acquire(&self, cache: &CacheKey, timeout: Duration) -> Result<Box<dyn LockGuard>, LockError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), cache.namespace.as_str());
        let name = lease_name(cache);
        let calls = Calls { cache, timeout: self.timing.call_timeout };
        let started = Instant::now();
        let (mut attempt, mut failures) = (0, 0);
        loop {
            // The latest transient failure, kept only while it is the latest thing that happened.
            let mut failed = None;
            let pause = match self.try_take(&api, &calls, &name).await {
                Ok(Step::Won { lease, sent }) => {
                    return Ok(Box::new(LeaseGuard::start(api, name, self.clone(), cache.clone(), *lease, sent)));
                }
                Ok(Step::Busy) | Err(Failure::Conflict) => backoff(attempt),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient { call, message, retry_after }) => {
                    let pause = retry_after.unwrap_or_else(|| api_backoff(failures));
                    failures += 1;
                    failed = Some((call, message));
                    pause
                }
            };
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(match failed {
                    Some((call, message)) => LockError::Api {
                        cache: cache.clone(),
                        op: call.op,
                        message: format!("{message} (still failing after {waited:?} of retries)"),
                    },
                    None => LockError::Timeout { cache: cache.clone(), waited },
                });
            }
            tokio::time::sleep(pause.min(timeout - waited)).await;
            attempt += 1;
        }
    }
}

impl LeaseLock {
    /// One look at the Lease: create it if absent, take it if free or expired.
    async fn try_take(&self, api: &Api<Lease>, calls: &Calls<'_>, name: &str) -> Result<Step, Failure> {
        let pp = PostParams::default();
        let Some(current) = calls.run(GET, api.get_opt(name)).await? else {
            let lease = Lease { metadata: self.metadata(ObjectMeta::default(), name), spec: Some(self.spec(0)) };
            let sent = Instant::now();
            return match calls.run(CREATE, api.create(&pp, &lease)).await {
                Ok(lease) => Ok(Step::Won { lease: Box::new(lease), sent }),
                // Someone else created it first.
                Err(Failure::Conflict) => Ok(Step::Busy),
                Err(f) => Err(f),
            };
        };
        let key = (calls.cache.namespace.as_str().to_string(), name.to_string());
        if !self.takeable(&key, &current) {
            return Ok(Step::Busy);
        }
        let transitions = current.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
        // The metadata we read carries the resourceVersion that makes this write conditional.
        let lease = Lease {
            metadata: self.metadata(current.metadata, name),
            spec: Some(self.spec(transitions.saturating_add(1))),
        };
        let sent = Instant::now();
        match calls.run(UPDATE, api.replace(name, &pp, &lease)).await {
            Ok(lease) => {
                self.seen.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                Ok(Step::Won { lease: Box::new(lease), sent })
            }
            // Someone else took it between our read and our write.
            Err(Failure::Conflict) => Ok(Step::Busy),
            Err(f) => Err(f),
        }
    }

    /// Judges `current` against what this process saw of it before, and remembers it.
    fn takeable(&self, key: &(String, String), current: &Lease) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (free, remember) = judge(seen.remove(key), current, Instant::now(), self.timing.duration);
        if let Some(s) = remember {
            seen.insert(key.clone(), s);
        }
        free
    }

    /// `meta` (kept as read, so others' labels and the resourceVersion survive) named and labelled.
    fn metadata(&self, mut meta: ObjectMeta, name: &str) -> ObjectMeta {
        meta.name = Some(name.to_string());
        meta.labels
            .get_or_insert_with(Default::default)
            .insert("app.kubernetes.io/managed-by".to_string(), "jobcachefs".to_string());
        meta
    }

    fn spec(&self, transitions: i32) -> LeaseSpec {
        let t = MicroTime(now());
        // Whole seconds, rounded up: others wait at least as long as we count on the Lease.
        let secs = self.timing.duration.as_secs() + u64::from(self.timing.duration.subsec_nanos() > 0);
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(i32::try_from(secs.max(1)).unwrap_or(i32::MAX)),
            acquire_time: Some(t.clone()),
            renew_time: Some(t),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

/// What the renewer and the guard share.
struct Held {
    lease: Mutex<Lease>,
    lost: AtomicBool,
    /// When the last write that landed was sent: the Lease is ours for `duration` from then.
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
    fn start(api: Api<Lease>, name: String, lock: LeaseLock, cache: CacheKey, lease: Lease, sent: Instant) -> Self {
        let held =
            Arc::new(Held { lease: Mutex::new(lease), lost: AtomicBool::new(false), renewed_at: Mutex::new(sent) });
        let renewer = tokio::spawn(renew(api.clone(), name.clone(), lock.clone(), cache.clone(), held.clone()));
        Self { api, name, lock, cache, held, renewer }
    }

    /// Whether `current` is still the Lease this guard took: our holder identity alone is not
    /// enough, as every acquire of this process uses it; the acquire time tells them apart.
    fn is_ours(&self, current: &Lease) -> bool {
        let spec = |l: &Lease| l.spec.clone().unwrap_or_default();
        let (now, took) = (spec(current), spec(&self.held.lease.lock().unwrap_or_else(|p| p.into_inner())));
        now.holder_identity.as_deref() == Some(self.lock.holder.as_str()) && now.acquire_time == took.acquire_time
    }
}

/// Renews every third of the Lease's duration, and sooner after a failure; a conflict, or no
/// renewal landing within the duration, means the Lease is lost and HEAD must not be written.
async fn renew(api: Api<Lease>, name: String, lock: LeaseLock, cache: CacheKey, held: Arc<Held>) {
    let every = lock.timing.duration / 3;
    let calls = Calls { cache: &cache, timeout: lock.timing.call_timeout.min(every) };
    let (mut pause, mut failures) = (every, 0);
    loop {
        tokio::time::sleep(pause).await;
        let mut lease = held.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(MicroTime(now()));
        }
        let sent = Instant::now();
        match calls.run(RENEW, api.replace(&name, &PostParams::default(), &lease)).await {
            Ok(renewed) => {
                *held.lease.lock().unwrap_or_else(|p| p.into_inner()) = renewed;
                *held.renewed_at.lock().unwrap_or_else(|p| p.into_inner()) = sent;
                (pause, failures) = (every, 0);
            }
            Err(Failure::Conflict) => {
                held.lost.store(true, Ordering::SeqCst);
                return;
            }
            // A failed renewal is survivable while the Lease is still within its duration.
            Err(_) => {
                let since = held.renewed_at.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                if since >= lock.timing.duration {
                    held.lost.store(true, Ordering::SeqCst);
                    return;
                }
                pause = api_backoff(failures).min(every);
                failures += 1;
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

/// Attempts at a release before giving up; after that the Lease expires on its own.
const RELEASE_ATTEMPTS: u32 = 4;

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
        let mut last = Failure::Conflict;
        for attempt in 0..RELEASE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(api_backoff(attempt - 1)).await;
            }
            let current = match calls.run(GET, self.api.get_opt(&self.name)).await {
                Ok(Some(l)) => l,
                Ok(None) => return Ok(()),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(f) => {
                    last = f;
                    continue;
                }
            };
            if !self.is_ours(&current) {
                return Ok(());
            }
            let mut cleared = current;
            if let Some(spec) = cleared.spec.as_mut() {
                spec.holder_identity = None;
                spec.acquire_time = None;
                spec.renew_time = None;
            }
            match calls.run(RELEASE, self.api.replace(&self.name, &PostParams::default(), &cleared)).await {
                Ok(_) => return Ok(()),
                Err(Failure::Fatal(e)) => return Err(e),
                // A renewal that was already on its way landed first, or the server failed: again.
                Err(f) => last = f,
            }
        }
        let (op, message) = match last {
            Failure::Transient { call, message, .. } => (call.op, message),
            _ => (RELEASE.op, "the Lease changed under every attempt (409 Conflict)".to_string()),
        };
        Err(LockError::Api {
            cache: self.cache.clone(),
            op,
            message: format!("{message} (gave up after {RELEASE_ATTEMPTS} attempts; the Lease expires on its own)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kubernetes' rule for object names like a Lease's (`IsDNS1123Subdomain`): at most 253
    /// characters of dot-separated labels, each `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
    fn is_dns1123_subdomain(s: &str) -> bool {
        let label = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        };
        s.len() <= 253 && s.split('.').all(label)
    }

    #[test]
    fn the_name_rule_is_kubernetes_own() {
        for ok in ["a", "a.b", "a-b", "a--b", "0.1", "jobcachefs-x-1a2b3c4d"] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in ["", "a.-b", "a-.b", "-a", "a-", ".a", "a.", "a..b", "A", "a_b", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn lease_names_are_valid_for_tricky_cache_names() {
        let tricky = [
            "a.-b",
            "a-.b",
            "a_b",
            "a._b",
            "a_.b",
            "a-_.-b",
            "x.",
            "x-",
            "x_",
            "x._",
            "0.0.0",
            "a.b-.c",
            "m2.-",
            &"x".repeat(63),
            &format!("a{}", ".-".repeat(31)),
            &format!("{}.", "y".repeat(62)),
        ];
        for name in tricky {
            let lease = lease_name(&CacheKey::new("ns", name).expect("a valid cache name"));
            assert!(is_dns1123_subdomain(&lease), "{name} -> {lease}");
            assert!(lease.starts_with("jobcachefs-"), "{lease}");
        }
    }

    /// The first release's rule, which produced invalid names for some cache names.
    fn first_lease_name(cache: &CacheKey) -> String {
        use sha2::Digest;
        let name = cache.name.as_str();
        let readable: String = name.chars().map(|c| if c == '_' { '-' } else { c }).collect();
        let digest = sha2::Sha256::digest(name.as_bytes());
        let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        format!("jobcachefs-{}-{hash}", readable.trim_end_matches(['.', '-']))
    }

    #[test]
    fn every_short_cache_name_gets_its_own_valid_lease_name() {
        // All names of up to 5 characters over an alphabet with every kind of character; those
        // the first release already named validly keep their Lease (see the next test).
        let alphabet = ['a', '0', '.', '-', '_'];
        let mut names = vec![String::new()];
        let mut by_lease = HashMap::new();
        for _ in 0..5 {
            names = names.iter().flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}"))).collect();
            for name in &names {
                let Ok(key) = CacheKey::new("ns", name) else { continue };
                let lease = lease_name(&key);
                assert!(is_dns1123_subdomain(&lease), "{name} -> {lease}");
                let before = first_lease_name(&key);
                assert!(!is_dns1123_subdomain(&before) || before == lease, "{name}: {before} became {lease}");
                if let Some(other) = by_lease.insert(lease.clone(), name.clone()) {
                    panic!("{other} and {name} share the Lease {lease}");
                }
            }
        }
        assert!(by_lease.len() > 1000, "the alphabet yields many valid names: {}", by_lease.len());
    }

    #[test]
    fn lease_names_that_were_valid_never_change() {
        // A renamed Lease would let an old and a new driver both publish during an upgrade.
        let name = |n: &str| lease_name(&CacheKey::new("ns", n).unwrap());
        assert_eq!(name("maven"), "jobcachefs-maven-2b204554");
        assert_eq!(name("go.mod_cache"), "jobcachefs-go.mod-cache-b2bdedc6");
        assert_eq!(name("x."), "jobcachefs-x-c92f00b1");
        assert_ne!(name("a_b"), name("a-b"));
        assert_eq!(name("m2"), lease_name(&CacheKey::new("other", "m2").unwrap()), "the namespace is the Lease's");
    }

    fn lease(holder: Option<&str>, renewed: Timestamp, rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta { resource_version: Some(rv.into()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn expiry_counts_observed_silence_on_our_clock_only() {
        let t0 = Instant::now();
        let fallback = Duration::from_secs(60);
        let secs = |s| t0 + Duration::from_secs(s);
        let hour = k8s_openapi::jiff::SignedDuration::from_hours(1);
        for renewed in [now() + hour, now() - hour, now()] {
            let held = lease(Some("node-b/1"), renewed, "7");
            let (free, seen) = judge(None, &held, t0, fallback);
            assert!(!free, "never taken at first sight, whatever renewTime says");
            let (free, seen) = judge(seen, &held, secs(14), fallback);
            assert!(!free, "unchanged for 14s of 15s");
            let (free, seen) = judge(seen, &held, secs(15), fallback);
            assert!(free, "unchanged for the whole 15s");
            // A renewal (a new resourceVersion) starts the count again, even with an old renewTime.
            let renewed_again = lease(Some("node-b/1"), renewed, "8");
            let (free, seen) = judge(seen, &renewed_again, secs(16), fallback);
            assert!(!free);
            assert!(!judge(seen.clone(), &renewed_again, secs(30), fallback).0);
            assert!(judge(seen, &renewed_again, secs(31), fallback).0);
        }
        let (free, seen) = judge(None, &lease(None, now(), "9"), t0, fallback);
        assert!(free && seen.is_none(), "a released Lease is free at once");
        let mut no_duration = lease(Some("node-b/1"), now(), "10");
        if let Some(s) = no_duration.spec.as_mut() {
            s.lease_duration_seconds = None;
        }
        let (_, seen) = judge(None, &no_duration, t0, fallback);
        assert!(!judge(seen.clone(), &no_duration, secs(59), fallback).0, "our own duration when it names none");
        assert!(judge(seen, &no_duration, secs(60), fallback).0);
    }
}
