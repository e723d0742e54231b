//! One pass of status: the writes that bring each policy's status to what the inputs say, and
//! none for a policy whose status already says it.
//!
//! A replica's entry is written when its counts change (with no proxy of this replica calling
//! the Service there is no entry), never just to refresh it: whether a replica is alive is its
//! heartbeat's business. The leader's part is written when it differs from what the API server
//! has, summing its own entry and the entries of the replicas whose heartbeat is alive; it
//! removes the entries of replicas whose heartbeat stopped or went, once a read of the
//! heartbeats begun after it saw the entry confirms it (see `heartbeat`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use outrigger_api::policy::{DestinationPolicyStatus, ReplicaStatus};
use tokio::time::Instant;

use super::destination_policy::{Held, desired_status, replica_status};
use super::heartbeat::Liveness;
use super::observed::Observed;
use super::write::{Job, Outcome, Write};
use crate::index::{PolicyReport, PolicyReports};
use crate::kube_api::explain;
use crate::metrics::Metrics;
use crate::source::ObjectKey;

/// Failed writes of a policy are tried again after this long.
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Everything a pass reads, taken at once (the streams and the index go on meanwhile).
pub(super) struct View {
    pub(super) reports: PolicyReports,
    /// What this replica's proxies hold of each policy's keys.
    pub(super) held: Held,
    pub(super) observed: Observed,
    pub(super) liveness: Liveness,
    pub(super) leading: bool,
    /// Now, to the second (the precision of status times).
    pub(super) now: Time,
}

/// What this replica wrote, what it is writing, and what failed.
pub(super) struct Planner {
    identity: String,
    lease_duration: Duration,
    metrics: Metrics,
    /// By policy (with this uid): this replica's entry as written last (None: no entry).
    own: HashMap<ObjectKey, (Option<String>, Option<ReplicaStatus>)>,
    /// By policy (with this uid): the leader's part as written last.
    summaries: HashMap<ObjectKey, (Option<String>, DestinationPolicyStatus)>,
    /// Policies with writes in flight: planned again once they are done.
    busy: HashSet<ObjectKey>,
    /// Policies whose writes failed, until they are tried again.
    retry_at: HashMap<ObjectKey, Instant>,
    /// The heartbeat's `joined` as of the last pass.
    joined: u64,
}

impl Planner {
    pub(super) fn new(identity: &str, lease_duration: Duration, metrics: Metrics) -> Self {
        Self {
            identity: identity.to_string(),
            lease_duration,
            metrics,
            own: HashMap::new(),
            summaries: HashMap::new(),
            busy: HashSet::new(),
            retry_at: HashMap::new(),
            joined: 0,
        }
    }

    /// When the earliest failed policy is due to be tried again.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retry_at.values().min().copied()
    }

    /// The writes each policy needs, for those with none in flight.
    pub(super) fn plan(&mut self, view: &View) -> Vec<Job> {
        if view.liveness.joined != self.joined {
            // This replica's heartbeat was written anew: its entries may be gone meanwhile.
            self.joined = view.liveness.joined;
            self.own.clear();
        }
        if !view.leading {
            // Another replica writes meanwhile: once leading again, this one compares afresh.
            self.summaries.clear();
        }
        let reports = &view.reports;
        self.own.retain(|key, _| reports.contains_key(key));
        self.summaries.retain(|key, _| reports.contains_key(key));
        let now = Instant::now();
        self.retry_at
            .retain(|key, at| reports.contains_key(key) && *at > now);
        let mut jobs = Vec::new();
        for (key, report) in reports {
            if self.busy.contains(key) || self.retry_at.contains_key(key) {
                continue;
            }
            let mut writes = Vec::new();
            let own = self.plan_own(key, report, view, &mut writes);
            if view.leading {
                self.plan_summary(key, report, own.as_ref(), view, &mut writes);
            }
            if !writes.is_empty() {
                self.busy.insert(key.clone());
                jobs.push(Job {
                    key: key.clone(),
                    uid: report.uid.clone(),
                    writes,
                });
            }
        }
        jobs
    }

    /// This replica's entry as it should be, planning its write when it differs from what was
    /// written (and this replica's heartbeat is current).
    fn plan_own(
        &self,
        key: &ObjectKey,
        report: &PolicyReport,
        view: &View,
        writes: &mut Vec<Write>,
    ) -> Option<ReplicaStatus> {
        let counted = replica_status(key, report, &view.held, &self.identity, &view.now);
        let wanted = (counted.proxies.connected > 0).then_some(counted);
        let written = match self.own.get(key) {
            Some((uid, entry)) if *uid == report.uid => entry.clone(),
            _ => view.observed.status(key, &report.uid).and_then(|status| {
                status
                    .replicas
                    .iter()
                    .find(|entry| entry.name == self.identity)
                    .cloned()
            }),
        };
        let unchanged = match (&wanted, &written) {
            (Some(wanted), Some(written)) => same_counts(wanted, written),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            // As written, time included.
            return written;
        }
        if view.liveness.beating(self.lease_duration) {
            writes.push(Write::Own(wanted.clone()));
        }
        wanted
    }

    /// The leader's part: conditions and sums over the live replicas' entries, and the removal of
    /// the entries of replicas that stopped.
    fn plan_summary(
        &self,
        key: &ObjectKey,
        report: &PolicyReport,
        own: Option<&ReplicaStatus>,
        view: &View,
        writes: &mut Vec<Write>,
    ) {
        let observed = view.observed.status(key, &report.uid);
        let others: Vec<(usize, &ReplicaStatus)> = observed
            .map_or(&[][..], |status| status.replicas.as_slice())
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.name != self.identity)
            .collect();
        // The highest position first, so that each removal leaves the next one where it was.
        for (position, entry) in others.iter().rev() {
            if self.stopped(&entry.name, view) {
                writes.push(Write::Prune {
                    position: *position,
                    name: entry.name.clone(),
                });
            }
        }
        let counted: Vec<&ReplicaStatus> = others
            .iter()
            .map(|(_, entry)| *entry)
            .filter(|entry| view.liveness.alive.contains(&entry.name))
            .chain(own)
            .collect();
        let written = match self.summaries.get(key) {
            Some((uid, status)) if *uid == report.uid => Some(status.clone()),
            _ => observed.map(|status| DestinationPolicyStatus {
                replicas: Vec::new(),
                ..status.clone()
            }),
        };
        let status = desired_status(report, &counted, written.as_ref(), &view.now);
        if written.as_ref() != Some(&status) {
            writes.push(Write::Summary(status));
        }
    }

    /// Whether a replica's entries are surely stale: its heartbeat was not alive at a read begun
    /// after its last entry was seen.
    fn stopped(&self, name: &str, view: &View) -> bool {
        let Some(read_at) = view.liveness.read_at else {
            return false;
        };
        !view.liveness.alive.contains(name)
            && view
                .observed
                .entry_seen
                .get(name)
                .is_none_or(|seen| *seen < read_at)
    }

    /// Takes in what became of a job's writes.
    pub(super) fn record(&mut self, (job, results): Outcome) {
        let Job { key, uid, writes } = job;
        self.busy.remove(&key);
        for (write, result) in writes.into_iter().zip(results) {
            match (write, result) {
                (Write::Own(entry), Ok(())) => {
                    self.own.insert(key.clone(), (uid.clone(), entry));
                }
                (Write::Summary(status), Ok(())) => {
                    self.summaries.insert(key.clone(), (uid.clone(), status));
                }
                (Write::Prune { name, .. }, Ok(())) => {
                    tracing::info!(policy = %key, replica = %name, "removed the status entry of a replica whose heartbeat stopped");
                }
                // Deleted since the index reported it.
                (_, Err(kube::Error::Api(error))) if error.is_not_found() => {}
                // The list changed since it was read (the entry is gone already, or moved): the
                // next pass sees it as it is now.
                (Write::Prune { .. }, Err(kube::Error::Api(error))) if error.code == 422 => {}
                (_, Err(error)) => {
                    self.metrics.reconcile_errors.inc();
                    tracing::error!(policy = %key, "writing the status of DestinationPolicy {key}: {}", explain(&error));
                    self.retry_at
                        .insert(key.clone(), Instant::now() + RETRY_AFTER);
                }
            }
        }
    }
}

fn same_counts(a: &ReplicaStatus, b: &ReplicaStatus) -> bool {
    (a.observed_generation, &a.proxies, &a.rejection)
        == (b.observed_generation, &b.proxies, &b.rejection)
}

#[cfg(test)]
mod tests {
    use super::super::destination_policy::tests::{
        applied, at, condition, entry, held, policy, report,
    };
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    fn planner() -> Planner {
        Planner::new("new", LEASE, Metrics::default())
    }

    /// The view of the leader `new`, serving one proxy that applied generation 3, whose last
    /// heartbeat read (now) found `alive` beating; `listed` is the policy's status on the API
    /// server, each entry seen before that read.
    fn view(listed: DestinationPolicyStatus, alive: &[&str]) -> View {
        let now = Instant::now();
        let entry_seen = listed
            .replicas
            .iter()
            .map(|entry| (entry.name.clone(), now - Duration::from_secs(1)))
            .collect();
        View {
            reports: [(policy(), report())].into(),
            held: held(vec![("a", applied(3))]),
            observed: Observed {
                policies: [(policy(), (report().uid, listed))].into(),
                entry_seen,
            },
            liveness: Liveness {
                read_at: Some(now),
                alive: alive.iter().map(|name| name.to_string()).collect(),
                beat_at: Some(now),
                joined: 1,
            },
            leading: true,
            now: at(10),
        }
    }

    /// What the old leader wrote before it was replaced: its entry of two proxies, summed.
    fn written_by_old() -> DestinationPolicyStatus {
        let old = entry("old", 3, (2, 2, 0));
        DestinationPolicyStatus {
            replicas: vec![old.clone()],
            ..desired_status(&report(), &[&old], None, &at(0))
        }
    }

    fn summary(writes: &[Write]) -> &DestinationPolicyStatus {
        writes
            .iter()
            .find_map(|write| match write {
                Write::Summary(status) => Some(status),
                _ => None,
            })
            .expect("a summary is written")
    }

    fn succeeded(job: Job) -> Outcome {
        let results = job.writes.iter().map(|_| Ok(())).collect();
        (job, results)
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_replica_is_not_counted_and_the_leader_removes_its_entry() {
        let mut planner = planner();
        let mut jobs = planner.plan(&view(written_by_old(), &["new"]));
        assert_eq!(jobs.len(), 1);
        let job = jobs.pop().unwrap();
        let mut own = entry("new", 3, (1, 1, 0));
        own.last_update_time = at(10);
        assert_eq!(job.writes[0], Write::Own(Some(own)));
        assert_eq!(
            job.writes[1],
            Write::Prune {
                position: 0,
                name: "old".into()
            }
        );
        let status = summary(&job.writes);
        assert_eq!(status.proxies_summary.as_deref(), Some("1/1"));
        assert_eq!(
            condition(status, "Programmed"),
            ("True", "Programmed", "all 1 proxies applied generation 3")
        );
        assert_eq!(job.writes.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_replica_is_counted_and_an_entry_newer_than_the_last_read_is_kept() {
        let mut listed = written_by_old();
        listed.replicas.push(entry("late", 3, (4, 4, 0)));
        let mut view = view(listed, &["new", "old"]);
        // `late` wrote its heartbeat after the last read, then its entry.
        view.observed
            .entry_seen
            .insert("late".into(), Instant::now() + Duration::from_secs(1));
        let jobs = planner().plan(&view);
        let writes = &jobs[0].writes;
        assert!(!writes.iter().any(|w| matches!(w, Write::Prune { .. })));
        // Its own and old's, not late's until a read finds it beating.
        assert_eq!(summary(writes).proxies_summary.as_deref(), Some("3/3"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_state_writes_nothing_however_often_passes_run() {
        let mut planner = planner();
        let mut view = view(written_by_old(), &["new"]);
        let job = planner.plan(&view).pop().unwrap();
        // What the API server has once the job is done, as the watch tells it.
        let mut stored = summary(&job.writes).clone();
        stored.replicas = job
            .writes
            .iter()
            .filter_map(|write| match write {
                Write::Own(entry) => entry.clone(),
                _ => None,
            })
            .collect();
        planner.record(succeeded(job));
        view.observed
            .policies
            .insert(policy(), (report().uid, stored));
        // Heartbeats go on and time passes: nothing to write.
        for _ in 0..10 {
            tokio::time::advance(LEASE / 3).await;
            view.liveness.read_at = Some(Instant::now());
            view.liveness.beat_at = Some(Instant::now());
            view.now = at(view.now.0.as_second() + 5);
            assert!(planner.plan(&view).is_empty());
        }
        // Nor does this replica restarted under its name, finding its entry as it would write it.
        assert!(self::planner().plan(&view).is_empty());
        // A follower writes nothing for an unchanged entry either.
        view.leading = false;
        assert!(planner.plan(&view).is_empty());
        // A changed count is written, by this replica only.
        view.held = held(vec![("a", applied(3)), ("b", applied(2))]);
        let jobs = planner.plan(&view);
        assert_eq!(jobs.len(), 1);
        assert!(
            matches!(&jobs[0].writes[..], [Write::Own(Some(own))] if own.proxies.connected == 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_whose_heartbeat_lags_writes_no_entry() {
        let mut view = view(DestinationPolicyStatus::default(), &["new"]);
        view.leading = false;
        tokio::time::advance(LEASE * 2 / 3).await;
        assert!(planner().plan(&view).is_empty());
        view.liveness.beat_at = Some(Instant::now());
        assert_eq!(planner().plan(&view).len(), 1);
        // Its entries may be gone while its mark was: written anew after it joins again.
        let mut planner = planner();
        for job in planner.plan(&view) {
            planner.record(succeeded(job));
        }
        assert!(planner.plan(&view).is_empty());
        view.liveness.joined += 1;
        assert_eq!(planner.plan(&view).len(), 1);
    }
}
