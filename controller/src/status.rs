//! DestinationPolicy status, written by the leader: the conditions Accepted, ResolvedRefs and
//! Programmed, `observedGeneration`, what the proxies did with the current generation, and the
//! `split` and `proxiesSummary` that `kubectl get dp` shows.
//!
//! Written with server-side apply on the status subresource, as field manager
//! `outrigger-controller`. Writes are coalesced: a pass computes every policy's status from the
//! index's reports and from what the proxies hold, writes those that differ from what was written
//! last, then waits at least [`MIN_INTERVAL`]; so a burst of changes (a thousand proxies
//! acknowledging a rollout) costs each policy at most one write per interval. A status write
//! leaves a policy's generation alone, and the Kubernetes source ignores changes that do, so
//! writing never causes work of its own.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource as _};
use outrigger_api::policy::{DestinationPolicy, DestinationPolicyStatus, ProxyCounts};
use tokio::sync::watch;

use crate::distribute::{PolicyVersion, ProxyId, Subscribers};
use crate::index::{ObjectKey, PolicyReport, PolicyReports, Problem};
use crate::kube_source::explain;
use crate::metrics::Metrics;

pub const FIELD_MANAGER: &str = "outrigger-controller";
/// At most one status write per policy per this long.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
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
}

/// Writes status while this replica leads, until the index is gone.
pub async fn run(client: Client, mut inputs: Inputs, metrics: Metrics) {
    if inputs.synced.wait_for(|synced| *synced).await.is_err() {
        return;
    }
    // What this replica wrote last, by policy and uid (a policy recreated under the same name
    // starts afresh).
    let mut written: HashMap<ObjectKey, (Option<String>, DestinationPolicyStatus)> = HashMap::new();
    loop {
        if !*inputs.leading.borrow_and_update() {
            // Another replica writes meanwhile: once leading again, everything is written anew.
            written.clear();
            if inputs.leading.changed().await.is_err() {
                return;
            }
            continue;
        }
        let now =
            Time(Timestamp::from_second(Timestamp::now().as_second()).expect("now is in range"));
        let desired: Vec<(ObjectKey, Option<String>, DestinationPolicyStatus)> = {
            let reports = inputs.reports.borrow_and_update();
            let subscribers = inputs.subscribers.borrow_and_update();
            written.retain(|key, _| reports.contains_key(key));
            reports
                .iter()
                .map(|(key, report)| {
                    let previous = match written.get(key) {
                        Some((uid, status)) if *uid == report.uid => Some(status),
                        _ => report.status.as_ref(),
                    };
                    let status = desired_status(key, report, &subscribers, previous, &now);
                    (key.clone(), report.uid.clone(), status)
                })
                .filter(|(key, uid, status)| {
                    written.get(key) != Some(&(uid.clone(), status.clone()))
                })
                .collect()
        };
        let results: Vec<_> = futures_util::stream::iter(desired)
            .map(|(key, uid, status)| {
                let client = client.clone();
                async move {
                    let result = write(client, &key, &status).await;
                    (key, uid, status, result)
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        let mut failed = false;
        for (key, uid, status, result) in results {
            match result {
                Ok(()) => {
                    written.insert(key, (uid, status));
                }
                // Deleted since the index reported it.
                Err(kube::Error::Api(error)) if error.is_not_found() => {}
                Err(error) => {
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
            _ = tokio::time::sleep(RETRY_AFTER), if failed => false,
        };
        if gone {
            return;
        }
    }
}

async fn write(
    client: Client,
    key: &ObjectKey,
    status: &DestinationPolicyStatus,
) -> Result<(), kube::Error> {
    let api: Api<DestinationPolicy> = Api::namespaced(client, &key.namespace);
    let patch = serde_json::json!({
        "apiVersion": DestinationPolicy::api_version(&()),
        "kind": DestinationPolicy::kind(&()),
        "status": status,
    });
    api.patch_status(
        &key.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
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

/// The status a policy should have; conditions whose value did not change keep their
/// `lastTransitionTime` from `previous`.
pub fn desired_status(
    key: &ObjectKey,
    report: &PolicyReport,
    subscribers: &Subscribers,
    previous: Option<&DestinationPolicyStatus>,
    now: &Time,
) -> DestinationPolicyStatus {
    let generation = report.generation;
    let (proxies, programmed) = match &report.destination_keys {
        Err(problem) => (ProxyCounts::default(), Verdict::fails(problem)),
        Ok(keys) => {
            let current = PolicyVersion {
                policy: key.to_string(),
                generation,
            };
            programmed(&current, keys, subscribers)
        }
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
    }
}

/// Counts the proxies subscribed to any of `keys` by what they hold of `current`, and whether
/// they all applied it.
fn programmed(
    current: &PolicyVersion,
    keys: &[String],
    subscribers: &Subscribers,
) -> (ProxyCounts, Verdict) {
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
    let generation = current.generation;
    let verdict = if let Some((proxy, (_, Some(reason)))) = proxies
        .iter()
        .filter(|(_, (_, rejection))| rejection.is_some())
        .min_by_key(|(proxy, _)| (&proxy.namespace, &proxy.workload))
    {
        Verdict {
            holds: false,
            reason: "Rejected",
            message: format!(
                "{} of {} proxies rejected generation {generation}; {}/{}: {reason}",
                counts.rejected, counts.connected, proxy.namespace, proxy.workload
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
        let none = desired_status(&policy(), &report(), &Subscribers::new(), None, &at(0));
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
        let status = desired_status(&policy(), &report(), &pending, None, &at(0));
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
        let status = desired_status(&policy(), &report(), &done, None, &at(0));
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
        let status = desired_status(&policy(), &report(), &holdings, None, &at(0));
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
        let status = desired_status(&policy(), &report, &Subscribers::new(), None, &at(0));
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
        let first = desired_status(&policy(), &report(), &holdings, None, &at(100));
        // Later, the proxy applies generation 3: only Programmed turns.
        let holdings = subscribers(vec![("a", applied(3))]);
        let second = desired_status(&policy(), &report(), &holdings, Some(&first), &at(200));
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
        let third = desired_status(&policy(), &report(), &holdings, Some(&second), &at(300));
        assert_eq!(third, second);
    }
}
