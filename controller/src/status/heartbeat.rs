//! Heartbeats: which replicas are alive, in one place per replica instead of in every policy.
//!
//! Every replica keeps a mark in the Lease [`HEARTBEATS_LEASE`] (beside the leader Lease): its
//! annotation [`HEARTBEATS_ANNOTATION`] is a JSON object from replica name to the time of that
//! replica's last beat. A replica rewrites its mark every third of the lease duration, and removes
//! it when it stops. A replica is alive while its mark keeps changing: one whose mark has not
//! changed for a whole lease duration (timed by the reader's own clock, so clock skew does not
//! matter) has stopped without saying so, and the leader removes its mark. The leader counts the
//! status entries of live replicas only, and removes the entries of the others (see `plan`).
//!
//! A replica writes its mark before any status entry, and writes no entry while its mark may
//! have been judged stale (two thirds of a lease duration after its last beat was sent). One whose
//! mark was removed (it was cut off for a while) writes it again, and then its entries, which the
//! leader may have removed meanwhile, anew.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::kube_api::{explain, within};
use crate::metrics::Metrics;

pub const HEARTBEATS_LEASE: &str = "outrigger-controller-replicas";
pub const HEARTBEATS_ANNOTATION: &str = "outrigger.dev/heartbeats";
/// The most one request about the heartbeats may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries of one beat when another replica wrote the Lease between its read and its write.
const CONFLICT_TRIES: usize = 3;

/// What this replica knows of which replicas are alive.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Liveness {
    /// When the marks were read for this replica's last beat that was written (when the request
    /// was sent, on this replica's clock); None before the first.
    pub read_at: Option<Instant>,
    /// The replicas whose mark had changed within a lease duration at that read, this one
    /// included.
    pub alive: BTreeSet<String>,
    /// When this replica's last beat that was written was sent.
    pub beat_at: Option<Instant>,
    /// How many times this replica's mark was written where there was none (the first beat
    /// included): its status entries may have been removed before each.
    pub joined: u64,
}

impl Liveness {
    /// Whether this replica's mark is surely current: it may write status entries.
    pub fn beating(&self, lease_duration: Duration) -> bool {
        self.beat_at
            .is_some_and(|beat| beat.elapsed() < lease_duration * 2 / 3)
    }
}

/// One replica's heartbeat.
pub struct Heartbeat {
    api: Api<Lease>,
    identity: String,
    lease_duration: Duration,
    metrics: Metrics,
    /// Per replica: its mark as last read, and when it was first read so.
    marks: HashMap<String, (String, Instant)>,
    liveness: Liveness,
}

type Marks = BTreeMap<String, String>;

impl Heartbeat {
    pub fn new(
        client: &Client,
        namespace: &str,
        identity: &str,
        lease_duration: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            api: Api::namespaced(client.clone(), namespace),
            identity: identity.to_string(),
            lease_duration,
            metrics,
            marks: HashMap::new(),
            liveness: Liveness::default(),
        }
    }

    /// Beats until `shutdown`, telling `liveness` what it learns; then removes this replica's
    /// mark, so that the leader stops counting its entries at once.
    pub async fn run(
        mut self,
        liveness: watch::Sender<Liveness>,
        leading: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let leads = *leading.borrow();
            if let Err(error) = self.beat(leads).await {
                self.metrics.reconcile_errors.inc();
                tracing::error!("heartbeat: {error:#}");
            }
            liveness.send_if_modified(|known| {
                let changed = *known != self.liveness;
                known.clone_from(&self.liveness);
                changed
            });
            tokio::select! {
                () = tokio::time::sleep(self.lease_duration / 3) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        match self.leave().await {
            Ok(()) => tracing::info!("removed this replica's heartbeat"),
            Err(error) => tracing::warn!("removing this replica's heartbeat: {error:#}"),
        }
    }

    /// Reads the marks, then writes this replica's anew, dropping (while leading) those of
    /// replicas that stopped.
    async fn beat(&mut self, leading: bool) -> anyhow::Result<()> {
        for _ in 0..CONFLICT_TRIES {
            let (lease, mut marks, read_at) = self.read().await?;
            let joined = !marks.contains_key(&self.identity);
            let mut alive: BTreeSet<String> = marks
                .keys()
                .filter(|name| !self.stopped(name, read_at))
                .cloned()
                .collect();
            alive.insert(self.identity.clone());
            marks.insert(self.identity.clone(), Timestamp::now().to_string());
            if leading {
                marks.retain(|name, _| alive.contains(name));
            }
            let sent = Instant::now();
            // Told only once written: the leader removes the entries of the replicas it finds
            // stopped, so their marks must be gone too, or they would not know to write anew.
            if self.write(lease, &marks).await? {
                self.liveness = Liveness {
                    read_at: Some(read_at),
                    alive,
                    beat_at: Some(sent),
                    joined: self.liveness.joined + u64::from(joined),
                };
                return Ok(());
            }
        }
        anyhow::bail!("the Lease {HEARTBEATS_LEASE} kept changing under this replica's writes")
    }

    /// Removes this replica's mark.
    async fn leave(&mut self) -> anyhow::Result<()> {
        for _ in 0..CONFLICT_TRIES {
            let (lease, mut marks, _) = self.read().await?;
            if marks.remove(&self.identity).is_none() || self.write(lease, &marks).await? {
                return Ok(());
            }
        }
        anyhow::bail!("the Lease {HEARTBEATS_LEASE} kept changing under this replica's writes")
    }

    /// The Lease and its marks, noting when each mark was first read as it is, and when the read
    /// was sent.
    async fn read(&mut self) -> anyhow::Result<(Option<Lease>, Marks, Instant)> {
        let read_at = Instant::now();
        let lease = within(CALL_TIMEOUT, self.api.get_opt(HEARTBEATS_LEASE))
            .await
            .map_err(|error| self.failed("reading", &error))?;
        let marks: Marks = match lease
            .as_ref()
            .and_then(|lease| lease.metadata.annotations.as_ref())
            .and_then(|annotations| annotations.get(HEARTBEATS_ANNOTATION))
        {
            Some(text) => serde_json::from_str(text).with_context(|| {
                format!("the annotation {HEARTBEATS_ANNOTATION} of the Lease {HEARTBEATS_LEASE}")
            })?,
            None => Marks::new(),
        };
        self.marks.retain(|name, _| marks.contains_key(name));
        for (name, mark) in &marks {
            if self.marks.get(name).is_none_or(|(seen, _)| seen != mark) {
                self.marks.insert(name.clone(), (mark.clone(), read_at));
            }
        }
        Ok((lease, marks, read_at))
    }

    /// Whether the replica's mark had not changed for a lease duration at `at`.
    fn stopped(&self, name: &str, at: Instant) -> bool {
        self.marks
            .get(name)
            .is_some_and(|(_, since)| at.saturating_duration_since(*since) >= self.lease_duration)
    }

    /// Writes `marks` into the Lease as read (creating it when there was none); false when another
    /// replica wrote it since.
    async fn write(&self, lease: Option<Lease>, marks: &Marks) -> anyhow::Result<bool> {
        let text = serde_json::to_string(marks).expect("marks serialize");
        let params = PostParams::default();
        let written = match lease {
            Some(mut lease) => {
                lease
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(HEARTBEATS_ANNOTATION.to_string(), text);
                within(
                    CALL_TIMEOUT,
                    self.api.replace(HEARTBEATS_LEASE, &params, &lease),
                )
                .await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(HEARTBEATS_LEASE.into()),
                        annotations: Some([(HEARTBEATS_ANNOTATION.to_string(), text)].into()),
                        ..Default::default()
                    },
                    spec: None,
                };
                within(CALL_TIMEOUT, self.api.create(&params, &lease)).await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                Ok(false)
            }
            Err(error) => Err(self.failed("writing", &error)),
        }
    }

    fn failed(&self, doing: &str, error: &kube::Error) -> anyhow::Error {
        anyhow::anyhow!("{}", explain(error)).context(format!(
            "{doing} the Lease {}/{HEARTBEATS_LEASE}",
            self.api.namespace().unwrap_or_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::fake;

    const LEASE: Duration = Duration::from_secs(15);

    /// The marks as the fake API server has them.
    fn marks(leases: &fake::Leases) -> Marks {
        leases
            .get(HEARTBEATS_LEASE)
            .and_then(|lease| {
                let text = lease["metadata"]["annotations"][HEARTBEATS_ANNOTATION].as_str()?;
                Some(serde_json::from_str(text).unwrap())
            })
            .unwrap_or_default()
    }

    /// Writes the marks as another replica would.
    fn store(leases: &fake::Leases, marks: &serde_json::Value) {
        leases.put(
            HEARTBEATS_LEASE,
            serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"annotations": {HEARTBEATS_ANNOTATION: marks.to_string()}},
            }),
        );
    }

    /// A replica that crashed left its mark, and it never changes again.
    fn crashed(leases: &fake::Leases, name: &str) {
        store(leases, &serde_json::json!({ name: "2026-01-01T00:00:00Z" }));
    }

    /// `identity` beating on the fake; its liveness, and what stops it.
    fn beat(
        client: &Client,
        identity: &str,
        leading: bool,
    ) -> (
        watch::Receiver<Liveness>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let heartbeat = Heartbeat::new(client, "system", identity, LEASE, Metrics::default());
        let (liveness, known) = watch::channel(Liveness::default());
        let (stop, shutdown) = watch::channel(false);
        let (_, leads) = watch::channel(leading);
        let task = tokio::spawn(heartbeat.run(liveness, leads, shutdown));
        (known, stop, task)
    }

    async fn until(liveness: &mut watch::Receiver<Liveness>, check: impl Fn(&Liveness) -> bool) {
        tokio::time::timeout(Duration::from_secs(3600), liveness.wait_for(check))
            .await
            .expect("in time")
            .expect("the heartbeat runs");
    }

    fn alive(liveness: &Liveness) -> Vec<&str> {
        liveness.alive.iter().map(String::as_str).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_mark_that_stops_changing_is_dead_after_a_lease_and_the_leader_removes_it() {
        let (client, leases) = fake::leases("system", |_| fake::Delay::Now);
        crashed(&leases, "old");
        let started = Instant::now();
        let (mut liveness, _stop, _task) = beat(&client, "new", true);
        // Not yet a lease unchanged, as far as this replica can tell.
        until(&mut liveness, |l| l.beat_at.is_some()).await;
        assert_eq!(alive(&liveness.borrow()), ["new", "old"]);
        assert_eq!(liveness.borrow().joined, 1);
        until(&mut liveness, |l| !l.alive.contains("old")).await;
        assert!(started.elapsed() >= LEASE);
        assert_eq!(alive(&liveness.borrow()), ["new"]);
        assert_eq!(marks(&leases).keys().collect::<Vec<_>>(), ["new"]);
        assert!(liveness.borrow().beating(LEASE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_judges_marks_but_leaves_them_to_the_leader() {
        let (client, leases) = fake::leases("system", |_| fake::Delay::Now);
        crashed(&leases, "old");
        let (mut liveness, _stop, _task) = beat(&client, "follower", false);
        until(&mut liveness, |l| {
            l.beat_at.is_some() && !l.alive.contains("old")
        })
        .await;
        assert_eq!(alive(&liveness.borrow()), ["follower"]);
        assert_eq!(
            marks(&leases).keys().collect::<Vec<_>>(),
            ["follower", "old"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_that_beat_stay_alive_and_one_that_stops_removes_its_mark() {
        let (client, leases) = fake::leases("system", |_| fake::Delay::Now);
        let (mut a, stop_a, task_a) = beat(&client, "a", true);
        let (mut b, _stop_b, _task_b) = beat(&client, "b", false);
        until(&mut a, |l| l.alive.contains("b")).await;
        tokio::time::sleep(LEASE * 10).await;
        assert_eq!(alive(&a.borrow_and_update()), ["a", "b"]);
        assert_eq!(alive(&b.borrow_and_update()), ["a", "b"]);
        assert_eq!(a.borrow().joined, 1);

        stop_a.send(true).unwrap();
        task_a.await.unwrap();
        assert_eq!(marks(&leases).keys().collect::<Vec<_>>(), ["b"]);
        // The next read tells the others at once, not a lease later.
        let stopped = Instant::now();
        until(&mut b, |l| !l.alive.contains("a")).await;
        assert!(stopped.elapsed() <= LEASE / 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_whose_mark_was_removed_joins_again() {
        let (client, leases) = fake::leases("system", |_| fake::Delay::Now);
        let (mut liveness, _stop, _task) = beat(&client, "a", false);
        until(&mut liveness, |l| l.joined == 1).await;
        // The leader judged it stopped (it was cut off) and removed its mark.
        store(&leases, &serde_json::json!({}));
        until(&mut liveness, |l| l.joined == 2).await;
        assert!(marks(&leases).contains_key("a"));
    }
}
