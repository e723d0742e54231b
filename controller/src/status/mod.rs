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

use std::collections::HashMap;
use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource as _};
use outrigger_api::policy::{
    DestinationPolicy, DestinationPolicyStatus, ProxyCounts, ReplicaStatus,
};
use tokio::sync::watch;

use crate::distribute::{PolicyVersion, ProxyId, Subscribers};
use crate::index::{PolicyReport, PolicyReports, Problem};
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

/// Every policy's uid and `status.replicas`, as the API server has them.
pub type Replicas = HashMap<ObjectKey, (Option<String>, Vec<ReplicaStatus>)>;

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

/// Writes this replica's entries, and the rest of status while it leads, until the index is gone.
pub async fn run(client: Client, mut inputs: Inputs, metrics: Metrics) {
    if inputs.synced.wait_for(|synced| *synced).await.is_err() {
        return;
    }
    let own_manager = format!("{FIELD_MANAGER}/{}", inputs.identity);
    let refresh = seconds(inputs.lease_duration * REFRESH_LEASES);
    let stale = seconds(inputs.lease_duration * STALE_LEASES);
    // What this replica wrote last, by policy and uid (a policy recreated under the same name
    // starts afresh): the leader's part, and its own entry.
    let mut written: HashMap<ObjectKey, (Option<String>, DestinationPolicyStatus)> = HashMap::new();
    let mut contributed: HashMap<ObjectKey, (Option<String>, ReplicaStatus)> = HashMap::new();
    loop {
        let leading = *inputs.leading.borrow_and_update();
        if !leading {
            // Another replica writes meanwhile: once leading again, everything is written anew.
            written.clear();
        }
        let now =
            Time(Timestamp::from_second(Timestamp::now().as_second()).expect("now is in range"));
        let age = |entry: &ReplicaStatus| now.0.as_second() - entry.last_update_time.0.as_second();
        let mut writes: Vec<(ObjectKey, Option<String>, Write)> = Vec::new();
        {
            let reports = inputs.reports.borrow_and_update();
            let subscribers = inputs.subscribers.borrow_and_update();
            let replicas = inputs.replicas.borrow_and_update();
            written.retain(|key, _| reports.contains_key(key));
            contributed.retain(|key, _| reports.contains_key(key));
            for (key, report) in reports.iter() {
                let counted = replica_status(key, report, &subscribers, &inputs.identity, &now);
                let own = match contributed.get(key) {
                    // Unchanged and recent: the entry as written, time included.
                    Some((uid, entry))
                        if *uid == report.uid
                            && same_counts(entry, &counted)
                            && age(entry) < refresh =>
                    {
                        entry.clone()
                    }
                    _ => {
                        writes.push((key.clone(), report.uid.clone(), Write::Own(counted.clone())));
                        counted
                    }
                };
                if !leading {
                    continue;
                }
                let listed = replicas
                    .get(key)
                    .filter(|(uid, _)| *uid == report.uid)
                    .map_or(&[][..], |(_, entries)| entries.as_slice());
                let others = || {
                    listed
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.name != own.name)
                };
                let entries: Vec<&ReplicaStatus> = others()
                    .filter(|(_, entry)| age(entry) < stale)
                    .map(|(_, entry)| entry)
                    .chain([&own])
                    .collect();
                let previous = match written.get(key) {
                    Some((uid, status)) if *uid == report.uid => Some(status),
                    _ => report.status.as_ref(),
                };
                let status = desired_status(report, &entries, previous, &now);
                if written.get(key) != Some(&(report.uid.clone(), status.clone())) {
                    writes.push((key.clone(), report.uid.clone(), Write::Summary(status)));
                }
                for (position, entry) in others().filter(|(_, entry)| age(entry) >= stale) {
                    let name = entry.name.clone();
                    writes.push((
                        key.clone(),
                        report.uid.clone(),
                        Write::Prune { position, name },
                    ));
                }
            }
        }
        let results: Vec<_> = futures_util::stream::iter(writes)
            .map(|(key, uid, write)| {
                let client = client.clone();
                let own_manager = own_manager.as_str();
                async move {
                    let result = match &write {
                        Write::Own(entry) => {
                            let status = serde_json::json!({ "replicas": [entry] });
                            apply(client, &key, own_manager, status).await
                        }
                        Write::Summary(status) => {
                            apply(client, &key, FIELD_MANAGER, serde_json::json!(status)).await
                        }
                        Write::Prune { position, name } => {
                            prune(client, &key, *position, name).await
                        }
                    };
                    (key, uid, write, result)
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        let mut failed = false;
        for (key, uid, write, result) in results {
            match (write, result) {
                (Write::Own(entry), Ok(())) => {
                    contributed.insert(key, (uid, entry));
                }
                (Write::Summary(status), Ok(())) => {
                    written.insert(key, (uid, status));
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
                    failed = true;
                    metrics.reconcile_errors.inc();
                    tracing::error!(policy = %key, "writing the status of DestinationPolicy {key}: {}", explain(&error));
                }
            }
        }
        tokio::time::sleep(MIN_INTERVAL).await;
        let gone = tokio::select! {
            changed = inputs.reports.changed() => changed.is_err(),
            changed = inputs.subscribers.changed() => changed.is_err(),
            changed = inputs.leading.changed() => changed.is_err(),
            changed = inputs.replicas.changed() => changed.is_err(),
            // Entries to refresh, and others gone stale, with nothing else changing.
            _ = tokio::time::sleep(inputs.lease_duration) => false,
            _ = tokio::time::sleep(RETRY_AFTER), if failed => false,
        };
        if gone {
            return;
        }
    }
}

fn seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

fn same_counts(a: &ReplicaStatus, b: &ReplicaStatus) -> bool {
    (a.observed_generation, &a.proxies, &a.rejection)
        == (b.observed_generation, &b.proxies, &b.rejection)
}

/// Applies `status` to the policy's status subresource as `manager`.
async fn apply(
    client: Client,
    key: &ObjectKey,
    manager: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<DestinationPolicy> = Api::namespaced(client, &key.namespace);
    let patch = serde_json::json!({
        "apiVersion": DestinationPolicy::api_version(&()),
        "kind": DestinationPolicy::kind(&()),
        "status": status,
    });
    api.patch_status(
        &key.name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
}

/// Removes the entry of replica `name` at `position`. Server-side apply removes only what the
/// applier owns, and the entry is its replica's, so this is a JSON patch, which checks first that
/// the entry is still where it was read.
async fn prune(
    client: Client,
    key: &ObjectKey,
    position: usize,
    name: &str,
) -> Result<(), kube::Error> {
    let api: Api<DestinationPolicy> = Api::namespaced(client, &key.namespace);
    let path = format!("/status/replicas/{position}");
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "test", "path": format!("{path}/name"), "value": name },
        { "op": "remove", "path": path },
    ]))
    .expect("a well-formed JSON patch");
    api.patch_status(
        &key.name,
        &PatchParams::default(),
        &Patch::<()>::Json(patch),
    )
    .await
    .map(drop)
}

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

/// A condition's value, before it is dated.
struct Verdict {
    holds: bool,
    reason: &'static str,
    message: String,
}

impl Verdict {
    fn holds(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            holds: true,
            reason,
            message: message.into(),
        }
    }

    fn fails(problem: &Problem) -> Self {
        Self {
            holds: false,
            reason: problem.reason,
            message: problem.message.clone(),
        }
    }

    fn of(result: &Result<(), Problem>, reason: &'static str, message: impl Into<String>) -> Self {
        match result {
            Ok(()) => Self::holds(reason, message),
            Err(problem) => Self::fails(problem),
        }
    }
}

/// This replica's entry: its proxies subscribed to the policy's Service, by what they hold of its
/// current generation.
pub fn replica_status(
    key: &ObjectKey,
    report: &PolicyReport,
    subscribers: &Subscribers,
    name: &str,
    now: &Time,
) -> ReplicaStatus {
    let (proxies, rejection) = match &report.destination_keys {
        Err(_) => (ProxyCounts::default(), None),
        Ok(keys) => {
            let current = PolicyVersion {
                policy: key.to_string(),
                generation: report.generation,
            };
            count_proxies(&current, keys, subscribers)
        }
    };
    ReplicaStatus {
        name: name.to_string(),
        observed_generation: report.generation,
        proxies,
        rejection,
        last_update_time: now.clone(),
    }
}

/// The status a policy should have, summing `entries` (one per live replica); conditions whose
/// value did not change keep their `lastTransitionTime` from `previous`.
pub fn desired_status(
    report: &PolicyReport,
    entries: &[&ReplicaStatus],
    previous: Option<&DestinationPolicyStatus>,
    now: &Time,
) -> DestinationPolicyStatus {
    let generation = report.generation;
    let (proxies, programmed) = match &report.destination_keys {
        Err(problem) => (ProxyCounts::default(), Verdict::fails(problem)),
        Ok(_) => programmed(generation, entries),
    };
    let verdicts = [
        (
            "Accepted",
            Verdict::of(
                &report.accepted,
                "Accepted",
                "the policy is valid and in force",
            ),
        ),
        (
            "ResolvedRefs",
            Verdict::of(
                &report.resolved_refs,
                "ResolvedRefs",
                "its Service exists and every subset has ready endpoints",
            ),
        ),
        ("Programmed", programmed),
    ];
    let conditions = verdicts
        .into_iter()
        .map(|(type_, verdict)| {
            let status = if verdict.holds { "True" } else { "False" };
            let last_transition_time = previous
                .and_then(|previous| previous.conditions.iter().find(|c| c.type_ == type_))
                .filter(|condition| condition.status == status)
                .map_or_else(
                    || now.clone(),
                    |condition| condition.last_transition_time.clone(),
                );
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: verdict.reason.to_string(),
                message: verdict.message,
                observed_generation: Some(generation),
                last_transition_time,
            }
        })
        .collect();
    DestinationPolicyStatus {
        observed_generation: Some(generation),
        conditions,
        proxies_summary: Some(format!("{}/{}", proxies.acknowledged, proxies.connected)),
        proxies: Some(proxies),
        split: Some(report.split.clone()),
        replicas: Vec::new(),
    }
}

/// Counts the proxies subscribed to any of `keys` by what they hold of `current`, with
/// `namespace/workload: reason` of one that rejected it.
fn count_proxies(
    current: &PolicyVersion,
    keys: &[String],
    subscribers: &Subscribers,
) -> (ProxyCounts, Option<String>) {
    // Per proxy: whether it applied `current` under every key, and its rejection of it.
    let mut proxies: HashMap<&ProxyId, (bool, Option<&str>)> = HashMap::new();
    for (proxy, holding) in keys.iter().filter_map(|key| subscribers.get(key)).flatten() {
        let (applied, rejection) = proxies.entry(proxy).or_insert((true, None));
        *applied &= holding.applied.as_ref() == Some(current);
        if let Some((rejected, reason)) = &holding.rejected
            && rejected == current
        {
            *rejection = Some(reason);
        }
    }
    let counts = ProxyCounts {
        connected: count(proxies.len()),
        acknowledged: count(proxies.values().filter(|(applied, _)| *applied).count()),
        rejected: count(
            proxies
                .values()
                .filter(|(_, rejection)| rejection.is_some())
                .count(),
        ),
    };
    let rejection = proxies
        .iter()
        .filter_map(|(proxy, (_, rejection))| Some((proxy, (*rejection)?)))
        .min_by_key(|(proxy, _)| (&proxy.namespace, &proxy.workload))
        .map(|(proxy, reason)| format!("{}/{}: {reason}", proxy.namespace, proxy.workload));
    (counts, rejection)
}

/// The sums of the entries of `generation`, and whether all their proxies applied it.
fn programmed(generation: i64, entries: &[&ReplicaStatus]) -> (ProxyCounts, Verdict) {
    let current = entries
        .iter()
        .filter(|entry| entry.observed_generation == generation);
    let mut counts = ProxyCounts::default();
    for entry in current.clone() {
        counts.connected = counts.connected.saturating_add(entry.proxies.connected);
        counts.acknowledged = counts
            .acknowledged
            .saturating_add(entry.proxies.acknowledged);
        counts.rejected = counts.rejected.saturating_add(entry.proxies.rejected);
    }
    let verdict =
        if let Some(rejection) = current.filter_map(|entry| entry.rejection.as_deref()).min() {
            Verdict {
                holds: false,
                reason: "Rejected",
                message: format!(
                    "{} of {} proxies rejected generation {generation}; {rejection}",
                    counts.rejected, counts.connected
                ),
            }
        } else if counts.acknowledged < counts.connected {
            Verdict {
                holds: false,
                reason: "Pending",
                message: format!(
                    "{} of {} proxies applied generation {generation}",
                    counts.acknowledged, counts.connected
                ),
            }
        } else if counts.connected == 0 {
            Verdict::holds("Programmed", "no connected proxy calls its Service yet")
        } else {
            Verdict::holds(
                "Programmed",
                format!(
                    "all {} proxies applied generation {generation}",
                    counts.connected
                ),
            )
        };
    (counts, verdict)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribute::Holding;

    const KEY: &str = "reviews.shop.svc.cluster.local:9080";

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    fn report() -> PolicyReport {
        PolicyReport {
            uid: Some("u".into()),
            generation: 3,
            split: "stable=90,canary=10".into(),
            accepted: Ok(()),
            resolved_refs: Ok(()),
            destination_keys: Ok(vec![KEY.into()]),
            status: None,
        }
    }

    fn policy() -> ObjectKey {
        ObjectKey::new("shop", "reviews")
    }

    fn proxy(workload: &str) -> ProxyId {
        ProxyId {
            namespace: "shop".into(),
            workload: workload.into(),
            stream: 0,
        }
    }

    fn version(generation: i64) -> PolicyVersion {
        PolicyVersion {
            policy: "shop/reviews".into(),
            generation,
        }
    }

    fn subscribers(holdings: Vec<(&str, Holding)>) -> Subscribers {
        let proxies = holdings.into_iter().map(|(w, h)| (proxy(w), h)).collect();
        Subscribers::from([(KEY.to_string(), proxies)])
    }

    fn applied(generation: i64) -> Holding {
        Holding {
            applied: Some(version(generation)),
            rejected: None,
        }
    }

    /// The status with one replica, serving `subscribers`.
    fn status_of(
        report: &PolicyReport,
        subscribers: &Subscribers,
        previous: Option<&DestinationPolicyStatus>,
        now: &Time,
    ) -> DestinationPolicyStatus {
        let entry = replica_status(&policy(), report, subscribers, "replica-a", now);
        desired_status(report, &[&entry], previous, now)
    }

    fn entry(name: &str, generation: i64, counts: (u32, u32, u32)) -> ReplicaStatus {
        ReplicaStatus {
            name: name.into(),
            observed_generation: generation,
            proxies: ProxyCounts {
                connected: counts.0,
                acknowledged: counts.1,
                rejected: counts.2,
            },
            rejection: None,
            last_update_time: at(0),
        }
    }

    /// (status, reason, message) of a condition.
    fn condition<'a>(
        status: &'a DestinationPolicyStatus,
        type_: &str,
    ) -> (&'a str, &'a str, &'a str) {
        let condition = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (&condition.status, &condition.reason, &condition.message)
    }

    #[test]
    fn programmed_once_every_subscribed_proxy_applied_the_current_generation() {
        let none = status_of(&report(), &Subscribers::new(), None, &at(0));
        assert_eq!(
            condition(&none, "Programmed"),
            (
                "True",
                "Programmed",
                "no connected proxy calls its Service yet"
            )
        );
        assert_eq!(none.proxies_summary.as_deref(), Some("0/0"));
        assert_eq!(none.split.as_deref(), Some("stable=90,canary=10"));
        assert_eq!(none.observed_generation, Some(3));
        assert!(
            none.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );

        let pending = subscribers(vec![
            ("a", applied(3)),
            ("b", applied(2)),
            ("c", Holding::default()),
        ]);
        let status = status_of(&report(), &pending, None, &at(0));
        assert_eq!(
            condition(&status, "Programmed"),
            ("False", "Pending", "1 of 3 proxies applied generation 3")
        );
        assert_eq!(
            status.proxies,
            Some(ProxyCounts {
                connected: 3,
                acknowledged: 1,
                rejected: 0
            })
        );
        assert_eq!(status.proxies_summary.as_deref(), Some("1/3"));

        let done = subscribers(vec![("a", applied(3)), ("b", applied(3))]);
        let status = status_of(&report(), &done, None, &at(0));
        assert_eq!(
            condition(&status, "Programmed"),
            ("True", "Programmed", "all 2 proxies applied generation 3")
        );
    }

    #[test]
    fn a_rejection_of_the_current_generation_is_reported_with_the_proxy_reason() {
        let rejecting = Holding {
            applied: Some(version(2)),
            rejected: Some((version(3), "endpoints[0]: bad address".into())),
        };
        // A rejection of an older generation no longer counts.
        let outdated = Holding {
            applied: Some(version(3)),
            rejected: Some((version(2), "old".into())),
        };
        let holdings = subscribers(vec![("a", applied(3)), ("b", rejecting), ("c", outdated)]);
        let status = status_of(&report(), &holdings, None, &at(0));
        assert_eq!(
            condition(&status, "Programmed"),
            (
                "False",
                "Rejected",
                "1 of 3 proxies rejected generation 3; shop/b: endpoints[0]: bad address"
            )
        );
        assert_eq!(
            status.proxies,
            Some(ProxyCounts {
                connected: 3,
                acknowledged: 2,
                rejected: 1
            })
        );
    }

    #[test]
    fn problems_make_their_conditions_false() {
        let invalid = Problem {
            reason: "Invalid",
            message: "spec.retries.perTryTimeout: 20s exceeds the timeout 10s".into(),
        };
        let report = PolicyReport {
            accepted: Err(invalid.clone()),
            destination_keys: Err(invalid),
            resolved_refs: Err(Problem {
                reason: "ServiceNotFound",
                message: "Service shop/reviews does not exist".into(),
            }),
            ..report()
        };
        let status = status_of(&report, &Subscribers::new(), None, &at(0));
        let message = "spec.retries.perTryTimeout: 20s exceeds the timeout 10s";
        assert_eq!(
            condition(&status, "Accepted"),
            ("False", "Invalid", message)
        );
        assert_eq!(
            condition(&status, "Programmed"),
            ("False", "Invalid", message)
        );
        assert_eq!(
            condition(&status, "ResolvedRefs"),
            (
                "False",
                "ServiceNotFound",
                "Service shop/reviews does not exist"
            )
        );
        assert_eq!(status.proxies_summary.as_deref(), Some("0/0"));
    }

    #[test]
    fn transition_times_change_only_with_the_condition_status() {
        let holdings = subscribers(vec![("a", applied(2))]);
        let first = status_of(&report(), &holdings, None, &at(100));
        // Later, the proxy applies generation 3: only Programmed turns.
        let holdings = subscribers(vec![("a", applied(3))]);
        let second = status_of(&report(), &holdings, Some(&first), &at(200));
        let times = |status: &DestinationPolicyStatus| -> Vec<i64> {
            status
                .conditions
                .iter()
                .map(|c| c.last_transition_time.0.as_second())
                .collect()
        };
        assert_eq!(times(&first), [100, 100, 100]);
        assert_eq!(times(&second), [100, 100, 200]);
        // Nothing changed: the same status, so nothing to write.
        let third = status_of(&report(), &holdings, Some(&second), &at(300));
        assert_eq!(third, second);
    }

    #[test]
    fn a_replica_counts_its_own_proxies_and_names_one_rejection() {
        let rejecting = Holding {
            applied: Some(version(2)),
            rejected: Some((version(3), "bad address".into())),
        };
        let holdings = subscribers(vec![
            ("a", applied(3)),
            ("c", rejecting.clone()),
            ("b", rejecting),
        ]);
        let own = replica_status(&policy(), &report(), &holdings, "replica-a", &at(7));
        assert_eq!(
            own,
            ReplicaStatus {
                rejection: Some("shop/b: bad address".into()),
                last_update_time: at(7),
                ..entry("replica-a", 3, (3, 1, 2))
            }
        );
    }

    #[test]
    fn the_summary_sums_the_replicas_entries_of_the_current_generation() {
        let a = entry("replica-a", 3, (1, 1, 0));
        let b = entry("replica-b", 3, (2, 1, 0));
        // Its replica has not seen generation 3 yet: not counted.
        let c = entry("replica-c", 2, (5, 5, 0));
        let status = desired_status(&report(), &[&a, &b, &c], None, &at(0));
        assert_eq!(
            status.proxies,
            Some(ProxyCounts {
                connected: 3,
                acknowledged: 2,
                rejected: 0
            })
        );
        assert_eq!(status.proxies_summary.as_deref(), Some("2/3"));
        assert_eq!(
            condition(&status, "Programmed"),
            ("False", "Pending", "2 of 3 proxies applied generation 3")
        );
        // The summary leaves the entries to their replicas.
        assert!(status.replicas.is_empty());

        let b = entry("replica-b", 3, (2, 2, 0));
        let status = desired_status(&report(), &[&a, &b], None, &at(0));
        assert_eq!(status.proxies_summary.as_deref(), Some("3/3"));
        assert_eq!(
            condition(&status, "Programmed"),
            ("True", "Programmed", "all 3 proxies applied generation 3")
        );

        let b = ReplicaStatus {
            rejection: Some("shop/b: bad address".into()),
            ..entry("replica-b", 3, (2, 1, 1))
        };
        let status = desired_status(&report(), &[&a, &b], None, &at(0));
        assert_eq!(
            condition(&status, "Programmed"),
            (
                "False",
                "Rejected",
                "1 of 3 proxies rejected generation 3; shop/b: bad address"
            )
        );
    }

    #[test]
    fn an_entry_serializes_with_its_counts_inline() {
        let value = serde_json::to_value(entry("replica-a", 3, (2, 1, 0))).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "name": "replica-a",
                "observedGeneration": 3,
                "connected": 2,
                "acknowledged": 1,
                "rejected": 0,
                "lastUpdateTime": "1970-01-01T00:00:00Z",
            })
        );
    }
}
