//! Every policy's status as the API server has it: what a write is compared with (so only a
//! change is written), and the other replicas' entries the leader sums.

use std::collections::HashMap;
use std::pin::pin;

use futures_util::StreamExt as _;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client};
use outrigger_api::policy::{DestinationPolicy, DestinationPolicyStatus};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::source::ObjectKey;

/// Every policy's status, and when each replica's entries were last seen new.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// By policy: its uid and status.
    pub policies: HashMap<ObjectKey, (Option<String>, DestinationPolicyStatus)>,
    /// By replica name: when an entry it wrote was last seen here, new or changed (this replica's
    /// clock). A replica writes its heartbeat before its entries, so a read of the heartbeats
    /// begun after this instant sees its heartbeat, unless it has stopped.
    pub entry_seen: HashMap<String, Instant>,
}

impl Observed {
    /// The status of the policy with this uid, as the API server has it.
    pub fn status(
        &self,
        key: &ObjectKey,
        uid: &Option<String>,
    ) -> Option<&DestinationPolicyStatus> {
        self.policies
            .get(key)
            .filter(|(observed_uid, _)| observed_uid == uid)
            .map(|(_, status)| status)
    }

    /// Records a policy's status; whether it changed.
    fn record(&mut self, policy: &DestinationPolicy) -> bool {
        let Some(key) = policy_key(policy) else {
            return false;
        };
        let status = policy.status.clone().unwrap_or_default();
        let before = self.policies.get(&key).map(|(_, status)| status);
        let now = Instant::now();
        for entry in &status.replicas {
            if before.is_none_or(|before| !before.replicas.contains(entry)) {
                self.entry_seen.insert(entry.name.clone(), now);
            }
        }
        let value = (policy.metadata.uid.clone(), status);
        if self.policies.get(&key) == Some(&value) {
            return false;
        }
        self.policies.insert(key, value);
        true
    }
}

/// Keeps `observed` up to date with every policy's status. The Kubernetes source watches the same
/// policies but passes on spec changes only.
pub async fn watch_statuses(client: Client, observed: watch::Sender<Observed>) {
    let api: Api<DestinationPolicy> = Api::all(client);
    let mut events = pin!(watcher(api, watcher::Config::default()).default_backoff());
    let mut listing: Option<Observed> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => {
                listing = Some(Observed {
                    policies: HashMap::new(),
                    entry_seen: observed.borrow().entry_seen.clone(),
                });
            }
            Ok(Event::InitApply(policy)) => {
                if let Some(listing) = &mut listing {
                    listing.record(&policy);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(listing) = listing.take() {
                    observed.send_replace(listing);
                }
            }
            Ok(Event::Apply(policy)) => {
                observed.send_if_modified(|observed| observed.record(&policy));
            }
            Ok(Event::Delete(policy)) => {
                observed.send_if_modified(|observed| {
                    policy_key(&policy).is_some_and(|key| observed.policies.remove(&key).is_some())
                });
            }
            // The Kubernetes source counts the failures of its watch of the same objects; this one
            // retries with the same backoff.
            Err(error) => tracing::warn!("watching the status of DestinationPolicies: {error}"),
        }
    }
}

fn policy_key(policy: &DestinationPolicy) -> Option<ObjectKey> {
    Some(ObjectKey::new(
        policy.metadata.namespace.as_deref()?,
        policy.metadata.name.as_deref()?,
    ))
}
