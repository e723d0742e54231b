//! What the balancer knows of an endpoint's load: requests in flight and a peak-EWMA of latency.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What the balancer knows of an endpoint's load.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicUsize,
    /// Peak-EWMA of response latency in nanoseconds, and when it was last updated.
    ewma: Mutex<(f64, Instant)>,
}

/// Assumed latency of an endpoint that has not answered yet: pessimistic enough that a new
/// endpoint is not flooded, low enough that it is tried.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old latency observations fade.
const DECAY: Duration = Duration::from_secs(10);

impl Default for Load {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new((DEFAULT_RTT.as_nanos() as f64, Instant::now())),
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

    /// PeakEwma cost: expected latency, scaled by the work already queued on the endpoint.
    pub fn cost(&self) -> f64 {
        let (ewma, updated) = *self.ewma.lock().expect("ewma lock");
        let decayed = ewma * decay_weight(updated.elapsed());
        decayed * (self.in_flight() + 1) as f64
    }

    pub fn observe(&self, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let mut ewma = self.ewma.lock().expect("ewma lock");
        let now = Instant::now();
        let (previous, updated) = *ewma;
        // Peak: a slow response counts at once; fast ones pull the average down gradually.
        let next = if rtt > previous {
            rtt
        } else {
            let w = decay_weight(now - updated);
            previous * w + rtt * (1.0 - w)
        };
        *ewma = (next, now);
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
}
