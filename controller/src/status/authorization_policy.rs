//! AuthorizationPolicy status: the conditions Accepted and ResolvedRefs and `observedGeneration`,
//! written by the leader alone (`leader`) with server-side apply on the status subresource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource as _};
use outrigger_api::authz::{AuthorizationPolicy, AuthorizationPolicyStatus};

use super::FIELD_MANAGER;
use super::conditions::{Verdict, conditions};
use super::leader::{LeaderWritten, undated};
use super::write::WRITE_TIMEOUT;
use crate::index::AuthorizationReport;
use crate::kube_api::within;
use crate::source::ObjectKey;

pub(super) struct AuthorizationPolicies;

impl LeaderWritten for AuthorizationPolicies {
    type Key = ObjectKey;
    type Report = AuthorizationReport;
    type Status = AuthorizationPolicyStatus;

    const KIND: &'static str = "AuthorizationPolicy";

    fn uid(report: &AuthorizationReport) -> &Option<String> {
        &report.uid
    }

    fn read(report: &AuthorizationReport) -> Option<&AuthorizationPolicyStatus> {
        report.status.as_ref()
    }

    fn status_of(
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

    fn same(a: &AuthorizationPolicyStatus, b: &AuthorizationPolicyStatus) -> bool {
        let (mut a, mut b) = (a.clone(), b.clone());
        undated(&mut a.conditions);
        undated(&mut b.conditions);
        a == b
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
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::index::Problem;

    fn status_of(
        report: &AuthorizationReport,
        previous: Option<&AuthorizationPolicyStatus>,
        now: &Time,
    ) -> AuthorizationPolicyStatus {
        AuthorizationPolicies::status_of(report, previous, now)
    }

    fn same(a: &AuthorizationPolicyStatus, b: &AuthorizationPolicyStatus) -> bool {
        AuthorizationPolicies::same(a, b)
    }

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
