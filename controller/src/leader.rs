//! Leader election over a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.
//!
//! Every replica serves proxies and counts them in status; only the holder of the Lease
//! `outrigger-controller` writes the rest of status (see [`crate::status`]). The holder renews it
//! every third of the lease duration. The others take it once its record has not changed for a
//! whole lease duration, timed by their own clock (so clock skew between nodes does not matter): a
//! new leader takes over within about one lease duration of the old one dying. Every write carries
//! the resourceVersion it read, so of two replicas racing for the Lease exactly one wins. A leader
//! that cannot renew for two thirds of the duration steps down before anyone else may take over,
//! timed from when it sent its last renewal that succeeded (the others start their count later,
//! when they see it written), and even while a request of its own is still unanswered: every
//! request has a deadline. One that stops cleanly hands the Lease back.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::kube_api::{explain, within};
use crate::metrics::Metrics;

pub const LEASE_NAME: &str = "outrigger-controller";
/// The most one request about the Lease may take; a renewal is bounded by the renew deadline too.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_LEASE_DURATION: &str = "15s";

#[derive(clap::Args, Clone, Debug)]
pub struct LeaderSettings {
    /// Namespace of the leader Lease `outrigger-controller`. Default: the controller's own (the
    /// in-cluster service account's, else the kubeconfig context's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_namespace: Option<String>,
    /// How long the Lease stays with a leader that stopped renewing it: a new leader takes over
    /// within about this long after the old one dies.
    #[arg(long, env = "OUTRIGGER_LEASE_DURATION", default_value = DEFAULT_LEASE_DURATION, value_parser = parse_duration)]
    pub lease_duration: Duration,
}

impl Default for LeaderSettings {
    fn default() -> Self {
        Self {
            leader_namespace: None,
            lease_duration: parse_duration(DEFAULT_LEASE_DURATION).expect("a valid default"),
        }
    }
}

impl LeaderSettings {
    /// Where the leader Lease (and the replicas' heartbeats) live.
    pub fn namespace(&self, client: &Client) -> String {
        self.leader_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string())
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = outrigger_api::duration::parse(text).map_err(|e| e.to_string())?;
    if duration < Duration::from_secs(3) {
        return Err("the lease must last at least 3s".into());
    }
    Ok(duration)
}

/// Runs the election for one replica.
pub struct Elector {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    metrics: Metrics,
    /// The Lease's record as last read, and when it was first seen so on this replica's clock.
    observed: Option<(LeaseSpec, Instant)>,
    /// When this replica last renewed the Lease it holds.
    renewed: Option<Instant>,
}

impl Elector {
    pub fn new(client: &Client, settings: &LeaderSettings, metrics: Metrics) -> Self {
        Self {
            api: Api::namespaced(client.clone(), &settings.namespace(client)),
            identity: identity(),
            duration: settings.lease_duration,
            metrics,
            observed: None,
            renewed: None,
        }
    }

    /// This replica's name in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Tells `leading` whether this replica holds the Lease, until `shutdown`; then gives the
    /// Lease up if it holds it, so that another replica takes over at once.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(identity = %self.identity, lease = LEASE_NAME, "joining the leader election");
        loop {
            let holds = self.attempt().await;
            if !holds {
                self.renewed = None;
            }
            // Only a change wakes those watching.
            let was_leading = *leading.borrow();
            leading.send_if_modified(|leads| std::mem::replace(leads, holds) != holds);
            match (was_leading, holds) {
                (false, true) => {
                    tracing::info!(identity = %self.identity, "leading: this replica writes status")
                }
                (true, false) => {
                    tracing::warn!(identity = %self.identity, "no longer leading: the Lease could not be renewed or went to another replica")
                }
                _ => {}
            }
            let wait = if holds {
                self.duration / 3
            } else {
                self.duration / 6
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            match self.release().await {
                Ok(()) => tracing::info!("handed the leader Lease back"),
                Err(error) => tracing::warn!("handing the leader Lease back: {error:#}"),
            }
        }
    }

    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// One try to take or renew the Lease, bounded: while this replica leads, it must be done by
    /// the renew deadline, after which the Lease may pass to another replica, so past it this
    /// one steps down even when its request is still in flight.
    async fn attempt(&mut self) -> bool {
        let deadline = match self.renewed {
            Some(renewed) => renewed + self.renew_deadline(),
            None => Instant::now() + self.duration / 3,
        };
        match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
            Ok(Ok(holds)) => holds,
            Ok(Err(error)) => {
                self.metrics.reconcile_errors.inc();
                tracing::error!("leader election: {error:#}");
                // Keep leading while the Lease cannot have passed to anyone else.
                self.renewed
                    .is_some_and(|renewed| renewed.elapsed() < self.renew_deadline())
            }
            Err(_) => {
                self.metrics.reconcile_errors.inc();
                tracing::error!(
                    "leader election: the API server did not answer in time ({:?} after the last renewal)",
                    self.renew_deadline()
                );
                false
            }
        }
    }

    /// Whether this replica holds the Lease after trying to take or renew it.
    async fn try_acquire_or_renew(&mut self) -> anyhow::Result<bool> {
        let now = MicroTime(Timestamp::now());
        let Some(lease) = within(CALL_TIMEOUT, self.api.get_opt(LEASE_NAME))
            .await
            .map_err(|e| self.failed("reading", &e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..Default::default()
                },
                spec: Some(self.record(None, now)),
            };
            // Others time the Lease from when they see it written, which is after it was sent.
            let sent = Instant::now();
            let params = PostParams::default();
            return match within(CALL_TIMEOUT, self.api.create(&params, &lease)).await {
                Ok(_) => {
                    self.renewed = Some(sent);
                    Ok(true)
                }
                // Another replica created it first.
                Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(false),
                Err(error) => Err(self.failed("creating", &error)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != spec) {
            self.observed = Some((spec.clone(), Instant::now()));
        }
        let unchanged_for = self
            .observed
            .as_ref()
            .map(|(_, since)| since.elapsed())
            .unwrap_or_default();
        let held_for = spec
            .lease_duration_seconds
            .and_then(|seconds| u64::try_from(seconds).ok())
            .map_or(self.duration, Duration::from_secs);
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && unchanged_for < held_for {
            return Ok(false);
        }
        let record = if ours {
            LeaseSpec {
                renew_time: Some(now),
                lease_duration_seconds: Some(self.duration_seconds()),
                ..spec
            }
        } else {
            self.record(Some(&spec), now)
        };
        let renewed = Lease {
            metadata: lease.metadata,
            spec: Some(record),
        };
        let sent = Instant::now();
        let params = PostParams::default();
        let replaced = within(
            CALL_TIMEOUT,
            self.api.replace(LEASE_NAME, &params, &renewed),
        );
        match replaced.await {
            Ok(_) => {
                self.renewed = Some(sent);
                Ok(true)
            }
            // Someone else wrote it since it was read.
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
            Err(error) => Err(self.failed("updating", &error)),
        }
    }

    /// A record naming this replica the new holder, after `previous`.
    fn record(&self, previous: Option<&LeaseSpec>, now: MicroTime) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(
                previous
                    .and_then(|spec| spec.lease_transitions)
                    .map_or(0, |transitions| transitions + 1),
            ),
            ..Default::default()
        }
    }

    /// Clears the holder, as client-go does when it releases a Lease.
    async fn release(&self) -> anyhow::Result<()> {
        let mut lease = within(CALL_TIMEOUT, self.api.get(LEASE_NAME))
            .await
            .map_err(|e| self.failed("reading", &e))?;
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let params = PostParams::default();
        within(CALL_TIMEOUT, self.api.replace(LEASE_NAME, &params, &lease))
            .await
            .map(drop)
            .map_err(|e| self.failed("updating", &e))
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }

    fn failed(&self, doing: &str, error: &kube::Error) -> anyhow::Error {
        anyhow::anyhow!("{}", explain(error)).context(format!(
            "{doing} the Lease {}/{LEASE_NAME}",
            self.api.namespace().unwrap_or_default()
        ))
    }
}

/// This replica's name in the Lease: its pod's name, unique in the cluster. Outside a pod several
/// controllers may share a host, so there it is the host name and the process id.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "outrigger-controller".into());
        format!("{host}-{}", std::process::id())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::fake;

    /// A fake API server whose first Lease update takes `first`, and every later one forever.
    fn client(first: Option<Duration>) -> Client {
        let mut updates = 0;
        let (client, _) = fake::leases("system", move |_| {
            updates += 1;
            match (first, updates) {
                (None, _) => fake::Delay::Now,
                (Some(late), 1) => fake::Delay::After(late),
                (Some(_), _) => fake::Delay::Never,
            }
        });
        client
    }

    /// An elector running on `client`; its `leading` channel.
    fn elect(client: &Client) -> (watch::Receiver<bool>, watch::Sender<bool>) {
        let settings = LeaderSettings {
            leader_namespace: Some("system".into()),
            lease_duration: Duration::from_secs(15),
        };
        let elector = Elector::new(client, &settings, Metrics::default());
        let (leading, is_leading) = watch::channel(false);
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(elector.run(leading, shutdown));
        (is_leading, stop)
    }

    async fn until(leading: &mut watch::Receiver<bool>, value: bool) {
        tokio::time::timeout(
            Duration::from_secs(3600),
            leading.wait_for(|leads| *leads == value),
        )
        .await
        .expect("in time")
        .expect("the elector runs");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewal_hangs_steps_down_by_the_renew_deadline() {
        let client = client(Some(Duration::ZERO));
        let (mut leading, _stop) = elect(&client);
        until(&mut leading, true).await;
        let acquired = Instant::now();
        // Renewed at 5 s; the renewal at 10 s never answers.
        until(&mut leading, false).await;
        assert_eq!(acquired.elapsed(), Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn the_renew_deadline_counts_from_when_the_renewal_was_sent() {
        // The renewal sent at 5 s is answered at 9 s; the next, sent at 14 s, never.
        let client = client(Some(Duration::from_secs(4)));
        let (mut leading, _stop) = elect(&client);
        until(&mut leading, true).await;
        let acquired = Instant::now();
        until(&mut leading, false).await;
        // 5 s + the renew deadline (10 s), not 9 s + 10 s.
        assert_eq!(acquired.elapsed(), Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_renews_keeps_leading() {
        let client = client(None);
        let (mut leading, _stop) = elect(&client);
        until(&mut leading, true).await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(*leading.borrow());
        assert!(!leading.has_changed().unwrap(), "never stepped down");
    }
}
