//! Leader election over a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.
//!
//! Every replica serves proxies and counts them in status; only the holder of the Lease
//! `outrigger-controller` writes the rest of status (see [`crate::status`]). The holder renews it
//! every third of the lease duration. The others take it once its record has not changed for a
//! whole lease duration, timed by their own clock (so clock skew between nodes does not matter): a
//! new leader takes over within about one lease duration of the old one dying. Every write carries
//! the resourceVersion it read, so of two replicas racing for the Lease exactly one wins. A leader
//! that cannot renew for two thirds of the duration steps down before anyone else may take over,
//! and one that stops cleanly hands the Lease back.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::kube_api::explain;
use crate::metrics::Metrics;

pub const LEASE_NAME: &str = "outrigger-controller";
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
        let namespace = settings
            .leader_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        Self {
            api: Api::namespaced(client.clone(), &namespace),
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
            let holds = match self.try_acquire_or_renew().await {
                Ok(holds) => holds,
                Err(error) => {
                    self.metrics.reconcile_errors.inc();
                    tracing::error!("leader election: {error:#}");
                    // Keep leading while the Lease cannot have passed to anyone else.
                    self.renewed
                        .is_some_and(|renewed| renewed.elapsed() < self.renew_deadline())
                }
            };
            if !holds {
                self.renewed = None;
            }
            let was_leading = leading.send_replace(holds);
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

    /// Whether this replica holds the Lease after trying to take or renew it.
    async fn try_acquire_or_renew(&mut self) -> anyhow::Result<bool> {
        let now = MicroTime(Timestamp::now());
        let Some(lease) = self
            .api
            .get_opt(LEASE_NAME)
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
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.renewed = Some(Instant::now());
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
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &renewed)
            .await
        {
            Ok(_) => {
                self.renewed = Some(Instant::now());
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
        let mut lease = self
            .api
            .get(LEASE_NAME)
            .await
            .map_err(|e| self.failed("reading", &e))?;
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
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
