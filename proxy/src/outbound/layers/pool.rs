//! Connection pool limits (`connectionPool`): at most `maxConnections` connections to the
//! destination, at most `maxPendingRequests` requests waiting for one; past that a request fails
//! at once with 503 instead of queueing without bound.

use std::sync::Arc;

use http::Request;
use tokio::sync::Semaphore;
use tower::Service as _;

use crate::http::body::Body;
use crate::http::error::ProxyError;
use crate::outbound::stack::{ResponseFuture, Stack, Step};
use crate::policy::PoolLimits;

/// Semaphores for one destination's limits, shared by all its endpoints and routes.
#[derive(Clone, Default)]
pub struct Pool {
    /// Open connections; a connect waits for a permit.
    pub connections: Option<Arc<Semaphore>>,
    /// Requests in flight (on a connection or waiting for one); past it, fail fast.
    pub requests: Option<Arc<Semaphore>>,
}

impl Pool {
    pub fn new(limits: PoolLimits) -> Self {
        let requests = match (limits.max_connections, limits.max_pending_requests) {
            // One request per HTTP/1 connection, plus the queue.
            (Some(connections), Some(pending)) => Some(connections as usize + pending as usize),
            // No connection limit: nothing ever waits for one.
            (None, _) => None,
            // Unset limits are unlimited (SPEC.md): an unbounded queue.
            (Some(_), None) => None,
        };
        Self {
            connections: limits
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            requests: requests.map(|n| Arc::new(Semaphore::new(n))),
        }
    }
}

/// Fails a request at once when the destination's request limit is reached.
#[derive(Clone)]
pub struct PoolLimit {
    pub requests: Arc<Semaphore>,
}

impl Step for PoolLimit {
    fn name(&self) -> &'static str {
        "pool limit"
    }

    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture {
        let Ok(permit) = self.requests.clone().try_acquire_owned() else {
            return Box::pin(async {
                Err(ProxyError::Overflow(
                    "connection pool overflow: maxConnections and maxPendingRequests are all in use",
                ))
            });
        };
        let response = next.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(permit);
            response
        })
    }
}
