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
    /// The endpoints last sent for this destination, which later updates name by version instead
    /// of carrying them again.
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

    /// The endpoints of an update: those it carries, which are held from now on (whether or not
    /// the rest of the update applies, as the controller counts on), or else those held under
    /// the version it names.
    fn endpoints(
        &self,
        version: String,
        carried: Option<Bytes>,
    ) -> Result<Vec<proto::Endpoint>, ConfigError> {
        let mut held = self.endpoints.lock().expect("endpoints lock");
        let encoded = match carried {
            // Copied: a slice would keep the stream's whole read buffer alive.
            Some(encoded) => Bytes::copy_from_slice(&encoded),
            None => match &*held {
                Some(held) if held.version == version => held.encoded.clone(),
                _ => {
                    return Err(invalid(
                        "endpoints",
                        format!("version `{version}` was named but never sent"),
                    ));
                }
            },
        };
        let endpoints = proto::Endpoints::decode(encoded.clone())
            .map_err(|error| invalid("endpoints", format!("do not decode: {error}")))?
            .endpoints;
        *held = Some(HeldEndpoints { version, encoded });
        Ok(endpoints)
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

    /// Validates and applies a new version; on error the previous version stays in force.
    pub fn apply(&self, update: proto::DestinationUpdate) -> Result<(), ConfigError> {
        let Some(entry) = self.existing(&update.key) else {
            // Not subscribed (any more): nothing to do.
            return Ok(());
        };
        let endpoints = entry.endpoints(update.endpoints_version, update.endpoints)?;
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

    /// Every subscribed key with the versions held for it (empty when none), to subscribe again
    /// after a reconnect without being sent what is already here.
    pub fn subscriptions(&self) -> Vec<proto::Subscription> {
        let entries = self.inner.entries.lock().expect("destinations lock");
        entries
            .iter()
            .map(|(key, entry)| proto::Subscription {
                key: key.clone(),
                known_version: match entry.current() {
                    Resolution::Ready(d) => d.config.version.clone(),
                    _ => String::new(),
                },
                known_endpoints_version: entry
                    .endpoints
                    .lock()
                    .expect("endpoints lock")
                    .as_ref()
                    .map(|held| held.version.clone())
                    .unwrap_or_default(),
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
        endpoints: Option<(&str, &[&str])>,
    ) -> proto::DestinationUpdate {
        let destination = proto::Destination {
            namespace: "default".into(),
            service: "web".into(),
            port: 80,
            subsets: subsets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let (endpoints_version, endpoints) = match endpoints {
            Some((endpoints_version, addresses)) => {
                let endpoints = proto::Endpoints {
                    endpoints: addresses
                        .iter()
                        .map(|address| proto::Endpoint {
                            address: address.to_string(),
                            subsets: vec!["stable".into()],
                            ..Default::default()
                        })
                        .collect(),
                };
                (endpoints_version, Some(endpoints.encode_to_vec().into()))
            }
            None => ("e1", None),
        };
        proto::DestinationUpdate {
            key: KEY.into(),
            version: version.into(),
            destination: destination.encode_to_vec().into(),
            endpoints_version: endpoints_version.into(),
            endpoints,
        }
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
    fn endpoints_are_held_for_the_updates_that_name_them() {
        let (destinations, _subscriptions) = Destinations::new(Metrics::new());
        destinations.entry(KEY);
        let address: SocketAddr = "10.0.0.1:80".parse().unwrap();

        // Never sent: refused, nothing applied.
        assert_eq!(
            destinations.apply(update("0", &["stable"], None)),
            Err(invalid(
                "endpoints",
                "version `e1` was named but never sent"
            ))
        );

        // Carried with a policy that cannot apply (the endpoints' subset is not declared): the
        // update is refused, but the endpoints are held, as the controller assumes.
        let refused = destinations.apply(update("1", &[], Some(("e1", &["10.0.0.1:80"]))));
        assert_eq!(refused.unwrap_err().field, "endpoints[0].subsets");
        assert_eq!(
            destinations.subscriptions()[0].known_endpoints_version,
            "e1"
        );
        assert_eq!(destinations.subscriptions()[0].known_version, "");

        // A policy-only update uses them.
        destinations.apply(update("2", &["stable"], None)).unwrap();
        assert_eq!(applied(&destinations), ("2".to_string(), vec![address]));
        assert_eq!(destinations.subscriptions()[0].known_version, "2");

        // Endpoints that do not decode are refused and not held; the last good ones stay.
        let mut broken = update("3", &["stable"], None);
        broken.endpoints_version = "e2".into();
        broken.endpoints = Some(Bytes::from_static(b"\xff\xff"));
        assert_eq!(destinations.apply(broken).unwrap_err().field, "endpoints");
        assert_eq!(applied(&destinations).0, "2");
        destinations.apply(update("4", &["stable"], None)).unwrap();

        // Unknown drops them.
        destinations.set_unknown(KEY, "gone".into());
        assert_eq!(destinations.subscriptions()[0].known_endpoints_version, "");
        assert!(destinations.apply(update("5", &["stable"], None)).is_err());
    }
}
