//! Fault injection, for chaos tests and demos: delay some requests, fail some outright.

use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use rand::Rng;

use crate::body::{Body, proxy_error};
use crate::config::FaultConfig;
use crate::error::{ProxyError, ResponseFuture};

/// Marks responses the proxy failed on purpose.
pub const FAULT_HEADER: &str = "outrigger-fault";

#[derive(Clone)]
pub struct Faults<S> {
    inner: S,
    config: FaultConfig,
}

impl<S> Faults<S> {
    pub fn new(inner: S, config: FaultConfig) -> Self {
        Self { inner, config }
    }
}

fn chance(percent: f64) -> bool {
    percent > 0.0 && rand::rng().random_range(0.0..100.0) < percent
}

impl<S> tower::Service<Request<Body>> for Faults<S>
where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = ProxyError,
            Future = ResponseFuture,
        > + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        // As in Istio, a request may be both delayed and then aborted.
        let delay = chance(self.config.delay_percent).then_some(self.config.delay);
        let abort = chance(self.config.abort_percent).then_some(self.config.abort_status);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = abort {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let mut response = proxy_error(status, "fault injected");
                response
                    .headers_mut()
                    .insert(FAULT_HEADER, http::HeaderValue::from_static("abort"));
                return Ok(response);
            }
            inner.call(request).await
        })
    }
}
