//! The controller against a real Kubernetes API server: etcd and kube-apiserver on loopback (the
//! outrigger-cluster library), the controller binary running with a ServiceAccount token that the
//! Helm chart's RBAC binds, real proxies in this process, and backends on this machine's address
//! (EndpointSlices refuse loopback ones).
//!
//! One cluster serves the whole binary and tests take turns with it: the controllers watch every
//! namespace and share the leader Lease, so two tests at once would see each other's. Each test
//! works in a namespace of its own. Every wait is a bounded poll; nothing asserts on timing.
//!
//! Needs the controller binary built next to the tests (`cargo test --workspace` builds it; alone:
//! `cargo build -p outrigger-controller && cargo test -p outrigger-tests --test cluster_e2e`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use outrigger_cluster::Cluster;
use outrigger_tests::Backend;
use outrigger_tests::e2e::{RunningProxy, eventually, eventually_within, get};
use outrigger_tests::process::{ChildProcess, free_port, host_address, sibling_binary};
use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard};

/// Where the chart installs the controller: its ServiceAccount and leader Lease live here.
const SYSTEM_NAMESPACE: &str = "outrigger-system";
/// The controller's ServiceAccount, as the chart names it.
const CONTROLLER_ACCOUNT: &str = "outrigger-controller";
/// Short, so that a replica that died takes little time to replace.
const LEASE_DURATION: Duration = Duration::from_secs(4);
/// How long status, which is rate-limited and waits on proxies, may take to follow a change.
const STATUS_DEADLINE: Duration = Duration::from_secs(30);
/// How the clients of the test namespaces call the `reviews` Service.
const REVIEWS: &str = "reviews:9080";

/// The cluster every test of this binary shares, one test at a time. A test that failed holding
/// it leaves it usable for the next one.
async fn cluster() -> MutexGuard<'static, TestCluster> {
    static SHARED: OnceLock<Mutex<TestCluster>> = OnceLock::new();
    SHARED
        .get_or_init(|| Mutex::new(TestCluster::start()))
        .lock()
        .await
}

struct TestCluster {
    cluster: Cluster,
    workspace: PathBuf,
    /// A token of the chart's ServiceAccount: the controllers run with the chart's RBAC only.
    controller_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl TestCluster {
    fn start() -> Self {
        let cluster = Cluster::start().expect("starting the test cluster");
        let workspace = outrigger_tests::workspace();
        let dir = tempfile::tempdir().unwrap();
        let mut test_cluster = Self {
            cluster,
            workspace,
            controller_kubeconfig: PathBuf::new(),
            dir,
        };
        let crds = test_cluster.workspace.join("crds");
        test_cluster.kubectl(&["apply", "-f", crds.to_str().unwrap()]);
        test_cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/destinationpolicies.outrigger.dev",
            "--timeout=60s",
        ]);
        // The Gateway API's standard channel, as the conformance suite's release ships it: the
        // chart leaves these CRDs to the user. Server-side: they are too large for the
        // annotation a client-side apply writes.
        let gateway_api = test_cluster
            .workspace
            .join("tests/conformance/crds/standard.yaml");
        test_cluster.kubectl(&[
            "apply",
            "--server-side",
            "-f",
            gateway_api.to_str().unwrap(),
        ]);
        test_cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/httproutes.gateway.networking.k8s.io",
            "crd/grpcroutes.gateway.networking.k8s.io",
            "--timeout=60s",
        ]);
        test_cluster.kubectl(&["create", "namespace", SYSTEM_NAMESPACE]);
        let chart =
            test_cluster.helm_template(&["templates/serviceaccount.yaml", "templates/rbac.yaml"]);
        test_cluster.apply(&chart);
        test_cluster.controller_kubeconfig = test_cluster.token_kubeconfig(CONTROLLER_ACCOUNT);
        test_cluster
    }

    /// kubectl as the cluster's admin; panics with its stderr when it fails.
    fn kubectl(&self, args: &[&str]) -> String {
        self.cluster
            .kubectl(args)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn try_apply(&self, yaml: &str) -> Output {
        self.cluster
            .kubectl_with_input(&["apply", "-f", "-"], yaml)
            .expect("running kubectl")
    }

    fn apply(&self, yaml: &str) {
        let output = self.try_apply(yaml);
        assert!(
            output.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The chart's templates, rendered for a release in the system namespace.
    fn helm_template(&self, templates: &[&str]) -> String {
        let chart = self.workspace.join("charts/outrigger");
        let mut helm = self.cluster.helm_command();
        helm.args(["template", "outrigger"])
            .arg(&chart)
            .args(["--namespace", SYSTEM_NAMESPACE]);
        for template in templates {
            helm.args(["--show-only", template]);
        }
        let output = helm.output().expect("running helm");
        assert!(
            output.status.success(),
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// A kubeconfig that authenticates as ServiceAccount `account` of the system namespace.
    fn token_kubeconfig(&self, account: &str) -> PathBuf {
        let token = self.kubectl(&[
            "create",
            "token",
            account,
            "--namespace",
            SYSTEM_NAMESPACE,
            "--duration=24h",
        ]);
        let path = self.dir.path().join(format!("{account}.kubeconfig"));
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.cluster.server_url(),
                "certificate-authority": self.cluster.certificates().ca_cert,
            }}],
            "users": [{"name": account, "user": {"token": token.trim()}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": account}}],
            "current-context": "test",
        });
        std::fs::write(&path, kubeconfig.to_string()).unwrap();
        path
    }

    /// A namespace for one test, where Pods can be created (there is no controller manager to
    /// make its default ServiceAccount).
    fn namespace(&self, name: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: default, namespace: {name}}}\n"
        ));
    }

    fn policy(&self, namespace: &str, name: &str) -> Value {
        let json = self.kubectl(&["get", "dp", name, "--namespace", namespace, "-o", "json"]);
        serde_json::from_str(&json).unwrap()
    }
}

/// The controller binary, with the given kubeconfig, electing its leader in the system namespace.
struct ControllerProcess {
    process: ChildProcess,
    grpc: SocketAddr,
    admin: SocketAddr,
    identity: String,
}

impl ControllerProcess {
    /// Started, not waited for.
    fn spawn(kubeconfig: &Path, identity: &str) -> Self {
        let (grpc, admin) = (free_port().unwrap(), free_port().unwrap());
        let mut command = Command::new(sibling_binary("outrigger-controller").unwrap());
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--leader-namespace", SYSTEM_NAMESPACE])
            .args([
                "--lease-duration",
                &format!("{}s", LEASE_DURATION.as_secs()),
            ])
            // Its name in the Lease.
            .env("POD_NAME", identity)
            .env("RUST_LOG", "info")
            // Plain log lines, for `logged`.
            .env("NO_COLOR", "1");
        Self {
            process: ChildProcess::spawn(identity, &mut command).unwrap(),
            grpc,
            admin,
            identity: identity.to_string(),
        }
    }

    /// Started with the chart's RBAC, and ready: it has listed everything.
    async fn start(cluster: &TestCluster, identity: &str) -> Self {
        let mut controller = Self::spawn(&cluster.controller_kubeconfig, identity);
        controller.wait_ready().await;
        controller
    }

    async fn wait_ready(&mut self) {
        self.process
            .wait_ready(self.admin, "/ready", Duration::from_secs(60))
            .await
            .unwrap();
    }

    async fn ready(&self) -> Option<u16> {
        get(self.admin, "admin", "/ready")
            .await
            .map(|(status, _)| status)
    }

    async fn reconcile_errors(&self) -> f64 {
        let (_, metrics) = get(self.admin, "admin", "/metrics")
            .await
            .expect("the controller answers /metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("outrigger_controller_reconcile_errors_total "))
            .map_or(0.0, |value| value.trim().parse().unwrap())
    }

    /// Whether its log has a line containing every one of `parts`.
    fn logged(&self, parts: &[&str]) -> bool {
        self.process
            .log()
            .lines()
            .any(|line| parts.iter().all(|part| line.contains(part)))
    }

    /// Stops it as Kubernetes does (SIGTERM), which hands the Lease back.
    fn stop(self) {
        self.process.terminate(Duration::from_secs(10)).unwrap();
    }
}

/// The `reviews` Service of a test namespace: pods labelled with their version, and behind each
/// pod a backend answering with its version and an EndpointSlice of its own.
///
/// EndpointSlices refuse loopback addresses, so the backends listen on this machine's own
/// address, each on its port.
struct Reviews {
    namespace: String,
    /// (pod, version, backend), in creation order.
    pods: Vec<(String, String, Backend)>,
}

impl Reviews {
    /// Pods per version, e.g. `[("v1", 1), ("v2", 1)]`.
    async fn start(cluster: &TestCluster, namespace: &str, versions: &[(&str, usize)]) -> Self {
        cluster.namespace(namespace);
        let mut reviews = Self {
            namespace: namespace.to_string(),
            pods: Vec::new(),
        };
        for (version, count) in versions {
            for _ in 0..*count {
                reviews.add_pod(version).await;
            }
        }
        cluster.apply(&reviews.manifests());
        reviews
    }

    async fn add_pod(&mut self, version: &str) {
        let pod = format!("reviews-{version}-{}", self.pods.len());
        let backend = Backend::start_on(SocketAddr::new(host_address(), 0), version).await;
        self.pods.push((pod, version.to_string(), backend));
    }

    /// Another pod of `version`, with its endpoint; returns its backend.
    async fn scale_up(&mut self, cluster: &TestCluster, version: &str) -> &Backend {
        self.add_pod(version).await;
        cluster.apply(&self.manifests());
        &self.pods.last().unwrap().2
    }

    /// No pod of `version` left, nor endpoint.
    fn scale_to_zero(&mut self, cluster: &TestCluster, version: &str) {
        self.pods.retain(|(_, v, _)| v != version);
        cluster.kubectl(&[
            "delete",
            "endpointslices,pods",
            "--namespace",
            &self.namespace,
            "--selector",
            &format!("version={version}"),
            "--grace-period=0",
            "--force",
        ]);
    }

    fn backends(&self, version: &str) -> impl Iterator<Item = &Backend> {
        self.pods
            .iter()
            .filter(move |(_, v, _)| v == version)
            .map(|(_, _, backend)| backend)
    }

    /// The Service, and each pod with its EndpointSlice.
    fn manifests(&self) -> String {
        let namespace = &self.namespace;
        let mut documents = vec![format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: {namespace}}}\n\
             spec: {{selector: {{app: reviews}}, ports: [{{name: http, port: 9080}}]}}\n"
        )];
        for (pod, version, backend) in &self.pods {
            documents.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {namespace}, \
                 labels: {{app: reviews, version: {version}}}}}\n\
                 spec: {{containers: [{{name: app, image: reviews}}]}}\n"
            ));
            documents.push(format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {pod}, namespace: {namespace}, \
                 labels: {{kubernetes.io/service-name: reviews, version: {version}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
                 endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}, \
                 targetRef: {{kind: Pod, name: {pod}, namespace: {namespace}}}}}]\n",
                ip = backend.addr.ip(),
                port = backend.addr.port(),
            ));
        }
        documents.join("---\n")
    }
}

/// Polls the policy until `check` holds, within [`STATUS_DEADLINE`]; fails showing its status.
async fn policy_until(
    cluster: &TestCluster,
    namespace: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let until = tokio::time::Instant::now() + STATUS_DEADLINE;
    loop {
        let policy = cluster.policy(namespace, name);
        if check(&policy) {
            return policy;
        }
        if tokio::time::Instant::now() >= until {
            panic!(
                "timed out waiting until {what}; status of {namespace}/{name}: {:#}",
                policy["status"]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn condition<'a>(policy: &'a Value, type_: &str) -> &'a Value {
    policy["status"]["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// Whether the condition has this status and reason, for the policy's current generation.
fn condition_is(policy: &Value, type_: &str, status: &str, reason: &str) -> bool {
    let condition = condition(policy, type_);
    condition["status"] == status
        && condition["reason"] == reason
        && condition["observedGeneration"] == policy["metadata"]["generation"]
}

fn observed(policy: &Value) -> bool {
    policy["status"]["observedGeneration"] == policy["metadata"]["generation"]
}

/// A policy for `reviews` splitting between subsets v1 and v2, with more spec after.
fn split_policy(namespace: &str, v1: u32, v2: u32, more: &str) -> String {
    policy(
        namespace,
        "reviews",
        &format!(
            "  host: reviews\n\
             \x20 subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n\
             \x20 trafficSplit: [{{subset: v1, weight: {v1}}}, {{subset: v2, weight: {v2}}}]\n{more}"
        ),
    )
}

async fn until_served_by(proxy: &RunningProxy, version: &str) {
    eventually(&format!("every call goes to {version}"), || {
        proxy.all_served_by(REVIEWS, version, 10)
    })
    .await;
}

/// A DestinationPolicy manifest.
fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: outrigger.dev/v1alpha1\nkind: DestinationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )
}

/// A DestinationPolicy that the API server refuses, and what its message must name.
struct Invalid {
    name: &'static str,
    spec: &'static str,
    field: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crd_installs_and_invalid_policies_are_refused_naming_the_field() {
    let cluster = cluster().await;
    let applied = cluster.kubectl(&[
        "apply",
        "-f",
        cluster.workspace.join("crds").to_str().unwrap(),
    ]);
    assert!(
        applied.contains("destinationpolicies.outrigger.dev"),
        "{applied}"
    );
    cluster.namespace("validation");
    let valid = policy(
        "validation",
        "valid",
        "  host: reviews\n  subsets: [{name: stable, labels: {version: v1}}]\n  timeout: 10s\n",
    );
    cluster.apply(&valid);

    let table = [
        Invalid {
            name: "bad-duration",
            spec: "  host: reviews\n  timeout: 10 seconds\n",
            field: "spec.timeout",
        },
        Invalid {
            name: "unknown-subset",
            spec: "  host: reviews\n  subsets: [{name: stable, labels: {version: v1}}]\n  trafficSplit: [{subset: canary, weight: 10}]\n",
            field: "spec.trafficSplit",
        },
        Invalid {
            name: "negative-attempts",
            spec: "  host: reviews\n  retries: {attempts: -1}\n",
            field: "spec.retries.attempts",
        },
        Invalid {
            name: "per-try-over-timeout",
            spec: "  host: reviews\n  timeout: 1s\n  retries: {perTryTimeout: 2s}\n",
            field: "spec.retries.perTryTimeout",
        },
        Invalid {
            name: "all-weights-zero",
            spec: "  host: reviews\n  subsets: [{name: stable, labels: {version: v1}}]\n  trafficSplit: [{subset: stable, weight: 0}]\n",
            field: "spec.trafficSplit",
        },
        Invalid {
            name: "duplicate-subsets",
            spec: "  host: reviews\n  subsets: [{name: stable, labels: {version: v1}}, {name: stable, labels: {version: v2}}]\n",
            field: "spec.subsets[1]",
        },
        Invalid {
            name: "hash-without-header",
            spec: "  host: reviews\n  loadBalancer: {algorithm: ConsistentHash}\n",
            field: "spec.loadBalancer.consistentHash",
        },
        Invalid {
            name: "unknown-retry-on",
            spec: "  host: reviews\n  retries: {retryOn: [5xx, sometimes]}\n",
            field: "spec.retries.retryOn[1]",
        },
        Invalid {
            name: "status-code-out-of-range",
            spec: "  host: reviews\n  retries: {retryOn: [retriable-status-codes], retriableStatusCodes: [600]}\n",
            field: "spec.retries.retriableStatusCodes[0]",
        },
        Invalid {
            name: "percent-over-100",
            spec: "  host: reviews\n  faultInjection: {abort: {percent: 150, httpStatus: 503}}\n",
            field: "spec.faultInjection.abort.percent",
        },
        Invalid {
            name: "budget-over-100",
            spec: "  host: reviews\n  retries: {budget: {percent: 101}}\n",
            field: "spec.retries.budget.percent",
        },
        Invalid {
            name: "status-codes-missing",
            spec: "  host: reviews\n  retries: {retryOn: [retriable-status-codes]}\n",
            field: "spec.retries.retriableStatusCodes",
        },
        Invalid {
            name: "relative-path",
            spec: "  host: reviews\n  routes: [{name: api, match: {pathPrefix: api}}]\n",
            field: "spec.routes[0].match.pathPrefix",
        },
        Invalid {
            name: "bad-host",
            spec: "  host: Reviews_Shop\n",
            field: "spec.host",
        },
        Invalid {
            name: "ejection-backwards",
            spec: "  host: reviews\n  outlierDetection: {baseEjectionTime: 10m, maxEjectionTime: 1m}\n",
            field: "spec.outlierDetection",
        },
    ];
    let mut accepted = Vec::new();
    for invalid in &table {
        let output = cluster.try_apply(&policy("validation", invalid.name, invalid.spec));
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() || !stderr.contains(invalid.field) {
            accepted.push(format!(
                "{}: expected a refusal naming {}; got: {stderr}",
                invalid.name, invalid.field
            ));
        }
    }
    assert!(accepted.is_empty(), "{}", accepted.join("\n"));
    let names = cluster.kubectl(&["get", "dp", "--namespace", "validation", "-o", "name"]);
    assert_eq!(names.trim(), "destinationpolicy.outrigger.dev/valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_kubectl_get_follow_the_policy_and_its_proxies() {
    let cluster = cluster().await;
    let _reviews = Reviews::start(&cluster, "status", &[("v1", 1), ("v2", 1)]).await;
    let controller = ControllerProcess::start(&cluster, "status-controller").await;
    let retries = "  timeout: 10s\n  retries: {attempts: 3}\n";
    cluster.apply(&split_policy("status", 90, 10, retries));
    policy_until(
        &cluster,
        "status",
        "reviews",
        "programmed, with no proxy yet",
        |p| {
            observed(p)
                && condition_is(p, "Accepted", "True", "Accepted")
                && condition_is(p, "ResolvedRefs", "True", "ResolvedRefs")
                && condition_is(p, "Programmed", "True", "Programmed")
                && p["status"]["proxiesSummary"] == "0/0"
        },
    )
    .await;

    let proxies = [
        RunningProxy::start(controller.grpc, "status", "client-a").await,
        RunningProxy::start(controller.grpc, "status", "client-b").await,
    ];
    for proxy in &proxies {
        eventually("the proxy reaches reviews", || async {
            matches!(proxy.call(REVIEWS).await, Some((200, _)))
        })
        .await;
    }
    let programmed = policy_until(
        &cluster,
        "status",
        "reviews",
        "both proxies applied it",
        |p| {
            condition_is(p, "Programmed", "True", "Programmed")
                && p["status"]["proxies"]
                    == serde_json::json!({"connected": 2, "acknowledged": 2, "rejected": 0})
        },
    )
    .await;
    assert_eq!(
        condition(&programmed, "Programmed")["message"],
        "all 2 proxies applied generation 1"
    );
    // Settled: the controller's own status writes do not make it write again. A policy applied
    // now gets its status in a later pass, which saw reviews too: once that is written, any write
    // the settled state caused would have been made.
    cluster.apply(&policy("status", "settled", "  host: ratings\n"));
    policy_until(&cluster, "status", "settled", "a later pass wrote", |p| {
        observed(p) && condition_is(p, "Accepted", "True", "Accepted")
    })
    .await;
    let settled = cluster.policy("status", "reviews");
    assert_eq!(
        settled["metadata"]["resourceVersion"],
        programmed["metadata"]["resourceVersion"]
    );

    let table = cluster.kubectl(&["get", "dp", "--namespace", "status"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAME",
            "HOST",
            "SPLIT",
            "TIMEOUT",
            "RETRIES",
            "ACCEPTED",
            "PROXIES",
            "ROUTED-BY",
            "AGE"
        ],
        "{table}"
    );
    // ROUTED-BY is empty: no route is attached to reviews.
    assert_eq!(rows[1].len(), 8, "{table}");
    assert_eq!(
        rows[1][..7],
        [
            "reviews",
            "reviews",
            "v1=90,v2=10",
            "10s",
            "3",
            "True",
            "2/2"
        ],
        "{table}"
    );

    // A new generation: status follows it, and so do the proxies.
    cluster.apply(&split_policy("status", 0, 100, retries));
    let edited = policy_until(
        &cluster,
        "status",
        "reviews",
        "generation 2 is programmed",
        |p| {
            p["metadata"]["generation"] == 2
                && observed(p)
                && condition_is(p, "Accepted", "True", "Accepted")
                && condition_is(p, "Programmed", "True", "Programmed")
                && p["status"]["proxiesSummary"] == "2/2"
        },
    )
    .await;
    assert_eq!(edited["status"]["split"], "v1=0,v2=100");
    for proxy in &proxies {
        until_served_by(proxy, "v2").await;
    }

    // A subset no pod belongs to.
    let missing_subset = policy(
        "status",
        "reviews",
        "  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}, {name: v3, labels: {version: v3}}]\n",
    );
    cluster.apply(&missing_subset);
    let unresolved = policy_until(
        &cluster,
        "status",
        "reviews",
        "subset v3 is reported empty",
        |p| condition_is(p, "ResolvedRefs", "False", "SubsetsWithoutEndpoints"),
    )
    .await;
    let message = condition(&unresolved, "ResolvedRefs")["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("v3") && !message.contains("v1"),
        "{message}"
    );
    assert_eq!(unresolved["status"]["split"], "all");

    // A host that names no Service.
    cluster.apply(&policy("status", "ghost", "  host: ghost\n"));
    let ghost = policy_until(
        &cluster,
        "status",
        "ghost",
        "the missing Service is reported",
        |p| {
            observed(p)
                && condition_is(p, "Accepted", "True", "Accepted")
                && condition_is(p, "ResolvedRefs", "False", "ServiceNotFound")
                && condition_is(p, "Programmed", "False", "ServiceNotFound")
        },
    )
    .await;
    assert_eq!(
        condition(&ghost, "ResolvedRefs")["message"],
        "Service status/ghost does not exist"
    );

    // A second policy for the same Service: the oldest stays in force.
    cluster.apply(&policy(
        "status",
        "newer",
        "  host: reviews.status.svc.cluster.local\n",
    ));
    let newer = policy_until(
        &cluster,
        "status",
        "newer",
        "the newer policy is refused",
        |p| {
            condition_is(p, "Accepted", "False", "Conflicted")
                && condition_is(p, "Programmed", "False", "Conflicted")
        },
    )
    .await;
    let message = condition(&newer, "Accepted")["message"].as_str().unwrap();
    assert!(message.contains("status/reviews"), "{message}");

    for proxy in proxies {
        proxy.stop().await;
    }
    controller.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_kubectl_edits_and_endpoint_changes() {
    let cluster = cluster().await;
    let mut reviews = Reviews::start(&cluster, "traffic", &[("v1", 1), ("v2", 1)]).await;
    let controller = ControllerProcess::start(&cluster, "traffic-controller").await;
    // Round robin, so that every endpoint of a subset is certainly called.
    let round_robin = "  loadBalancer: {algorithm: RoundRobin}\n";
    cluster.apply(&split_policy("traffic", 100, 0, round_robin));
    let proxy = RunningProxy::start(controller.grpc, "traffic", "client").await;
    until_served_by(&proxy, "v1").await;

    // A new weight, applied with kubectl.
    cluster.apply(&split_policy("traffic", 0, 100, round_robin));
    until_served_by(&proxy, "v2").await;

    // Scaling v2 up: the new pod's endpoint gets its share.
    let added = reviews.scale_up(&cluster, "v2").await;
    eventually("the new v2 endpoint gets traffic", || async {
        let before = added.hits();
        proxy.all_served_by(REVIEWS, "v2", 10).await && added.hits() > before
    })
    .await;

    // Scaling v2 to zero: v1 takes the traffic, and the condition says why.
    cluster.apply(&split_policy("traffic", 50, 50, round_robin));
    reviews.scale_to_zero(&cluster, "v2");
    until_served_by(&proxy, "v1").await;
    let policy = policy_until(
        &cluster,
        "traffic",
        "reviews",
        "v2 is reported empty",
        |p| condition_is(p, "ResolvedRefs", "False", "SubsetsWithoutEndpoints"),
    )
    .await;
    let message = condition(&policy, "ResolvedRefs")["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("v2"), "{message}");

    // Retries: one v1 pod of two fails, and no call sees it.
    let failing = reviews.backends("v1").next().unwrap();
    failing.set(outrigger_tests::Behaviour::Status(503));
    reviews.scale_up(&cluster, "v1").await;
    let retrying = format!(
        "{round_robin}  retries: {{attempts: 2, retryOn: [5xx], \
         budget: {{percent: 100, minRetriesPerSecond: 1000}}}}\n"
    );
    cluster.apply(&split_policy("traffic", 100, 0, &retrying));
    eventually("calls are retried past the failing pod", || {
        proxy.all_served_by(REVIEWS, "v1", 20)
    })
    .await;
    let failing = reviews.backends("v1").next().unwrap();
    let failed_before = failing.errors();
    assert!(proxy.all_served_by(REVIEWS, "v1", 20).await);
    assert!(
        failing.errors() > failed_before,
        "the failing pod was tried"
    );

    // A timeout: a slow backend gets the caller a 504.
    for backend in reviews.backends("v1") {
        backend.set(outrigger_tests::Behaviour::Delay(Duration::from_secs(5)));
    }
    cluster.apply(&split_policy(
        "traffic",
        100,
        0,
        &format!("{round_robin}  timeout: 200ms\n"),
    ));
    eventually("slow calls time out", || async {
        matches!(proxy.call(REVIEWS).await, Some((504, _)))
    })
    .await;

    proxy.stop().await;
    controller.stop();
}

/// The chart's ServiceAccount and RBAC renamed for `account`, keeping the rules `keep` passes.
fn chart_rbac_for(cluster: &TestCluster, account: &str, keep: impl Fn(&Value) -> bool) -> String {
    let rendered = cluster.helm_template(&["templates/serviceaccount.yaml", "templates/rbac.yaml"]);
    rendered
        .split("\n---\n")
        .map(|document| serde_norway::from_str::<Value>(document).expect("helm renders YAML"))
        .filter(|document| !document.is_null())
        .map(|mut document| {
            rename(&mut document, CONTROLLER_ACCOUNT, account);
            if let Some(rules) = document["rules"].as_array_mut() {
                rules.retain(&keep);
            }
            document.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Replaces the prefix `from` of every string in `value` (names of objects and references).
fn rename(value: &mut Value, from: &str, to: &str) {
    match value {
        Value::String(text) => {
            if let Some(rest) = text.strip_prefix(from) {
                *text = format!("{to}{rest}");
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| rename(item, from, to)),
        Value::Object(fields) => fields
            .values_mut()
            .for_each(|field| rename(field, from, to)),
        _ => {}
    }
}

/// Whether an RBAC rule is about `resource`.
fn grants(rule: &Value, resource: &str) -> bool {
    rule["resources"]
        .as_array()
        .is_some_and(|resources| resources.iter().any(|r| r == resource))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_rbac_is_enough_and_a_missing_permission_is_loud() {
    let cluster = cluster().await;
    // The chart grants what the controller uses, and nothing else.
    let controller_user =
        format!("--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{CONTROLLER_ACCOUNT}");
    let can = |request: &[&str]| {
        let args: Vec<&str> = ["auth", "can-i"]
            .into_iter()
            .chain(request.iter().copied())
            .chain([controller_user.as_str()])
            .collect();
        let output = cluster.cluster.kubectl_with_input(&args, "").unwrap();
        String::from_utf8_lossy(&output.stdout).trim() == "yes"
    };
    let leases = format!("--namespace={SYSTEM_NAMESPACE}");
    let allowed: [&[&str]; 7] = [
        &["watch", "services", "--all-namespaces"],
        &[
            "list",
            "endpointslices.discovery.k8s.io",
            "--all-namespaces",
        ],
        &["watch", "pods", "--all-namespaces"],
        &[
            "watch",
            "destinationpolicies.outrigger.dev",
            "--all-namespaces",
        ],
        &[
            "patch",
            "destinationpolicies.outrigger.dev",
            "--subresource=status",
            "--all-namespaces",
        ],
        &["update", "leases.coordination.k8s.io", &leases],
        &["create", "leases.coordination.k8s.io", &leases],
    ];
    let refused: [&[&str]; 7] = [
        &["get", "secrets", "--all-namespaces"],
        &["create", "pods"],
        &["patch", "pods", "--subresource=status"],
        &["update", "destinationpolicies.outrigger.dev"],
        &["delete", "destinationpolicies.outrigger.dev"],
        &["delete", "leases.coordination.k8s.io", &leases],
        &[
            "update",
            "leases.coordination.k8s.io",
            "--namespace=default",
        ],
    ];
    for request in allowed {
        assert!(can(request), "the controller may not {request:?}");
    }
    for request in refused {
        assert!(!can(request), "the controller may {request:?}");
    }

    // Without EndpointSlices the controller cannot know endpoints: it says why and stays unready.
    let limited = "outrigger-limited";
    let _reviews = Reviews::start(&cluster, "rbac", &[("v1", 1), ("v2", 1)]).await;
    cluster.apply(&chart_rbac_for(&cluster, limited, |rule| {
        !grants(rule, "endpointslices")
    }));
    let mut controller =
        ControllerProcess::spawn(&cluster.token_kubeconfig(limited), "rbac-controller");
    eventually("the controller reports the missing permission", || async {
        controller.logged(&[
            "listing EndpointSlices failed",
            "is forbidden",
            "lacks a permission",
        ])
    })
    .await;
    assert_eq!(controller.ready().await, Some(503));

    // Granted, it recovers without a restart.
    cluster.apply(&chart_rbac_for(&cluster, limited, |_| true));
    controller.wait_ready().await;
    let errors_before = controller.reconcile_errors().await;

    // Status writes refused: reported and counted, while proxies are still served.
    cluster.apply(&chart_rbac_for(&cluster, limited, |rule| {
        !grants(rule, "destinationpolicies/status")
    }));
    cluster.apply(&split_policy("rbac", 100, 0, ""));
    eventually("the refused status write is reported", || async {
        controller.logged(&[
            "writing the status of DestinationPolicy rbac/reviews",
            "forbidden",
        ])
    })
    .await;
    assert!(controller.reconcile_errors().await > errors_before);
    let proxy = RunningProxy::start(controller.grpc, "rbac", "client").await;
    until_served_by(&proxy, "v1").await;

    proxy.stop().await;
    controller.stop();
}

/// `name acknowledged/connected` of each entry of `status.replicas`.
fn replica_entries(policy: &Value) -> Vec<String> {
    policy["status"]["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            format!(
                "{} {}/{}",
                entry["name"].as_str().unwrap_or_default(),
                entry["acknowledged"],
                entry["connected"]
            )
        })
        .collect()
}

/// The holder of the leader Lease; empty when none.
fn lease_holder(cluster: &TestCluster) -> String {
    cluster.kubectl(&[
        "get",
        "lease",
        outrigger_controller::LEASE_NAME,
        "--namespace",
        SYSTEM_NAMESPACE,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_takes_over_status_when_the_leader_dies() {
    let cluster = cluster().await;
    let _reviews = Reviews::start(&cluster, "leader", &[("v1", 1), ("v2", 1)]).await;
    let mut replicas = vec![
        ControllerProcess::start(&cluster, "replica-a").await,
        ControllerProcess::start(&cluster, "replica-b").await,
    ];
    cluster.apply(&split_policy("leader", 100, 0, ""));
    // Every replica serves proxies.
    let mut proxies = Vec::new();
    for replica in &replicas {
        let proxy = RunningProxy::start(
            replica.grpc,
            "leader",
            &format!("client-of-{}", replica.identity),
        )
        .await;
        until_served_by(&proxy, "v1").await;
        proxies.push(proxy);
    }
    // Each counts the proxy it serves in an entry of its own; the one holding the Lease sums them.
    let policy = policy_until(
        &cluster,
        "leader",
        "reviews",
        "the leader programmed it, counting every replica's proxies",
        |p| {
            observed(p)
                && condition_is(p, "Programmed", "True", "Programmed")
                && p["status"]["proxiesSummary"] == "2/2"
        },
    )
    .await;
    let mut entries = replica_entries(&policy);
    entries.sort();
    assert_eq!(entries, ["replica-a 1/1", "replica-b 1/1"]);
    let holder = lease_holder(&cluster);
    let leader = replicas
        .iter()
        .position(|replica| replica.identity == holder)
        .unwrap_or_else(|| panic!("the Lease is held by `{holder}`"));
    assert!(replicas[leader].logged(&["leading: this replica writes status"]));
    assert!(!replicas[1 - leader].logged(&["leading: this replica writes status"]));

    // The leader dies without handing the Lease over; the other takes it and status goes on.
    drop(replicas.remove(leader));
    let follower = replicas.pop().unwrap();
    let (orphan, served) = if leader == 0 {
        (&proxies[0], &proxies[1])
    } else {
        (&proxies[1], &proxies[0])
    };
    cluster.apply(&split_policy("leader", 0, 100, ""));
    until_served_by(served, "v2").await;
    // The dead replica's entry is of generation 1, so not counted.
    policy_until(
        &cluster,
        "leader",
        "reviews",
        "the new leader programmed generation 2",
        |p| {
            p["metadata"]["generation"] == 2
                && observed(p)
                && condition_is(p, "Programmed", "True", "Programmed")
                && p["status"]["proxiesSummary"] == "1/1"
        },
    )
    .await;
    assert_eq!(lease_holder(&cluster), follower.identity);
    // No longer refreshed, it is removed within a few lease durations.
    let survivor = format!("{} 1/1", follower.identity);
    policy_until(
        &cluster,
        "leader",
        "reviews",
        "the dead replica's entry was removed",
        |p| replica_entries(p) == [survivor.as_str()],
    )
    .await;
    // The dead replica's proxy keeps its last configuration.
    assert!(orphan.all_served_by(REVIEWS, "v1", 10).await);

    // Stopped cleanly, a leader hands the Lease back at once.
    follower.stop();
    assert_eq!(lease_holder(&cluster), "");
    for proxy in proxies {
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_recover_from_an_api_server_restart_and_proxies_keep_their_config() {
    let mut cluster = cluster().await;
    let _reviews = Reviews::start(&cluster, "restart", &[("v1", 1), ("v2", 1)]).await;
    let controller = ControllerProcess::start(&cluster, "restart-controller").await;
    cluster.apply(&split_policy("restart", 100, 0, ""));
    let proxy = RunningProxy::start(controller.grpc, "restart", "client").await;
    until_served_by(&proxy, "v1").await;

    cluster.cluster.stop_apiserver().unwrap();
    eventually("the controller notices the API server is gone", || async {
        controller.logged(&["watching", "failed", "retrying with backoff"])
    })
    .await;
    // Meanwhile proxies keep their configuration, and the controller serves new ones from memory.
    assert!(proxy.all_served_by(REVIEWS, "v1", 20).await);
    assert_eq!(controller.ready().await, Some(200));
    let late = RunningProxy::start(controller.grpc, "restart", "late-client").await;
    until_served_by(&late, "v1").await;

    cluster.cluster.start_apiserver().unwrap();
    cluster.apply(&split_policy("restart", 0, 100, ""));
    // Within client-go's backoff, which reaches tens of seconds during a long outage.
    for proxy in [&proxy, &late] {
        eventually_within(
            Duration::from_secs(60),
            "the proxies follow an edit made after the restart",
            || proxy.all_served_by(REVIEWS, "v2", 10),
        )
        .await;
    }
    policy_until(
        &cluster,
        "restart",
        "reviews",
        "status follows again",
        |p| {
            p["metadata"]["generation"] == 2
                && observed(p)
                && condition_is(p, "Programmed", "True", "Programmed")
        },
    )
    .await;

    proxy.stop().await;
    late.stop().await;
    controller.stop();
}

/// An HTTPRoute of `reviews` in `namespace`: its parents are the Service (port 9080), a Service
/// that does not exist and another controller's Gateway; `more_backends` follow `reviews:9080`.
fn reviews_route(namespace: &str, more_backends: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: reviews, namespace: {namespace}}}\n\
         spec:\n\
         \x20 parentRefs:\n\
         \x20 - {{group: '', kind: Service, name: reviews, port: 9080}}\n\
         \x20 - {{group: '', kind: Service, name: missing}}\n\
         \x20 - {{name: some-gateway}}\n\
         \x20 rules:\n\
         \x20 - filters:\n\
         \x20   - type: ResponseHeaderModifier\n\
         \x20     responseHeaderModifier: {{set: [{{name: X-Route, value: reviews}}]}}\n\
         \x20   backendRefs:\n\
         \x20   - {{name: reviews, port: 9080}}\n{more_backends}"
    )
}

/// The route's entry of `status.parents` for the parent named `parent`, written by `controller`.
fn parent_entry<'a>(route: &'a Value, controller: &str, parent: &str) -> &'a Value {
    route["status"]["parents"]
        .as_array()
        .and_then(|parents| {
            parents.iter().find(|entry| {
                entry["controllerName"] == controller && entry["parentRef"]["name"] == parent
            })
        })
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_serves_and_gets_status_per_service_parent_beside_other_controllers_entries() {
    let cluster = cluster().await;
    let namespace = "routes";
    let reviews = Reviews::start(&cluster, namespace, &[("v1", 1)]).await;
    cluster.apply(&reviews_route(
        namespace,
        "  \x20 - {name: nowhere, port: 80, weight: 0}\n",
    ));
    // Another controller's entry, for its Gateway: Outrigger's writes must keep it. Written
    // before Outrigger's controller starts, as this merge patch replaces the whole list.
    cluster.kubectl(&[
        "patch",
        "httproute",
        "reviews",
        "--namespace",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"parents":[{"parentRef":{"name":"some-gateway"},
            "controllerName":"example.com/gateway","conditions":[{"type":"Accepted",
            "status":"True","reason":"Accepted","message":"","observedGeneration":1,
            "lastTransitionTime":"2026-01-01T00:00:00Z"}]}]}}"#,
    ]);
    let controller = ControllerProcess::start(&cluster, "routes-controller").await;

    let route = |cluster: &TestCluster| -> Value {
        let json = cluster.kubectl(&["get", "httproute", "reviews", "-n", namespace, "-o", "json"]);
        serde_json::from_str(&json).unwrap()
    };
    let route_until = |what: &'static str, check: fn(&Value) -> bool| {
        let cluster = &*cluster;
        async move {
            let until = tokio::time::Instant::now() + STATUS_DEADLINE;
            loop {
                let route = route(cluster);
                if check(&route) {
                    return route;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "timed out waiting until {what}: {:#}",
                    route["status"]
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let condition = |route: &Value, parent: &str, type_: &str| -> (String, String, bool) {
        let entry = parent_entry(route, "outrigger.dev/mesh", parent);
        let condition = entry["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == type_))
            .cloned()
            .unwrap_or_default();
        (
            condition["status"].as_str().unwrap_or("").to_string(),
            condition["reason"].as_str().unwrap_or("").to_string(),
            condition["observedGeneration"] == route["metadata"]["generation"],
        )
    };
    let written = route_until("Outrigger wrote both Service parents", |route| {
        !parent_entry(route, "outrigger.dev/mesh", "reviews").is_null()
            && !parent_entry(route, "outrigger.dev/mesh", "missing").is_null()
    })
    .await;
    assert_eq!(
        condition(&written, "reviews", "Accepted"),
        ("True".into(), "Accepted".into(), true)
    );
    assert_eq!(
        condition(&written, "reviews", "ResolvedRefs"),
        ("False".into(), "BackendNotFound".into(), true)
    );
    assert_eq!(
        condition(&written, "missing", "Accepted"),
        ("False".into(), "NoMatchingParent".into(), true)
    );
    assert!(
        !parent_entry(&written, "example.com/gateway", "some-gateway").is_null(),
        "the other controller's entry is kept: {:#}",
        written["status"]
    );
    assert!(
        parent_entry(&written, "outrigger.dev/mesh", "some-gateway").is_null(),
        "a Gateway parent is not Outrigger's"
    );

    // The route is in force for calls to the Service, and its weight-0 backend breaks nothing.
    let proxy = RunningProxy::start(controller.grpc, namespace, "client").await;
    eventually("calls to reviews take the route", || async {
        let answer = outrigger_tests::e2e::request(proxy.outbound, REVIEWS, "/", &[]).await;
        answer.is_some_and(|a| a.status == 200 && a.header("x-route") == "reviews")
    })
    .await;

    // A new generation: status follows it.
    cluster.apply(&reviews_route(namespace, ""));
    let resolved = route_until("ResolvedRefs turns True at the new generation", |route| {
        let entry = parent_entry(route, "outrigger.dev/mesh", "reviews");
        entry["conditions"].as_array().is_some_and(|conditions| {
            conditions.iter().any(|c| {
                c["type"] == "ResolvedRefs"
                    && c["status"] == "True"
                    && c["observedGeneration"] == route["metadata"]["generation"]
            })
        })
    })
    .await;
    assert_eq!(resolved["metadata"]["generation"], 2);
    assert!(!parent_entry(&resolved, "example.com/gateway", "some-gateway").is_null());

    // The DestinationPolicy of the route's parent says that the route serves its calls.
    cluster.apply(&policy(namespace, "reviews", "  host: reviews\n"));
    let routed = policy_until(
        &cluster,
        namespace,
        "reviews",
        "the policy names the route",
        |p| observed(p) && condition_is(p, "Routed", "True", "Routed"),
    )
    .await;
    assert_eq!(routed["status"]["routedBy"], "HTTPRoute/routes/reviews");
    assert_eq!(
        crate::condition(&routed, "Routed")["message"],
        "HTTPRoute/routes/reviews serves every caller's calls to port 9080. Of the calls they \
         serve, the policy applies to those a route sends to its Service; the others get the \
         policy of the Service a route sends them to"
    );
    // Columns are aligned, and this policy leaves some empty: read the one under the heading.
    let table = cluster.kubectl(&["get", "dp", "reviews", "--namespace", namespace]);
    let lines: Vec<&str> = table.lines().collect();
    let routed_by = lines[0].find("ROUTED-BY").and_then(|at| {
        let cell = lines[1].get(at..)?;
        cell.split_whitespace().next()
    });
    assert_eq!(routed_by, Some("HTTPRoute/routes/reviews"), "{table}");

    cluster.kubectl(&["delete", "httproute", "reviews", "--namespace", namespace]);
    let unrouted = policy_until(
        &cluster,
        namespace,
        "reviews",
        "the policy no longer names the route",
        |p| condition_is(p, "Routed", "False", "NoRoutes"),
    )
    .await;
    assert!(
        unrouted["status"].get("routedBy").is_none(),
        "{:#}",
        unrouted["status"]
    );
    proxy.stop().await;
    controller.stop();
    drop(reviews);
}
