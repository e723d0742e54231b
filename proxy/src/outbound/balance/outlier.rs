//! Outlier detection: a passive, per-endpoint circuit breaker.
//!
//! Consecutive server errors eject an endpoint for `base * n` (n = times ejected, capped at the
//! maximum). When that time is up the endpoint is on probation: exactly one request probes it;
//! success restores it, failure ejects it again for longer. Never more than `max_ejection_percent`
//! of the endpoints are out, and at least one always stays in rotation.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::client::Endpoint;
use crate::metrics::{DestinationLabels, EndpointLabels, EndpointState, Metrics};
use crate::policy::OutlierConfig;

/// What a response says about the endpoint that produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx other than the gateway errors.
    ServerError,
    /// 502, 503, 504, or no connection at all.
    GatewayError,
}

impl Outcome {
    pub fn of_status(status: http::StatusCode) -> Self {
        match status.as_u16() {
            502..=504 => Self::GatewayError,
            500..=599 => Self::ServerError,
            _ => Self::Success,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Healthy,
    Ejected {
        until: Instant,
    },
    /// The ejection time is over and the single probe has been sent.
    Probing,
}

/// An endpoint's health, kept across configuration versions.
#[derive(Debug)]
pub struct Health(Mutex<HealthState>);

#[derive(Debug)]
struct HealthState {
    status: Status,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Times ejected: the next ejection lasts one base period longer.
    ejections: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self(Mutex::new(HealthState {
            status: Status::Healthy,
            consecutive_5xx: 0,
            consecutive_gateway: 0,
            ejections: 0,
        }))
    }
}

impl Health {
    pub fn state(&self, now: Instant) -> EndpointState {
        match self.0.lock().expect("health lock").status {
            Status::Healthy => EndpointState::Healthy,
            Status::Ejected { until } if now < until => EndpointState::Ejected,
            Status::Ejected { .. } | Status::Probing => EndpointState::Probation,
        }
    }
}

/// Outlier detection over one destination's endpoints.
pub struct OutlierDetector {
    config: OutlierConfig,
    endpoints: Vec<Arc<Endpoint>>,
    labels: DestinationLabels,
    metrics: Metrics,
    /// Serialises ejection decisions, so two concurrent failures cannot both take the last slot.
    ejecting: Mutex<()>,
}

impl OutlierDetector {
    pub fn new(
        config: OutlierConfig,
        endpoints: Vec<Arc<Endpoint>>,
        labels: DestinationLabels,
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
        let state = endpoint.health.0.lock().expect("health lock");
        match state.status {
            Status::Healthy => true,
            Status::Ejected { until } => Instant::now() >= until,
            Status::Probing => false,
        }
    }

    /// Called for the endpoint actually picked: if it was due for its probe, this request is the
    /// probe, and no other may be. False when another request took the probe first.
    pub fn claim(&self, endpoint: &Endpoint) -> bool {
        let mut state = endpoint.health.0.lock().expect("health lock");
        match state.status {
            Status::Healthy => return true,
            Status::Ejected { until } if Instant::now() >= until => {
                state.status = Status::Probing;
                drop(state);
                self.refresh_gauges();
                return true;
            }
            Status::Ejected { .. } | Status::Probing => {}
        }
        drop(state);
        // The balancer only offers an unavailable endpoint when nothing else is left: serve
        // rather than fail.
        !self.any_available()
    }

    fn any_available(&self) -> bool {
        self.endpoints.iter().any(|e| self.is_available(e))
    }

    pub fn observe(self: &Arc<Self>, endpoint: &Endpoint, outcome: Outcome) {
        let mut state = endpoint.health.0.lock().expect("health lock");
        match outcome {
            Outcome::Success => {
                state.consecutive_5xx = 0;
                state.consecutive_gateway = 0;
                if state.status == Status::Probing {
                    state.status = Status::Healthy;
                    drop(state);
                    self.refresh_gauges();
                }
                return;
            }
            // Gateway errors are server errors too, as in Envoy.
            Outcome::ServerError => state.consecutive_5xx += 1,
            Outcome::GatewayError => {
                state.consecutive_5xx += 1;
                state.consecutive_gateway += 1;
            }
        }
        let over = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        let should_eject = state.status == Status::Probing
            || (state.status == Status::Healthy
                && (over(state.consecutive_5xx, self.config.consecutive_5xx)
                    || over(
                        state.consecutive_gateway,
                        self.config.consecutive_gateway_errors,
                    )));
        drop(state);
        if should_eject {
            self.eject(endpoint);
        }
    }

    fn eject(self: &Arc<Self>, endpoint: &Endpoint) {
        let _deciding = self.ejecting.lock().expect("ejection lock");
        let probing = endpoint.health.0.lock().expect("health lock").status == Status::Probing;
        // A failed probe goes back out whatever the quota: it was counted as out already.
        if !probing && self.out_of_rotation() >= self.max_ejected() {
            return;
        }
        let until = {
            let mut state = endpoint.health.0.lock().expect("health lock");
            state.ejections += 1;
            state.consecutive_5xx = 0;
            state.consecutive_gateway = 0;
            let until = Instant::now() + ejection_time(&self.config, state.ejections);
            state.status = Status::Ejected { until };
            until
        };
        tracing::info!(endpoint = %endpoint.addr, ?until, "outlier ejected");
        self.metrics
            .outlier_ejections
            .get_or_create(&self.labels)
            .inc();
        self.refresh_gauges();
        // Probation starts by itself when the time is up: show it in the gauges then.
        let detector: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(until.into()).await;
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
    use std::net::SocketAddr;

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
            .map(|i| {
                Arc::new(Endpoint::new(
                    SocketAddr::from(([127, 0, 0, 1], 2000 + i)),
                    String::new(),
                    Vec::new(),
                    false,
                    Duration::from_secs(1),
                    None,
                ))
            })
            .collect();
        let labels = DestinationLabels {
            dst_namespace: Arc::new("ns".into()),
            dst_service: Arc::new("svc".into()),
        };
        OutlierDetector::new(config, endpoints, labels, Metrics::new())
    }

    fn state(d: &OutlierDetector, i: usize) -> EndpointState {
        d.endpoints[i].health.state(Instant::now())
    }

    #[tokio::test]
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

    #[tokio::test]
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

    #[tokio::test]
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

    #[tokio::test]
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
