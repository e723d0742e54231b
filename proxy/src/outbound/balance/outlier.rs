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

    pub fn observe(self: &Arc<Self>, endpoint: &Endpoint, outcome: Outcome) {
        let thresholds = Thresholds {
            consecutive_5xx: self.config.consecutive_5xx,
            consecutive_gateway_errors: self.config.consecutive_gateway_errors,
        };
        match endpoint.health.record(outcome, thresholds) {
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
            .eject(Instant::now(), |n| ejection_time(&self.config, n));
        tracing::info!(endpoint = %endpoint.addr, ?until, "outlier ejected");
        self.metrics
            .outlier_ejections
            .get_or_create(&self.labels)
            .inc();
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

    /// The share allowed out, rounded down, but at least one when that leaves one in rotation.
    fn max_ejected(&self) -> usize {
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
            self.metrics
                .endpoints
                .get_or_create(&EndpointLabels {
                    dst: self.labels.clone(),
                    state,
                })
                .set(count as i64);
        }
    }
}

/// How long an endpoint stays out after its `n`th ejection.
fn ejection_time(config: &OutlierConfig, n: u32) -> Duration {
    (config.base_ejection_time * n).min(config.max_ejection_time)
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

    fn state(d: &OutlierDetector, i: usize) -> EndpointState {
        d.endpoints[i].health.state(Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_and_a_success_in_between_resets_the_count() {
        let d = detector(4, config());
        let e = d.endpoints[0].clone();
        d.observe(&e, Outcome::ServerError);
        d.observe(&e, Outcome::ServerError);
        d.observe(&e, Outcome::Success);
        d.observe(&e, Outcome::ServerError);
        d.observe(&e, Outcome::GatewayError);
        assert_eq!(state(&d, 0), EndpointState::Healthy);
        d.observe(&e, Outcome::ServerError);
        assert_eq!(state(&d, 0), EndpointState::Ejected);
        assert!(!d.is_available(&e));
    }

    #[tokio::test(start_paused = true)]
    async fn probation_admits_exactly_one_probe_then_restores_or_ejects_for_longer() {
        let d = detector(4, config());
        let e = d.endpoints[0].clone();
        for _ in 0..3 {
            d.observe(&e, Outcome::ServerError);
        }
        tokio::time::sleep(ejection_time(&config(), 1)).await;
        assert_eq!(state(&d, 0), EndpointState::Probation);
        assert!(d.is_available(&e));
        assert!(d.claim(&e), "the first request is the probe");
        assert!(!d.is_available(&e), "a second request while probing");
        d.observe(&e, Outcome::ServerError);
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
        d.observe(&e, Outcome::Success);
        assert_eq!(state(&d, 0), EndpointState::Healthy);
        assert!(d.is_available(&e));
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let c = config();
        assert_eq!(ejection_time(&c, 1), Duration::from_millis(40));
        assert_eq!(ejection_time(&c, 2), Duration::from_millis(80));
        assert_eq!(ejection_time(&c, 3), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_allowed_share_and_never_the_last_endpoint() {
        let d = detector(4, config());
        for e in d.endpoints.clone() {
            for _ in 0..3 {
                d.observe(&e, Outcome::ServerError);
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
                d.observe(&e, Outcome::ServerError);
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
            d.observe(&e, Outcome::ServerError);
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
            d.observe(&e, Outcome::ServerError);
        }
        assert_eq!(state(&d, 0), EndpointState::Healthy);
        d.observe(&e, Outcome::GatewayError);
        d.observe(&e, Outcome::GatewayError);
        assert_eq!(state(&d, 0), EndpointState::Ejected);
    }
}
