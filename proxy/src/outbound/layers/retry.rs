//! Retries: which failures are retried (`retryOn`, as in Istio), how often (`attempts`, within a
//! budget), when (exponential backoff with full jitter), where (another endpoint when there is
//! one) and which requests may be (idempotent methods, replayable bodies).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rand::Rng;
use tower::Service as _;

use crate::http::body::{Body, boxed};
use crate::http::error::ProxyError;
use crate::http::headers::is_upgrade;
use crate::metrics::{DstLabels, RetryLabels};
use crate::outbound::layers::replay::ReplayBody;
use crate::outbound::stack::{ResponseFuture, Stack, Step};
use crate::policy::{RetryOn, RetryPolicy};

/// Endpoints a request has been sent to; the balancer avoids them for its retries.
#[derive(Clone, Default)]
pub struct Tried(Arc<Mutex<Vec<SocketAddr>>>);

impl Tried {
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.0.lock().expect("tried lock").clone()
    }

    pub fn push(&self, addr: SocketAddr) {
        self.0.lock().expect("tried lock").push(addr);
    }
}

/// Caps retries at `percent` of the requests of the last `WINDOW`, plus `min_per_second`.
#[derive(Debug)]
pub struct Budget {
    percent: u32,
    min_per_second: u32,
    /// (second since start, requests, retries), oldest first.
    seconds: Mutex<VecDeque<(u64, u64, u64)>>,
    start: Instant,
}

const WINDOW_SECONDS: u64 = 10;

impl Budget {
    pub fn new(percent: u32, min_per_second: u32) -> Self {
        Self {
            percent,
            min_per_second,
            seconds: Mutex::default(),
            start: Instant::now(),
        }
    }

    fn current<'a>(&self, seconds: &'a mut VecDeque<(u64, u64, u64)>) -> &'a mut (u64, u64, u64) {
        let now = self.start.elapsed().as_secs();
        while seconds
            .front()
            .is_some_and(|(s, _, _)| *s + WINDOW_SECONDS <= now)
        {
            seconds.pop_front();
        }
        if seconds.back().is_none_or(|(s, _, _)| *s != now) {
            seconds.push_back((now, 0, 0));
        }
        seconds.back_mut().expect("just pushed")
    }

    pub fn record_request(&self) {
        let mut seconds = self.seconds.lock().expect("budget lock");
        self.current(&mut seconds).1 += 1;
    }

    /// Takes one retry from the budget, if it has one.
    pub fn try_retry(&self) -> bool {
        let mut seconds = self.seconds.lock().expect("budget lock");
        self.current(&mut seconds);
        let (requests, retries) = seconds
            .iter()
            .fold((0, 0), |(q, r), (_, sq, sr)| (q + sq, r + sr));
        let allowed = requests * u64::from(self.percent) / 100
            + u64::from(self.min_per_second) * WINDOW_SECONDS;
        if retries >= allowed {
            return false;
        }
        self.current(&mut seconds).2 += 1;
        true
    }
}

/// Without a retry policy only connect failures are retried, once: nothing reached the server.
fn connect_failure_once() -> RetryPolicy {
    RetryPolicy {
        attempts: 1,
        per_try_timeout: None,
        retry_on: RetryOn {
            connect_failure: true,
            ..RetryOn::default()
        },
        retriable_status_codes: Vec::new(),
        backoff_base: Duration::ZERO,
        backoff_max: Duration::ZERO,
        budget_percent: 100,
        budget_min_per_second: 0,
        retry_non_idempotent: false,
    }
}

#[derive(Clone)]
pub struct Retry {
    policy: Arc<RetryPolicy>,
    /// `None` for the connect-failure default, which needs no budget.
    budget: Option<Arc<Budget>>,
    labels: DstLabels,
    retries: Family<RetryLabels, Counter>,
    exhausted: Counter,
}

impl Retry {
    /// Retries by `policy`, or only connect failures when there is none.
    pub fn new(
        policy: Option<RetryPolicy>,
        labels: DstLabels,
        retries: Family<RetryLabels, Counter>,
        exhausted: Counter,
    ) -> Self {
        let budget = policy
            .as_ref()
            .map(|p| Arc::new(Budget::new(p.budget_percent, p.budget_min_per_second)));
        Self {
            policy: Arc::new(policy.unwrap_or_else(connect_failure_once)),
            budget,
            labels,
            retries,
            exhausted,
        }
    }
}

/// Why a result may be retried (the `reason` label), or `None`.
fn retry_reason(
    policy: &RetryPolicy,
    grpc: bool,
    result: &Result<Response<Body>, ProxyError>,
) -> Option<&'static str> {
    let on = policy.retry_on;
    match result {
        Err(ProxyError::Connect { .. }) => {
            (on.connect_failure || on.server_error || on.gateway_error).then_some("connect-failure")
        }
        Err(ProxyError::Upstream { .. }) => (on.reset || on.server_error).then_some("reset"),
        Err(ProxyError::Timeout { .. }) => {
            (on.server_error || on.gateway_error).then_some("per-try-timeout")
        }
        Err(ProxyError::NoEndpoints(_) | ProxyError::Overflow(_)) => None,
        // gRPC reports failure in grpc-status; UNAVAILABLE (14) is the one safe to retry.
        Ok(response) if grpc => (response
            .headers()
            .get("grpc-status")
            .is_some_and(|s| s == "14")
            && (on.server_error || on.gateway_error || on.reset))
            .then_some("unavailable"),
        Ok(response) => {
            let status = response.status().as_u16();
            if on.retriable_status_codes && policy.retriable_status_codes.contains(&status) {
                Some("retriable-status-code")
            } else if on.gateway_error && (502..=504).contains(&status) {
                Some("gateway-error")
            } else if on.server_error && status >= 500 {
                Some("5xx")
            } else {
                None
            }
        }
    }
}

/// Full jitter: anywhere between zero and the exponential step, so retries spread out.
fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let step = policy
        .backoff_base
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(policy.backoff_max);
    if step.is_zero() {
        return step;
    }
    rand::rng().random_range(Duration::ZERO..=step)
}

fn same_request(
    method: &Method,
    uri: &http::Uri,
    version: http::Version,
    headers: &http::HeaderMap,
    body: Body,
) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.version_mut() = version;
    *request.headers_mut() = headers.clone();
    request
}

impl Step for Retry {
    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture {
        // An upgraded connection cannot be replayed.
        if is_upgrade(request.headers()) {
            return next.call(request);
        }
        if let Some(budget) = &self.budget {
            budget.record_request();
        }
        let this = self.clone();
        let next = next.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = ReplayBody::new(body);
            let grpc = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let idempotent = !matches!(parts.method, Method::POST | Method::PATCH);
            let tried = Tried::default();
            let mut retries = 0;
            loop {
                let mut attempt = same_request(
                    &parts.method,
                    &parts.uri,
                    parts.version,
                    &parts.headers,
                    boxed(body.replay()),
                );
                attempt.extensions_mut().insert(tried.clone());
                let result = next.clone().call(attempt).await;
                let Some(reason) = retry_reason(&this.policy, grpc, &result) else {
                    return result;
                };
                // Nothing reached the server on a connect failure, and a gRPC server answering
                // UNAVAILABLE did not process the call (every gRPC call is a POST): safe for every
                // method.
                let unprocessed = matches!(reason, "connect-failure" | "unavailable");
                let method_allows = idempotent || this.policy.retry_non_idempotent || unprocessed;
                if retries >= this.policy.attempts || !method_allows || !body.is_replayable() {
                    return result;
                }
                if let Some(budget) = &this.budget
                    && !budget.try_retry()
                {
                    this.exhausted.inc();
                    return result;
                }
                retries += 1;
                this.retries
                    .get_or_create(&RetryLabels {
                        dst: this.labels.clone(),
                        reason,
                    })
                    .inc();
                drop(result);
                tokio::time::sleep(backoff(&this.policy, retries)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            per_try_timeout: None,
            retry_on: RetryOn {
                gateway_error: true,
                retriable_status_codes: true,
                ..RetryOn::default()
            },
            retriable_status_codes: vec![409],
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            budget_percent: 20,
            budget_min_per_second: 0,
            retry_non_idempotent: false,
        }
    }

    fn status(code: u16) -> Result<Response<Body>, ProxyError> {
        let mut response = Response::new(crate::http::body::full(""));
        *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
        Ok(response)
    }

    #[test]
    fn retry_on_conditions_follow_istio() {
        let p = policy();
        assert_eq!(retry_reason(&p, false, &status(503)), Some("gateway-error"));
        assert_eq!(
            retry_reason(&p, false, &status(500)),
            None,
            "500 is not a gateway error"
        );
        assert_eq!(
            retry_reason(&p, false, &status(409)),
            Some("retriable-status-code")
        );
        assert_eq!(retry_reason(&p, false, &status(200)), None);
        let five_xx = RetryPolicy {
            retry_on: RetryOn {
                server_error: true,
                ..RetryOn::default()
            },
            ..policy()
        };
        assert_eq!(retry_reason(&five_xx, false, &status(500)), Some("5xx"));
        assert_eq!(retry_reason(&five_xx, false, &status(404)), None);
        let timeout = Err(ProxyError::Timeout {
            kind: crate::metrics::TimeoutKind::PerTry,
            after: Duration::ZERO,
        });
        assert_eq!(
            retry_reason(&five_xx, false, &timeout),
            Some("per-try-timeout")
        );
        assert_eq!(
            retry_reason(&connect_failure_once(), false, &status(503)),
            None
        );
    }

    #[test]
    fn grpc_is_retried_on_unavailable_only() {
        let p = policy();
        let mut unavailable = status(200);
        unavailable
            .as_mut()
            .unwrap()
            .headers_mut()
            .insert("grpc-status", "14".parse().unwrap());
        assert_eq!(retry_reason(&p, true, &unavailable), Some("unavailable"));
        let mut internal = status(200);
        internal
            .as_mut()
            .unwrap()
            .headers_mut()
            .insert("grpc-status", "13".parse().unwrap());
        assert_eq!(retry_reason(&p, true, &internal), None);
    }

    #[test]
    fn backoff_grows_exponentially_within_bounds() {
        let p = policy();
        for retry in 1..10 {
            let cap = (p.backoff_base * (1 << (retry - 1))).min(p.backoff_max);
            for _ in 0..50 {
                assert!(backoff(&p, retry) <= cap);
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| backoff(&p, 3)).collect();
        assert!(spread.len() > 10, "full jitter spreads retries");
    }

    #[test]
    fn the_budget_allows_a_share_of_recent_requests_plus_a_floor() {
        let budget = Budget::new(20, 0);
        for _ in 0..50 {
            budget.record_request();
        }
        let allowed = (0..50).filter(|_| budget.try_retry()).count();
        assert_eq!(allowed, 10);
        let floor = Budget::new(0, 1);
        assert_eq!(
            (0..50).filter(|_| floor.try_retry()).count(),
            WINDOW_SECONDS as usize
        );
    }
}
