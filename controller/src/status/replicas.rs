//! Every policy's `status.replicas`, as the API server has them, for the leader's sums.

use std::collections::HashMap;
use std::pin::pin;

use futures_util::StreamExt as _;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client};
use outrigger_api::policy::{DestinationPolicy, ReplicaStatus};
use tokio::sync::watch;

use crate::source::ObjectKey;

/// Every policy's uid and `status.replicas`, as the API server has them.
pub type Replicas = HashMap<ObjectKey, (Option<String>, Vec<ReplicaStatus>)>;

/// Keeps `replicas` up to date with every policy's entries, for the leader's sums. The Kubernetes
/// source watches the same policies but passes on spec changes only.
pub async fn watch_replicas(client: Client, replicas: watch::Sender<Replicas>) {
    let api: Api<DestinationPolicy> = Api::all(client);
    let mut events = pin!(watcher(api, watcher::Config::default()).default_backoff());
    let mut listing: Option<Replicas> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing = Some(Replicas::new()),
            Ok(Event::InitApply(policy)) => {
                if let Some(listing) = &mut listing {
                    record(listing, &policy);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(listing) = listing.take() {
                    replicas.send_replace(listing);
                }
            }
            Ok(Event::Apply(policy)) => {
                replicas.send_if_modified(|replicas| record(replicas, &policy));
            }
            Ok(Event::Delete(policy)) => {
                replicas.send_if_modified(|replicas| {
                    policy_key(&policy).is_some_and(|key| replicas.remove(&key).is_some())
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

/// Records a policy's entries; whether they changed.
fn record(replicas: &mut Replicas, policy: &DestinationPolicy) -> bool {
    let Some(key) = policy_key(policy) else {
        return false;
    };
    let entries = policy
        .status
        .as_ref()
        .map(|status| status.replicas.clone())
        .unwrap_or_default();
    let value = (policy.metadata.uid.clone(), entries);
    if replicas.get(&key) == Some(&value) {
        return false;
    }
    replicas.insert(key, value);
    true
}
