//! DestinationPolicy status, written with server-side apply on the status subresource.
//!
//! Every replica serves proxies, so every replica counts its own: what the proxies it serves did
//! with the policy's generation goes into its entry of `status.replicas`, applied under a field
//! manager of its own (`outrigger-controller/<identity>`) so that the API server merges the
//! entries by name. The leader alone (field manager `outrigger-controller`) writes the rest: the
//! conditions Accepted, ResolvedRefs and Programmed, `observedGeneration`, the `split`, and the
//! sums `proxies` and `proxiesSummary` over the entries of the current generation.
//!
//! A replica refreshes its entry every [`REFRESH_LEASES`] lease durations even when its counts
//! stay the same; the leader removes the entries not refreshed for [`STALE_LEASES`] lease
//! durations, those of replicas that are gone (the timestamps are the writers' clocks, so skew
//! between nodes must stay well under that). An entry of an older generation is kept but not
//! counted: its replica has not seen the current one yet.
//!
//! Writes are coalesced: a pass computes every policy's status from the index's reports, from what
//! the proxies hold and from the other replicas' entries, writes those that differ from what was
//! written last, then waits at least [`MIN_INTERVAL`]; so a burst of changes (a thousand proxies
//! acknowledging a rollout) costs each policy at most one write per replica per interval. A status
//! write leaves a policy's generation alone, and the Kubernetes source ignores changes that do, so
//! writing never causes work of its own.

//!
//! `destination_policy` computes a policy's entry and summary; `replicas` watches the entries on
//! the API server; `api` writes. A new kind with a status gets a file of its own beside
//! `destination_policy`.

mod api;
mod destination_policy;
mod replicas;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use outrigger_api::policy::{DestinationPolicyStatus, ReplicaStatus};
use tokio::sync::watch;

use self::destination_policy::{desired_status, replica_status};
pub use self::replicas::{Replicas, watch_replicas};
use crate::distribute::Subscribers;
use crate::index::{PolicyReport, PolicyReports};
use crate::kube_api::explain;
use crate::metrics::Metrics;
use crate::source::ObjectKey;

pub const FIELD_MANAGER: &str = "outrigger-controller";
/// At most one status write per policy per this long.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// A replica rewrites an unchanged entry after this many lease durations.
pub const REFRESH_LEASES: u32 = 2;
/// The leader removes an entry not rewritten for this many lease durations.
pub const STALE_LEASES: u32 = 5;
/// Failed writes are tried again after this long, or at the next change.
const RETRY_AFTER: Duration = Duration::from_secs(5);
const CONCURRENT_WRITES: usize = 8;

/// What status is computed from.
pub struct Inputs {
    pub reports: watch::Receiver<PolicyReports>,
    pub subscribers: watch::Receiver<Subscribers>,
    /// Whether this replica holds the leader Lease.
    pub leading: watch::Receiver<bool>,
    /// Whether the index has its first full view; before, a Service may look missing that is not.
    pub synced: watch::Receiver<bool>,
    /// Every replica's entries, kept by [`watch_replicas`].
    pub replicas: watch::Receiver<Replicas>,
    /// This replica's name in the Lease, and of its entries.
    pub identity: String,
    pub lease_duration: Duration,
}

/// One status write.
enum Write {
    /// This replica's entry.
    Own(ReplicaStatus),
    /// The leader's conditions and sums.
    Summary(DestinationPolicyStatus),
    /// The removal of a gone replica's entry, at its position in the list.
    Prune { position: usize, name: String },
}

/// A write of one policy's status, for the policy with this uid.
struct Planned {
    key: ObjectKey,
    uid: Option<String>,
    write: Write,
}

/// Writes this replica's entries, and the rest of status while it leads, until the index is gone.
pub async fn run(client: Client, mut inputs: Inputs, metrics: Metrics) {
    if inputs.synced.wait_for(|synced| *synced).await.is_err() {
        return;
    }
    let mut writer = Writer::new(client, &inputs, metrics);
    loop {
        let leading = *inputs.leading.borrow_and_update();
        if !leading {
            // Another replica writes meanwhile: once leading again, everything is written anew.
            writer.written.clear();
        }
        let writes = writer.plan(&mut inputs, leading, &now());
        let failed = writer.write(writes).await;
        tokio::time::sleep(MIN_INTERVAL).await;
        if inputs.gone_after_change(failed).await {
            return;
        }
    }
}

impl Inputs {
    /// Waits for a change worth a pass; true when an input is gone.
    async fn gone_after_change(&mut self, failed: bool) -> bool {
        tokio::select! {
            changed = self.reports.changed() => changed.is_err(),
            changed = self.subscribers.changed() => changed.is_err(),
            changed = self.leading.changed() => changed.is_err(),
            changed = self.replicas.changed() => changed.is_err(),
            // Entries to refresh, and others gone stale, with nothing else changing.
            _ = tokio::time::sleep(self.lease_duration) => false,
            _ = tokio::time::sleep(RETRY_AFTER), if failed => false,
        }
    }
}

/// Now, to the second (the precision of status times).
fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).expect("now is in range"))
}

/// This replica's status writer, and what it wrote last, by policy and uid (a policy recreated
/// under the same name starts afresh).
struct Writer {
    client: Client,
    identity: String,
    own_manager: String,
    metrics: Metrics,
    /// Seconds after which an unchanged entry is written again, and an entry not written is stale.
    refresh: i64,
    stale: i64,
    /// The leader's part.
    written: HashMap<ObjectKey, (Option<String>, DestinationPolicyStatus)>,
    /// This replica's entry.
    contributed: HashMap<ObjectKey, (Option<String>, ReplicaStatus)>,
}

impl Writer {
    fn new(client: Client, inputs: &Inputs, metrics: Metrics) -> Self {
        Self {
            client,
            identity: inputs.identity.clone(),
            own_manager: format!("{FIELD_MANAGER}/{}", inputs.identity),
            metrics,
            refresh: seconds(inputs.lease_duration * REFRESH_LEASES),
            stale: seconds(inputs.lease_duration * STALE_LEASES),
            written: HashMap::new(),
            contributed: HashMap::new(),
        }
    }

    /// The writes that bring every policy's status to what the inputs say.
    fn plan(&mut self, inputs: &mut Inputs, leading: bool, now: &Time) -> Vec<Planned> {
        let reports = inputs.reports.borrow_and_update();
        let subscribers = inputs.subscribers.borrow_and_update();
        let replicas = inputs.replicas.borrow_and_update();
        self.written.retain(|key, _| reports.contains_key(key));
        self.contributed.retain(|key, _| reports.contains_key(key));
        let mut writes = Vec::new();
        for (key, report) in reports.iter() {
            let own = self.plan_own(key, report, &subscribers, now, &mut writes);
            if leading {
                let listed = replicas
                    .get(key)
                    .filter(|(uid, _)| *uid == report.uid)
                    .map_or(&[][..], |(_, entries)| entries.as_slice());
                self.plan_summary(key, report, &own, listed, now, &mut writes);
            }
        }
        writes
    }

    /// This replica's entry for one policy, planning its write unless it is unchanged and
    /// recent.
    fn plan_own(
        &self,
        key: &ObjectKey,
        report: &PolicyReport,
        subscribers: &Subscribers,
        now: &Time,
        writes: &mut Vec<Planned>,
    ) -> ReplicaStatus {
        let counted = replica_status(key, report, subscribers, &self.identity, now);
        match self.contributed.get(key) {
            // Unchanged and recent: the entry as written, time included.
            Some((uid, entry))
                if *uid == report.uid
                    && same_counts(entry, &counted)
                    && age(entry, now) < self.refresh =>
            {
                entry.clone()
            }
            _ => {
                writes.push(Planned {
                    key: key.clone(),
                    uid: report.uid.clone(),
                    write: Write::Own(counted.clone()),
                });
                counted
            }
        }
    }

    /// The leader's part of one policy's status, summed over this replica's entry and the
    /// others' that are not stale, and the removal of those that are.
    fn plan_summary(
        &self,
        key: &ObjectKey,
        report: &PolicyReport,
        own: &ReplicaStatus,
        listed: &[ReplicaStatus],
        now: &Time,
        writes: &mut Vec<Planned>,
    ) {
        let others = || {
            listed
                .iter()
                .enumerate()
                .filter(|(_, entry)| entry.name != own.name)
        };
        let entries: Vec<&ReplicaStatus> = others()
            .filter(|(_, entry)| age(entry, now) < self.stale)
            .map(|(_, entry)| entry)
            .chain([own])
            .collect();
        let previous = match self.written.get(key) {
            Some((uid, status)) if *uid == report.uid => Some(status),
            _ => report.status.as_ref(),
        };
        let status = desired_status(report, &entries, previous, now);
        if self.written.get(key) != Some(&(report.uid.clone(), status.clone())) {
            writes.push(Planned {
                key: key.clone(),
                uid: report.uid.clone(),
                write: Write::Summary(status),
            });
        }
        for (position, entry) in others().filter(|(_, entry)| age(entry, now) >= self.stale) {
            writes.push(Planned {
                key: key.clone(),
                uid: report.uid.clone(),
                write: Write::Prune {
                    position,
                    name: entry.name.clone(),
                },
            });
        }
    }

    /// Performs the writes, a few at a time, and records what was written; whether any failed.
    async fn write(&mut self, writes: Vec<Planned>) -> bool {
        let results: Vec<_> = futures_util::stream::iter(writes)
            .map(|planned| {
                let client = self.client.clone();
                let own_manager = self.own_manager.as_str();
                async move {
                    let result = perform(client, own_manager, &planned).await;
                    (planned, result)
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        let mut failed = false;
        for (planned, result) in results {
            failed |= !self.record(planned, result);
        }
        failed
    }

    /// Records the outcome of one write; false when it failed.
    fn record(&mut self, planned: Planned, result: Result<(), kube::Error>) -> bool {
        let Planned { key, uid, write } = planned;
        match (write, result) {
            (Write::Own(entry), Ok(())) => {
                self.contributed.insert(key, (uid, entry));
            }
            (Write::Summary(status), Ok(())) => {
                self.written.insert(key, (uid, status));
            }
            (Write::Prune { name, .. }, Ok(())) => {
                tracing::info!(policy = %key, replica = %name, "removed the status entry of a replica that stopped refreshing it");
            }
            // Deleted since the index reported it.
            (_, Err(kube::Error::Api(error))) if error.is_not_found() => {}
            // The list changed since it was read (the entry is gone already, or moved): the
            // next pass sees it as it is now.
            (Write::Prune { .. }, Err(kube::Error::Api(error))) if error.code == 422 => {}
            (_, Err(error)) => {
                self.metrics.reconcile_errors.inc();
                tracing::error!(policy = %key, "writing the status of DestinationPolicy {key}: {}", explain(&error));
                return false;
            }
        }
        true
    }
}

async fn perform(client: Client, own_manager: &str, planned: &Planned) -> Result<(), kube::Error> {
    let key = &planned.key;
    match &planned.write {
        Write::Own(entry) => {
            let status = serde_json::json!({ "replicas": [entry] });
            api::apply(client, key, own_manager, status).await
        }
        Write::Summary(status) => {
            api::apply(client, key, FIELD_MANAGER, serde_json::json!(status)).await
        }
        Write::Prune { position, name } => api::prune(client, key, *position, name).await,
    }
}

/// Seconds since the entry was written, by the clock of this replica.
fn age(entry: &ReplicaStatus, now: &Time) -> i64 {
    now.0.as_second() - entry.last_update_time.0.as_second()
}

fn seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

fn same_counts(a: &ReplicaStatus, b: &ReplicaStatus) -> bool {
    (a.observed_generation, &a.proxies, &a.rejection)
        == (b.observed_generation, &b.proxies, &b.rejection)
}
