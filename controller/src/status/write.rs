//! Status writes: each policy's writes in one job, its requests sent one after the other, each
//! within [`WRITE_TIMEOUT`] and within the replica's rate limit; jobs of different policies run
//! side by side and share nothing but the rate limit, so one that hangs holds up no other.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource as _};
use outrigger_api::policy::{DestinationPolicy, DestinationPolicyStatus, ReplicaStatus};
use tokio::time::Instant;

use super::FIELD_MANAGER;
use crate::kube_api::within;
use crate::metrics::Metrics;
use crate::source::ObjectKey;

/// The most one status request may take.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Status requests per second this replica sends at most, after a burst of [`WRITE_BURST`]:
/// what a thousand policies changing at once costs the API server is spread over seconds.
pub(super) const WRITES_PER_SECOND: f64 = 50.0;
pub(super) const WRITE_BURST: f64 = 100.0;

/// One status write.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Write {
    /// This replica's entry; None removes it (no proxy of this replica calls the Service).
    Own(Option<ReplicaStatus>),
    /// The leader's conditions and sums.
    Summary(DestinationPolicyStatus),
    /// The removal of a stopped replica's entry, at its position in the list.
    Prune { position: usize, name: String },
}

/// The writes of one policy (with this uid), sent in order.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) key: ObjectKey,
    pub(super) uid: Option<String>,
    pub(super) writes: Vec<Write>,
}

/// What became of each write of a job.
pub(super) type Outcome = (Job, Vec<Result<(), kube::Error>>);

/// Sends jobs' requests: the client, this replica's field manager, and the rate limit shared by
/// all jobs. A policy has one job at a time, so requests in flight are at most one per policy.
#[derive(Clone)]
pub(super) struct Writer {
    client: Client,
    own_manager: String,
    metrics: Metrics,
    rate: Arc<RateLimit>,
}

impl Writer {
    pub(super) fn new(client: Client, identity: &str, metrics: Metrics) -> Self {
        Self {
            client,
            own_manager: format!("{FIELD_MANAGER}/{identity}"),
            metrics,
            rate: Arc::new(RateLimit::new(WRITES_PER_SECOND, WRITE_BURST)),
        }
    }

    /// Sends the job's writes in order; a write that fails ends the job (the next pass tries
    /// again from what was done).
    pub(super) async fn perform(self, job: Job) -> Outcome {
        let mut results = Vec::new();
        for write in &job.writes {
            let result = self.send(&job.key, write).await;
            let failed = result.is_err();
            results.push(result);
            if failed {
                break;
            }
        }
        (job, results)
    }

    async fn send(&self, key: &ObjectKey, write: &Write) -> Result<(), kube::Error> {
        self.rate.acquire().await;
        self.metrics.status_writes.inc();
        let api: Api<DestinationPolicy> = Api::namespaced(self.client.clone(), &key.namespace);
        within(WRITE_TIMEOUT, async {
            match write {
                Write::Own(entry) => {
                    let entries: Vec<&ReplicaStatus> = entry.iter().collect();
                    let status = serde_json::json!({ "replicas": entries });
                    apply(&api, key, &self.own_manager, status).await
                }
                Write::Summary(status) => {
                    apply(&api, key, FIELD_MANAGER, serde_json::json!(status)).await
                }
                Write::Prune { position, name } => prune(&api, key, *position, name).await,
            }
        })
        .await
    }
}

/// Applies `status` to the policy's status subresource as `manager`.
async fn apply(
    api: &Api<DestinationPolicy>,
    key: &ObjectKey,
    manager: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
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
    api: &Api<DestinationPolicy>,
    key: &ObjectKey,
    position: usize,
    name: &str,
) -> Result<(), kube::Error> {
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

/// A token bucket: `burst` requests at once, then `per_second`. Requests that find it empty
/// reserve their turn, so they go in the order they came.
pub(super) struct RateLimit {
    per_second: f64,
    burst: f64,
    /// Tokens (below zero: reserved ahead) as of when they were counted.
    tokens: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub(super) fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            tokens: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits for this request's turn.
    pub(super) async fn acquire(&self) {
        let turn = {
            let mut tokens = self.tokens.lock().expect("rate limit lock");
            let now = Instant::now();
            let refilled = now.duration_since(tokens.1).as_secs_f64() * self.per_second;
            let available = (tokens.0 + refilled).min(self.burst) - 1.0;
            *tokens = (available, now);
            if available >= 0.0 {
                now
            } else {
                now + Duration::from_secs_f64(-available / self.per_second)
            }
        };
        tokio::time::sleep_until(turn).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_and_the_rest_at_the_rate_in_order() {
        let limit = Arc::new(RateLimit::new(50.0, 100.0));
        let started = Instant::now();
        let mut waits = tokio::task::JoinSet::new();
        for n in 0..200u32 {
            let limit = limit.clone();
            waits.spawn(async move {
                limit.acquire().await;
                (n, started.elapsed())
            });
            // In order of arrival.
            tokio::task::yield_now().await;
        }
        let mut turns = waits.join_all().await;
        turns.sort();
        assert!(turns[..100].iter().all(|(_, at)| at.is_zero()));
        for (n, at) in &turns[100..] {
            let expected = Duration::from_secs_f64(f64::from(n - 99) / 50.0);
            let off = at.abs_diff(expected);
            assert!(
                off < Duration::from_millis(1),
                "request {n} at {at:?}, not {expected:?}"
            );
        }
        // A quiet second refills 50 tokens.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = Instant::now();
        for _ in 0..50 {
            limit.acquire().await;
        }
        assert!(before.elapsed().is_zero());
    }
}
