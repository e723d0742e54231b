//! Retries: which failures are retried (`retryOn`, as in Istio), how often (`attempts`, within a
//! budget), when (exponential backoff with full jitter), where (another endpoint when there is
//! one) and which requests may be (idempotent methods, replayable bodies).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use tokio::time::Instant;
use tower::Service as _;

use crate::ctx::Tried;
use crate::http::body::{Body, boxed};
use crate::http::error::ProxyError;
use crate::http::grpc::is_grpc;
use crate::http::headers::is_upgrade;
use crate::metrics::{RequestLabels, RetryLabels, RetryReason, ServiceFamily};
use crate::outbound::layers::replay::ReplayBody;
use crate::outbound::stack::{ResponseFuture, Stack, Step};
use crate::policy::RetryPolicy;

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
    /// Whether this budget is kept by `policy` (so a new version can carry it on).
    pub fn is_of(&self, policy: &RetryPolicy) -> bool {
        (self.percent, self.min_per_second) == (policy.budget_percent, policy.budget_min_per_second)
    }

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

/// What is retried.
enum Mode {
    /// No retry policy: a request whose connection could not be established is retried once on
    /// another endpoint (nothing reached the server, so it is safe for every method).
    ConnectFailureOnce,
    Policy {
        policy: RetryPolicy,
        budget: Arc<Budget>,
    },
}

#[derive(Clone)]
pub struct Retry {
    mode: Arc<Mode>,
    labels: RequestLabels,
    retries: ServiceFamily<RetryLabels, Counter>,
    exhausted: Counter,
}

impl Retry {
    /// Retries by `policy`, or only connect failures when there is none. A policy keeps its
    /// budget in `budget` (the previous version's, when its settings are the same).
    pub fn new(
        policy: Option<RetryPolicy>,
        budget: impl FnOnce(&RetryPolicy) -> Arc<Budget>,
        labels: RequestLabels,
        retries: ServiceFamily<RetryLabels, Counter>,
        exhausted: Counter,
    ) -> Self {
        let mode = match policy {
            None => Mode::ConnectFailureOnce,
            Some(policy) => Mode::Policy {
                budget: budget(&policy),
                policy,
            },
        };
        Self {
            mode: Arc::new(mode),
            labels,
            retries,
            exhausted,
        }
    }

    /// The budget retries are taken from, if any.
    pub fn budget(&self) -> Option<&Arc<Budget>> {
        match &*self.mode {
            Mode::ConnectFailureOnce => None,
            Mode::Policy { budget, .. } => Some(budget),
        }
    }
}

impl Mode {
    fn allows_non_idempotent(&self) -> bool {
        match self {
            Mode::ConnectFailureOnce => false,
            Mode::Policy { policy, .. } => policy.retry_non_idempotent,
        }
    }

    /// How long to wait before retry number `retry`: at once without a policy.
    fn backoff(&self, retry: u32) -> Duration {
        match self {
            Mode::ConnectFailureOnce => Duration::ZERO,
            Mode::Policy { policy, .. } => backoff(policy, retry),
        }
    }

    fn attempts(&self) -> u32 {
        match self {
            Mode::ConnectFailureOnce => 1,
            Mode::Policy { policy, .. } => policy.attempts,
        }
    }

    /// Why a result may be retried, or `None`.
    fn reason(
        &self,
        grpc: bool,
        result: &Result<Response<Body>, ProxyError>,
    ) -> Option<RetryReason> {
        match self {
            Mode::ConnectFailureOnce => matches!(result, Err(ProxyError::Connect { .. }))
                .then_some(RetryReason::ConnectFailure),
            Mode::Policy { policy, .. } => retry_reason(policy, grpc, result),
        }
    }
}

/// Why a result may be retried under `policy`, or `None`.
fn retry_reason(
    policy: &RetryPolicy,
    grpc: bool,
    result: &Result<Response<Body>, ProxyError>,
) -> Option<RetryReason> {
    let on = policy.retry_on;
    match result {
        Err(ProxyError::Connect { .. }) => {
            (on.connect_failure || on.server_error || on.gateway_error)
                .then_some(RetryReason::ConnectFailure)
        }
        Err(ProxyError::Upstream { .. }) => {
            (on.reset || on.server_error).then_some(RetryReason::Reset)
        }
        Err(ProxyError::Timeout { .. }) => {
            (on.server_error || on.gateway_error).then_some(RetryReason::PerTryTimeout)
        }
        Err(ProxyError::NoEndpoints(_) | ProxyError::Overflow(_)) => None,
        // gRPC reports failure in grpc-status; UNAVAILABLE (14) is the one safe to retry.
        Ok(response) if grpc => (response
            .headers()
            .get("grpc-status")
            .is_some_and(|s| s == "14")
            && (on.server_error || on.gateway_error || on.reset))
            .then_some(RetryReason::Unavailable),
        Ok(response) => {
            let status = response.status().as_u16();
            if on.retriable_status_codes && policy.retriable_status_codes.contains(&status) {
                Some(RetryReason::RetriableStatusCode)
            } else if on.gateway_error && (502..=504).contains(&status) {
                Some(RetryReason::GatewayError)
            } else if on.server_error && status >= 500 {
                Some(RetryReason::ServerError)
            } else {
                None
            }
        }
    }
}

/// Whether nothing of the request reached the server, so that sending it again is safe whatever
/// its method: the connection failed, or the server refused the stream before processing it
/// (HTTP/2 REFUSED_STREAM, which a GOAWAY also gives the streams it excludes). A gRPC UNAVAILABLE
/// is an answer: the call may have been processed.
fn reached_no_server(result: &Result<Response<Body>, ProxyError>) -> bool {
    match result {
        Err(ProxyError::Connect { .. }) => true,
        Err(error @ ProxyError::Upstream { .. }) => error.is_refused_stream(),
        _ => false,
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
    fn name(&self) -> &'static str {
        "retry"
    }

    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture {
        // An upgraded connection cannot be replayed.
        if is_upgrade(request.headers()) {
            return next.call(request);
        }
        if let Mode::Policy { budget, .. } = &*self.mode {
            budget.record_request();
        }
        let this = self.clone();
        let next = next.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = ReplayBody::new(body);
            let grpc = is_grpc(&parts.headers);
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
                let Some(reason) = this.mode.reason(grpc, &result) else {
                    return result;
                };
                let method_allows =
                    idempotent || reached_no_server(&result) || this.mode.allows_non_idempotent();
                if retries >= this.mode.attempts() || !method_allows || !body.is_replayable() {
                    return result;
                }
                if let Mode::Policy { budget, .. } = &*this.mode
                    && !budget.try_retry()
                {
                    this.exhausted.inc();
                    return result;
                }
                retries += 1;
                let labels = RetryLabels {
                    dst: this.labels.clone(),
                    reason,
                };
                this.retries.with(&labels, |counter| counter.inc());
                drop(result);
                tokio::time::sleep(this.mode.backoff(retries)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RetryOn;

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
        assert_eq!(
            retry_reason(&p, false, &status(503)),
            Some(RetryReason::GatewayError)
        );
        assert_eq!(
            retry_reason(&p, false, &status(500)),
            None,
            "500 is not a gateway error"
        );
        assert_eq!(
            retry_reason(&p, false, &status(409)),
            Some(RetryReason::RetriableStatusCode)
        );
        assert_eq!(retry_reason(&p, false, &status(200)), None);
        let five_xx = RetryPolicy {
            retry_on: RetryOn {
                server_error: true,
                ..RetryOn::default()
            },
            ..policy()
        };
        assert_eq!(
            retry_reason(&five_xx, false, &status(500)),
            Some(RetryReason::ServerError)
        );
        assert_eq!(retry_reason(&five_xx, false, &status(404)), None);
        let timeout = Err(ProxyError::Timeout {
            kind: crate::metrics::TimeoutKind::PerTry,
            after: Duration::ZERO,
        });
        assert_eq!(
            retry_reason(&five_xx, false, &timeout),
            Some(RetryReason::PerTryTimeout)
        );
        let connect_failure_once = Mode::ConnectFailureOnce;
        assert_eq!(connect_failure_once.reason(false, &status(503)), None);
        assert_eq!(connect_failure_once.reason(false, &timeout), None);
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
        assert_eq!(
            retry_reason(&p, true, &unavailable),
            Some(RetryReason::Unavailable)
        );
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
