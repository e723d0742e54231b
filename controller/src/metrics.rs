//! The controller's Prometheus metrics (names fixed by SPEC.md).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub proxies_connected: Gauge,
    pub push_seconds: Histogram,
    pub reconcile_errors: Counter,
    pub status_writes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("outrigger_controller");
        let proxies_connected = Gauge::default();
        registry.register(
            "proxies_connected",
            "Proxies with an open configuration stream",
            proxies_connected.clone(),
        );
        // 1 ms to about 16 s, doubling.
        let push_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "push_seconds",
            "Time from a change seen by the controller to its acknowledgement by a proxy",
            push_seconds.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Failed attempts to turn cluster state into configuration or status",
            reconcile_errors.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "status_writes",
            "Requests this replica sent to write DestinationPolicy and AuthorizationPolicy status",
            status_writes.clone(),
        );
        Self {
            registry: Arc::new(registry),
            proxies_connected,
            push_seconds,
            reconcile_errors,
            status_writes,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
