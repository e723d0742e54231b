//! Outlier detection: a passive, per-endpoint circuit breaker.
//!
//! Consecutive server errors eject an endpoint for `base * n` (n = times ejected, capped at the
//! maximum). When that time is up the endpoint is on probation: exactly one request probes it;
//! success restores it, failure ejects it again for longer. Never more than `max_ejection_percent`
//! of the endpoints are out, and at least one always stays in rotation. Each endpoint's state is
//! its `client::Health`; this is the destination-wide policy over them.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::client::{Claim, Endpoint, Outcome, Recorded, Thresholds};
use crate::metrics::{EndpointLabels, EndpointState, Metrics, ServiceLabels};
use crate::policy::OutlierConfig;

/// Outlier detection over one destination's endpoints.
pub struct OutlierDetector {
    config: OutlierConfig,
    endpoints: Vec<Arc<Endpoint>>,
    labels: ServiceLabels,
    metrics: Metrics,
    /// Serialises ejection decisions, so two concurrent failures cannot both take the last slot.
    ejecting: Mutex<()>,
}

impl OutlierDetector {
    pub fn new(
        config: OutlierConfig,
        endpoints: Vec<Arc<Endpoint>>,
        labels: ServiceLabels,
        metrics: Metrics,
    ) -> Arc<Self> {
        let detector = Arc::new(Self {
            config,
            endpoints,
            labels,
            metrics,
            ejecting: Mutex::new(()),
        });
        detector.refresh_gauges();
        detector
    }

    /// May this endpoint be picked now: healthy, or due for its probe.
    pub fn is_available(&self, endpoint: &Endpoint) -> bool {
        endpoint.health.is_available(Instant::now())
    }

    /// Called for the endpoint actually picked: if it was due for its probe, this request is the
    /// probe, and no other may be. False when another request took the probe first.
    pub fn claim(&self, endpoint: &Endpoint) -> bool {
        match endpoint.health.claim(Instant::now()) {
            Claim::Healthy => true,
            Claim::Probe => {
                self.refresh_gauges();
                true
            }
            // The balancer only offers an unavailable endpoint when nothing else is left: serve
            // rather than fail.
            Claim::Unavailable => !self.any_available(),
        }
    }

    fn any_available(&self) -> bool {
        self.endpoints.iter().any(|e| self.is_available(e))
    }

    /// Takes the outcome of a request sent in the endpoint's health `epoch`.
    pub fn observe(self: &Arc<Self>, endpoint: &Endpoint, outcome: Outcome, epoch: u64) {
        let thresholds = Thresholds {
            consecutive_5xx: self.config.consecutive_5xx,
            consecutive_gateway_errors: self.config.consecutive_gateway_errors,
        };
        match endpoint.health.record(outcome, epoch, thresholds) {
            Recorded::Nothing => {}
            Recorded::Restored => self.refresh_gauges(),
            Recorded::Eject => self.eject(endpoint),
        }
    }

    fn eject(self: &Arc<Self>, endpoint: &Endpoint) {
        let _deciding = self.ejecting.lock().expect("ejection lock");
        // A failed probe goes back out whatever the quota: it was counted as out already.
        if !endpoint.health.is_probing() && self.out_of_rotation() >= self.max_ejected() {
            return;
        }
        let until = endpoint
            .health
            .eject(Instant::now(), self.config.interval, |n| {
                ejection_time(&self.config, n)
            });
        tracing::info!(endpoint = %endpoint.addr, ?until, "outlier ejected");
        self.metrics
            .outlier_ejections
            .with(&self.labels, |metric| metric.inc());
        self.refresh_gauges();
        // Probation starts by itself when the time is up: show it in the gauges then.
        let detector: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            if let Some(detector) = detector.upgrade() {
                detector.refresh_gauges();
            }
        });
    }

    fn out_of_rotation(&self) -> usize {
        let now = Instant::now();
        self.endpoints
            .iter()
            .filter(|e| e.health.state(now) != EndpointState::Healthy)
            .count()
    }

    /// The share allowed out, rounded down, but at least one when that leaves one in rotation
    /// (none when the share is 0%).
    fn max_ejected(&self) -> usize {
        if self.config.max_ejection_percent == 0 {
            return 0;
        }
        let n = self.endpoints.len();
        let by_percent = n * self.config.max_ejection_percent as usize / 100;
        by_percent.max(1).min(n.saturating_sub(1))
    }

    fn refresh_gauges(&self) {
        let now = Instant::now();
        for state in [
            EndpointState::Healthy,
            EndpointState::Ejected,
            EndpointState::Probation,
        ] {
            let count = self
                .endpoints
                .iter()
                .filter(|e| e.health.state(now) == state)
                .count();
            let labels = EndpointLabels {
                dst: self.labels.clone(),
                state,
            };
            self.metrics
                .endpoints
                .with(&labels, |gauge| gauge.set(count as i64));
        }
    }
}

/// How long an endpoint stays out after its `n`th ejection.
fn ejection_time(config: &OutlierConfig, n: u32) -> Duration {
    config
        .base_ejection_time
        .saturating_mul(n)
        .min(config.max_ejection_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 3,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_millis(40),
            max_ejection_time: Duration::from_millis(100),
            max_ejection_percent: 50,
        }
    }

    fn detector(n: u16, config: OutlierConfig) -> Arc<OutlierDetector> {
        let endpoints = (0..n)
            .map(|i| crate::client::test_endpoint(2000 + i, &[]))
            .collect();
        let labels = ServiceLabels {
            dst_namespace: Arc::new("ns".into()),
            dst_service: Arc::new("svc".into()),
        };
        OutlierDetector::new(config, endpoints, labels, Metrics::new())
    }

    /// A response to a request sent just now.
    fn seen(d: &Arc<OutlierDetector>, e: &Endpoint, outcome: Outcome) {
        d.observe(e, outcome, e.health.epoch());
    }

    fn state(d: &OutlierDetector, i: usize) -> EndpointState {
        d.endpoints[i].health.state(Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_and_a_success_in_between_resets_the_count() {
        let d = detector(4, config());
        let e = d.endpoints[0].clone();
        seen(&d, &e, Outcome::ServerError);
        seen(&d, &e, Outcome::ServerError);
        seen(&d, &e, Outcome::Success);
        seen(&d, &e, Outcome::ServerError);
        seen(&d, &e, Outcome::GatewayError);
        assert_eq!(state(&d, 0), EndpointState::Healthy);
        seen(&d, &e, Outcome::ServerError);
        assert_eq!(state(&d, 0), EndpointState::Ejected);
        assert!(!d.is_available(&e));
    }

    #[tokio::test(start_paused = true)]
    async fn probation_admits_exactly_one_probe_then_restores_or_ejects_for_longer() {
        let d = detector(4, config());
        let e = d.endpoints[0].clone();
        for _ in 0..3 {
            seen(&d, &e, Outcome::ServerError);
        }
        tokio::time::sleep(ejection_time(&config(), 1)).await;
        assert_eq!(state(&d, 0), EndpointState::Probation);
        assert!(d.is_available(&e));
        assert!(d.claim(&e), "the first request is the probe");
        assert!(!d.is_available(&e), "a second request while probing");
        seen(&d, &e, Outcome::ServerError);
        assert_eq!(
            state(&d, 0),
            EndpointState::Ejected,
            "a failed probe ejects again"
        );

        // The second ejection lasts twice as long: still out after one base period.
        tokio::time::sleep(ejection_time(&config(), 1)).await;
        assert_eq!(state(&d, 0), EndpointState::Ejected);
        tokio::time::sleep(ejection_time(&config(), 1)).await;
        assert!(d.claim(&e));
        seen(&d, &e, Outcome::Success);
        assert_eq!(state(&d, 0), EndpointState::Healthy);
        assert!(d.is_available(&e));
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let c = config();
        assert_eq!(ejection_time(&c, 1), Duration::from_millis(40));
        assert_eq!(ejection_time(&c, 2), Duration::from_millis(80));
        assert_eq!(ejection_time(&c, 3), Duration::from_millis(100));
        let huge = OutlierConfig {
            base_ejection_time: Duration::MAX / 2,
            max_ejection_time: Duration::MAX,
            ..config()
        };
        assert_eq!(
            ejection_time(&huge, 4),
            Duration::MAX,
            "saturates, no overflow"
        );
    }

    /// Ejects `e` (healthy, with `config()`) and waits out the ejection: returns how long it was.
    async fn eject_and_wait(d: &Arc<OutlierDetector>, e: &Arc<Endpoint>) -> Duration {
        for _ in 0..3 {
            seen(d, e, Outcome::ServerError);
        }
        assert_eq!(e.health.state(Instant::now()), EndpointState::Ejected);
        let ejected = Instant::now();
        while !d.is_available(e) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(d.claim(e));
        seen(d, e, Outcome::Success);
        ejected.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn each_interval_spent_healthy_takes_one_off_the_next_ejections_length() {
        let c = OutlierConfig {
            max_ejection_time: Duration::from_secs(1),
            ..config()
        };
        let d = detector(4, c.clone());
        let e = d.endpoints[0].clone();
        assert_eq!(eject_and_wait(&d, &e).await, ejection_time(&c, 1));
        assert_eq!(eject_and_wait(&d, &e).await, ejection_time(&c, 2));
        assert_eq!(eject_and_wait(&d, &e).await, ejection_time(&c, 3));
        // Healthy for two intervals: the fourth ejection is counted as the second.
        tokio::time::sleep(c.interval * 2).await;
        assert_eq!(eject_and_wait(&d, &e).await, ejection_time(&c, 2));
        // Healthy long enough to be forgiven everything.
        tokio::time::sleep(c.interval * 10).await;
        assert_eq!(eject_and_wait(&d, &e).await, ejection_time(&c, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_to_a_request_sent_before_the_ejection_does_not_decide_the_probation() {
        let d = detector(4, config());
        let e = d.endpoints[0].clone();
        let sent_before = e.health.epoch();
        for _ in 0..3 {
            seen(&d, &e, Outcome::ServerError);
        }
        tokio::time::sleep(ejection_time(&config(), 1)).await;
        assert!(d.claim(&e), "the probe");
        // A slow request from before the ejection answers now: it is not the probe.
        d.observe(&e, Outcome::Success, sent_before);
        assert_eq!(state(&d, 0), EndpointState::Probation);
        seen(&d, &e, Outcome::ServerError);
        assert_eq!(
            state(&d, 0),
            EndpointState::Ejected,
            "the probe's answer decides"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_max_ejection_percent_of_zero_ejects_nothing() {
        let d = detector(
            4,
            OutlierConfig {
                max_ejection_percent: 0,
                ..config()
            },
        );
        let e = d.endpoints[0].clone();
        for _ in 0..10 {
            seen(&d, &e, Outcome::ServerError);
        }
        assert_eq!(state(&d, 0), EndpointState::Healthy);
    }

    #[test]
    fn grpc_statuses_count_as_http_would() {
        assert_eq!(Outcome::of_grpc_status(b"0"), Outcome::Success);
        assert_eq!(Outcome::of_grpc_status(b"5"), Outcome::Success, "NOT_FOUND");
        assert_eq!(Outcome::of_grpc_status(b"14"), Outcome::GatewayError);
        assert_eq!(Outcome::of_grpc_status(b"4"), Outcome::GatewayError);
        assert_eq!(Outcome::of_grpc_status(b"13"), Outcome::ServerError);
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_allowed_share_and_never_the_last_endpoint() {
        let d = detector(4, config());
        for e in d.endpoints.clone() {
            for _ in 0..3 {
                seen(&d, &e, Outcome::ServerError);
            }
        }
        assert_eq!(d.out_of_rotation(), 2, "50% of 4");

        let tiny = OutlierConfig {
            max_ejection_percent: 10,
            ..config()
        };
        let d = detector(2, tiny);
        for e in d.endpoints.clone() {
            for _ in 0..3 {
                seen(&d, &e, Outcome::ServerError);
            }
        }
        assert_eq!(
            d.out_of_rotation(),
            1,
            "rounds to zero, yet one may go while one stays"
        );

        let d = detector(1, config());
        let e = d.endpoints[0].clone();
        for _ in 0..10 {
            seen(&d, &e, Outcome::ServerError);
        }
        assert_eq!(
            state(&d, 0),
            EndpointState::Healthy,
            "the only endpoint stays"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_error_threshold_counts_only_gateway_errors() {
        let c = OutlierConfig {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 2,
            ..config()
        };
        let d = detector(4, c);
        let e = d.endpoints[0].clone();
        for _ in 0..5 {
            seen(&d, &e, Outcome::ServerError);
        }
        assert_eq!(state(&d, 0), EndpointState::Healthy);
        seen(&d, &e, Outcome::GatewayError);
        seen(&d, &e, Outcome::GatewayError);
        assert_eq!(state(&d, 0), EndpointState::Ejected);
    }
}
