//! Deadlines: the whole request (`timeout`, retries included) or one attempt (`perTryTimeout`).

use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;

use crate::body::Body;
use crate::error::{ProxyError, ResponseFuture};
use crate::metrics::TimeoutKind;

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    after: Duration,
    kind: TimeoutKind,
    /// `outrigger_timeouts_total` for this route and kind.
    timeouts: Counter,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, after: Duration, kind: TimeoutKind, timeouts: Counter) -> Self {
        Self {
            inner,
            after,
            kind,
            timeouts,
        }
    }
}

impl<S> tower::Service<Request<Body>> for Deadline<S>
where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = ProxyError,
            Future = ResponseFuture,
        >,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        let response = self.inner.call(request);
        let (after, kind, timeouts) = (self.after, self.kind, self.timeouts.clone());
        Box::pin(async move {
            match tokio::time::timeout(after, response).await {
                Ok(result) => result,
                Err(_) => {
                    timeouts.inc();
                    Err(ProxyError::Timeout { kind, after })
                }
            }
        })
    }
}
