//! A DestinationPolicy's status: this replica's entry (its proxies' counts) and the leader's
//! conditions and sums over every replica's entries.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use outrigger_api::policy::{DestinationPolicyStatus, ProxyCounts, ReplicaStatus};

use super::conditions::{Verdict, conditions};
use crate::distribute::{Holders, PolicyVersion, ProxyId, Subscribers};
use crate::index::{PolicyReport, PolicyReports, RoutedBy};
use crate::source::ObjectKey;

/// What this replica's proxies hold of each policy's destinations: per policy, the holders of
/// each of its keys, shared with the subscriber table. Taken under the table's lock for the cost
/// of one reference per key that a policy names, and counted after it is released, so that the
/// streams' subscribes and acknowledgements never wait on a count.
#[derive(Default)]
pub(super) struct Held(HashMap<ObjectKey, Vec<Arc<Holders>>>);

impl Held {
    pub(super) fn take(reports: &PolicyReports, subscribers: &Subscribers) -> Self {
        let by_policy = reports
            .iter()
            .filter_map(|(policy, report)| {
                let keys = report.destination_keys.as_ref().ok()?;
                let holders = keys.iter().filter_map(|key| subscribers.get(key));
                Some((policy.clone(), holders.cloned().collect()))
            })
            .collect();
        Self(by_policy)
    }

    fn of(&self, policy: &ObjectKey) -> &[Arc<Holders>] {
        self.0.get(policy).map_or(&[], Vec::as_slice)
    }
}

/// This replica's entry: its proxies subscribed to the policy's Service, by what they hold of its
/// current generation.
pub(super) fn replica_status(
    key: &ObjectKey,
    report: &PolicyReport,
    held: &Held,
    name: &str,
    now: &Time,
) -> ReplicaStatus {
    let current = PolicyVersion {
        policy: key.to_string(),
        generation: report.generation,
    };
    let (proxies, rejection) = count_proxies(&current, held.of(key));
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
pub(super) fn desired_status(
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
        ("Routed", routed(&report.routed_by)),
    ];
    let conditions = conditions(
        verdicts,
        previous.map_or(&[], |previous| previous.conditions.as_slice()),
        generation,
        now,
    );
    DestinationPolicyStatus {
        observed_generation: Some(generation),
        conditions,
        proxies_summary: Some(format!("{}/{}", proxies.acknowledged, proxies.connected)),
        proxies: Some(proxies),
        split: Some(report.split.clone()),
        routed_by: routed_by_summary(&report.routed_by),
        replicas: Vec::new(),
    }
}

/// At most this many routes are named in the `Routed` message, and fewer in `routedBy`.
const ROUTES_NAMED: usize = 8;
const ROUTES_SUMMARIZED: usize = 3;

/// Whether routes serve calls to the policy's Service, which then get the policy only where a
/// route sends them back to that Service (routes choose the Service; each Service's own policy
/// applies to what it is sent).
fn routed(routed_by: &[RoutedBy]) -> Verdict {
    if routed_by.is_empty() {
        return Verdict {
            holds: false,
            reason: "NoRoutes",
            message: "no HTTPRoute or GRPCRoute is attached to its Service: the policy applies \
                      to every call to it"
                .into(),
        };
    }
    let mut serving: Vec<String> = routed_by
        .iter()
        .take(ROUTES_NAMED)
        .map(|routed| {
            let callers = match &routed.callers {
                None => "every caller's calls".to_string(),
                Some(namespace) => format!("calls from namespace {namespace}"),
            };
            let ports: Vec<String> = routed.ports.iter().map(u16::to_string).collect();
            let port = if ports.len() == 1 { "port" } else { "ports" };
            format!(
                "{} serves {callers} to {port} {}",
                routed.route,
                ports.join(", ")
            )
        })
        .collect();
    if routed_by.len() > ROUTES_NAMED {
        serving.push(format!("{} more routes", routed_by.len() - ROUTES_NAMED));
    }
    Verdict::holds(
        "Routed",
        format!(
            "{}. Of the calls they serve, the policy applies to those a route sends to its \
             Service; the others get the policy of the Service a route sends them to",
            serving.join("; ")
        ),
    )
}

/// `HTTPRoute/shop/a,GRPCRoute/shop/b,HTTPRoute/web/c,+2`; none without routes.
fn routed_by_summary(routed_by: &[RoutedBy]) -> Option<String> {
    if routed_by.is_empty() {
        return None;
    }
    let mut names: Vec<String> = routed_by
        .iter()
        .take(ROUTES_SUMMARIZED)
        .map(|routed| routed.route.clone())
        .collect();
    if routed_by.len() > ROUTES_SUMMARIZED {
        names.push(format!("+{}", routed_by.len() - ROUTES_SUMMARIZED));
    }
    Some(names.join(","))
}

/// Counts the proxies among `holders` (those of each key of the policy) by what they hold of
/// `current`, with `namespace/workload: reason` of one that rejected it.
fn count_proxies(
    current: &PolicyVersion,
    holders: &[Arc<Holders>],
) -> (ProxyCounts, Option<String>) {
    // Per proxy: whether it applied `current` under every key, and its rejection of it.
    let mut proxies: HashMap<&ProxyId, (bool, Option<&str>)> = HashMap::new();
    let holdings = holders.iter().flat_map(|proxies| proxies.iter());
    for (proxy, holding) in holdings {
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
pub(super) mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::distribute::Holding;
    use crate::index::Problem;

    const KEY: &str = "reviews.shop.svc.cluster.local:9080";

    pub(in crate::status) fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    pub(in crate::status) fn report() -> PolicyReport {
        PolicyReport {
            uid: Some("u".into()),
            generation: 3,
            split: "stable=90,canary=10".into(),
            accepted: Ok(()),
            resolved_refs: Ok(()),
            destination_keys: Ok(vec![KEY.into()]),
            routed_by: Vec::new(),
            status: None,
        }
    }

    pub(in crate::status) fn policy() -> ObjectKey {
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
        Subscribers::from([(KEY.to_string(), Arc::new(proxies))])
    }

    /// What the proxies of `report()` hold, by workload.
    pub(in crate::status) fn held(holdings: Vec<(&str, Holding)>) -> Held {
        Held::take(&[(policy(), report())].into(), &subscribers(holdings))
    }

    pub(in crate::status) fn applied(generation: i64) -> Holding {
        Holding {
            applied: Some(version(generation)),
            rejected: None,
        }
    }

    /// The status with one replica, whose proxies hold `held`.
    fn status_of(
        report: &PolicyReport,
        held: &Held,
        previous: Option<&DestinationPolicyStatus>,
        now: &Time,
    ) -> DestinationPolicyStatus {
        let entry = replica_status(&policy(), report, held, "replica-a", now);
        desired_status(report, &[&entry], previous, now)
    }

    pub(in crate::status) fn entry(
        name: &str,
        generation: i64,
        counts: (u32, u32, u32),
    ) -> ReplicaStatus {
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
    pub(in crate::status) fn condition<'a>(
        status: &'a DestinationPolicyStatus,
        type_: &str,
    ) -> (&'a str, &'a str, &'a str) {
        let condition = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (&condition.status, &condition.reason, &condition.message)
    }

    #[test]
    fn what_is_held_is_taken_for_the_keys_policies_name_only_shared_with_the_table() {
        let mut table = subscribers(vec![("a", applied(3))]);
        let other = "ratings.shop.svc.cluster.local:9080";
        table.insert(other.into(), table[KEY].clone());
        let held = Held::take(&[(policy(), report())].into(), &table);
        let of_policy = held.of(&policy());
        assert_eq!(of_policy.len(), 1, "only the policy's key");
        assert!(
            Arc::ptr_eq(&of_policy[0], &table[KEY]),
            "shared, not copied"
        );
        assert!(held.of(&ObjectKey::new("shop", "ratings")).is_empty());
    }

    #[test]
    fn programmed_once_every_subscribed_proxy_applied_the_current_generation() {
        let none = status_of(&report(), &Held::default(), None, &at(0));
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

        let pending = held(vec![
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

        let done = held(vec![("a", applied(3)), ("b", applied(3))]);
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
        let holdings = held(vec![("a", applied(3)), ("b", rejecting), ("c", outdated)]);
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
        let status = status_of(&report, &Held::default(), None, &at(0));
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
        let holdings = held(vec![("a", applied(2))]);
        let first = status_of(&report(), &holdings, None, &at(100));
        // Later, the proxy applies generation 3: only Programmed turns.
        let holdings = held(vec![("a", applied(3))]);
        let second = status_of(&report(), &holdings, Some(&first), &at(200));
        let times = |status: &DestinationPolicyStatus| -> Vec<i64> {
            status
                .conditions
                .iter()
                .map(|c| c.last_transition_time.0.as_second())
                .collect()
        };
        assert_eq!(times(&first), [100, 100, 100, 100]);
        assert_eq!(times(&second), [100, 100, 200, 100]);
        // Nothing changed: the same status, so nothing to write.
        let third = status_of(&report(), &holdings, Some(&second), &at(300));
        assert_eq!(third, second);
    }

    #[test]
    fn routed_names_the_routes_serving_its_service_and_what_applies_to_their_calls() {
        let alone = status_of(&report(), &Held::default(), None, &at(0));
        assert_eq!(
            condition(&alone, "Routed"),
            (
                "False",
                "NoRoutes",
                "no HTTPRoute or GRPCRoute is attached to its Service: the policy applies to \
                 every call to it"
            )
        );
        assert_eq!(alone.routed_by, None);

        let routed = |route: &str, callers: Option<&str>, ports: &[u16]| RoutedBy {
            route: route.into(),
            callers: callers.map(String::from),
            ports: ports.to_vec(),
        };
        let report = PolicyReport {
            routed_by: vec![
                routed("GRPCRoute/web/mine", Some("web"), &[9080, 9090]),
                routed("HTTPRoute/shop/split", None, &[9080]),
            ],
            ..report()
        };
        let status = status_of(&report, &Held::default(), None, &at(0));
        assert_eq!(
            condition(&status, "Routed"),
            (
                "True",
                "Routed",
                "GRPCRoute/web/mine serves calls from namespace web to ports 9080, 9090; \
                 HTTPRoute/shop/split serves every caller's calls to port 9080. Of the calls \
                 they serve, the policy applies to those a route sends to its Service; the \
                 others get the policy of the Service a route sends them to"
            )
        );
        assert_eq!(
            status.routed_by.as_deref(),
            Some("GRPCRoute/web/mine,HTTPRoute/shop/split")
        );

        let many: Vec<RoutedBy> = (0..10)
            .map(|n| routed(&format!("HTTPRoute/shop/r{n}"), None, &[9080]))
            .collect();
        let report = PolicyReport {
            routed_by: many,
            ..report
        };
        let status = status_of(&report, &Held::default(), None, &at(0));
        assert_eq!(
            status.routed_by.as_deref(),
            Some("HTTPRoute/shop/r0,HTTPRoute/shop/r1,HTTPRoute/shop/r2,+7")
        );
        let (_, _, message) = condition(&status, "Routed");
        assert!(
            message.contains("HTTPRoute/shop/r7 serves") && message.contains("; 2 more routes."),
            "{message}"
        );
        assert!(!message.contains("r8"), "{message}");
    }

    #[test]
    fn a_replica_counts_its_own_proxies_and_names_one_rejection() {
        let rejecting = Holding {
            applied: Some(version(2)),
            rejected: Some((version(3), "bad address".into())),
        };
        let holdings = held(vec![
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
