//! The metrics layer: counts every request and its duration as the app saw it, including the
//! responses the proxy made itself. Inner layers say whom a request was for by putting `ctx::Labels` in
//! the response's extensions; the duration runs until the response body is done. Who was at the
//! other end of mutual TLS comes with the request (`ctx::ClientId`) or the response
//! (`ctx::ServerId`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use tokio::time::Instant;

use crate::ctx::{ClientId, Labels, ServerId};
use crate::http::body::{Body, BoxError, FrameWatcher, watched};
use crate::http::grpc::is_grpc;
use crate::metrics::{
    Classification, DurationLabels, Metrics, PeerLabels, RequestLabels, ResponseLabels, Tls,
};

#[derive(Clone)]
pub struct TelemetryLayer {
    metrics: Metrics,
    /// Labels for responses no inner layer labelled (an unknown destination, inbound traffic).
    fallback: RequestLabels,
}

impl TelemetryLayer {
    pub fn new(metrics: Metrics, fallback: RequestLabels) -> Self {
        Self { metrics, fallback }
    }
}

impl<S> tower::Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;

    fn layer(&self, inner: S) -> Telemetry<S> {
        Telemetry {
            inner,
            layer: self.clone(),
        }
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

#[derive(Clone)]
pub struct Telemetry<S> {
    inner: S,
    layer: TelemetryLayer,
}

impl<S> tower::Service<Request<Body>> for Telemetry<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let grpc = is_grpc(request.headers());
        let client_id = request
            .extensions()
            .get::<ClientId>()
            .map(|id| id.0.clone());
        // Boxed here, where `S::Future: Send` is known: inside the async block rustc cannot prove
        // it for the projection (rust-lang/rust#64552).
        let response: ResponseFuture = Box::pin(self.inner.call(request));
        let layer = self.layer.clone();
        Box::pin(async move {
            let response = response.await?;
            let labels = response
                .extensions()
                .get::<Labels>()
                .map(|Labels(labels)| labels.clone())
                .unwrap_or(layer.fallback);
            let server_id = response
                .extensions()
                .get::<ServerId>()
                .map(|id| id.0.clone());
            let peer = match (client_id, server_id) {
                (None, None) => PeerLabels::plaintext(),
                (client_id, server_id) => PeerLabels {
                    tls: Tls::True,
                    client_id: client_id.unwrap_or_default(),
                    server_id: server_id.unwrap_or_default(),
                },
            };
            let grpc_status = response
                .headers()
                .get("grpc-status")
                .map(|v| v.as_bytes() == b"0");
            let recorder = Recorder {
                metrics: layer.metrics,
                labels: DurationLabels { dst: labels, peer },
                status: response.status().as_u16(),
                started,
                grpc,
                grpc_ok: grpc_status,
                body_failed: false,
            };
            Ok(response.map(|body| watched(body, recorder)))
        })
    }
}

struct Recorder {
    metrics: Metrics,
    labels: DurationLabels,
    status: u16,
    started: Instant,
    grpc: bool,
    /// `grpc-status` seen in the headers (trailers-only response) or trailers: true when 0.
    grpc_ok: Option<bool>,
    /// The body was cut short (a reset upstream, a deadline): whatever the status said, the app
    /// did not get the response.
    body_failed: bool,
}

impl Drop for Recorder {
    /// Runs when the response body is finished or abandoned: the request is over either way.
    fn drop(&mut self) {
        let failed =
            self.status >= 500 || (self.grpc && self.grpc_ok != Some(true)) || self.body_failed;
        let classification = if failed {
            Classification::Failure
        } else {
            Classification::Success
        };
        self.metrics.request_duration.with(&self.labels, |metric| {
            metric.observe(self.started.elapsed().as_secs_f64())
        });
        let labels = ResponseLabels {
            dst: self.labels.dst.clone(),
            peer: self.labels.peer.clone(),
            status_code: self.status,
            classification,
        };
        self.metrics.requests.with(&labels, |counter| counter.inc());
    }
}

impl FrameWatcher for Recorder {
    fn frame(&mut self, frame: &Result<Frame<Bytes>, BoxError>) {
        match frame {
            Ok(frame) => {
                if let Some(status) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    self.grpc_ok = Some(status.as_bytes() == b"0");
                }
            }
            Err(_) => self.body_failed = true,
        }
    }
}
