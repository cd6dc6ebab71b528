//! A fake Kubernetes API server for Leases, over real HTTP on loopback. It answers like the
//! real one: 201 on create, 409 AlreadyExists on a second create, 409 Conflict on an update
//! with a stale resourceVersion, 404 with a Status body when absent; and it can be made slow
//! or failing to test how errors surface.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

/// Shared state of the fake server.
#[derive(Default)]
pub struct FakeApi {
    leases: Mutex<HashMap<(String, String), Value>>,
    version: AtomicU64,
    /// Answer the next N requests with 500.
    pub fail_next: AtomicUsize,
    /// Delay every answer by this many milliseconds.
    pub delay_ms: AtomicU64,
    /// Requests served, by method.
    pub writes: AtomicUsize,
    /// Other objects served read-only by their API path (PVCs, pods).
    objects: Mutex<HashMap<String, Value>>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

impl FakeApi {
    /// The Lease stored under namespace/name, as the server holds it.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.leases.lock().unwrap().get(&(ns.to_string(), name.to_string())).cloned()
    }

    /// Serves `object` at `path` (e.g. /api/v1/namespaces/ci/pods/build-1) for GET.
    pub fn put_object(&self, path: &str, object: Value) {
        self.objects.lock().unwrap().insert(path.to_string(), object);
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Ok(status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "etcdserver: request timed out"));
        }
        let path = req.uri().path().to_string();
        if path.starts_with("/api/v1/") {
            return Ok(match (req.method(), self.objects.lock().unwrap().get(&path)) {
                (&Method::GET, Some(obj)) => respond(StatusCode::OK, obj),
                _ => status(StatusCode::NOT_FOUND, "NotFound", &format!("{path} not found")),
            });
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]
        if parts.len() < 6 || parts[..3] != ["apis", "coordination.k8s.io", "v1"] || parts[5] != "leases" {
            return Ok(status(StatusCode::NOT_FOUND, "NotFound", &format!("the server could not find {path}")));
        }
        let ns = parts[4].to_string();
        let name = parts.get(6).map(|s| s.to_string());
        let method = req.method().clone();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let mut leases = self.leases.lock().unwrap();
        Ok(match (method, name) {
            (Method::GET, Some(name)) => match leases.get(&(ns.clone(), name.clone())) {
                Some(l) => respond(StatusCode::OK, l),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("leases.coordination.k8s.io \"{name}\" not found"),
                ),
            },
            (Method::POST, None) => {
                let mut lease: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let name = lease["metadata"]["name"].as_str().unwrap_or_default().to_string();
                if leases.contains_key(&(ns.clone(), name.clone())) {
                    return Ok(status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                    ));
                }
                self.writes.fetch_add(1, Ordering::SeqCst);
                let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                lease["metadata"]["resourceVersion"] = json!(rv.to_string());
                lease["metadata"]["namespace"] = json!(ns);
                leases.insert((ns, name), lease.clone());
                respond(StatusCode::CREATED, &lease)
            }
            (Method::PUT, Some(name)) => {
                let mut lease: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let Some(current) = leases.get(&(ns.clone(), name.clone())) else {
                    return Ok(status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("leases.coordination.k8s.io \"{name}\" not found"),
                    ));
                };
                if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return Ok(status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        &format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                    ));
                }
                self.writes.fetch_add(1, Ordering::SeqCst);
                let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                lease["metadata"]["resourceVersion"] = json!(rv.to_string());
                leases.insert((ns, name), lease.clone());
                respond(StatusCode::OK, &lease)
            }
            (m, _) => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &format!("{m} not supported here")),
        })
    }
}

/// Starts the fake server on 127.0.0.1; returns its state and a client pointed at it.
pub async fn start() -> (Arc<FakeApi>, kube::Client) {
    let (api, url) = start_http().await;
    let mut config = kube::Config::new(url.parse().expect("url"));
    config.default_namespace = "default".into();
    (api, kube::Client::try_from(config).expect("client"))
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
                let service = hyper::service::service_fn(move |req| state.clone().handle(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (api, format!("http://{addr}"))
}
