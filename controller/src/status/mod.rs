//! DestinationPolicy status, written with server-side apply on the status subresource.
//!
//! Every replica serves proxies, so every replica counts its own: what the proxies it serves did
//! with the policy's generation goes into its entry of `status.replicas`, applied under a field
//! manager of its own (`outrigger-controller/<identity>`) so that the API server merges the
//! entries by name. The leader alone (field manager `outrigger-controller`) writes the rest: the
//! conditions Accepted, ResolvedRefs and Programmed, `observedGeneration`, the `split`, and the
//! sums `proxies` and `proxiesSummary` over the entries of the current generation of the replicas
//! that are alive. An entry of an older generation is kept but not counted: its replica has not
//! seen the current one yet.
//!
//! Status is written on change only: each pass computes every policy's status from the index's
//! reports, what this replica's proxies hold, the statuses as the API server has them and which
//! replicas are alive (`plan`), and writes what differs (`write`). Whether a replica is alive is
//! one heartbeat per replica (`heartbeat`), not a refresh of every policy it counts, so the write
//! load follows changes, not policies times replicas. Passes are at least [`MIN_INTERVAL`] apart,
//! so a burst of changes (a thousand proxies acknowledging a rollout) costs each policy at most
//! one write per replica per interval; requests are rate-limited, bounded in time, and one
//! policy's writes never wait on another's. A status write leaves a policy's generation alone, and
//! the Kubernetes source ignores changes that do, so writing never causes work of its own.
//!
//! `destination_policy` computes a policy's entry and summary; `observed` watches the statuses on
//! the API server. A new kind with a status gets a file of its own beside `destination_policy`:
//! `authorization_policy` and `route`, whose status has nothing per replica, are written by the
//! leader alone, in a loop of their own (`leader`).

mod authorization_policy;
mod conditions;
mod destination_policy;
mod heartbeat;
mod leader;
mod observed;
mod plan;
pub mod route;
mod write;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::destination_policy::Held;
pub use self::heartbeat::{Heartbeat, Liveness};
pub use self::observed::{Observed, watch_statuses};
use self::plan::{Planner, View};
use self::write::Writer;
use crate::distribute::Subscribers;
use crate::index::{AuthorizationReports, PolicyReports, RouteReports};
use crate::metrics::Metrics;

pub const FIELD_MANAGER: &str = "outrigger-controller";
/// At most one pass, so at most one status write per policy and writer, per this long.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// Writes every AuthorizationPolicy's status while this replica leads, until the index is gone.
pub async fn write_authorization_policies(
    client: Client,
    reports: watch::Receiver<AuthorizationReports>,
    leading: watch::Receiver<bool>,
    synced: watch::Receiver<bool>,
    metrics: Metrics,
) {
    leader::run::<authorization_policy::AuthorizationPolicies>(
        client, reports, leading, synced, metrics,
    )
    .await;
}

/// Writes every HTTPRoute's and GRPCRoute's status while this replica leads, until the index is
/// gone.
pub async fn write_routes(
    client: Client,
    reports: watch::Receiver<RouteReports>,
    leading: watch::Receiver<bool>,
    synced: watch::Receiver<bool>,
    metrics: Metrics,
) {
    leader::run::<route::Routes>(client, reports, leading, synced, metrics).await;
}

/// What status is computed from.
pub struct Inputs {
    pub reports: watch::Receiver<PolicyReports>,
    pub subscribers: watch::Receiver<Subscribers>,
    /// Whether this replica holds the leader Lease.
    pub leading: watch::Receiver<bool>,
    /// Whether the index has its first full view; before, a Service may look missing that is not.
    pub synced: watch::Receiver<bool>,
    /// Every policy's status on the API server, kept by [`watch_statuses`].
    pub observed: watch::Receiver<Observed>,
    /// Which replicas are alive, kept by [`Heartbeat`].
    pub liveness: watch::Receiver<Liveness>,
    /// This replica's name in the Lease, and of its entries.
    pub identity: String,
    pub lease_duration: Duration,
}

/// Writes this replica's entries, and the rest of status while it leads, until the index is gone.
pub async fn run(client: Client, mut inputs: Inputs, metrics: Metrics) {
    if inputs.synced.wait_for(|synced| *synced).await.is_err() {
        return;
    }
    let writer = Writer::new(client, &inputs.identity, metrics.clone());
    let mut planner = Planner::new(&inputs.identity, inputs.lease_duration, metrics);
    let mut jobs = JoinSet::new();
    let mut dirty = true;
    let mut next_pass = Instant::now();
    loop {
        // A retry waits for the interval too.
        let pass_at = if dirty {
            Some(next_pass)
        } else {
            planner.next_retry().map(|retry| retry.max(next_pass))
        };
        tokio::select! {
            () = tokio::time::sleep_until(pass_at.unwrap_or(next_pass)), if pass_at.is_some() => {
                for job in planner.plan(&inputs.view()) {
                    jobs.spawn(writer.clone().perform(job));
                }
                dirty = false;
                next_pass = Instant::now() + MIN_INTERVAL;
            }
            Some(done) = jobs.join_next() => {
                planner.record(done.expect("status writes do not panic"));
                dirty = true;
            }
            gone = inputs.changed() => {
                if gone {
                    return;
                }
                dirty = true;
            }
        }
    }
}

impl Inputs {
    /// Everything a pass reads, taken at once so that no lock is held while it computes.
    fn view(&mut self) -> View {
        let reports = self.reports.borrow_and_update().clone();
        View {
            held: Held::take(&reports, &self.subscribers.borrow_and_update()),
            reports,
            observed: self.observed.borrow_and_update().clone(),
            liveness: self.liveness.borrow_and_update().clone(),
            leading: *self.leading.borrow_and_update(),
            now: Time(
                Timestamp::from_second(Timestamp::now().as_second()).expect("now is in range"),
            ),
        }
    }

    /// Waits for a change; true when an input is gone.
    async fn changed(&mut self) -> bool {
        tokio::select! {
            changed = self.reports.changed() => changed.is_err(),
            changed = self.subscribers.changed() => changed.is_err(),
            changed = self.leading.changed() => changed.is_err(),
            changed = self.observed.changed() => changed.is_err(),
            changed = self.liveness.changed() => changed.is_err(),
        }
    }
}
