//! HTTPRoute and GRPCRoute status: per Service parentRef, an entry of `status.parents` under
//! Outrigger's controller name with the conditions Accepted, ResolvedRefs and, when some rules
//! cannot be served, PartiallyInvalid, each with `observedGeneration`. Written by the leader
//! alone (`leader`).
//!
//! `status.parents` is an atomic list that other controllers (a Gateway's) write entries of
//! their own into, so a write reads the route, keeps every entry that is not ours, and replaces
//! the list with a merge patch that names the version it read: a concurrent write makes it fail,
//! and the next pass tries again from what is there then.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use outrigger_api::gateway::{GRPCRoute, HTTPRoute, RouteParentStatus, RouteStatus};
use serde::de::DeserializeOwned;

use super::conditions::{Verdict, conditions};
use super::leader::{LeaderWritten, undated};
use super::write::WRITE_TIMEOUT;
use crate::index::RouteReport;
use crate::kube_api::within;
use crate::source::{Kind, ObjectRef};

/// Who wrote an entry of `status.parents`: Outrigger's are this.
pub const CONTROLLER_NAME: &str = "outrigger.dev/mesh";

pub(super) struct Routes;

impl LeaderWritten for Routes {
    type Key = ObjectRef;
    type Report = RouteReport;
    type Status = RouteStatus;

    const KIND: &'static str = "route";

    fn uid(report: &RouteReport) -> &Option<String> {
        &report.uid
    }

    fn read(report: &RouteReport) -> Option<&RouteStatus> {
        report.status.as_ref()
    }

    /// Outrigger's entries only.
    fn status_of(report: &RouteReport, previous: Option<&RouteStatus>, now: &Time) -> RouteStatus {
        let parents = report
            .parents
            .iter()
            .map(|parent| {
                let previous = previous
                    .into_iter()
                    .flat_map(|status| &status.parents)
                    .find(|entry| {
                        entry.controller_name == CONTROLLER_NAME
                            && entry.parent_ref == parent.parent
                    })
                    .map_or(&[][..], |entry| entry.conditions.as_slice());
                let accepted_message = if parent.ignored.is_empty() {
                    "the route is attached to this Service".to_string()
                } else {
                    format!(
                        "the route is attached to this Service; fields this version does not \
                         know are ignored: {}",
                        parent.ignored.join(", ")
                    )
                };
                let mut verdicts = vec![
                    (
                        "Accepted",
                        Verdict::of(&parent.accepted, "Accepted", accepted_message),
                    ),
                    (
                        "ResolvedRefs",
                        Verdict::of(
                            &parent.resolved_refs,
                            "ResolvedRefs",
                            "every backend is a Service port",
                        ),
                    ),
                ];
                if let Some(invalid) = &parent.partially_invalid {
                    verdicts.push((
                        "PartiallyInvalid",
                        Verdict::holds("UnsupportedValue", invalid.clone()),
                    ));
                }
                RouteParentStatus {
                    parent_ref: parent.parent.clone(),
                    controller_name: CONTROLLER_NAME.to_string(),
                    conditions: conditions(verdicts, previous, report.generation, now),
                }
            })
            .collect();
        RouteStatus { parents }
    }

    /// Compares Outrigger's entries only.
    fn same(a: &RouteStatus, b: &RouteStatus) -> bool {
        ours(a) == ours(b)
    }

    async fn write(
        client: &Client,
        key: &ObjectRef,
        status: &RouteStatus,
    ) -> Result<(), kube::Error> {
        match key.kind {
            Kind::HttpRoute => write_parents::<HTTPRoute>(client, key, status).await,
            Kind::GrpcRoute => write_parents::<GRPCRoute>(client, key, status).await,
            other => unreachable!("{other:?} is not a route"),
        }
    }
}

/// Outrigger's entries, undated.
fn ours(status: &RouteStatus) -> Vec<RouteParentStatus> {
    status
        .parents
        .iter()
        .filter(|entry| entry.controller_name == CONTROLLER_NAME)
        .cloned()
        .map(|mut entry| {
            undated(&mut entry.conditions);
            entry
        })
        .collect()
}

/// A route kind with the status every route has.
trait WithRouteStatus:
    kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
{
    fn route_status(&self) -> Option<&RouteStatus>;
}

impl WithRouteStatus for HTTPRoute {
    fn route_status(&self) -> Option<&RouteStatus> {
        self.status.as_ref()
    }
}

impl WithRouteStatus for GRPCRoute {
    fn route_status(&self) -> Option<&RouteStatus> {
        self.status.as_ref()
    }
}

async fn write_parents<K: WithRouteStatus>(
    client: &Client,
    key: &ObjectRef,
    status: &RouteStatus,
) -> Result<(), kube::Error> {
    let api: Api<K> = Api::namespaced(client.clone(), &key.key.namespace);
    let current = within(WRITE_TIMEOUT, api.get(&key.key.name)).await?;
    let parents: Vec<RouteParentStatus> = current
        .route_status()
        .into_iter()
        .flat_map(|status| &status.parents)
        .filter(|entry| entry.controller_name != CONTROLLER_NAME)
        .chain(&status.parents)
        .cloned()
        .collect();
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": current.meta().resource_version },
        "status": { "parents": parents },
    });
    within(
        WRITE_TIMEOUT,
        api.patch_status(
            &key.key.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await
    .map(drop)
}
