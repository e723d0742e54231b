//! The destinations this proxy has asked the control plane about, and their current state.
//!
//! A destination is subscribed to the first time the app calls it. Requests wait (briefly) for the
//! first answer; after that every request reads the latest applied version, and a new version
//! replaces it atomically: requests already running finish on the version they started with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outrigger_api::proto;
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::outbound::destination::Destination;
use crate::policy::{ConfigError, DestinationConfig, invalid};

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
    /// Looked up since the last sweep.
    used: AtomicBool,
    /// The endpoint groups last fetched for this destination, by name, which updates name with
    /// their versions.
    endpoints: Mutex<HashMap<String, HeldEndpoints>>,
}

struct HeldEndpoints {
    version: String,
    /// An encoded `proto::Endpoints`, a fraction of the decoded size, decoded again when a new
    /// version of the destination needs them.
    encoded: Bytes,
}

impl Entry {
    pub fn current(&self) -> Resolution {
        self.state.borrow().clone()
    }

    /// Every endpoint of `groups`, from the groups held at the versions named; groups no longer
    /// named are let go.
    fn endpoints(
        &self,
        groups: &[proto::EndpointGroup],
    ) -> Result<Vec<proto::Endpoint>, ConfigError> {
        let mut held = self.endpoints.lock().expect("endpoints lock");
        held.retain(|name, _| groups.iter().any(|group| group.name == *name));
        let mut endpoints = Vec::new();
        for group in groups {
            match held.get(&group.name) {
                Some(held) if held.version == group.version => endpoints.extend(
                    proto::Endpoints::decode(held.encoded.clone())
                        .expect("held endpoints decoded when they were fetched")
                        .endpoints,
                ),
                _ => {
                    return Err(invalid(
                        format!("endpoints[{}]", group.name),
                        format!("version `{}` is not held", group.version),
                    ));
                }
            }
        }
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
            entry.used.store(true, Ordering::Relaxed);
            return entry.clone();
        }
        let entry = Arc::new(Entry {
            state: watch::Sender::new(Resolution::Pending),
            used: AtomicBool::new(true),
            endpoints: Mutex::default(),
        });
        entries.insert(key.to_string(), entry.clone());
        let _ = self.inner.subscribe.send(key.to_string());
        entry
    }

    /// Forgets the destinations not looked up since the last sweep that nothing holds (no open
    /// connection, no request in flight); returns their keys, to unsubscribe from.
    pub fn sweep(&self) -> Vec<String> {
        let mut entries = self.inner.entries.lock().expect("destinations lock");
        let mut idle = Vec::new();
        entries.retain(|key, entry| {
            let used = entry.used.swap(false, Ordering::Relaxed);
            let kept = used || Arc::strong_count(entry) > 1;
            if !kept {
                idle.push(key.clone());
            }
            kept
        });
        idle
    }

    fn existing(&self, key: &str) -> Option<Arc<Entry>> {
        self.inner
            .entries
            .lock()
            .expect("destinations lock")
            .get(key)
            .cloned()
    }

    /// The endpoint groups of `groups` not held at the version named (none when `key` is not
    /// subscribed, so none are needed).
    pub fn missing_endpoints(
        &self,
        key: &str,
        groups: &[proto::EndpointGroup],
    ) -> Vec<proto::EndpointGroup> {
        let Some(entry) = self.existing(key) else {
            return Vec::new();
        };
        let held = entry.endpoints.lock().expect("endpoints lock");
        groups
            .iter()
            .filter(|group| {
                held.get(&group.name)
                    .is_none_or(|held| held.version != group.version)
            })
            .cloned()
            .collect()
    }

    /// Holds a fetched endpoint group (an encoded `proto::Endpoints`) for the updates that name
    /// it; refused, keeping what was held, when it does not decode.
    pub fn hold_endpoints(
        &self,
        key: &str,
        group: proto::EndpointGroup,
        encoded: &[u8],
    ) -> Result<(), ConfigError> {
        proto::Endpoints::decode(encoded).map_err(|error| {
            invalid(
                format!("endpoints[{}]", group.name),
                format!("do not decode: {error}"),
            )
        })?;
        if let Some(entry) = self.existing(key) {
            // Copied: a slice would keep the reply's whole read buffer alive.
            let encoded = Bytes::copy_from_slice(encoded);
            let held = HeldEndpoints {
                version: group.version,
                encoded,
            };
            entry
                .endpoints
                .lock()
                .expect("endpoints lock")
                .insert(group.name, held);
        }
        Ok(())
    }

    /// Validates and applies a new version; on error the previous version stays in force.
    pub fn apply(
        &self,
        key: &str,
        version: String,
        destination: proto::Destination,
    ) -> Result<(), ConfigError> {
        let Some(entry) = self.existing(key) else {
            // Not subscribed (any more): nothing to do.
            return Ok(());
        };
        let endpoints = entry.endpoints(&destination.endpoint_groups)?;
        let config = DestinationConfig::from_proto(version, destination, endpoints)?;
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
            entry.endpoints.lock().expect("endpoints lock").clear();
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

    /// Endpoint groups by (name, version).
    fn groups(named: &[(&str, &str)]) -> Vec<proto::EndpointGroup> {
        named
            .iter()
            .map(|(name, version)| proto::EndpointGroup {
                name: name.to_string(),
                version: version.to_string(),
            })
            .collect()
    }

    fn destination(subsets: &[&str], groups: &[proto::EndpointGroup]) -> proto::Destination {
        proto::Destination {
            namespace: "default".into(),
            service: "web".into(),
            port: 80,
            subsets: subsets.iter().map(|s| s.to_string()).collect(),
            endpoint_groups: groups.to_vec(),
            ..Default::default()
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
    fn updates_apply_with_the_endpoint_groups_held_at_the_versions_they_name() {
        let (destinations, _subscriptions) = Destinations::new(Metrics::new());
        destinations.entry(KEY);
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let hold = |name: &str, version: &str, addresses: &[&str]| {
            destinations.hold_endpoints(
                KEY,
                groups(&[(name, version)]).remove(0),
                &endpoints(addresses),
            )
        };
        let both = groups(&[("a", "1"), ("b", "1")]);

        // Not held: refused, nothing applied.
        assert_eq!(destinations.missing_endpoints(KEY, &both), both);
        assert_eq!(
            destinations.apply(KEY, "0".into(), destination(&["stable"], &both)),
            Err(invalid("endpoints[a]", "version `1` is not held"))
        );

        hold("a", "1", &["10.0.0.1:80"]).unwrap();
        hold("b", "1", &["10.0.0.2:80"]).unwrap();
        assert!(destinations.missing_endpoints(KEY, &both).is_empty());
        destinations
            .apply(KEY, "1".into(), destination(&["stable"], &both))
            .unwrap();
        assert_eq!(
            applied(&destinations),
            ("1".into(), vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")])
        );

        // A policy that cannot apply to them (their subset is not declared) is refused.
        let refused = destinations
            .apply(KEY, "2".into(), destination(&[], &both))
            .unwrap_err();
        assert_eq!(refused.field, "endpoints[0].subsets");
        assert_eq!(applied(&destinations).0, "1");

        // A group that does not decode is refused and the held one stays.
        let broken = destinations.hold_endpoints(KEY, groups(&[("b", "2")]).remove(0), b"\xff\xff");
        assert_eq!(broken.unwrap_err().field, "endpoints[b]");
        assert!(destinations.missing_endpoints(KEY, &both).is_empty());

        // Churn in one group: only it is missing; a group no longer named is let go.
        let churned = groups(&[("a", "1"), ("b", "3")]);
        assert_eq!(destinations.missing_endpoints(KEY, &churned), churned[1..]);
        hold("b", "3", &["10.0.0.3:80"]).unwrap();
        destinations
            .apply(KEY, "3".into(), destination(&["stable"], &churned[1..]))
            .unwrap();
        assert_eq!(
            applied(&destinations),
            ("3".into(), vec![addr("10.0.0.3:80")])
        );
        assert_eq!(destinations.missing_endpoints(KEY, &churned), churned[..1]);

        // Unknown drops them all.
        destinations.set_unknown(KEY, "gone".into());
        assert_eq!(destinations.missing_endpoints(KEY, &churned), churned);
    }

    #[test]
    fn a_sweep_forgets_what_was_neither_used_since_the_last_nor_held() {
        let (destinations, mut subscriptions) = Destinations::new(Metrics::new());
        let held = destinations.entry("held.default.svc.cluster.local:80");
        destinations.entry("idle.default.svc.cluster.local:80");
        destinations.entry("used.default.svc.cluster.local:80");
        while subscriptions.try_recv().is_ok() {}

        // Everything was just used.
        assert!(destinations.sweep().is_empty());
        destinations.entry("used.default.svc.cluster.local:80");
        assert_eq!(destinations.sweep(), ["idle.default.svc.cluster.local:80"]);
        assert_eq!(destinations.sweep(), ["used.default.svc.cluster.local:80"]);
        // Held (an open connection, a request waiting): kept, however long.
        assert!(destinations.sweep().is_empty());
        drop(held);
        assert_eq!(destinations.sweep(), ["held.default.svc.cluster.local:80"]);

        // Used again after being forgotten: subscribed again.
        destinations.entry("idle.default.svc.cluster.local:80");
        assert_eq!(
            subscriptions.try_recv().unwrap(),
            "idle.default.svc.cluster.local:80"
        );
    }
}
