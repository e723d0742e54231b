//! The destinations this proxy has asked the control plane about, and their current state.
//!
//! A destination is subscribed to the first time the app calls it. Requests wait (briefly) for the
//! first answer; after that every request reads the latest applied version, and a new version
//! replaces it atomically: requests already running finish on the version they started with.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use outrigger_api::destination::MAX_DESTINATIONS_PER_PROXY;
use outrigger_api::proto;
use tokio::sync::{mpsc, watch};

use crate::metrics::{Metrics, OfService, ServiceLabels};
use crate::outbound::destination::Destination;
use crate::policy::DestinationConfig;
use crate::tls::Held;

#[derive(Clone)]
pub enum Resolution {
    /// Asked, not answered yet.
    Pending,
    /// The control plane knows no such destination.
    Unknown(Arc<str>),
    Ready(Arc<Destination>),
}

/// Whether the control plane can answer questions about new destinations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlPlaneState {
    /// Not reached yet since the proxy started.
    Connecting,
    Connected,
    /// Reached before, lost since: nothing new will be answered until it is back.
    Unreachable,
}

/// One destination asked about.
pub struct Lookup {
    state: watch::Sender<Resolution>,
    /// Looked up since the last sweep.
    used: AtomicBool,
}

impl Lookup {
    pub fn current(&self) -> Resolution {
        self.state.borrow().clone()
    }

    /// The Service the last applied version is about.
    fn service(&self) -> Option<ServiceLabels> {
        match &*self.state.borrow() {
            Resolution::Ready(destination) => Some(destination.labels.service()),
            _ => None,
        }
    }

    /// The current resolution once it is no longer pending, or `Pending` after `wait`.
    pub async fn resolved(&self, wait: Duration) -> Resolution {
        let mut receiver = self.state.subscribe();
        let answered = receiver.wait_for(|r| !matches!(r, Resolution::Pending));
        match tokio::time::timeout(wait, answered).await {
            Ok(Ok(resolution)) => resolution.clone(),
            _ => Resolution::Pending,
        }
    }
}

/// Every destination asked about, by key; cloning shares them.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    lookups: Mutex<HashMap<String, Arc<Lookup>>>,
    control_plane: watch::Sender<ControlPlaneState>,
    /// New keys for the control-plane client to subscribe to.
    subscribe: mpsc::UnboundedSender<String>,
    metrics: Metrics,
    /// This proxy's identity, which endpoints call meshed endpoints with.
    identity: Held,
    /// How long a request for a destination waits for the control plane's first answer.
    discovery_wait: Duration,
}

impl Resolver {
    pub fn new(
        metrics: Metrics,
        identity: Held,
        discovery_wait: Duration,
    ) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (subscribe, subscriptions) = mpsc::unbounded_channel();
        let inner = Inner {
            lookups: Mutex::default(),
            control_plane: watch::Sender::new(ControlPlaneState::Connecting),
            subscribe,
            metrics,
            identity,
            discovery_wait,
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            subscriptions,
        )
    }

    /// The lookup of `key`, subscribing to it if this is the first time it is needed. Past
    /// [`MAX_DESTINATIONS_PER_PROXY`] a new key is not followed: it resolves as unknown, so a
    /// redirected connection goes where it was going and a request by name is refused with why.
    pub fn lookup(&self, key: &str) -> Arc<Lookup> {
        let mut lookups = self.inner.lookups.lock().expect("resolver lock");
        if let Some(lookup) = lookups.get(key) {
            lookup.used.store(true, Ordering::Relaxed);
            return lookup.clone();
        }
        if lookups.len() >= MAX_DESTINATIONS_PER_PROXY {
            tracing::debug!(key, "destination not followed: too many destinations");
            let reason = format!(
                "this proxy follows {MAX_DESTINATIONS_PER_PROXY} destinations, the most it may; \
                 those unused for a minute are forgotten"
            );
            return Arc::new(Lookup {
                state: watch::Sender::new(Resolution::Unknown(reason.into())),
                used: AtomicBool::new(false),
            });
        }
        let lookup = Arc::new(Lookup {
            state: watch::Sender::new(Resolution::Pending),
            used: AtomicBool::new(true),
        });
        lookups.insert(key.to_string(), lookup.clone());
        let _ = self.inner.subscribe.send(key.to_string());
        lookup
    }

    pub fn set_control_plane(&self, state: ControlPlaneState) {
        self.inner.control_plane.send_replace(state);
    }

    pub fn control_plane(&self) -> ControlPlaneState {
        *self.inner.control_plane.borrow()
    }

    /// The resolution of `lookup` once answered, waiting up to the discovery wait; not waiting
    /// while the control plane is unreachable, since it cannot answer.
    pub async fn resolve(&self, lookup: &Lookup) -> Resolution {
        match lookup.current() {
            Resolution::Pending if self.control_plane() == ControlPlaneState::Unreachable => {
                Resolution::Pending
            }
            Resolution::Pending => lookup.resolved(self.inner.discovery_wait).await,
            resolution => resolution,
        }
    }

    /// A handle for destinations to reach their routes' backends by, which does not keep the
    /// resolver (that holds the destinations) alive.
    pub fn backends(&self) -> Backends {
        Backends(Arc::downgrade(&self.inner))
    }

    /// Forgets the destinations not looked up since the last sweep that nothing holds (no open
    /// connection, no request in flight), and the metric series of Services no destination left
    /// is about; returns their keys, to unsubscribe from.
    pub fn sweep(&self) -> Vec<String> {
        let mut lookups = self.inner.lookups.lock().expect("resolver lock");
        let mut idle = Vec::new();
        let mut gone = HashSet::new();
        lookups.retain(|key, lookup| {
            let used = lookup.used.swap(false, Ordering::Relaxed);
            let kept = used || Arc::strong_count(lookup) > 1;
            if !kept {
                idle.push(key.clone());
                gone.extend(lookup.service());
            }
            kept
        });
        for lookup in lookups.values() {
            if let Some(service) = lookup.service() {
                gone.remove(&service);
            }
        }
        drop(lookups);
        for service in &gone {
            self.inner.metrics.forget_service(service);
        }
        idle
    }

    fn existing(&self, key: &str) -> Option<Arc<Lookup>> {
        self.inner
            .lookups
            .lock()
            .expect("resolver lock")
            .get(key)
            .cloned()
    }

    pub fn is_subscribed(&self, key: &str) -> bool {
        self.existing(key).is_some()
    }

    /// Puts a validated version in force (nothing when `key` is no longer subscribed). The
    /// destination is built from the previous one, outside any lock requests take.
    pub fn apply(&self, key: &str, config: DestinationConfig) {
        let Some(lookup) = self.existing(key) else {
            return;
        };
        let previous = match lookup.current() {
            Resolution::Ready(previous) => Some(previous),
            _ => None,
        };
        let next = Destination::build(
            config,
            previous.as_deref(),
            &self.inner.metrics,
            &self.inner.identity,
            &self.backends(),
        );
        lookup.state.send_replace(Resolution::Ready(Arc::new(next)));
    }

    pub fn set_unknown(&self, key: &str, reason: String) {
        if let Some(lookup) = self.existing(key) {
            lookup
                .state
                .send_replace(Resolution::Unknown(reason.into()));
        }
    }

    /// Every subscribed key with the version applied to it (empty when none), to subscribe again
    /// after a reconnect without being sent what is already here.
    pub fn subscriptions(&self) -> Vec<proto::Subscription> {
        self.all()
            .into_iter()
            .map(|(key, resolution)| proto::Subscription {
                key,
                known_version: match resolution {
                    Resolution::Ready(d) => d.config.version.clone(),
                    _ => String::new(),
                },
            })
            .collect()
    }

    pub fn all(&self) -> Vec<(String, Resolution)> {
        let lookups = self.inner.lookups.lock().expect("resolver lock");
        let mut all: Vec<_> = lookups
            .iter()
            .map(|(key, lookup)| (key.clone(), lookup.current()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// The destinations a route's backends name, resolved as the app's own requests are.
#[derive(Clone)]
pub struct Backends(Weak<Inner>);

impl Backends {
    /// None: a handle on no resolver, for destinations built on their own.
    #[cfg(test)]
    pub fn none() -> Self {
        Self(Weak::new())
    }

    /// The destination `key` names, subscribing to it on first use.
    pub async fn resolve(&self, key: &str) -> Resolution {
        let Some(inner) = self.0.upgrade() else {
            return Resolution::Unknown("the proxy is shutting down".into());
        };
        let resolver = Resolver { inner };
        let lookup = resolver.lookup(key);
        resolver.resolve(&lookup).await
    }

    /// Subscribes to `key` ahead of its first request.
    pub fn prefetch(&self, key: &str) {
        if let Some(inner) = self.0.upgrade() {
            Resolver { inner }.lookup(key);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metrics::{DurationLabels, PeerLabels};

    #[test]
    fn a_sweep_forgets_what_was_neither_used_since_the_last_nor_held() {
        let (resolver, mut subscriptions) = Resolver::new(
            Metrics::new(),
            crate::tls::no_identity(),
            Duration::from_secs(5),
        );
        let held = resolver.lookup("held.default.svc.cluster.local:80");
        resolver.lookup("idle.default.svc.cluster.local:80");
        resolver.lookup("used.default.svc.cluster.local:80");
        while subscriptions.try_recv().is_ok() {}

        // Everything was just used.
        assert!(resolver.sweep().is_empty());
        resolver.lookup("used.default.svc.cluster.local:80");
        assert_eq!(resolver.sweep(), ["idle.default.svc.cluster.local:80"]);
        assert_eq!(resolver.sweep(), ["used.default.svc.cluster.local:80"]);
        // Held (an open connection, a request waiting): kept, however long.
        assert!(resolver.sweep().is_empty());
        drop(held);
        assert_eq!(resolver.sweep(), ["held.default.svc.cluster.local:80"]);

        // Used again after being forgotten: subscribed again.
        resolver.lookup("idle.default.svc.cluster.local:80");
        assert_eq!(
            subscriptions.try_recv().unwrap(),
            "idle.default.svc.cluster.local:80"
        );
    }

    #[test]
    fn past_the_most_destinations_a_new_one_is_not_followed_until_some_are_forgotten() {
        let (resolver, mut subscriptions) = Resolver::new(
            Metrics::new(),
            crate::tls::no_identity(),
            Duration::from_secs(5),
        );
        let key = |i: usize| format!("10.0.{}.{}:80", i / 256, i % 256);
        for i in 0..MAX_DESTINATIONS_PER_PROXY {
            resolver.lookup(&key(i));
        }
        let mut subscribed = 0;
        while subscriptions.try_recv().is_ok() {
            subscribed += 1;
        }
        assert_eq!(subscribed, MAX_DESTINATIONS_PER_PROXY);

        let over = key(MAX_DESTINATIONS_PER_PROXY);
        let Resolution::Unknown(reason) = resolver.lookup(&over).current() else {
            panic!("a destination past the bound resolves as unknown")
        };
        assert!(reason.contains("the most it may"), "{reason}");
        assert!(!resolver.is_subscribed(&over));
        assert!(subscriptions.try_recv().is_err(), "nothing more subscribed");
        // Those already followed still are.
        assert!(matches!(
            resolver.lookup(&key(0)).current(),
            Resolution::Pending
        ));

        // Once the unused ones are forgotten, there is room again.
        resolver.sweep();
        resolver.lookup(&key(0));
        assert_eq!(resolver.sweep().len(), MAX_DESTINATIONS_PER_PROXY - 1);
        resolver.lookup(&over);
        assert!(resolver.is_subscribed(&over));
        assert_eq!(subscriptions.try_recv().unwrap(), over);
    }

    pub(crate) fn web(version: &str) -> DestinationConfig {
        DestinationConfig {
            version: version.into(),
            namespace: "default".into(),
            service: "web".into(),
            port: 80,
            policy: None,
            policy_generation: 0,
            subsets: Vec::new(),
            endpoints: Vec::new(),
            load_balancer: crate::policy::Algorithm::PeakEwma,
            connect_timeout: Duration::from_secs(1),
            traffic: crate::policy::TrafficPolicy {
                split: None,
                timeout: None,
                retries: None,
            },
            routes: Vec::new(),
            outlier_detection: None,
            connection_pool: Default::default(),
            rate_limit: None,
            fault_injection: None,
            http_routes: None,
        }
    }

    #[test]
    fn the_series_of_a_service_go_once_no_destination_of_it_is_left() {
        let metrics = Metrics::new();
        let (resolver, _subscriptions) = Resolver::new(
            metrics.clone(),
            crate::tls::no_identity(),
            Duration::from_secs(5),
        );
        let (by_name, by_address) = ("web.default.svc.cluster.local:80", "10.96.0.5:80");
        for key in [by_name, by_address] {
            resolver.lookup(key);
            resolver.apply(key, web("1"));
        }
        let Resolution::Ready(destination) = resolver.lookup(by_name).current() else {
            panic!("applied")
        };
        let labels = DurationLabels {
            dst: destination.labels.clone(),
            peer: PeerLabels::plaintext(),
        };
        metrics
            .request_duration
            .with(&labels, |histogram| histogram.observe(0.01));
        let web_series = |metrics: &Metrics| metrics.encode().contains(r#"dst_service="web""#);
        assert!(web_series(&metrics));

        // The name goes idle while the address is still called: the series stay.
        assert!(resolver.sweep().is_empty());
        resolver.lookup(by_address);
        assert_eq!(resolver.sweep(), [by_name]);
        assert!(web_series(&metrics));
        // Then the address too: nothing about web is left.
        drop(destination);
        assert_eq!(resolver.sweep(), [by_address]);
        assert!(!web_series(&metrics), "{}", metrics.encode());
    }
}
