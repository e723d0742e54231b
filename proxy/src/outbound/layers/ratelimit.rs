//! Local rate limit: a token bucket per destination; past it, 429 with `Retry-After`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tower::Service as _;

use crate::http::body::{Body, proxy_error};
use crate::outbound::stack::{ResponseFuture, Stack, Step};
use crate::policy::RateLimitConfig;

#[derive(Debug)]
pub struct TokenBucket {
    /// The settings it was made with, so that a new version with the same can carry it on.
    pub config: RateLimitConfig,
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(config: RateLimitConfig) -> Self {
        let burst = f64::from(config.burst.max(1));
        Self {
            config,
            rate: f64::from(config.requests_per_second),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().expect("bucket lock");
        let now = Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

#[derive(Clone)]
pub struct RateLimit {
    pub bucket: Arc<TokenBucket>,
    /// `outrigger_rate_limited_total` for the destination.
    pub limited: Counter,
}

impl Step for RateLimit {
    fn name(&self) -> &'static str {
        "rate limit"
    }

    fn call(&self, next: &mut Stack, request: Request<Body>) -> ResponseFuture {
        match self.bucket.take() {
            Ok(()) => next.call(request),
            Err(wait) => {
                self.limited.inc();
                let mut response =
                    proxy_error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
                // Whole seconds, rounded up: a client that waits this long finds a token.
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, seconds.max(1).into());
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let bucket = TokenBucket::new(RateLimitConfig {
            requests_per_second: 10,
            burst: 3,
        });
        for _ in 0..3 {
            assert_eq!(bucket.take(), Ok(()));
        }
        let waits = |expected_ms: f64| {
            let wait = bucket.take().unwrap_err();
            assert!(
                (wait.as_secs_f64() * 1000.0 - expected_ms).abs() < 0.001,
                "{wait:?}"
            );
        };
        // Time stands still: a token is 100 ms away, then 60 ms once 40 ms have passed.
        waits(100.0);
        tokio::time::advance(Duration::from_millis(40)).await;
        waits(60.0);
        tokio::time::advance(Duration::from_millis(61)).await;
        assert_eq!(bucket.take(), Ok(()));
        // Idle for long: no more than the burst piles up.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert_eq!(bucket.take(), Ok(()));
        }
        assert!(bucket.take().is_err());
    }
}
