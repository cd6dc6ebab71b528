//! Times every CSI call for `csi_plugin_operations_seconds`, in one place under all three
//! services: the gRPC path is the method name, the `grpc-status` header the code (tonic puts
//! it in the headers of every error; a unary success carries none there and is OK). A call
//! whose future is dropped before it answers (the caller gave up, the stream was reset) is
//! counted as Canceled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

use crate::metrics::Metrics;

/// The layer that wraps the services.
#[derive(Clone)]
pub struct TimedLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for TimedLayer {
    type Service = Timed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timed { inner, metrics: self.0.clone() }
    }
}

/// A service whose calls are timed.
#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Records the call once: when it answers, or as Canceled if it never does.
struct Pending {
    metrics: Arc<Metrics>,
    method: String,
    started: Instant,
    done: bool,
}

impl Pending {
    fn finish(&mut self, code: tonic::Code) {
        self.done = true;
        self.metrics.csi_call(&self.method, code, self.started.elapsed());
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.csi_call(&self.method, tonic::Code::Cancelled, self.started.elapsed());
        }
    }
}

fn code_of<B>(response: &http::Response<B>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

impl<S, B, R> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let call = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let mut pending = Pending { metrics, method, started: Instant::now(), done: false };
            let answer = call.await;
            pending.finish(match &answer {
                Ok(response) => code_of(response),
                Err(_) => tonic::Code::Internal,
            });
            answer
        })
    }
}
