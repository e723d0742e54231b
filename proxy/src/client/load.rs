//! What the balancer knows of an endpoint's load: requests in flight and a peak-EWMA of latency.
//!
//! A failure (no connection, a reset, a gateway error) counts as a very slow response, so an
//! endpoint that only fails is not taken for a fast one. An endpoint that has not answered yet is
//! taken for no slower than the endpoint it is compared with: a new endpoint is tried as soon as
//! one it is as good as, instead of waiting for its assumed latency to fade.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Load {
    in_flight: AtomicUsize,
    /// Peak-EWMA of response latency in nanoseconds and when it was last updated; `None` until
    /// the first response or failure.
    ewma: Mutex<Option<(f64, Instant)>>,
}

/// Assumed latency of an endpoint that has not answered yet, against endpoints that are slower:
/// pessimistic enough that a new endpoint is not flooded, low enough that it is tried.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// What a failure counts as.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// How much cheaper one endpoint must be to win: costs closer than this are a tie, which the
/// balancer breaks at random. Equal pods differ by noise (a loaded node, one slow response), and a
/// strict order would send two thirds of light traffic to whichever looked fastest; one request
/// queued (twice the cost) or a slower pod still loses.
const CLEARLY_CHEAPER: f64 = 1.5;
/// Added to both costs before they are compared: below a millisecond, differences between pods
/// are scheduling noise, not load.
const NOISE_FLOOR: Duration = Duration::from_millis(1);
/// How fast old latency observations fade.
const DECAY: Duration = Duration::from_secs(10);

impl Default for Load {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(None),
        }
    }
}

impl Load {
    /// Starts counting a request against this load.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self,
            started: Instant::now(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// PeakEwma: whether this endpoint is expected to answer clearly sooner than `other`, its
    /// latency scaled by the work already queued on it.
    pub fn is_cheaper_than(&self, other: &Load) -> bool {
        let (mine, theirs) = match (self.cost(), other.cost()) {
            (Some(mine), Some(theirs)) => (mine, theirs),
            (None, Some(theirs)) => (self.assumed_cost().min(theirs), theirs),
            (Some(mine), None) => (mine, other.assumed_cost().min(mine)),
            (None, None) => (self.assumed_cost(), other.assumed_cost()),
        };
        let floor = NOISE_FLOOR.as_nanos() as f64;
        (mine + floor) * CLEARLY_CHEAPER < theirs + floor
    }

    fn cost(&self) -> Option<f64> {
        let (ewma, updated) = (*self.ewma.lock().expect("ewma lock"))?;
        Some(ewma * decay_weight(updated.elapsed()) * self.queued())
    }

    fn assumed_cost(&self) -> f64 {
        DEFAULT_RTT.as_nanos() as f64 * self.queued()
    }

    fn queued(&self) -> f64 {
        (self.in_flight() + 1) as f64
    }

    pub fn observe(&self, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let mut ewma = self.ewma.lock().expect("ewma lock");
        let now = Instant::now();
        let next = match *ewma {
            // Peak: a slow response counts at once; fast ones pull the average down gradually.
            Some((previous, updated)) if rtt <= previous => {
                let w = decay_weight(now - updated);
                previous * w + rtt * (1.0 - w)
            }
            _ => rtt,
        };
        *ewma = Some((next, now));
    }
}

fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

/// Counts a request against an endpoint's load until dropped.
pub struct InFlight<'a> {
    load: &'a Load,
    started: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight<'_> {
    /// The response arrived: its latency counts.
    pub fn answered(self) {
        self.load.observe(self.started.elapsed());
    }

    /// No usable response: counted as a very slow one.
    pub fn failed(self) {
        self.load
            .observe(FAILURE_PENALTY.max(self.started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(rtt: Duration) -> Load {
        let load = Load::default();
        load.observe(rtt);
        load
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_is_as_good_as_a_fast_one_and_better_than_a_slow_one() {
        let new = Load::default();
        let fast = observed(Duration::from_millis(1));
        let slow = observed(Duration::from_millis(500));
        // Neither is cheaper: picks between them are even.
        assert!(!new.is_cheaper_than(&fast) && !fast.is_cheaper_than(&new));
        assert!(new.is_cheaper_than(&slow) && !slow.is_cheaper_than(&new));
        assert!(fast.is_cheaper_than(&slow));
    }

    #[tokio::test(start_paused = true)]
    async fn equal_endpoints_tie_whatever_their_noise_and_queued_work_decides() {
        let one = observed(Duration::from_millis(10));
        let other = observed(Duration::from_millis(12));
        assert!(!one.is_cheaper_than(&other) && !other.is_cheaper_than(&one));
        // A request queued on one doubles its cost: the other wins.
        let _queued = one.start();
        assert!(other.is_cheaper_than(&one));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_count_as_slow_responses_that_fade() {
        let healthy = observed(Duration::from_millis(1));
        let failing = Load::default();
        failing.start().failed();
        assert!(healthy.is_cheaper_than(&failing));
        // Long after, the failure has faded: the endpoint is tried again.
        tokio::time::advance(Duration::from_secs(120)).await;
        healthy.observe(Duration::from_millis(1));
        assert!(failing.is_cheaper_than(&healthy));
    }
}
