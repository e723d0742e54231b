//! The destinations this proxy has asked the control plane about, and their current state.
//!
//! A destination is subscribed to the first time the app calls it. Requests wait (briefly) for the
//! first answer; after that every request reads the latest applied version, and a new version
//! replaces it atomically: requests already running finish on the version they started with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outrigger_api::proto;
use tokio::sync::{mpsc, watch};

use crate::config::{ConfigError, DestinationConfig};
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
    pub fn apply(
        &self,
        key: &str,
        version: String,
        destination: proto::Destination,
    ) -> Result<(), ConfigError> {
        let config = DestinationConfig::from_proto(version, destination)?;
        let Some(entry) = self.existing(key) else {
            // Not subscribed (any more): nothing to do, and nothing wrong with the config.
            return Ok(());
        };
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
            entry.state.send_replace(Resolution::Unknown(reason.into()));
        }
    }

    /// Every subscribed key with the version applied to it (empty when none), to subscribe again
    /// after a reconnect without being sent what is already here.
    pub fn subscriptions(&self) -> Vec<(String, String)> {
        self.all()
            .into_iter()
            .map(|(key, resolution)| {
                let version = match resolution {
                    Resolution::Ready(d) => d.config.version.clone(),
                    _ => String::new(),
                };
                (key, version)
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
