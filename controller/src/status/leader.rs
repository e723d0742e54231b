//! Status the leader alone writes (nothing in it is per replica): AuthorizationPolicy's and the
//! routes'. Written on change only: an object is written when what it should say differs from
//! what it said when its spec was read, or from what this leader last wrote. Passes are at least
//! [`MIN_INTERVAL`] apart; a failed write is tried again at the next pass, [`RETRY_AFTER`] later
//! at most.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;

use super::MIN_INTERVAL;
use crate::metrics::Metrics;

const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A kind whose status the leader writes from the index's reports.
pub(super) trait LeaderWritten {
    type Key: Clone + Ord + Hash + Display + Send + Sync;
    type Report: Clone + Send + Sync;
    type Status: Clone + Send + Sync;

    /// The kind's name, for logs.
    const KIND: &'static str;

    /// Tells an object from one deleted and created again under its name.
    fn uid(report: &Self::Report) -> &Option<String>;

    /// The status the object carried when the index last read its spec.
    fn read(report: &Self::Report) -> Option<&Self::Status>;

    /// The status the object should have; a condition whose status is unchanged from `previous`
    /// keeps its transition time.
    fn status_of(
        report: &Self::Report,
        previous: Option<&Self::Status>,
        now: &Time,
    ) -> Self::Status;

    /// Whether two statuses say the same, whenever they were written.
    fn same(a: &Self::Status, b: &Self::Status) -> bool;

    fn write(
        client: &Client,
        key: &Self::Key,
        status: &Self::Status,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
}

/// Writes the status of every object of kind `K` while this replica leads, until the index is
/// gone.
pub(super) async fn run<K: LeaderWritten>(
    client: Client,
    mut reports: watch::Receiver<BTreeMap<K::Key, K::Report>>,
    mut leading: watch::Receiver<bool>,
    mut synced: watch::Receiver<bool>,
    metrics: Metrics,
) {
    if synced.wait_for(|synced| *synced).await.is_err() {
        return;
    }
    // Per object, the uid and status this replica last wrote.
    let mut written: HashMap<K::Key, (Option<String>, K::Status)> = HashMap::new();
    let mut retry = false;
    loop {
        if *leading.borrow_and_update() {
            let reports = reports.borrow_and_update().clone();
            written.retain(|key, _| reports.contains_key(key));
            retry = false;
            for (key, report) in &reports {
                let last = written
                    .get(key)
                    .filter(|(uid, _)| uid == K::uid(report))
                    .map(|(_, status)| status)
                    .or(K::read(report));
                let status = K::status_of(report, last, &now());
                if last.is_some_and(|last| K::same(last, &status)) {
                    continue;
                }
                metrics.status_writes.inc();
                match K::write(&client, key, &status).await {
                    Ok(()) => {
                        written.insert(key.clone(), (K::uid(report).clone(), status));
                    }
                    Err(error) => {
                        metrics.reconcile_errors.inc();
                        tracing::warn!(object = %key, %error, "writing {} status", K::KIND);
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

/// `conditions` with every transition time the same, to compare what they say.
pub(super) fn undated(
    conditions: &mut [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) {
    for condition in conditions {
        condition.last_transition_time = Time(Timestamp::UNIX_EPOCH);
    }
}
