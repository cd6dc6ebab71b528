//! The Prometheus registry and the `/metrics` endpoint (OpenMetrics text).
//!
//! `prometheus-client` is the Prometheus project's own Rust client and writes OpenMetrics,
//! which Prometheus scrapes natively. The CSI operation histogram has the name, labels and
//! buckets of kubernetes-csi's csi-lib-utils (`csi_plugin_operations_seconds`), so the
//! dashboards people already have for CSI drivers work unchanged. Cache-level series carry
//! the cache's namespace, never its name, unless the driver is told to (cardinality).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::{CacheKey, StoreSummary};

/// csi-lib-utils' `operationsLatencyBuckets`, so CSI dashboards read ours like any driver's.
const CSI_BUCKETS: [f64; 13] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 120.0, 300.0, 600.0];
/// Restores are milliseconds, publishes up to minutes (a cold cache's first publish).
const DURATION_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Labels of `csi_plugin_operations_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CsiOp {
    driver_name: String,
    method_name: String,
    grpc_status_code: String,
}

/// A cache's namespace, and its name only when asked for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct CacheLabels {
    namespace: String,
    cache: Option<String>,
}

impl EncodeLabelSet for CacheLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("namespace", self.namespace.as_str()).encode(encoder.encode_label())?;
        if let Some(cache) = &self.cache {
            ("cache", cache.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A cache's labels plus one more (`result` or `outcome`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Labeled {
    cache: CacheLabels,
    key: &'static str,
    value: &'static str,
}

impl EncodeLabelSet for Labeled {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        self.cache.encode(encoder)?;
        (self.key, self.value).encode(encoder.encode_label())
    }
}

/// What a restore found.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RestoreResult {
    /// The cache had a version.
    hit,
    /// The cache had none; a fallback cache's version was restored.
    fallback,
    /// Nothing to restore: the job starts cold.
    miss,
}

/// Kinds of publish-lock failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LockKind {
    kind: &'static str,
}

/// A registry transfer's direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

/// A failed registry step.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Step {
    step: &'static str,
}

/// Every series the driver exports.
pub struct Metrics {
    registry: Registry,
    per_cache: bool,
    csi_ops: Family<CsiOp, Histogram>,
    restores: Family<Labeled, Counter>,
    restore_seconds: Family<CacheLabels, Histogram>,
    publish_seconds: Family<CacheLabels, Histogram>,
    publishes: Family<Labeled, Counter>,
    published_bytes: Family<CacheLabels, Counter>,
    lock_wait_seconds: Histogram,
    lock_held_seconds: Histogram,
    lock_errors: Family<LockKind, Counter>,
    layers_created: Counter,
    layers_collected: Counter,
    squashes: Counter,
    evictions: Counter,
    gc_runs: Counter,
    gc_freed_bytes: Counter,
    caches: Gauge,
    layers: Gauge,
    store_bytes: Gauge,
    volumes: Gauge,
    deepest: Gauge,
    oldest_pending: Gauge,
    registry_bytes: Family<Direction, Counter>,
    registry_errors: Family<Step, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("per_cache", &self.per_cache).finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

fn csi_histogram() -> Histogram {
    Histogram::new(CSI_BUCKETS)
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    /// A registry with every series; `per_cache` adds a `cache` label to cache-level series.
    pub fn new(per_cache: bool) -> Self {
        let mut registry = Registry::default();
        let csi_ops = Family::<CsiOp, Histogram>::new_with_constructor(csi_histogram);
        registry.register(
            "csi_plugin_operations_seconds",
            "Container Storage Interface operation duration with gRPC error code status total",
            csi_ops.clone(),
        );
        let restores = Family::default();
        registry.register(
            "jobcachefs_restores",
            "Volumes restored, by what the cache had (hit, fallback, miss)",
            restores.clone(),
        );
        let restore_seconds = Family::<CacheLabels, Histogram>::new_with_constructor(duration_histogram);
        registry.register(
            "jobcachefs_restore_duration_seconds",
            "Time to restore (pin and mount) a volume",
            restore_seconds.clone(),
        );
        let publish_seconds = Family::<CacheLabels, Histogram>::new_with_constructor(duration_histogram);
        registry.register(
            "jobcachefs_publish_duration_seconds",
            "Time to release a volume, from unmount to the recorded outcome",
            publish_seconds.clone(),
        );
        let publishes = Family::default();
        registry.register("jobcachefs_publishes", "Releases of volumes, by outcome", publishes.clone());
        let published_bytes = Family::default();
        registry.register(
            "jobcachefs_published_bytes",
            "Bytes of changes that became versions",
            published_bytes.clone(),
        );
        let lock_wait_seconds = duration_histogram();
        registry.register(
            "jobcachefs_publish_lock_wait_seconds",
            "Time spent waiting for a cache's publish lock",
            lock_wait_seconds.clone(),
        );
        let lock_held_seconds = duration_histogram();
        registry.register(
            "jobcachefs_publish_lock_held_seconds",
            "Time a publish lock was held",
            lock_held_seconds.clone(),
        );
        let lock_errors = Family::default();
        registry.register("jobcachefs_lock_errors", "Publish lock failures, by kind", lock_errors.clone());
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let layers_created = counter(&mut registry, "jobcachefs_layers_created", "Layers made by commits and squashes");
        let layers_collected =
            counter(&mut registry, "jobcachefs_layers_collected", "Layers deleted by garbage collection");
        let squashes = counter(&mut registry, "jobcachefs_squashes", "Caches flattened into one layer");
        let evictions = counter(&mut registry, "jobcachefs_evictions", "Caches evicted (idle or over budget)");
        let gc_runs = counter(&mut registry, "jobcachefs_gc_runs", "Garbage collection runs");
        let gc_freed_bytes = counter(&mut registry, "jobcachefs_gc_freed_bytes", "Bytes freed by garbage collection");
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let caches = gauge(&mut registry, "jobcachefs_caches", "Caches with a version on this node's store");
        let layers = gauge(&mut registry, "jobcachefs_layers", "Layers on the store");
        let store_bytes = gauge(&mut registry, "jobcachefs_store_bytes", "Bytes in the store's layers");
        let volumes = gauge(&mut registry, "jobcachefs_volumes", "Volumes in use on this node");
        let deepest = gauge(&mut registry, "jobcachefs_deepest_stack_layers", "Layers of the deepest cache");
        let oldest_pending = gauge(
            &mut registry,
            "jobcachefs_oldest_pending_publish_seconds",
            "Age of the oldest change promoted to a layer and still waiting for its cache's HEAD",
        );
        let registry_bytes = Family::default();
        registry.register(
            "jobcachefs_registry_bytes",
            "Compressed layer bytes moved to (pushed) and from (pulled) the registry",
            registry_bytes.clone(),
        );
        let registry_errors = Family::default();
        registry.register(
            "jobcachefs_registry_errors",
            "Registry steps that failed (push, publish, pull, prefetch); a publish is retried",
            registry_errors.clone(),
        );
        Self {
            registry,
            per_cache,
            csi_ops,
            restores,
            restore_seconds,
            publish_seconds,
            publishes,
            published_bytes,
            lock_wait_seconds,
            lock_held_seconds,
            lock_errors,
            layers_created,
            layers_collected,
            squashes,
            evictions,
            gc_runs,
            gc_freed_bytes,
            caches,
            layers,
            store_bytes,
            volumes,
            deepest,
            oldest_pending,
            registry_bytes,
            registry_errors,
        }
    }

    /// Layer blob bytes moved: `direction` is `pushed` or `pulled`.
    pub fn registry_moved(&self, direction: &'static str, bytes: u64) {
        self.registry_bytes.get_or_create(&Direction { direction }).inc_by(bytes);
    }

    /// A registry step failed.
    pub fn registry_failed(&self, step: &'static str) {
        self.registry_errors.get_or_create(&Step { step }).inc();
    }

    fn labels(&self, cache: &CacheKey) -> CacheLabels {
        CacheLabels { namespace: cache.namespace.to_string(), cache: self.per_cache.then(|| cache.name.to_string()) }
    }

    /// One CSI call: `method` is the gRPC path (`/csi.v1.Node/NodeStageVolume`).
    pub fn csi_call(&self, method: &str, code: tonic::Code, took: Duration) {
        let op = CsiOp {
            driver_name: crate::csi::PLUGIN_NAME.to_string(),
            method_name: method.to_string(),
            grpc_status_code: code_name(code).to_string(),
        };
        self.csi_ops.get_or_create(&op).observe(took.as_secs_f64());
    }

    /// A volume restored.
    pub fn restored(&self, cache: &CacheKey, result: RestoreResult, took: Duration) {
        let value = match result {
            RestoreResult::hit => "hit",
            RestoreResult::fallback => "fallback",
            RestoreResult::miss => "miss",
        };
        self.restores.get_or_create(&Labeled { cache: self.labels(cache), key: "result", value }).inc();
        self.restore_seconds.get_or_create(&self.labels(cache)).observe(took.as_secs_f64());
    }

    /// A release ended with `outcome` (see [`crate::ops::Released::outcome`]).
    pub fn released(&self, cache: &CacheKey, outcome: &'static str, bytes: u64, took: Duration) {
        self.publishes.get_or_create(&Labeled { cache: self.labels(cache), key: "outcome", value: outcome }).inc();
        self.publish_seconds.get_or_create(&self.labels(cache)).observe(took.as_secs_f64());
        if bytes > 0 {
            self.published_bytes.get_or_create(&self.labels(cache)).inc_by(bytes);
        }
    }

    /// A publish lock was taken after `waited` and held for `held`.
    pub fn lock_used(&self, waited: Duration, held: Duration) {
        self.lock_wait_seconds.observe(waited.as_secs_f64());
        self.lock_held_seconds.observe(held.as_secs_f64());
    }

    /// A publish lock could not be had or kept.
    pub fn lock_failed(&self, kind: &'static str) {
        self.lock_errors.get_or_create(&LockKind { kind }).inc();
    }

    /// A layer was made (commit or squash).
    pub fn layer_created(&self) {
        self.layers_created.inc();
    }

    /// A squash replaced a prefix of a cache's layers.
    pub fn squashed(&self) {
        self.squashes.inc();
    }

    /// A gc run's report.
    pub fn collected(&self, evicted: usize, layers: usize, bytes: u64) {
        self.gc_runs.inc();
        self.evictions.inc_by(evicted as u64);
        self.layers_collected.inc_by(layers as u64);
        self.gc_freed_bytes.inc_by(bytes);
    }

    /// Sets the store gauges from one summary (the same numbers `cache ls` prints).
    pub fn set_store(&self, s: &StoreSummary) {
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.caches.set(to_i64(s.caches));
        self.layers.set(to_i64(s.layers));
        self.store_bytes.set(to_i64(s.bytes));
        self.volumes.set(to_i64(s.volumes));
        self.deepest.set(to_i64(s.deepest));
        self.oldest_pending.set(to_i64(s.oldest_pending_secs));
    }

    /// The OpenMetrics text of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

/// gRPC code names as Go's `codes.Code.String()` spells them, which csi-lib-utils exports.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("metrics endpoint {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
}

/// Refreshes the store gauges before each scrape (boxed, so the endpoint need not know the engine).
pub type Refresh = Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// Serves `GET /metrics` on `address` until the task is dropped; returns the bound address.
pub async fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    refresh: Refresh,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|source| MetricsError::Bind { address, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind { address, source })?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (metrics, refresh) = (metrics.clone(), refresh.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (metrics, refresh) = (metrics.clone(), refresh.clone());
                    async move {
                        let response = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                            refresh().await;
                            Response::builder()
                                .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                                .body(Full::new(Bytes::from(metrics.encode())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from("not found\n")))
                        };
                        response.map_err(std::io::Error::other)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_named_and_labelled_as_dashboards_expect() {
        let m = Metrics::new(false);
        let key = CacheKey::new("ci", "maven").unwrap();
        m.csi_call("/csi.v1.Node/NodeStageVolume", tonic::Code::Ok, Duration::from_millis(3));
        m.csi_call("/csi.v1.Controller/DeleteVolume", tonic::Code::Cancelled, Duration::from_secs(20));
        m.restored(&key, RestoreResult::hit, Duration::from_millis(2));
        m.released(&key, "stale", 0, Duration::from_millis(40));
        let text = m.encode();
        assert!(text.contains(
            "csi_plugin_operations_seconds_count{driver_name=\"jobcachefs.dev\",method_name=\"/csi.v1.Node/NodeStageVolume\",grpc_status_code=\"OK\"} 1"
        ), "{text}");
        assert!(text.contains("grpc_status_code=\"Canceled\"} 1"), "Go's spelling: {text}");
        assert!(text.contains("le=\"600.0\""), "csi-lib-utils buckets: {text}");
        assert!(text.contains("jobcachefs_restores_total{namespace=\"ci\",result=\"hit\"} 1"), "{text}");
        assert!(text.contains("jobcachefs_publishes_total{namespace=\"ci\",outcome=\"stale\"} 1"), "{text}");
        assert!(!text.contains("maven"), "no cache names by default: {text}");
        assert!(text.ends_with("# EOF\n"));

        let per_cache = Metrics::new(true);
        per_cache.restored(&key, RestoreResult::miss, Duration::from_millis(2));
        assert!(per_cache
            .encode()
            .contains("jobcachefs_restores_total{namespace=\"ci\",cache=\"maven\",result=\"miss\"} 1"));
    }

    #[test]
    fn code_names_match_go() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::Cancelled), "Canceled");
        assert_eq!(code_name(tonic::Code::FailedPrecondition), "FailedPrecondition");
    }
}
