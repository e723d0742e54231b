//! Deadlines: the whole request (`timeout`, retries included) or one attempt (`perTryTimeout`).

use std::time::Duration;

use http::Request;
use prometheus_client::metrics::counter::Counter;
use tower::Service as _;

use crate::body::Body;
use crate::error::ProxyError;
use crate::metrics::TimeoutKind;
use crate::stack::{ResponseFuture, Stack, Step};

#[derive(Clone)]
pub struct Deadline {
    pub after: Duration,
    pub kind: TimeoutKind,
    /// `outrigger_timeouts_total` for this route and kind.
    pub timeouts: Counter,
}

impl Step for Deadline {
    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture {
        let response = next.call(request);
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
