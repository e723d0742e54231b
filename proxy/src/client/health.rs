//! An endpoint's health as outlier detection sees it, kept across configuration versions: healthy,
//! ejected until some time, or on probation with its single probe sent. The destination's
//! detector (`outbound::balance::outlier`) decides ejections and their lengths; this is the state
//! and its transitions.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::EndpointState;

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

    /// What a gRPC status (from `grpc-status`, in headers or trailers) says, as Envoy maps them to
    /// HTTP: UNAVAILABLE and DEADLINE_EXCEEDED are gateway errors, INTERNAL, UNKNOWN and DATA_LOSS
    /// server errors; the rest are the caller's business.
    pub fn of_grpc_status(code: &[u8]) -> Self {
        match code {
            b"14" | b"4" => Self::GatewayError,
            b"13" | b"2" | b"15" => Self::ServerError,
            _ => Self::Success,
        }
    }
}

/// Consecutive failures that call for an ejection; 0 is off.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
}

/// What picking an endpoint found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    Healthy,
    /// Its ejection is over: this request is its one probe.
    Probe,
    /// Ejected, or its probe is already out.
    Unavailable,
}

/// What a recorded outcome calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Nothing,
    /// A probe succeeded: the endpoint is back in rotation.
    Restored,
    /// A threshold was reached, or a probe failed.
    Eject,
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

#[derive(Debug)]
pub struct Health(Mutex<State>);

#[derive(Debug)]
struct State {
    status: Status,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Times ejected, less one for each interval spent healthy since: the next ejection lasts one
    /// base period longer.
    ejections: u32,
    /// Since when the endpoint has been back in rotation, after its last ejection.
    healthy_since: Option<Instant>,
    /// Counts ejections: an outcome of a request sent before the last ejection is not about the
    /// endpoint as it is now, and is passed over.
    epoch: u64,
}

impl Default for Health {
    fn default() -> Self {
        Self(Mutex::new(State {
            status: Status::Healthy,
            consecutive_5xx: 0,
            consecutive_gateway: 0,
            ejections: 0,
            healthy_since: None,
            epoch: 0,
        }))
    }
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("health lock")
    }

    pub fn state(&self, now: Instant) -> EndpointState {
        match self.lock().status {
            Status::Healthy => EndpointState::Healthy,
            Status::Ejected { until } if now < until => EndpointState::Ejected,
            Status::Ejected { .. } | Status::Probing => EndpointState::Probation,
        }
    }

    /// May this endpoint be picked now: healthy, or due for its probe.
    pub fn is_available(&self, now: Instant) -> bool {
        match self.lock().status {
            Status::Healthy => true,
            Status::Ejected { until } => now >= until,
            Status::Probing => false,
        }
    }

    /// For the endpoint actually picked: when it is due for its probe, this request takes it.
    pub fn claim(&self, now: Instant) -> Claim {
        let mut state = self.lock();
        match state.status {
            Status::Healthy => Claim::Healthy,
            Status::Ejected { until } if now >= until => {
                state.status = Status::Probing;
                Claim::Probe
            }
            Status::Ejected { .. } | Status::Probing => Claim::Unavailable,
        }
    }

    /// Which ejection period a request sent now belongs to (for [`Health::record`]).
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    pub fn is_probing(&self) -> bool {
        self.lock().status == Status::Probing
    }

    /// Records the outcome of a request sent in `epoch`.
    pub fn record(&self, outcome: Outcome, epoch: u64, thresholds: Thresholds) -> Recorded {
        let mut state = self.lock();
        if epoch != state.epoch {
            return Recorded::Nothing;
        }
        match outcome {
            Outcome::Success => {
                state.consecutive_5xx = 0;
                state.consecutive_gateway = 0;
                if state.status == Status::Probing {
                    state.status = Status::Healthy;
                    state.healthy_since = Some(Instant::now());
                    return Recorded::Restored;
                }
                return Recorded::Nothing;
            }
            // Gateway errors are server errors too, as in Envoy.
            Outcome::ServerError => state.consecutive_5xx += 1,
            Outcome::GatewayError => {
                state.consecutive_5xx += 1;
                state.consecutive_gateway += 1;
            }
        }
        let over = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        let eject = state.status == Status::Probing
            || (state.status == Status::Healthy
                && (over(state.consecutive_5xx, thresholds.consecutive_5xx)
                    || over(
                        state.consecutive_gateway,
                        thresholds.consecutive_gateway_errors,
                    )));
        if eject {
            Recorded::Eject
        } else {
            Recorded::Nothing
        }
    }

    /// Ejects the endpoint for the length `ejection` gives for its `n`th ejection, where each
    /// `interval` it spent healthy since the last one takes one off `n`; returns when the ejection
    /// ends.
    pub fn eject(
        &self,
        now: Instant,
        interval: Duration,
        ejection: impl FnOnce(u32) -> Duration,
    ) -> Instant {
        let mut state = self.lock();
        if let Some(since) = state.healthy_since.take() {
            let healthy_intervals =
                now.saturating_duration_since(since).as_nanos() / interval.as_nanos().max(1);
            let forgiven = u32::try_from(healthy_intervals).unwrap_or(u32::MAX);
            state.ejections = state.ejections.saturating_sub(forgiven);
        }
        state.ejections = state.ejections.saturating_add(1);
        state.epoch += 1;
        state.consecutive_5xx = 0;
        state.consecutive_gateway = 0;
        let until = now + ejection(state.ejections);
        state.status = Status::Ejected { until };
        until
    }
}
