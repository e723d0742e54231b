//! Status against a real API server (etcd and kube-apiserver on loopback, the outrigger-cluster
//! library) when the controller restarts under a new name, as a Deployment's rollout does: the
//! old replica's proxies stop counting at once, the entry it left is removed, and an unchanged
//! state costs no writes (counted by the controller's metric and the policy's resourceVersion).
//! The controllers are this package's binary; the proxies are streams driven here that
//! acknowledge every update. Every wait is a bounded poll; nothing asserts on timing.
//!
//! Needs the cluster binaries (`cargo xtask cluster build`, or built on first use).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use outrigger_api::proto::{Ack, ProxyMessage, controller_message, proxy_message};
use outrigger_cluster::Cluster;
use serde_json::Value;
use tokio::time::Instant;

use common::{free_port, get, sigterm};

const NAMESPACE: &str = "restart";
const KEY: &str = "reviews.restart.svc.cluster.local:9080";
/// Long, so that a count that waited for the old replica's heartbeat to age out would miss
/// [`COUNT_DEADLINE`].
const LEASE_DURATION: Duration = Duration::from_secs(45);
const COUNT_DEADLINE: Duration = Duration::from_secs(30);
/// For what follows a heartbeat (a third of the lease), with room for a loaded machine.
const DEADLINE: Duration = Duration::from_secs(90);
/// Where the replicas elect their leader and beat: there from the start.
const LEADER_NAMESPACE: &str = "default";

/// The controller binary under one name; killed when dropped (a test that failed leaves none).
struct Replica {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    log: std::path::PathBuf,
}

impl Replica {
    async fn start(cluster: &Cluster, logs: &Path, identity: &str) -> Self {
        let (grpc, admin) = (free_port(), free_port());
        let log = logs.join(format!("{identity}.log"));
        let output = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_outrigger-controller"))
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--leader-namespace", LEADER_NAMESPACE])
            .args([
                "--lease-duration",
                &format!("{}s", LEASE_DURATION.as_secs()),
            ])
            // Its name in the Lease and in status.
            .env("POD_NAME", identity)
            .env("RUST_LOG", "info")
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap();
        let replica = Self {
            child,
            grpc,
            admin,
            log,
        };
        let deadline = Instant::now() + DEADLINE;
        while get(admin, "/ready")
            .await
            .is_none_or(|(code, _)| code != 200)
        {
            replica.check(deadline, "ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        replica
    }

    /// Fails, with its log, once past `deadline`.
    fn check(&self, deadline: Instant, what: &str) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until the controller is {what}; its log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Stops it as Kubernetes does (SIGTERM), and waits for it to exit.
    async fn terminate(mut self) {
        sigterm(&self.child);
        let deadline = Instant::now() + DEADLINE;
        while self.child.try_wait().unwrap().is_none() {
            self.check(deadline, "stopped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Requests it sent to write status so far.
    async fn status_writes(&self) -> u64 {
        let (_, metrics) = get(self.admin, "/metrics").await.expect("/metrics answers");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("outrigger_controller_status_writes_total "))
            .map_or(0, |value| value.trim().parse().unwrap())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy calling reviews through `replica`: it acknowledges every update; gone when dropped.
struct Proxy(tokio::task::JoinHandle<()>);

impl Proxy {
    async fn connect(replica: &Replica, workload: &str) -> Self {
        let (mut received, send) =
            common::open_stream(replica.grpc, NAMESPACE, workload, KEY).await;
        Self(tokio::spawn(async move {
            while let Ok(Some(message)) = received.message().await {
                if let Some(controller_message::Message::Update(update)) = message.message {
                    let ack = proxy_message::Message::Ack(Ack {
                        key: update.key,
                        version: update.version,
                    });
                    if send
                        .send(ProxyMessage { message: Some(ack) })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    cluster
        .kubectl(args)
        .unwrap_or_else(|error| panic!("{error}"))
}

fn apply(cluster: &Cluster, yaml: &str) {
    let output = cluster
        .kubectl_with_input(&["apply", "-f", "-"], yaml)
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl apply failed: {}\n{yaml}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn object(cluster: &Cluster, kind: &str, namespace: &str, name: &str) -> Value {
    let json = kubectl(cluster, &["get", kind, name, "-n", namespace, "-o", "json"]);
    serde_json::from_str(&json).unwrap()
}

/// `name acknowledged/connected` of each entry of the policy's `status.replicas`.
fn entries(policy: &Value) -> Vec<String> {
    policy["status"]["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            let name = entry["name"].as_str().unwrap_or_default();
            format!("{name} {}/{}", entry["acknowledged"], entry["connected"])
        })
        .collect()
}

/// Polls policy `name` until `check` holds, within `deadline`; fails showing its status.
async fn until(
    cluster: &Cluster,
    name: &str,
    deadline: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let until = Instant::now() + deadline;
    loop {
        let policy = object(cluster, "dp", NAMESPACE, name);
        if check(&policy) {
            return policy;
        }
        assert!(
            Instant::now() < until,
            "timed out waiting until {what}; status of {name}: {:#}",
            policy["status"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn policy(name: &str, host: &str, timeout: &str) -> String {
    format!(
        "apiVersion: outrigger.dev/v1alpha1\nkind: DestinationPolicy\n\
         metadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
         spec: {{host: {host}, timeout: {timeout}}}\n"
    )
}

/// Puts back the old replica's entry as it was, had the replica stopped before removing it (its
/// proxies are gone too when it stops, and it may or may not get to write that).
fn leave_behind(cluster: &Cluster, entry: &Value) {
    let status = serde_json::json!({
        "apiVersion": "outrigger.dev/v1alpha1",
        "kind": "DestinationPolicy",
        "metadata": {"name": "reviews", "namespace": NAMESPACE},
        "status": {"replicas": [entry]},
    });
    let output = cluster
        .kubectl_with_input(
            &[
                "apply",
                "--server-side",
                "--subresource=status",
                "--field-manager=outrigger-controller/controller-old",
                "--force-conflicts",
                "-f",
                "-",
            ],
            &status.to_string(),
        )
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn summary(policy: &Value) -> &Value {
    &policy["status"]["proxiesSummary"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_counts_only_live_replicas_and_writes_only_changes() {
    let cluster = Cluster::start().expect("starting the test cluster");
    let logs = tempfile::tempdir().unwrap();
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    kubectl(&cluster, &["apply", "-f", crds.to_str().unwrap()]);
    kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Established",
            "crd/destinationpolicies.outrigger.dev",
            "--timeout=60s",
        ],
    );
    apply(
        &cluster,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: {NAMESPACE}}}\n\
             spec: {{ports: [{{name: http, port: 9080}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: ratings, namespace: {NAMESPACE}}}\n\
             spec: {{ports: [{{name: http, port: 9080}}]}}\n---\n{}---\n{}",
            policy("reviews", "reviews", "10s"),
            policy("ratings", "ratings", "10s"),
        ),
    );

    // The old replica serves two proxies and, leading, sums them.
    let old = Replica::start(&cluster, logs.path(), "controller-old").await;
    let old_proxies = [
        Proxy::connect(&old, "client-a").await,
        Proxy::connect(&old, "client-b").await,
    ];
    let counted = until(
        &cluster,
        "reviews",
        DEADLINE,
        "the old replica counted its proxies",
        |p| entries(p) == ["controller-old 2/2"] && summary(p) == "2/2",
    )
    .await;

    // A rollout: the old pod stops, a new one under another name serves one proxy. The old
    // entry stays behind, but its replica's heartbeat is gone: 1/1, not 3/3, and well within a
    // lease.
    old.terminate().await;
    drop(old_proxies);
    leave_behind(&cluster, &counted["status"]["replicas"][0]);
    let new = Replica::start(&cluster, logs.path(), "controller-new").await;
    let _new_proxy = Proxy::connect(&new, "client-c").await;
    // Never the old replica's proxies too, while its entry is there or after.
    let not_counted = |p: &Value| assert_ne!(summary(p), "3/3", "{:#}", p["status"]);
    until(
        &cluster,
        "reviews",
        COUNT_DEADLINE,
        "the new leader counted its proxy and not the old replica's",
        |p| {
            not_counted(p);
            summary(p) == "1/1"
        },
    )
    .await;
    until(
        &cluster,
        "reviews",
        DEADLINE,
        "the leader removed the old replica's entry",
        |p| {
            not_counted(p);
            entries(p) == ["controller-new 1/1"]
        },
    )
    .await;

    // Settled. Heartbeats go on and wake status, and another policy's edit makes a pass:
    // reviews, unchanged, is not written; ratings is, once (it has no proxies, so no entry).
    let heartbeats = |cluster: &Cluster| {
        object(
            cluster,
            "lease",
            LEADER_NAMESPACE,
            "outrigger-controller-replicas",
        )["metadata"]["resourceVersion"]
            .clone()
    };
    let reviews_version =
        object(&cluster, "dp", NAMESPACE, "reviews")["metadata"]["resourceVersion"].clone();
    let writes = new.status_writes().await;
    assert!(writes > 0);
    let beat = heartbeats(&cluster);
    let deadline = Instant::now() + DEADLINE;
    while heartbeats(&cluster) == beat {
        new.check(deadline, "beating");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    apply(&cluster, &policy("ratings", "ratings", "5s"));
    until(
        &cluster,
        "ratings",
        DEADLINE,
        "the edit of ratings is in its status",
        |p| p["status"]["observedGeneration"] == 2,
    )
    .await;
    let reviews = object(&cluster, "dp", NAMESPACE, "reviews");
    assert_eq!(reviews["metadata"]["resourceVersion"], reviews_version);
    assert_eq!(new.status_writes().await, writes + 1);
    assert_eq!(summary(&reviews), "1/1");
}
