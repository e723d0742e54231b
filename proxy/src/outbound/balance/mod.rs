//! Load balancing: sends each request to one endpoint of a destination (or of one subset of it),
//! picked by the destination's algorithm (`picker`), skipping ejected endpoints (`outlier`) and
//! those the request already tried.

pub mod outlier;
mod picker;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body::Frame;

use crate::client::{Endpoint, Outcome};
use crate::ctx::Tried;
use crate::http::body::{Body, BoxError, FrameWatcher, watched};
use crate::http::error::ProxyError;
use crate::outbound::stack::{Leaf, ResponseFuture};
use outlier::OutlierDetector;
pub use picker::Balancer;

/// The balancing layer: sends each request to the endpoint the balancer picks, skipping ejected
/// endpoints and those this request already tried, and tells outlier detection how it went.
#[derive(Clone)]
pub struct Balance {
    destination: Arc<str>,
    balancer: Arc<Balancer>,
    outlier: Option<Arc<OutlierDetector>>,
}

impl Balance {
    pub fn new(
        destination: Arc<str>,
        balancer: Arc<Balancer>,
        outlier: Option<Arc<OutlierDetector>>,
    ) -> Self {
        Self {
            destination,
            balancer,
            outlier,
        }
    }

    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    fn is_available(&self, endpoint: &Endpoint) -> bool {
        self.outlier
            .as_ref()
            .is_none_or(|o| o.is_available(endpoint))
    }

    /// Some endpoint can take a request now (for failover between subsets).
    pub fn has_available(&self) -> bool {
        self.balancer
            .endpoints()
            .iter()
            .any(|e| self.is_available(e))
    }

    fn pick(&self, request: &Request<Body>, avoid: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        // Two requests may race for one probe; the loser picks again.
        for _ in 0..3 {
            let endpoint = self
                .balancer
                .pick(request.headers(), avoid, |e| self.is_available(e))?;
            if self.outlier.as_ref().is_none_or(|o| o.claim(&endpoint)) {
                return Some(endpoint);
            }
        }
        None
    }
}

impl Leaf for Balance {
    fn name(&self) -> &'static str {
        "balance"
    }

    fn call(&self, request: Request<Body>) -> ResponseFuture {
        let tried = request.extensions().get::<Tried>().cloned();
        let avoid = tried.as_ref().map(Tried::addrs).unwrap_or_default();
        let Some(endpoint) = self.pick(&request, &avoid) else {
            let error = ProxyError::NoEndpoints(self.destination.to_string());
            return Box::pin(async { Err(error) });
        };
        if let Some(tried) = tried {
            tried.push(endpoint.addr);
        }
        let report = self.outlier.clone().map(|detector| Report {
            detector,
            epoch: endpoint.health.epoch(),
            endpoint: endpoint.clone(),
            outcome: Outcome::GatewayError,
        });
        Box::pin(async move {
            let result = endpoint.send(request).await;
            let Some(mut report) = report else {
                return result;
            };
            let response = match result {
                Ok(response) => response,
                // Reported as it drops: no answer is a gateway error.
                Err(error) => return Err(error),
            };
            report.outcome = match response.headers().get(GRPC_STATUS) {
                // A trailers-only answer.
                Some(code) => Outcome::of_grpc_status(code.as_bytes()),
                None => Outcome::of_status(response.status()),
            };
            // gRPC says how a call went in its trailers: the report waits for the body's end.
            Ok(response.map(|body| watched(body, report)))
        })
    }
}

const GRPC_STATUS: &str = "grpc-status";

/// Tells outlier detection how a request went when it is over, including when it is abandoned
/// (a per-try timeout drops it): an attempt that never answered counts as a gateway error.
struct Report {
    detector: Arc<OutlierDetector>,
    endpoint: Arc<Endpoint>,
    /// The endpoint's health epoch when the request was sent.
    epoch: u64,
    outcome: Outcome,
}

impl Drop for Report {
    fn drop(&mut self) {
        self.detector
            .observe(&self.endpoint, self.outcome, self.epoch);
    }
}

/// The gRPC status in a response's trailers, if it has one, decides the report.
impl FrameWatcher for Report {
    fn frame(&mut self, frame: &Result<Frame<Bytes>, BoxError>) {
        if let Ok(frame) = frame
            && let Some(code) = frame.trailers_ref().and_then(|t| t.get(GRPC_STATUS))
        {
            self.outcome = Outcome::of_grpc_status(code.as_bytes());
        }
    }
}
