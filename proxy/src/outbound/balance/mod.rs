//! Load balancing: sends each request to one endpoint of a destination (or of one subset of it),
//! picked by the destination's algorithm (`picker`), skipping ejected endpoints (`outlier`) and
//! those the request already tried.

pub mod outlier;
mod picker;

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;

use crate::client::{Endpoint, Outcome};
use crate::ctx::Tried;
use crate::http::body::Body;
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
            endpoint: endpoint.clone(),
            outcome: Outcome::GatewayError,
        });
        Box::pin(async move {
            let result = endpoint.send(request).await;
            // Reported as it drops, at the end of this block.
            if let Some(mut report) = report {
                report.outcome = match &result {
                    Ok(response) => Outcome::of_status(response.status()),
                    Err(_) => Outcome::GatewayError,
                };
            }
            result
        })
    }
}

/// Tells outlier detection how a request went when it is over, including when it is abandoned
/// (a per-try timeout drops it): an attempt that never answered counts as a gateway error.
struct Report {
    detector: Arc<OutlierDetector>,
    endpoint: Arc<Endpoint>,
    outcome: Outcome,
}

impl Drop for Report {
    fn drop(&mut self) {
        self.detector.observe(&self.endpoint, self.outcome);
    }
}
