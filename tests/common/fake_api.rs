//! A fake Kubernetes API server for Leases that answers as kube-apiserver does, with real
//! `Status` bodies: 201 on create, 409 AlreadyExists on a second create, 409 Conflict for a stale
//! resourceVersion, 422 Invalid for a name that is not a DNS-1123 subdomain or an update without
//! a resourceVersion, 404 `namespaces "x" not found` for a write into a missing namespace, 403
//! Forbidden for a verb RBAC denies, 400 for a malformed body (MicroTime included). It sets
//! resourceVersion itself and stores times the way the real server re-serialises them. Tests can
//! make it answer 500 or 429, or never answer, for the next N requests.
//!
//! Served two ways with the same semantics: in process as a tower service ([`start`]: no
//! sockets, so tokio's paused clock can drive the tests) and over HTTP on loopback
//! ([`start_http`]) for a driver running as its own process.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

/// The identity that RBAC denials name, as for a driver's service account.
pub const USER: &str = "system:serviceaccount:kube-system:jobcachefs";
const GROUP: &str = "coordination.k8s.io";
/// Go's `metav1.RFC3339Micro`: MicroTime is parsed with exactly this layout.
const MICRO_LAYOUT: &str = "2006-01-02T15:04:05.000000Z07:00";

/// Shared state of the fake server.
#[derive(Default)]
pub struct FakeApi {
    leases: Mutex<HashMap<(String, String), Value>>,
    version: AtomicU64,
    /// Answer the next N requests with 500 InternalError.
    pub fail_next: AtomicUsize,
    /// Answer the next N requests with 429 TooManyRequests (Retry-After: 1).
    pub throttle_next: AtomicUsize,
    /// Never answer the next N requests.
    pub hang_next: AtomicUsize,
    /// Delay every answer by this many milliseconds.
    pub delay_ms: AtomicU64,
    /// Lease writes that succeeded.
    pub writes: AtomicUsize,
    /// Answer everything with 401 Unauthorized, as for a revoked token.
    pub unauthorized: AtomicBool,
    /// Namespaces that exist; `None` means every namespace does.
    namespaces: Mutex<Option<BTreeSet<String>>>,
    /// Verbs RBAC denies on Leases (`get`, `create`, `update`).
    forbidden: Mutex<BTreeSet<String>>,
    /// Every request, as "METHOD path".
    requests: Mutex<Vec<String>>,
    /// Other objects served read-only by their API path (PVCs, pods).
    objects: Mutex<HashMap<String, Value>>,
    /// core/v1 Events created, in order.
    events: Mutex<Vec<Value>>,
    /// Refuse Event creation with 403, as without RBAC on events.
    pub forbid_events: AtomicBool,
}

type Answer = Response<Full<Bytes>>;

fn respond(code: StatusCode, body: &Value) -> Answer {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

/// A `Status` body as `k8s.io/apimachinery/pkg/api/errors` builds it.
fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Answer {
    let mut body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    if let Some(d) = details {
        body["details"] = d;
    }
    respond(code, &body)
}

fn lease_details(name: &str) -> Value {
    json!({"name": name, "group": GROUP, "kind": "leases"})
}

fn not_found(name: &str) -> Answer {
    let message = format!("leases.{GROUP} \"{name}\" not found");
    status(StatusCode::NOT_FOUND, "NotFound", &message, Some(lease_details(name)))
}

fn bad_request(message: &str) -> Answer {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

/// 422 Invalid as `errors.NewInvalid` words it: `<kind> "<name>" is invalid: <field>: <detail>`.
fn invalid(kind: &str, name: &str, field: &str, detail: &str) -> Answer {
    let message = format!("{kind}.{GROUP} \"{name}\" is invalid: {field}: {detail}");
    let details = json!({"name": name, "group": GROUP, "kind": kind,
        "causes": [{"reason": "FieldValueInvalid", "message": detail, "field": field}]});
    status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message, Some(details))
}

/// Kubernetes' `IsDNS1123Subdomain`: at most 253 characters of dot-separated labels, each
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    s.len() <= 253 && s.split('.').all(label)
}

/// Parses a MicroTime as Go's `time.Parse(RFC3339Micro, s)` does (exactly six fractional
/// digits, then `Z` or `±hh:mm`) and re-serialises it as `MicroTime.MarshalJSON` does: in UTC.
pub fn micro_time(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 27
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..26);
    let zone = s.get(26..).unwrap_or_default();
    let zone_ok = zone == "Z"
        || (zone.len() == 6
            && matches!(zone.as_bytes()[0], b'+' | b'-')
            && digits(27..29)
            && zone.as_bytes()[3] == b':'
            && digits(30..32));
    let parsed = if shape && zone_ok { s.parse::<Timestamp>().ok() } else { None };
    match parsed {
        Some(t) => Ok(t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()),
        None => Err(format!("parsing time {s:?} as {MICRO_LAYOUT:?}: cannot parse {s:?} as {MICRO_LAYOUT:?}")),
    }
}

/// A Lease request broken down: namespace, name (absent for a create), verb.
struct LeasePath {
    ns: String,
    name: Option<String>,
}

impl FakeApi {
    /// The Lease stored under namespace/name, as the server holds it.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.leases.lock().unwrap().get(&(ns.to_string(), name.to_string())).cloned()
    }

    /// Stores `lease` as another client's write would (the server's own resourceVersion, times
    /// re-serialised); returns the resourceVersion.
    pub fn put_lease(&self, ns: &str, mut lease: Value) -> String {
        let name = lease["metadata"]["name"].as_str().expect("lease name").to_string();
        normalise_times(&mut lease).expect("well-formed times");
        let rv = self.next_version();
        lease["metadata"]["resourceVersion"] = json!(rv);
        lease["metadata"]["namespace"] = json!(ns);
        self.leases.lock().unwrap().insert((ns.to_string(), name), lease);
        rv
    }

    /// Changes a stored Lease as its holder's write would (a new resourceVersion).
    pub fn edit_lease(&self, ns: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut leases = self.leases.lock().unwrap();
        let lease = leases.get_mut(&(ns.to_string(), name.to_string())).expect("lease to edit");
        edit(lease);
        normalise_times(lease).expect("well-formed times");
        lease["metadata"]["resourceVersion"] = json!(self.next_version());
    }

    /// Only these namespaces exist from now on.
    pub fn set_namespaces(&self, names: &[&str]) {
        *self.namespaces.lock().unwrap() = Some(names.iter().map(|s| s.to_string()).collect());
    }

    /// RBAC denies `verb` (`get`, `create`, `update`) on Leases from now on.
    pub fn forbid(&self, verb: &str) {
        self.forbidden.lock().unwrap().insert(verb.to_string());
    }

    /// Every request so far, as "METHOD path".
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// The Events created so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// A core/v1 Event create, validated as kube-apiserver does for the fields we send.
    fn create_event(&self, ns: &str, event: Value) -> Answer {
        if self.forbid_events.load(Ordering::SeqCst) {
            let message = format!(
                "events is forbidden: User \"{USER}\" cannot create resource \"events\" in API group \"\" in the \
                 namespace \"{ns}\""
            );
            return status(StatusCode::FORBIDDEN, "Forbidden", &message, Some(json!({"kind": "events"})));
        }
        if !self.namespace_exists(ns) {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("namespaces \"{ns}\" not found"), None);
        }
        let name = event["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if !is_dns1123_subdomain(&name) {
            return invalid("Event", &name, "metadata.name", "a lowercase RFC 1123 subdomain");
        }
        if event["involvedObject"]["namespace"].as_str() != Some(ns) {
            return invalid("Event", &name, "involvedObject.namespace", "does not match event.namespace");
        }
        if !matches!(event["type"].as_str(), Some("Normal" | "Warning")) {
            return invalid("Event", &name, "type", "supported values: \"Normal\", \"Warning\"");
        }
        let mut stored = event;
        stored["metadata"]["namespace"] = json!(ns);
        stored["metadata"]["resourceVersion"] = json!(self.next_version());
        self.events.lock().unwrap().push(stored.clone());
        respond(StatusCode::CREATED, &stored)
    }

    /// Serves `object` at `path` (e.g. /api/v1/namespaces/ci/pods/build-1) for GET.
    pub fn put_object(&self, path: &str, object: Value) {
        self.objects.lock().unwrap().insert(path.to_string(), object);
    }

    /// Sends one raw request, as any client could, and returns the status code and JSON body.
    pub async fn call(self: &Arc<Self>, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder().method(method).uri(path).body(Full::new(Bytes::from(body))).expect("request");
        let answer = self.clone().handle(req).await;
        let code = answer.status().as_u16();
        let bytes = answer.into_body().collect().await.expect("body").to_bytes();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn next_version(&self) -> String {
        (self.version.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.namespaces.lock().unwrap().as_ref().is_none_or(|set| set.contains(ns))
    }

    /// Takes one from `counter` if it is above zero.
    fn take(counter: &AtomicUsize) -> bool {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    /// Answers one request, in the order the real server checks: authentication, priority and
    /// fairness, authorisation, decoding, admission (the namespace), validation, storage.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Answer
    where
        B: hyper::body::Body,
        B::Error: std::fmt::Display,
    {
        let path = req.uri().path().to_string();
        self.requests.lock().unwrap().push(format!("{} {path}", req.method()));
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if Self::take(&self.hang_next) {
            std::future::pending::<()>().await;
        }
        if self.unauthorized.load(Ordering::SeqCst) {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized", None);
        }
        if Self::take(&self.throttle_next) {
            let mut answer = status(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Too many requests, please try again later.",
                Some(json!({"retryAfterSeconds": 1})),
            );
            answer.headers_mut().insert("retry-after", "1".parse().expect("header"));
            return answer;
        }
        if Self::take(&self.fail_next) {
            let message = "Internal error occurred: etcdserver: request timed out";
            let details = json!({"causes": [{"message": "etcdserver: request timed out"}]});
            return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message, Some(details));
        }
        let core: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if req.method() == Method::POST
            && core.len() == 5
            && core[..3] == ["api", "v1", "namespaces"]
            && core[4] == "events"
        {
            let ns = core[3].to_string();
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return bad_request(&format!("reading the request body: {e}")),
            };
            return match serde_json::from_slice::<Value>(&body) {
                Ok(event @ Value::Object(_)) => self.create_event(&ns, event),
                _ => bad_request("couldn't get version/kind; json parse error"),
            };
        }
        if path.starts_with("/api/v1/") {
            return match (req.method(), self.objects.lock().unwrap().get(&path)) {
                (&Method::GET, Some(obj)) => respond(StatusCode::OK, obj),
                _ => status(StatusCode::NOT_FOUND, "NotFound", &format!("{path} not found"), None),
            };
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]
        if parts.len() < 6
            || parts.len() > 7
            || parts[..4] != ["apis", GROUP, "v1", "namespaces"]
            || parts[5] != "leases"
        {
            let message = "the server could not find the requested resource";
            return status(StatusCode::NOT_FOUND, "NotFound", message, Some(json!({})));
        }
        let at = LeasePath { ns: parts[4].to_string(), name: parts.get(6).map(|s| s.to_string()) };
        let method = req.method().clone();
        let verb = match (&method, &at.name) {
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, None) => "create",
            (&Method::PUT, Some(_)) => "update",
            (m, _) => {
                let message = format!("the server does not allow this method on the requested resource: {m}");
                return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &message, Some(json!({})));
            }
        };
        if self.forbidden.lock().unwrap().contains(verb) {
            let named = at.name.as_ref().map(|n| format!(" \"{n}\"")).unwrap_or_default();
            let message = format!(
                "leases.{GROUP}{named} is forbidden: User \"{USER}\" cannot {verb} resource \"leases\" in API group \
                 \"{GROUP}\" in the namespace \"{}\"",
                at.ns
            );
            let details = json!({"name": at.name.clone().unwrap_or_default(), "group": GROUP, "kind": "leases"});
            return status(StatusCode::FORBIDDEN, "Forbidden", &message, Some(details));
        }
        if verb == "get" {
            let name = at.name.unwrap_or_default();
            return match self.lease(&at.ns, &name) {
                Some(l) => respond(StatusCode::OK, &l),
                None => not_found(&name),
            };
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return bad_request(&format!("reading the request body: {e}")),
        };
        let mut lease: Value = match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return bad_request("Object 'Kind' is missing in the request body"),
            Err(e) => return bad_request(&format!("couldn't get version/kind; json parse error: {e}")),
        };
        if let Err(e) = normalise_times(&mut lease) {
            return bad_request(&format!("Lease in version \"v1\" cannot be handled as a Lease: {e}"));
        }
        if lease["metadata"]["namespace"].as_str().is_some_and(|ns| ns != at.ns) {
            return bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
        self.write(at, verb, lease)
    }

    /// A create, or an update (which creates when the Lease is absent: Leases allow it).
    fn write(&self, at: LeasePath, verb: &str, mut lease: Value) -> Answer {
        let name = lease["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if let Some(url_name) = &at.name {
            if &name != url_name {
                return bad_request(&format!(
                    "the name of the object ({name}) does not match the name on the URL ({url_name})"
                ));
            }
        }
        let mut leases = self.leases.lock().unwrap();
        let key = (at.ns.clone(), name.clone());
        let existing = leases.get(&key).cloned();
        let creating = existing.is_none();
        if creating {
            // NamespaceLifecycle admission: nothing is created in a namespace that does not exist.
            if !self.namespace_exists(&at.ns) {
                let message = format!("namespaces \"{}\" not found", at.ns);
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &message,
                    Some(json!({"name": at.ns, "kind": "namespaces"})),
                );
            }
            if name.is_empty() {
                let detail = "Required value: name or generateName is required";
                return invalid("Lease", &name, "metadata.name", detail);
            }
            if !is_dns1123_subdomain(&name) {
                let detail = if name.len() > 253 {
                    format!("Invalid value: {name:?}: must be no more than 253 characters")
                } else {
                    format!(
                        "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case \
                         alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character \
                         (e.g. 'example.com', regex used for validation is \
                         '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
                    )
                };
                return invalid("Lease", &name, "metadata.name", &detail);
            }
            let rv = lease["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            if verb == "create" && !rv.is_empty() {
                // The storage layer refuses this as an internal error, not a validation one.
                let message = "Internal error occurred: resourceVersion should not be set on objects to be created";
                return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message, None);
            }
        }
        if existing.is_some() && verb == "create" {
            let message = format!("leases.{GROUP} \"{name}\" already exists");
            return status(StatusCode::CONFLICT, "AlreadyExists", &message, Some(lease_details(&name)));
        }
        if let Some(current) = &existing {
            let rv = lease["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            if rv.is_empty() {
                // The storage layer formats the missing version, a uint64 zero, with %#v.
                return invalid(
                    "leases",
                    &name,
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update",
                );
            }
            if rv != current["metadata"]["resourceVersion"].as_str().unwrap_or_default() {
                let message = format!(
                    "Operation cannot be fulfilled on leases.{GROUP} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again"
                );
                return status(StatusCode::CONFLICT, "Conflict", &message, Some(lease_details(&name)));
            }
        }
        for (field, min) in [("leaseDurationSeconds", 1), ("leaseTransitions", 0)] {
            if let Some(n) = lease["spec"][field].as_i64().filter(|&n| n < min) {
                let rule = if min == 1 { "must be greater than 0" } else { "must be greater than or equal to 0" };
                return invalid("Lease", &name, &format!("spec.{field}"), &format!("Invalid value: {n}: {rule}"));
            }
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        let meta = &mut lease["metadata"];
        meta["resourceVersion"] = json!(self.next_version());
        meta["namespace"] = json!(at.ns);
        match &existing {
            // Fields the server owns are kept from the stored object, whatever the client sent.
            Some(current) => {
                meta["uid"] = current["metadata"]["uid"].clone();
                meta["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
            }
            None => {
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", self.version.load(Ordering::SeqCst)));
                meta["creationTimestamp"] = json!(Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
            }
        }
        lease["apiVersion"] = json!(format!("{GROUP}/v1"));
        lease["kind"] = json!("Lease");
        leases.insert(key, lease.clone());
        respond(if creating { StatusCode::CREATED } else { StatusCode::OK }, &lease)
    }
}

/// Parses the Lease's MicroTime fields and writes them back in the real server's form.
fn normalise_times(lease: &mut Value) -> Result<(), String> {
    for field in ["acquireTime", "renewTime"] {
        match &lease["spec"][field] {
            Value::Null => {}
            Value::String(s) => {
                let t = micro_time(s)?;
                lease["spec"][field] = json!(t);
            }
            other => return Err(format!("{field}: expected a string, got {other}")),
        }
    }
    Ok(())
}

/// Starts the fake server in process; returns its state and a client whose requests it answers
/// directly, with no sockets.
pub async fn start() -> (Arc<FakeApi>, kube::Client) {
    let api = Arc::new(FakeApi::default());
    let state = api.clone();
    let service = tower::service_fn(move |req: Request<kube::client::Body>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(state.handle(req).await) }
    });
    (api, kube::Client::new(service, "default"))
}

/// Writes a kubeconfig that points at `url`, for a driver process to use.
pub fn kubeconfig(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
         users:\n- name: test\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\n\
         current-context: fake\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

/// Starts the fake server on 127.0.0.1; returns its state and its URL.
pub async fn start_http() -> (Arc<FakeApi>, String) {
    let api = Arc::new(FakeApi::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let state = api.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (api, format!("http://{addr}"))
}
