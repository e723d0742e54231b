//! Fault injection, for chaos tests and demos: delay some requests, fail some outright.

use http::{Request, StatusCode};
use rand::Rng;
use tower::Service as _;

use crate::http::body::{Body, proxy_error};
use crate::outbound::stack::{ResponseFuture, Stack, Step};
use crate::policy::FaultConfig;

/// Marks responses the proxy failed on purpose.
pub const FAULT_HEADER: &str = "outrigger-fault";

#[derive(Clone)]
pub struct Faults {
    pub config: FaultConfig,
}

fn chance(percent: f64) -> bool {
    percent > 0.0 && rand::rng().random_range(0.0..100.0) < percent
}

impl Step for Faults {
    fn name(&self) -> &'static str {
        "fault injection"
    }

    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture {
        // As in Istio, a request may be both delayed and then aborted.
        let delay = chance(self.config.delay_percent).then_some(self.config.delay);
        let abort = chance(self.config.abort_percent).then_some(self.config.abort_status);
        let mut next = next.clone();
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
            next.call(request).await
        })
    }
}
