//! The destinations this proxy has asked the control plane about, and their current state.
//!
//! A destination is subscribed to the first time the app calls it. Requests wait (briefly) for the
//! first answer; after that every request reads the latest applied version, and a new version
//! replaces it atomically: requests already running finish on the version they started with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outrigger_api::proto;
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use crate::config::{ConfigError, DestinationConfig, invalid};
use crate::destination::Destination;
use crate::metrics::Metrics;

#[derive(Clone)]
pub enum Resolution {
    /// Asked, not answered yet.
    Pending,
    /// The control plane knows no such destination.
    Unknown(Arc<str>),
    Ready(Arc<Destination>),
}

pub struct Entry {
    state: watch::Sender<Resolution>,
    /// The endpoints last fetched for this destination, which updates name by version.
    endpoints: Mutex<Option<HeldEndpoints>>,
}

#[derive(Clone)]
struct HeldEndpoints {
    version: String,
    /// An encoded `proto::Endpoints`: a tenth of the decoded size, decoded again when a policy
    /// change needs them.
    encoded: Bytes,
}

impl Entry {
    pub fn current(&self) -> Resolution {
        self.state.borrow().clone()
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

#[derive(Clone)]
pub struct Destinations {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    /// New keys for the control-plane client to subscribe to.
    subscribe: mpsc::UnboundedSender<String>,
    metrics: Metrics,
}

impl Destinations {
    pub fn new(metrics: Metrics) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (subscribe, subscriptions) = mpsc::unbounded_channel();
        let inner = Inner {
            entries: Mutex::default(),
            subscribe,
            metrics,
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            subscriptions,
        )
    }

    /// The entry for `key`, subscribing to it if this is the first time it is needed.
    pub fn entry(&self, key: &str) -> Arc<Entry> {
        let mut entries = self.inner.entries.lock().expect("destinations lock");
        if let Some(entry) = entries.get(key) {
            return entry.clone();
        }
        let entry = Arc::new(Entry {
            state: watch::Sender::new(Resolution::Pending),
            endpoints: Mutex::default(),
        });
        entries.insert(key.to_string(), entry.clone());
        let _ = self.inner.subscribe.send(key.to_string());
        entry
    }

    fn existing(&self, key: &str) -> Option<Arc<Entry>> {
        self.inner
            .entries
            .lock()
            .expect("destinations lock")
            .get(key)
            .cloned()
    }

    /// Whether the endpoints `version` of `key` are held (or `key` is not subscribed, so none
    /// are needed).
    pub fn holds_endpoints(&self, key: &str, version: &str) -> bool {
        self.existing(key).is_none_or(|entry| {
            entry
                .endpoints
                .lock()
                .expect("endpoints lock")
                .as_ref()
                .is_some_and(|held| held.version == version)
        })
    }

    /// Holds fetched endpoints (an encoded `proto::Endpoints`) for the updates that name them;
    /// refused, keeping what was held, when they do not decode.
    pub fn hold_endpoints(
        &self,
        key: &str,
        version: String,
        encoded: &[u8],
    ) -> Result<(), ConfigError> {
        proto::Endpoints::decode(encoded)
            .map_err(|error| invalid("endpoints", format!("do not decode: {error}")))?;
        if let Some(entry) = self.existing(key) {
            // Copied: a slice would keep the reply's whole read buffer alive.
            let encoded = Bytes::copy_from_slice(encoded);
            *entry.endpoints.lock().expect("endpoints lock") =
                Some(HeldEndpoints { version, encoded });
        }
        Ok(())
    }

    /// Validates and applies a new version; on error the previous version stays in force.
    pub fn apply(&self, update: proto::DestinationUpdate) -> Result<(), ConfigError> {
        let Some(entry) = self.existing(&update.key) else {
            // Not subscribed (any more): nothing to do.
            return Ok(());
        };
        let held = entry.endpoints.lock().expect("endpoints lock").clone();
        let endpoints = match held {
            Some(held) if held.version == update.endpoints_version => {
                proto::Endpoints::decode(held.encoded)
                    .expect("held endpoints decoded when they were fetched")
                    .endpoints
            }
            _ => {
                return Err(invalid(
                    "endpoints",
                    format!("version `{}` is not held", update.endpoints_version),
                ));
            }
        };
        let destination = proto::Destination::decode(update.destination)
            .map_err(|error| invalid("destination", format!("does not decode: {error}")))?;
        let config = DestinationConfig::from_proto(update.version, destination, endpoints)?;
        entry.state.send_modify(|state| {
            let previous = match &*state {
                Resolution::Ready(previous) => Some(previous.as_ref()),
                _ => None,
            };
            let next = Destination::build(config, previous, &self.inner.metrics);
            *state = Resolution::Ready(Arc::new(next));
        });
        Ok(())
    }

    pub fn set_unknown(&self, key: &str, reason: String) {
        if let Some(entry) = self.existing(key) {
            *entry.endpoints.lock().expect("endpoints lock") = None;
            entry.state.send_replace(Resolution::Unknown(reason.into()));
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
        let entries = self.inner.entries.lock().expect("destinations lock");
        let mut all: Vec<_> = entries
            .iter()
            .map(|(key, entry)| (key.clone(), entry.current()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    const KEY: &str = "web.default.svc.cluster.local:80";

    fn update(
        version: &str,
        subsets: &[&str],
        endpoints_version: &str,
    ) -> proto::DestinationUpdate {
        let destination = proto::Destination {
            namespace: "default".into(),
            service: "web".into(),
            port: 80,
            subsets: subsets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        proto::DestinationUpdate {
            key: KEY.into(),
            version: version.into(),
            destination: destination.encode_to_vec().into(),
            endpoints_version: endpoints_version.into(),
        }
    }

    fn endpoints(addresses: &[&str]) -> Vec<u8> {
        proto::Endpoints {
            endpoints: addresses
                .iter()
                .map(|address| proto::Endpoint {
                    address: address.to_string(),
                    subsets: vec!["stable".into()],
                    ..Default::default()
                })
                .collect(),
        }
        .encode_to_vec()
    }

    fn applied(destinations: &Destinations) -> (String, Vec<SocketAddr>) {
        match destinations.entry(KEY).current() {
            Resolution::Ready(d) => (
                d.config.version.clone(),
                d.config.endpoints.iter().map(|e| e.address).collect(),
            ),
            _ => panic!("nothing applied"),
        }
    }

    #[test]
    fn updates_apply_with_the_endpoints_held_under_the_version_they_name() {
        let (destinations, _subscriptions) = Destinations::new(Metrics::new());
        destinations.entry(KEY);
        let first: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let second: SocketAddr = "10.0.0.2:80".parse().unwrap();

        // Not held: refused, nothing applied.
        assert!(!destinations.holds_endpoints(KEY, "e1"));
        assert_eq!(
            destinations.apply(update("0", &["stable"], "e1")),
            Err(invalid("endpoints", "version `e1` is not held"))
        );

        destinations
            .hold_endpoints(KEY, "e1".into(), &endpoints(&["10.0.0.1:80"]))
            .unwrap();
        assert!(destinations.holds_endpoints(KEY, "e1"));
        destinations.apply(update("1", &["stable"], "e1")).unwrap();
        assert_eq!(applied(&destinations), ("1".to_string(), vec![first]));

        // A policy that cannot apply to them (their subset is not declared) is refused.
        let refused = destinations.apply(update("2", &[], "e1")).unwrap_err();
        assert_eq!(refused.field, "endpoints[0].subsets");
        assert_eq!(applied(&destinations).0, "1");

        // Endpoints that do not decode are refused and the held ones stay.
        let broken = destinations.hold_endpoints(KEY, "e2".into(), b"\xff\xff");
        assert_eq!(broken.unwrap_err().field, "endpoints");
        assert!(destinations.holds_endpoints(KEY, "e1"));

        // New endpoints replace the held ones.
        destinations
            .hold_endpoints(KEY, "e3".into(), &endpoints(&["10.0.0.2:80"]))
            .unwrap();
        destinations.apply(update("3", &["stable"], "e3")).unwrap();
        assert_eq!(applied(&destinations), ("3".to_string(), vec![second]));
        assert_eq!(destinations.subscriptions()[0].known_version, "3");

        // Unknown drops them.
        destinations.set_unknown(KEY, "gone".into());
        assert!(!destinations.holds_endpoints(KEY, "e3"));
    }
}
