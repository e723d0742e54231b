//! AuthorizationPolicy status: the conditions Accepted and ResolvedRefs and `observedGeneration`,
//! written by the leader alone (nothing in it is per replica) with server-side apply on the
//! status subresource, on change only: a policy is written when what it should say differs from
//! what it said when its spec was read, or from what this leader last wrote. Passes are at least
//! [`MIN_INTERVAL`] apart; a failed write is tried again at the next pass, [`RETRY_AFTER`] later
//! at most.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource as _};
use outrigger_api::authz::{AuthorizationPolicy, AuthorizationPolicyStatus};
use tokio::sync::watch;
use tokio::time::Instant;

use super::conditions::{Verdict, conditions};
use super::write::WRITE_TIMEOUT;
use super::{FIELD_MANAGER, MIN_INTERVAL};
use crate::index::{AuthorizationReport, AuthorizationReports};
use crate::kube_api::within;
use crate::metrics::Metrics;
use crate::source::ObjectKey;

const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Writes the status of every AuthorizationPolicy while this replica leads, until the index is
/// gone.
pub async fn run(
    client: Client,
    mut reports: watch::Receiver<AuthorizationReports>,
    mut leading: watch::Receiver<bool>,
    mut synced: watch::Receiver<bool>,
    metrics: Metrics,
) {
    if synced.wait_for(|synced| *synced).await.is_err() {
        return;
    }
    // Per policy, the uid and status this replica last wrote.
    let mut written: HashMap<ObjectKey, (Option<String>, AuthorizationPolicyStatus)> =
        HashMap::new();
    let mut retry = false;
    loop {
        if *leading.borrow_and_update() {
            let reports = reports.borrow_and_update().clone();
            written.retain(|key, _| reports.contains_key(key));
            retry = false;
            for (key, report) in &reports {
                let last = written
                    .get(key)
                    .filter(|(uid, _)| *uid == report.uid)
                    .map(|(_, status)| status)
                    .or(report.status.as_ref());
                let status = status_of(report, last, &now());
                if last.is_some_and(|last| same(last, &status)) {
                    continue;
                }
                metrics.status_writes.inc();
                match write(&client, key, &status).await {
                    Ok(()) => {
                        written.insert(key.clone(), (report.uid.clone(), status));
                    }
                    Err(error) => {
                        metrics.reconcile_errors.inc();
                        tracing::warn!(policy = %key, %error, "writing AuthorizationPolicy status");
                        retry = true;
                    }
                }
            }
        } else {
            // Another replica writes; what it wrote is not ours to compare with.
            written.clear();
        }
        let next_pass = Instant::now() + MIN_INTERVAL;
        tokio::select! {
            changed = reports.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY_AFTER), if retry => {}
        }
        tokio::time::sleep_until(next_pass).await;
    }
}

fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).expect("now is in range"))
}

/// Whether two statuses say the same, whenever they were written.
fn same(a: &AuthorizationPolicyStatus, b: &AuthorizationPolicyStatus) -> bool {
    let undated = |status: &AuthorizationPolicyStatus| {
        let mut status = status.clone();
        for condition in &mut status.conditions {
            condition.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        status
    };
    undated(a) == undated(b)
}

/// The status a policy should have; a condition whose status is unchanged from `previous` keeps
/// its transition time.
pub(super) fn status_of(
    report: &AuthorizationReport,
    previous: Option<&AuthorizationPolicyStatus>,
    now: &Time,
) -> AuthorizationPolicyStatus {
    let generation = report.generation;
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
                "every Service it targets exists",
            ),
        ),
    ];
    let conditions = conditions(
        verdicts,
        previous.map_or(&[], |previous| previous.conditions.as_slice()),
        generation,
        now,
    );
    AuthorizationPolicyStatus {
        observed_generation: Some(generation),
        conditions,
    }
}

async fn write(
    client: &Client,
    key: &ObjectKey,
    status: &AuthorizationPolicyStatus,
) -> Result<(), kube::Error> {
    let api: Api<AuthorizationPolicy> = Api::namespaced(client.clone(), &key.namespace);
    let patch = serde_json::json!({
        "apiVersion": AuthorizationPolicy::api_version(&()),
        "kind": AuthorizationPolicy::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    within(
        WRITE_TIMEOUT,
        api.patch_status(&key.name, &params, &Patch::Apply(&patch)),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Problem;

    fn report(accepted: Result<(), Problem>, resolved: Result<(), Problem>) -> AuthorizationReport {
        AuthorizationReport {
            uid: Some("u".into()),
            generation: 4,
            accepted,
            resolved_refs: resolved,
            status: None,
        }
    }

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn conditions_say_why_and_keep_their_transition_time_while_unchanged() {
        let missing = Problem::new("ServiceNotFound", "Service shop/reviews does not exist");
        let first = status_of(&report(Ok(()), Err(missing)), None, &at(10));
        assert_eq!(first.observed_generation, Some(4));
        let resolved = &first.conditions[1];
        assert_eq!(
            (
                resolved.type_.as_str(),
                resolved.status.as_str(),
                resolved.reason.as_str()
            ),
            ("ResolvedRefs", "False", "ServiceNotFound")
        );
        assert_eq!(first.conditions[0].status, "True");

        let second = status_of(&report(Ok(()), Ok(())), Some(&first), &at(20));
        assert_eq!(
            second.conditions[0].last_transition_time,
            at(10),
            "Accepted unchanged"
        );
        assert_eq!(
            second.conditions[1].last_transition_time,
            at(20),
            "ResolvedRefs turned"
        );
        assert_eq!(second.conditions[1].status, "True");
        assert!(!same(&first, &second));
        let again = status_of(&report(Ok(()), Ok(())), Some(&second), &at(30));
        assert!(same(&second, &again), "nothing to write");
    }
}
