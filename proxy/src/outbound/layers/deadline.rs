//! Deadlines: the whole request (`timeout`, retries included) or one attempt (`perTryTimeout`).
//!
//! The whole-request deadline also bounds the response body: a response whose body is still
//! streaming when it passes is cut (the stream is reset), as Envoy's route timeout does, since
//! its headers, and their status, are already on their way to the app. An attempt's deadline ends
//! at its response headers, when it can no longer be retried.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};
use tower::Service as _;

use crate::http::body::{Body, BoxError, boxed};
use crate::http::error::ProxyError;
use crate::metrics::TimeoutKind;
use crate::outbound::stack::{ResponseFuture, Stack, Step};

#[derive(Clone)]
pub struct Deadline {
    pub after: Duration,
    pub kind: TimeoutKind,
    /// `outrigger_timeouts_total` for this route and kind.
    pub timeouts: Counter,
}

impl Step for Deadline {
    fn name(&self) -> &'static str {
        match self.kind {
            TimeoutKind::Request => "request timeout",
            TimeoutKind::PerTry => "per-try timeout",
        }
    }

    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture {
        let response = next.call(request);
        let deadline = Instant::now() + self.after;
        let this = self.clone();
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, response).await {
                Ok(Ok(response)) if this.kind == TimeoutKind::Request => Ok(response.map(|body| {
                    boxed(DeadlineBody {
                        inner: body,
                        expiry: Box::pin(tokio::time::sleep_until(deadline)),
                        deadline: Some(this),
                    })
                })),
                Ok(result) => result,
                Err(_) => Err(this.expired()),
            }
        })
    }
}

impl Deadline {
    fn expired(&self) -> ProxyError {
        self.timeouts.inc();
        ProxyError::Timeout {
            kind: self.kind,
            after: self.after,
        }
    }
}

pin_project_lite::pin_project! {
    // A response body that fails when the deadline passes before it ends.
    struct DeadlineBody {
        #[pin]
        inner: Body,
        expiry: Pin<Box<Sleep>>,
        // Taken when it passes: the body fails once.
        deadline: Option<Deadline>,
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(deadline) = this.deadline
            && this.expiry.as_mut().poll(cx).is_ready()
        {
            let error = deadline.expired();
            *this.deadline = None;
            return Poll::Ready(Some(Err(Box::new(error))));
        }
        if this.deadline.is_none() {
            return Poll::Ready(None);
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.deadline.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
