//! The README's flow for real, in meshed pods on the test cluster's node (needs root, and the
//! images `cargo xtask images` builds; `cargo xtask ci` does both):
//!
//! 1. `helm install` the chart: the controller runs as a pod with its ServiceAccount and RBAC
//!    (in-cluster configuration) and takes its Lease; the CRDs are installed.
//! 2. Label namespace `shop`; deploy reviews v1 (3 pods) and v2 (1), a client and a TCP echo: the
//!    webhook served from the controller's pod injects `outrigger-init` and the native-sidecar
//!    `outrigger-proxy`; the apps start after their proxy is ready; probes work through the
//!    redirection.
//! 3. Apply `examples/reviews-canary.yaml`: the client's calls to
//!    `http://reviews.shop.svc.cluster.local:9080`, through CoreDNS, the ClusterIP and the iptables
//!    of its own pod, split about 90/10; `x-canary: true` always reaches v2; `kubectl get dp`
//!    shows the proxy as acknowledged; the calls go over mutual TLS, and both proxies' metrics
//!    name the other side.
//! 4. v2 failing half its requests: retries hide it. A v1 pod answering only 5xx is ejected (the
//!    client's proxy's `/endpoints` and metrics say so) and gets exactly one probe per ejection.
//! 5. A rolling restart of reviews v1 under steady load loses no request; neither does deleting
//!    the controller's pod, and its replacement resyncs every proxy.
//! 6. TCP that is not HTTP (over mutual TLS, to an endpoint the client's proxy picks), and HTTP
//!    to an address no Service owns, pass through unchanged. An
//!    AuthorizationPolicy on reviews lets the client's ServiceAccount through and answers another
//!    meshed client 403, the reviews pods staying ready. A namespace annotated
//!    `outrigger.dev/mtls: strict` gets a strict proxy: the meshed client gets through, a caller
//!    outside the mesh does not, the kubelet's probe does; its TCP echo is reached over mutual
//!    TLS, and a packet capture on the node sees TLS records from the meshed client and the
//!    plaintext only of the caller outside the mesh.
//!    Then the Gateway API CRDs, installed next to the running mesh: an HTTPRoute (the README's
//!    example, other weights) splits reviews' calls by its weights per request, answers a
//!    redirect in the client's proxy and sends `x-canary: true` to v2; a consumer route in a
//!    namespace `frontend` serves only its calls; the route's status is Accepted and ResolvedRefs.
//! 7. Prometheus discovers the meshed pods through the API server (pod service discovery) and
//!    every dashboard query returns data for namespace `shop`.
//! 8. A pod that cannot be meshed says why in its events and logs; the proxy stops after the app;
//!    `helm uninstall` leaves nothing that blocks pod creation, and meshed pods keep working.
//!
//! One test walks the flow, since each step builds on the ones before; each check is recorded and
//! the flow goes on where it can, so that one failure does not hide the others. The test fails
//! at the end, listing every failed check.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outrigger_cluster::Cluster;
use outrigger_tests::dashboards::{Prometheus, load_dashboards, query_every_panel, series_sum};
use serde_json::Value;

use capture::{Capture, Segment};

mod capture;

const SYSTEM: &str = "outrigger-system";
const SHOP: &str = "shop";
const REVIEWS_URL: &str = "http://reviews.shop.svc.cluster.local:9080/api/reviews";
/// The images `cargo xtask images` writes into `<target>/images/`.
const IMAGE_ARCHIVES: [(&str, &str); 4] = [
    ("controller", "outrigger-controller"),
    ("proxy", "outrigger-proxy"),
    ("proxy-init", "outrigger-proxy"),
    ("app", "outrigger-test-app"),
];
const APP: &str = "/outrigger-test-app";
/// `kubectl` arguments that run the test app in the client pod's app container.
const IN_CLIENT: [&str; 8] = ["exec", "-n", SHOP, "deploy/client", "-c", "app", "--", APP];
/// How long any one awaited effect (a rollout, an ejection, a scrape) may take on a loaded
/// 2-core machine before a check gives up.
const PATIENCE: Duration = Duration::from_secs(180);
/// The client paces its calls below the example policy's rate limit (100/s).
const PACE: &str = "--pause=25ms";

type Outcome = Result<(), String>;

/// Fails the check with a message built like `format!` unless the condition holds.
macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        let holds: bool = $condition;
        if !holds {
            return Err(format!($($message)+));
        }
    };
}

// ------------------------------------------------------------------------------------------------
// The cluster, kubectl, helm and the pods

struct Suite {
    cluster: Cluster,
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Suite {
    fn check(&mut self, name: &str, outcome: Outcome) -> bool {
        match outcome {
            Ok(()) => {
                eprintln!("pods_e2e: ok: {name}");
                self.passed.push(name.to_string());
                true
            }
            Err(problem) => {
                eprintln!("pods_e2e: FAILED: {name}: {problem}");
                self.failed.push(format!("{name}: {problem}"));
                false
            }
        }
    }

    fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.cluster.kubectl(args).map_err(|err| err.to_string())
    }

    fn json(&self, args: &[&str]) -> Result<Value, String> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let text = self.kubectl(&args)?;
        serde_json::from_str(&text).map_err(|err| format!("kubectl {}: {err}", args.join(" ")))
    }

    fn apply(&self, manifest: &str) -> Outcome {
        let output = self
            .cluster
            .kubectl_with_input(&["apply", "-f", "-"], manifest)
            .map_err(|err| err.to_string())?;
        ensure!(
            output.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }

    /// Runs helm; its stdout and stderr, or why it failed.
    fn helm(&self, args: &[&str]) -> Result<(String, String), String> {
        let output = self
            .cluster
            .helm_command()
            .args(args)
            .output()
            .map_err(|err| format!("running helm {}: {err}", args.join(" ")))?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        ensure!(
            output.status.success(),
            "helm {} failed: {stderr}",
            args.join(" ")
        );
        Ok((String::from_utf8_lossy(&output.stdout).into_owned(), stderr))
    }

    /// The pod `name` of `namespace`, whatever its phase.
    fn pod(&self, namespace: &str, name: &str) -> Result<Pod, String> {
        let json = self.json(&["get", "pod", name, "-n", namespace])?;
        Ok(Pod { json })
    }

    /// Running pods (not terminating) of `namespace` matching `selector`.
    fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<Pod>, String> {
        let list = self.json(&["get", "pods", "-n", namespace, "-l", selector])?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
            .filter(|pod| pod["status"]["phase"] == "Running")
            .map(|pod| Pod { json: pod.clone() })
            .collect())
    }

    fn only_pod(&self, namespace: &str, selector: &str) -> Result<Pod, String> {
        let mut pods = self.pods(namespace, selector)?;
        ensure!(
            pods.len() == 1,
            "expected one running pod {selector} in {namespace}, found {}",
            pods.len()
        );
        Ok(pods.remove(0))
    }

    fn rollout(&self, namespace: &str, deployment: &str) -> Outcome {
        self.kubectl(&[
            "rollout",
            "status",
            "-n",
            namespace,
            &format!("deployment/{deployment}"),
            &format!("--timeout={}s", PATIENCE.as_secs()),
        ])
        .map(drop)
        .map_err(|err| {
            let pods = self
                .kubectl(&["get", "pods", "-n", namespace, "-o", "wide"])
                .unwrap_or_default();
            format!("{err}\n{pods}")
        })
    }

    /// The test app's `http` role, run in the client's pod: its JSON summary.
    fn client_calls(&self, args: &[&str]) -> Result<Calls, String> {
        calls_from(self, SHOP, "deploy/client", args)
    }

    /// Starts the client calling reviews steadily until [`Load::finish`].
    fn start_load(&self) -> Result<Load, String> {
        let child = self
            .cluster
            .kubectl_command()
            .args(["exec", "-i"])
            .args(&IN_CLIENT[1..])
            .args([
                "http",
                "--url",
                REVIEWS_URL,
                "--until-stdin-closes",
                "--concurrency=2",
                PACE,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("starting the client's load: {err}"))?;
        Ok(Load { child })
    }

    /// The client pod's proxy's admin endpoint.
    fn client_proxy(&self) -> Result<SocketAddr, String> {
        Ok(self.only_pod(SHOP, "app=client")?.addr(4191))
    }

    /// What the client pod's proxy shows at `path` on loopback only (`/config`, `/endpoints`),
    /// asked from inside the pod.
    fn client_proxy_dump(&self, path: &str) -> Result<String, String> {
        let url = format!("http://127.0.0.1:4191{path}");
        self.kubectl(&[&IN_CLIENT[..], &["get", &url]].concat())
    }
}

struct Pod {
    json: Value,
}

impl Pod {
    fn name(&self) -> &str {
        self.json["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn addr(&self, port: u16) -> SocketAddr {
        let ip = self.json["status"]["podIP"].as_str().unwrap_or("0.0.0.0");
        SocketAddr::new(ip.parse().unwrap_or([0, 0, 0, 0].into()), port)
    }

    fn init_containers(&self) -> Vec<&Value> {
        self.json["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect()
    }
}

/// What the client's `http` role printed.
struct Calls(Value);

impl Calls {
    fn count(&self, field: &str, key: &str) -> u64 {
        self.0[field][key].as_u64().unwrap_or(0)
    }

    fn calls(&self) -> u64 {
        self.0["calls"].as_u64().unwrap_or(0)
    }

    /// Every call answered 200, none failed.
    fn all_ok(&self) -> Outcome {
        ensure!(
            self.calls() > 0 && self.count("statuses", "200") == self.calls(),
            "not every call answered 200: {}",
            self.0
        );
        Ok(())
    }

    /// Every call was answered by reviews v1 or v2, and v2's share is `share`, within six
    /// standard deviations of a binomial (false alarms about one in 10^9 runs).
    fn v2_share_is(&self, share: f64) -> Outcome {
        let (n, v2) = (self.calls(), self.answered_by("reviews-v2-"));
        ensure!(
            v2 + self.answered_by("reviews-v1-") == n,
            "answers from elsewhere: {}",
            self.0
        );
        let n = n as f64;
        let (expected, tolerance) = (n * share, 6.0 * (n * share * (1.0 - share)).sqrt());
        ensure!(
            (v2 as f64 - expected).abs() <= tolerance,
            "v2 got {v2} of {n}, expected {expected} ± {tolerance:.0}"
        );
        Ok(())
    }

    /// Calls answered by pods whose names start with `prefix`.
    fn answered_by(&self, prefix: &str) -> u64 {
        self.0["bodies"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(body, _)| body.starts_with(prefix))
            .map(|(_, count)| count.as_u64().unwrap_or(0))
            .sum()
    }
}

/// The client calling reviews from its pod for as long as a step needs.
struct Load {
    child: Child,
}

impl Load {
    /// Stops the calls (closing the client's stdin) and returns what they got.
    fn finish(mut self) -> Result<Calls, String> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + PATIENCE;
        while self
            .child
            .try_wait()
            .map_err(|err| err.to_string())?
            .is_none()
        {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err("the client's load did not stop when its stdin closed".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let output = self
            .child
            .wait_with_output()
            .map_err(|err| err.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(&text).map(Calls).map_err(|err| {
            format!(
                "the client's load printed {text:?} ({err}); stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }
}

/// Polls `check` every half second until it holds, fails, or `timeout` passes; the last reason
/// it gave for not holding is in the error.
/// The test app's `http` role with `args`, run in the app container of `target` (a pod, or
/// `deploy/<name>`) in `namespace`: its JSON summary.
fn calls_from(
    suite: &Suite,
    namespace: &str,
    target: &str,
    args: &[&str],
) -> Result<Calls, String> {
    let command = [
        &[
            "exec", "-n", namespace, target, "-c", "app", "--", APP, "http",
        ][..],
        args,
    ]
    .concat();
    let text = suite.kubectl(&command)?;
    serde_json::from_str(&text)
        .map(Calls)
        .map_err(|err| format!("{target} printed {text:?}: {err}"))
}

fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool, String>,
) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(problem) => last = problem,
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting until {what}; {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One HTTP/1.1 exchange with `addr` from this machine (pods are on its bridge): status and body.
fn http(method: &str, addr: SocketAddr, path: &str, body: &str) -> Result<(u16, String), String> {
    let exchange = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = exchange().map_err(|err| format!("{method} http://{addr}{path}: {err}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} http://{addr}{path}: no response head in {answer:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{method} http://{addr}{path}: bad status line in {head:?}"))?;
    let chunked = head
        .lines()
        .any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn metrics(admin: SocketAddr) -> Result<String, String> {
    match http("GET", admin, "/metrics", "")? {
        (200, body) => Ok(body),
        (status, body) => Err(format!("GET http://{admin}/metrics: {status} {body}")),
    }
}

/// The sum of `sample`'s series with `labels`; an error when there is none.
fn metric(exposition: &str, sample: &str, labels: &str) -> Result<f64, String> {
    series_sum(exposition, sample, labels)
        .ok_or_else(|| format!("no {sample}{{{labels}}} series in the proxy's metrics"))
}

/// A counter of calls to reviews, 0 while nothing has happened that it counts (its series appears
/// with the first).
fn reviews_count(exposition: &str, counter: &str) -> f64 {
    series_sum(exposition, counter, r#"dst_service="reviews""#).unwrap_or(0.0)
}

/// Steers the backend in `pod` (`answer`, `status 500`, `fail-percent 50`, ...).
fn steer(pod: &Pod, behaviour: &str) -> Outcome {
    match http("PUT", pod.addr(9081), "/behaviour", behaviour)? {
        (200, _) => Ok(()),
        (status, body) => Err(format!(
            "steering {} to {behaviour}: {status} {body}",
            pod.name()
        )),
    }
}

/// What the backend in `pod` has received: `hits`, `errors`.
fn backend_stats(pod: &Pod) -> Result<Value, String> {
    let (status, body) = http("GET", pod.addr(9081), "/stats", "")?;
    ensure!(status == 200, "stats of {}: {status} {body}", pod.name());
    serde_json::from_str(&body).map_err(|err| format!("stats of {}: {err}: {body}", pod.name()))
}

fn workspace_file(path: &str) -> PathBuf {
    outrigger_tests::workspace().join(path)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// The image archives, checked to be there and newer than the release binaries they hold.
fn image_archives() -> Vec<PathBuf> {
    let exe = std::env::current_exe().expect("the test's path");
    // <target>/debug/deps/pods_e2e-<hash>
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test runs from <target>/<profile>/deps");
    let modified = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|metadata| metadata.modified())
            .ok()
    };
    IMAGE_ARCHIVES
        .iter()
        .map(|(name, binary)| {
            let archive = target.join("images").join(format!("{name}.tar"));
            let built = modified(&archive).unwrap_or_else(|| {
                panic!(
                    "{} is missing: `cargo xtask images` builds the images this suite runs \
                     (`cargo xtask ci` does it before the tests)",
                    archive.display()
                )
            });
            if let Some(binary_built) = modified(&target.join("release").join(binary)) {
                assert!(
                    binary_built <= built,
                    "{} is older than the release {binary} it should hold: run `cargo xtask images`",
                    archive.display()
                );
            }
            archive
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The steps

/// 1. `helm install`, as the README says.
fn install_the_chart(suite: &mut Suite) -> bool {
    let chart = workspace_file("charts/outrigger");
    let installed = suite.helm(&[
        "install",
        "outrigger",
        &chart.to_string_lossy(),
        "-n",
        SYSTEM,
        "--create-namespace",
        "--wait",
        &format!("--timeout={}s", PATIENCE.as_secs()),
    ]);
    let (notes, warnings) = match installed {
        Ok(output) => output,
        Err(problem) => {
            suite.check("helm install the chart", Err(problem));
            return false;
        }
    };
    suite.check("helm install the chart", Ok(()));
    suite.check(
        "helm install's notes say no Gateway API CRDs are installed yet",
        {
            if notes.contains("Gateway API: no HTTPRoute CRD found") {
                Ok(())
            } else {
                Err(format!("helm printed: {notes}"))
            }
        },
    );
    suite.check("helm install prints no warnings", {
        let stderr = warnings;
        if stderr.trim().is_empty() {
            Ok(())
        } else {
            Err(format!("helm said: {}", stderr.trim()))
        }
    });
    suite.check(
        "the controller runs as a pod with its ServiceAccount, in-cluster, and takes its Lease",
        (|| {
            suite.json(&["get", "crd", "destinationpolicies.outrigger.dev"])?;
            let controller = suite.only_pod(SYSTEM, "app.kubernetes.io/component=controller")?;
            let spec = &controller.json["spec"];
            ensure!(
                spec["serviceAccountName"] == "outrigger-controller",
                "its ServiceAccount is {}",
                spec["serviceAccountName"]
            );
            let args = spec["containers"][0]["args"].to_string();
            ensure!(
                !args.contains("kubeconfig") && !args.contains("manifests"),
                "it is not configured in-cluster: {args}"
            );
            eventually("the controller holds its Lease", PATIENCE, || {
                let holder = suite.kubectl(&[
                    "get",
                    "lease",
                    "outrigger-controller",
                    "-n",
                    SYSTEM,
                    "-o",
                    "jsonpath={.spec.holderIdentity}",
                ])?;
                Ok(holder == controller.name())
            })
        })(),
    );
    suite.check(
        "the controller's logs carry no terminal colour codes",
        plain_logs(suite, &["-n", SYSTEM, "deploy/outrigger-controller"]),
    );
    true
}

/// `kubectl logs <args>` shows no terminal colour codes (the binaries' default format off a
/// terminal).
fn plain_logs(suite: &Suite, args: &[&str]) -> Outcome {
    let logs = suite.kubectl(&[&["logs"], args].concat())?;
    ensure!(
        !logs.contains('\u{1b}'),
        "kubectl logs shows ANSI escapes: {:?}",
        logs.lines().next().unwrap_or_default()
    );
    Ok(())
}

/// 2. Label the namespace, deploy the shop; what was injected, and the order things started in.
fn deploy_the_shop(suite: &mut Suite) -> bool {
    let deployed = (|| {
        let shop = std::fs::read_to_string(workspace_file("tests/manifests/shop.yaml"))
            .map_err(|err| format!("reading tests/manifests/shop.yaml: {err}"))?;
        let reviews = std::fs::read_to_string(workspace_file("tests/manifests/reviews.yaml"))
            .map_err(|err| format!("reading tests/manifests/reviews.yaml: {err}"))?;
        // The namespace first, labelled as the README says, then what runs in it.
        let (namespace, rest) = shop
            .split_once("\n---\n")
            .ok_or("shop.yaml starts with the namespace")?;
        suite.apply(namespace)?;
        suite.kubectl(&["label", "namespace", SHOP, "outrigger.dev/inject=enabled"])?;
        suite.apply(rest)?;
        for (version, replicas) in [("v1", "3"), ("v2", "1")] {
            suite.apply(
                &reviews
                    .replace("VERSION", version)
                    .replace("REPLICAS", replicas),
            )?;
        }
        for deployment in ["reviews-v1", "reviews-v2", "client", "echo"] {
            suite.rollout(SHOP, deployment)?;
        }
        suite
            .kubectl(&[
                "wait",
                "-n",
                "outside",
                "--for=condition=Ready",
                "pod/bystander",
                &format!("--timeout={}s", PATIENCE.as_secs()),
            ])
            .map(drop)
    })();
    if !suite.check("the shop's pods come up", deployed) {
        return false;
    }
    suite.check(
        "every shop pod has outrigger-init and the native sidecar outrigger-proxy",
        (|| {
            let pods = suite.pods(SHOP, "app")?;
            ensure!(pods.len() == 6, "expected 6 shop pods, found {}", pods.len());
            for pod in &pods {
                let init = pod.init_containers();
                let names: Vec<&str> = init.iter().filter_map(|c| c["name"].as_str()).collect();
                ensure!(
                    names == ["outrigger-init", "outrigger-proxy"],
                    "{}: init containers {names:?}",
                    pod.name()
                );
                ensure!(
                    init[1]["restartPolicy"] == "Always",
                    "{}: the proxy is not a native sidecar",
                    pod.name()
                );
                let statuses = pod.json["status"]["initContainerStatuses"].to_string();
                ensure!(
                    pod.json["status"]["initContainerStatuses"][0]["state"]["terminated"]
                        ["exitCode"]
                        == 0,
                    "{}: outrigger-init did not succeed: {statuses}",
                    pod.name()
                );
            }
            let bystander = suite.json(&["get", "pod", "bystander", "-n", "outside"])?;
            ensure!(
                bystander["spec"]["initContainers"].is_null(),
                "a pod outside labelled namespaces is left alone"
            );
            Ok(())
        })(),
    );
    suite.check(
        "every app starts after its proxy is ready",
        (|| {
            for pod in suite.pods(SHOP, "app")? {
                let logs = suite.kubectl(&["logs", "-n", SHOP, pod.name(), "-c", "app"])?;
                let first = logs.lines().next().unwrap_or_default();
                ensure!(
                    first == "proxy ready at app start: 200",
                    "{}: {first:?} (the sidecar has no startup probe, so the kubelet starts the \
                     app as soon as the proxy's process runs)",
                    pod.name()
                );
            }
            Ok(())
        })(),
    );
    suite.check(
        "the apps' probes work through the redirection (and reach the app through the proxy)",
        (|| {
            // Ready already (their readiness probes pass); alive for a while with no restart.
            std::thread::sleep(Duration::from_secs(11));
            for pod in suite.pods(SHOP, "app=reviews")? {
                let restarts = &pod.json["status"]["containerStatuses"][0]["restartCount"];
                ensure!(*restarts == 0, "{}: the app restarted", pod.name());
                let inbound = metric(
                    &metrics(pod.addr(4191))?,
                    "outrigger_requests_total",
                    r#"direction="inbound""#,
                )?;
                ensure!(
                    inbound >= 1.0,
                    "{}: the probes did not go through the proxy",
                    pod.name()
                );
            }
            Ok(())
        })(),
    );
    suite.check(
        "the proxies' logs carry no terminal colour codes",
        plain_logs(
            suite,
            &["-n", SHOP, "deploy/client", "-c", "outrigger-proxy"],
        ),
    );
    true
}

/// 3. The canary policy, the split, the testers' route, and `kubectl get dp`.
fn canary(suite: &mut Suite) {
    suite.check(
        "kubectl apply -f examples/reviews-canary.yaml",
        (|| {
            let policy = std::fs::read_to_string(workspace_file("examples/reviews-canary.yaml"))
                .map_err(|err| format!("reading the example: {err}"))?;
            suite.apply(&policy)
        })(),
    );
    suite.check(
        "calls through CoreDNS, the ClusterIP and the pod's iptables split about 90/10",
        (|| {
            // The policy reaches the client's proxy when it first calls reviews.
            eventually("the canary split applies", PATIENCE, || {
                let calls = suite.client_calls(&["--url", REVIEWS_URL, "--requests=20", PACE])?;
                Ok(calls.answered_by("reviews-v2-") > 0 || calls.count("statuses", "200") == 20)
            })?;
            let n = 500;
            let calls = suite.client_calls(&[
                "--url",
                REVIEWS_URL,
                &format!("--requests={n}"),
                "--concurrency=2",
                PACE,
            ])?;
            calls.all_ok()?;
            calls.v2_share_is(0.1)
        })(),
    );
    suite.check(
        "meshed pods call each other over mutual TLS, each side's proxy naming the other",
        (|| {
            // Both run as the shop's default ServiceAccount.
            let client = metrics(suite.client_proxy()?)?;
            let outbound = metric(
                &client,
                "outrigger_requests_total",
                r#"tls="true",client_id="",server_id="shop/default""#,
            )?;
            ensure!(outbound > 0.0, "no call over mutual TLS");
            for pod in suite.pods(SHOP, "app=reviews")? {
                let inbound = metric(
                    &metrics(pod.addr(4191))?,
                    "outrigger_requests_total",
                    r#"tls="true",client_id="shop/default",server_id="""#,
                )
                .map_err(|err| format!("{}: {err}", pod.name()))?;
                ensure!(inbound > 0.0, "{}: no call over mutual TLS", pod.name());
            }
            Ok(())
        })(),
    );
    suite.check(
        "the default balancer spreads the calls over equal v1 pods",
        (|| {
            let n = 300;
            let calls =
                suite.client_calls(&["--url", REVIEWS_URL, &format!("--requests={n}"), PACE])?;
            let v1_pods = suite.pods(SHOP, "app=reviews,version=v1")?;
            let stable = calls.answered_by("reviews-v1-");
            for pod in &v1_pods {
                let share = calls.answered_by(pod.name());
                // A third each is even. PeakEwma sends fewer calls to a pod that answers more
                // slowly, as one does at times on a loaded 2-core node (one got 21 of 267 here);
                // under a twentieth is a pod the balancer all but never picks.
                ensure!(
                    share * 20 >= stable,
                    "{} got {share} of the {stable} calls to v1: {}",
                    pod.name(),
                    calls.0["bodies"]
                );
            }
            Ok(())
        })(),
    );
    suite.check(
        "x-canary: true always reaches v2",
        (|| {
            let calls = suite.client_calls(&[
                "--url",
                REVIEWS_URL,
                "--header=x-canary: true",
                "--requests=50",
                PACE,
            ])?;
            calls.all_ok()?;
            ensure!(
                calls.answered_by("reviews-v2-") == 50,
                "not all went to v2: {}",
                calls.0["bodies"]
            );
            Ok(())
        })(),
    );
    suite.check(
        "kubectl get dp -n shop shows the proxy as acknowledged",
        eventually(
            "the client's proxy is counted as acknowledged",
            PATIENCE,
            || {
                let status = suite.json(&["get", "dp", "reviews", "-n", SHOP])?["status"].clone();
                let proxies = &status["proxies"];
                let table = suite.kubectl(&["get", "dp", "-n", SHOP])?;
                Ok(proxies["connected"] == 1
                    && proxies["acknowledged"] == 1
                    && proxies["rejected"] == 0
                    && table
                        .lines()
                        .nth(1)
                        .is_some_and(|row| row.contains(" 1/1 ")))
            },
        ),
    );
}

/// 4. Failures the mesh hides, and outlier ejection with its probes.
fn failures(suite: &mut Suite) {
    suite.check(
        "v2 failing half its requests: retries hide it",
        (|| {
            let v2 = suite.only_pod(SHOP, "app=reviews,version=v2")?;
            let proxy = suite.client_proxy()?;
            let retries = |exposition: &str| reviews_count(exposition, "outrigger_retries_total");
            let retries_before = retries(&metrics(proxy)?);
            let errors_before = backend_stats(&v2)?["errors"].as_u64().unwrap_or(0);
            steer(&v2, "fail-percent 50")?;
            let calls = suite.client_calls(&[
                "--url",
                REVIEWS_URL,
                "--requests=400",
                "--concurrency=2",
                PACE,
            ]);
            steer(&v2, "answer")?;
            let calls = calls?;
            let errors = backend_stats(&v2)?["errors"].as_u64().unwrap_or(0) - errors_before;
            ensure!(
                errors > 0,
                "v2 failed nothing: the test did not test anything"
            );
            calls.all_ok()?;
            ensure!(
                retries(&metrics(proxy)?) > retries_before,
                "the client's proxy counted no retry"
            );
            Ok(())
        })(),
    );
    suite.check(
        "a v1 pod answering only 5xx is ejected, with exactly one probe per ejection",
        (|| {
            // Short ejections, so that several happen during the load.
            suite.kubectl(&[
                "patch",
                "dp",
                "reviews",
                "-n",
                SHOP,
                "--type=merge",
                "-p",
                r#"{"spec":{"outlierDetection":{"baseEjectionTime":"1s","maxEjectionTime":"3s"}}}"#,
            ])?;
            let proxy = suite.client_proxy()?;
            eventually(
                "the client's proxy applies the short ejections",
                PATIENCE,
                || {
                    let config = suite.client_proxy_dump("/config")?;
                    Ok(config.contains(r#""base_ejection_time": "1000ms""#))
                },
            )?;
            // Policies, pods and addresses are for the pod itself, not for whoever reaches it.
            for dump in ["/config", "/endpoints"] {
                let (status, _) = http("GET", proxy, dump, "")?;
                ensure!(
                    status == 403,
                    "the client's proxy served {dump} off the pod: {status}"
                );
            }
            let bad = suite
                .pods(SHOP, "app=reviews,version=v1")?
                .into_iter()
                .next()
                .ok_or("no v1 pod")?;
            let ejections =
                |exposition: &str| reviews_count(exposition, "outrigger_outlier_ejections_total");
            let ejections_before = ejections(&metrics(proxy)?);
            let hits_before = backend_stats(&bad)?["hits"].as_u64().unwrap_or(0);
            steer(&bad, "status 500")?;
            // One call at a time: the fifth 5xx in a row ejects it before another call is sent.
            let calls =
                suite.client_calls(&["--url", REVIEWS_URL, "--requests=600", "--pause=20ms"]);
            let endpoints = suite.client_proxy_dump("/endpoints");
            let exposition = metrics(proxy);
            let hits = backend_stats(&bad)?["hits"].as_u64().unwrap_or(0) - hits_before;
            steer(&bad, "answer")?;
            calls?.all_ok()?;

            let endpoints = endpoints?;
            let endpoints: Value = serde_json::from_str(&endpoints)
                .map_err(|err| format!("/endpoints: {err}: {endpoints}"))?;
            let state = endpoints
                .as_object()
                .into_iter()
                .flatten()
                .flat_map(|(_, list)| list.as_array().into_iter().flatten())
                .find(|endpoint| endpoint["pod"] == bad.name())
                .map(|endpoint| endpoint["state"].clone())
                .ok_or_else(|| format!("{} is not in /endpoints: {endpoints}", bad.name()))?;
            ensure!(
                state == "ejected" || state == "probation",
                "/endpoints says {} is {state}",
                bad.name()
            );
            let exposition = exposition?;
            let ejected = ejections(&exposition) - ejections_before;
            ensure!(
                ejected >= 2.0,
                "{ejected} ejections: too few to count probes"
            );
            let out = metric(&exposition, "outrigger_endpoints", r#"state="ejected""#)?
                + metric(&exposition, "outrigger_endpoints", r#"state="probation""#)?;
            ensure!(
                out >= 1.0,
                "outrigger_endpoints shows no endpoint out of rotation"
            );
            // Five 5xx in a row eject it; then each probe fails and ejects it again.
            ensure!(
                hits as f64 == 5.0 + (ejected - 1.0),
                "{} got {hits} requests for {ejected} ejections (5 + one probe per later ejection \
                 expected)",
                bad.name()
            );
            Ok(())
        })(),
    );
    suite.check(
        "the example policy is restored",
        (|| {
            let policy = std::fs::read_to_string(workspace_file("examples/reviews-canary.yaml"))
                .map_err(|err| format!("reading the example: {err}"))?;
            suite.apply(&policy)
        })(),
    );
}

/// 5. Pods and the controller come and go under load.
fn restarts(suite: &mut Suite) {
    suite.check(
        "a rolling restart of reviews v1 under steady load loses no request",
        (|| {
            let before: Vec<String> = suite
                .pods(SHOP, "app=reviews,version=v1")?
                .iter()
                .map(|pod| pod.name().to_string())
                .collect();
            let load = suite.start_load()?;
            let restarted = suite
                .kubectl(&["rollout", "restart", "-n", SHOP, "deployment/reviews-v1"])
                .and_then(|_| suite.rollout(SHOP, "reviews-v1"))
                .and_then(|()| {
                    eventually("the old v1 pods are gone", PATIENCE, || {
                        let all = suite.json(&["get", "pods", "-n", SHOP, "-l", "version=v1"])?;
                        Ok(all["items"].as_array().map_or(0, Vec::len) == 3)
                    })
                });
            let calls = load.finish()?;
            restarted?;
            calls.all_ok()?;
            let new_pods = suite.pods(SHOP, "app=reviews,version=v1")?;
            ensure!(
                new_pods
                    .iter()
                    .all(|pod| !before.iter().any(|old| old == pod.name())),
                "the pods were not replaced"
            );
            ensure!(
                new_pods.iter().any(|pod| calls.answered_by(pod.name()) > 0),
                "the new pods got no call during the load: {}",
                calls.0
            );
            Ok(())
        })(),
    );
    suite.check(
        "deleting the controller's pod loses no request, and its replacement resyncs every proxy",
        (|| {
            let old = suite.only_pod(SYSTEM, "app.kubernetes.io/component=controller")?;
            let meshed = suite.pods(SHOP, "app")?.len();
            let load = suite.start_load()?;
            let mut overcounted = std::collections::BTreeSet::new();
            let resynced = suite
                .kubectl(&["delete", "pod", "-n", SYSTEM, old.name(), "--wait=false"])
                .and_then(|_| {
                    eventually("a new controller pod is Ready", PATIENCE, || {
                        let pods = suite.pods(SYSTEM, "app.kubernetes.io/component=controller")?;
                        Ok(pods.iter().any(|pod| {
                            pod.name() != old.name()
                                && pod.json["status"]["conditions"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        }))
                    })
                })
                .and_then(|()| {
                    eventually(
                        "every proxy is connected to the new controller",
                        PATIENCE,
                        || {
                            let new =
                                suite.only_pod(SYSTEM, "app.kubernetes.io/component=controller")?;
                            let connected = metric(
                                &metrics(new.addr(9990))?,
                                "outrigger_controller_proxies_connected",
                                "",
                            )?;
                            let proxies =
                            suite.json(&["get", "dp", "reviews", "-n", SHOP])?["status"]["proxies"]
                                .clone();
                            if proxies["connected"].as_u64().unwrap_or(0) > 1 {
                                overcounted.insert(proxies.to_string());
                            }
                            Ok(connected as usize == meshed
                                && proxies["connected"] == 1
                                && proxies["acknowledged"] == 1)
                        },
                    )
                });
            let calls = load.finish()?;
            resynced?;
            calls.all_ok()?;
            ensure!(
                overcounted.is_empty(),
                "kubectl get dp counted the client's one proxy more than once after the restart: \
                 {overcounted:?}"
            );
            Ok(())
        })(),
    );
}

/// 6. What is not the mesh's business passes through unchanged.
fn pass_through(suite: &mut Suite) {
    suite.check(
        "TCP that is not HTTP (the echo Service) passes through unchanged",
        (|| {
            let echoed = tcp_echoes(
                suite,
                SHOP,
                "deploy/client",
                "echo.shop.svc.cluster.local:7000",
            )?;
            ensure!(echoed == 5, "round trips echoed: {echoed}");
            Ok(())
        })(),
    );
    suite.check(
        "HTTP to an address no Service owns passes through unchanged",
        (|| {
            let bystander = suite.json(&["get", "pod", "bystander", "-n", "outside"])?;
            let ip = bystander["status"]["podIP"]
                .as_str()
                .ok_or("no bystander IP")?;
            let calls = suite.client_calls(&[
                "--url",
                &format!("http://{ip}:9080/plain/path"),
                "--requests=3",
            ])?;
            calls.all_ok()?;
            let last = &calls.0["last"];
            ensure!(last["body"] == "bystander", "{last}");
            let seen = &last["headers"];
            ensure!(
                seen["x-seen-host"] == format!("{ip}:9080").as_str()
                    && seen["x-seen-path"] == "/plain/path"
                    && seen["x-seen-version"] == "HTTP/1.1",
                "the request arrived changed: {seen}"
            );
            Ok(())
        })(),
    );
}

/// A namespace whose pods the injector makes strict, by the namespace's annotation alone, with
/// one HTTP server (its kubelet probe on a port of its own).
const STRICT_NAMESPACE: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: vault
  labels: {outrigger.dev/inject: enabled}
  annotations: {outrigger.dev/mtls: strict}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vault, namespace: vault}
spec:
  replicas: 1
  selector: {matchLabels: {app: vault}}
  template:
    metadata: {labels: {app: vault}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: app
        image: localhost/outrigger-test/app:dev
        imagePullPolicy: Never
        args: [backend, --listen=0.0.0.0:9080, --control=0.0.0.0:9081]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        readinessProbe:
          httpGet: {path: /healthz, port: 9081}
          periodSeconds: 2
      - name: echo
        image: localhost/outrigger-test/app:dev
        imagePullPolicy: Never
        args: [echo, --listen=0.0.0.0:7000]
---
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: vault}
spec:
  selector: {app: vault}
  ports: [{name: http, port: 9080}, {name: tcp, port: 7000}]
"#;

/// What `tcp_echoes` sends.
const ECHO_MESSAGE: &str = "hello, this is not HTTP\n";

/// The TCP payloads a capture saw `from` send to `to`.
fn payloads(segments: &[Segment], from: IpAddr, to: SocketAddr) -> Vec<&[u8]> {
    sent(segments, from, to)
        .map(|s| s.payload.as_slice())
        .collect()
}

/// The first payload of each connection a capture saw `from` open to `to`.
fn connection_openings(segments: &[Segment], from: IpAddr, to: SocketAddr) -> Vec<&[u8]> {
    let mut openings = std::collections::BTreeMap::new();
    for segment in sent(segments, from, to) {
        openings
            .entry(segment.from.1)
            .or_insert(segment.payload.as_slice());
    }
    openings.into_values().collect()
}

/// The segments a capture saw `from` send to `to`, in order.
fn sent(segments: &[Segment], from: IpAddr, to: SocketAddr) -> impl Iterator<Item = &Segment> {
    segments
        .iter()
        .filter(move |s| IpAddr::V4(s.from.0) == from && SocketAddr::from(s.to) == to)
}

/// Whether `text` is in one of `payloads`.
fn carries(payloads: &[&[u8]], text: &str) -> bool {
    payloads.iter().any(|payload| {
        payload
            .windows(text.len())
            .any(|window| window == text.as_bytes())
    })
}

/// Five TCP round trips to `addr` from `pod` (a Deployment's, or a pod's name) in `namespace`:
/// how many echoed.
fn tcp_echoes(suite: &Suite, namespace: &str, pod: &str, addr: &str) -> Result<Value, String> {
    let text = suite.kubectl(&[
        "exec",
        "-n",
        namespace,
        pod,
        "-c",
        "app",
        "--",
        APP,
        "tcp",
        &format!("--addr={addr}"),
        &format!("--message={ECHO_MESSAGE}"),
        "--count=5",
    ])?;
    let summary: Value = serde_json::from_str(&text).map_err(|err| format!("{err}: {text}"))?;
    Ok(summary["echoed"].clone())
}

/// 6c. A namespace annotated strict: its pod's proxy serves the meshed client (over mutual TLS)
/// and the kubelet's probe, and refuses a caller outside the mesh; TCP that is not HTTP goes over
/// mutual TLS too, which a capture on the node's interfaces shows.
fn strict_namespace(suite: &mut Suite) {
    let deployed = suite
        .apply(STRICT_NAMESPACE)
        .and_then(|()| suite.rollout("vault", "vault"));
    if !suite.check(
        "a pod of a strict namespace comes up, its probe served",
        deployed,
    ) {
        return;
    }
    suite.check(
        "the strict namespace's pod serves the meshed client and refuses one outside the mesh",
        (|| {
            let pod = suite.only_pod("vault", "app=vault")?.json;
            let strict = pod["spec"]["initContainers"][1]["env"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|env| env["name"] == "OUTRIGGER_INBOUND_MTLS" && env["value"] == "strict");
            ensure!(strict, "the proxy was not made strict: {}", pod["spec"]);
            suite
                .client_calls(&[
                    "--url",
                    "http://vault.vault.svc.cluster.local:9080/",
                    "--requests=3",
                ])?
                .all_ok()?;
            let ip = pod["status"]["podIP"].as_str().ok_or("no vault pod IP")?;
            let text = suite.kubectl(&[
                "exec",
                "-n",
                "outside",
                "bystander",
                "-c",
                "app",
                "--",
                APP,
                "http",
                "--url",
                &format!("http://{ip}:9080/"),
                "--requests=3",
            ])?;
            let outside: Value =
                serde_json::from_str(&text).map_err(|err| format!("{err}: {text}"))?;
            let outside = Calls(outside);
            ensure!(
                outside.calls() == 3 && outside.count("statuses", "200") == 0,
                "a caller outside the mesh got through: {}",
                outside.0
            );
            Ok(())
        })(),
    );
    suite.check(
        "TCP that is not HTTP goes over mutual TLS to the strict pod: a capture on the node sees \
         each connection open with a TLS handshake, and plaintext only from a caller outside the \
         mesh, which is refused",
        (|| {
            let pod = suite.only_pod("vault", "app=vault")?;
            let client = suite.only_pod(SHOP, "app=client")?;
            let bystander = Pod {
                json: suite.json(&["get", "pod", "bystander", "-n", "outside"])?,
            };
            let [vault, client, bystander] = [&pod, &client, &bystander].map(|p| p.addr(0).ip());
            let capture = Capture::start(&[vault, client, bystander])?;
            let meshed = tcp_echoes(suite, SHOP, "deploy/client", "vault.vault.svc.cluster.local:7000");
            let outside = tcp_echoes(suite, "outside", "bystander", &pod.addr(7000).to_string());
            let segments = capture.stop();
            let echoed = meshed?;
            ensure!(echoed == 5, "the meshed client's round trips echoed: {echoed}");
            let echoed = outside?;
            ensure!(echoed == 0, "a caller outside the mesh got an echo: {echoed}");
            let to_vault = SocketAddr::new(vault, 7000);
            let meshed = payloads(&segments, client, to_vault);
            let openings = connection_openings(&segments, client, to_vault);
            ensure!(
                openings.len() >= 5 && openings.iter().all(|opening| opening.starts_with(&[0x16, 0x03])),
                "the meshed client's connections to {to_vault} do not all open with a TLS \
                 handshake record: {} seen, the first bytes of each {:?}",
                openings.len(),
                openings.iter().map(|opening| &opening[..opening.len().min(8)]).collect::<Vec<_>>()
            );
            ensure!(
                !carries(&meshed, ECHO_MESSAGE),
                "the meshed client's message crossed the node in plaintext"
            );
            let outside = payloads(&segments, bystander, to_vault);
            ensure!(
                carries(&outside, ECHO_MESSAGE),
                "the capture did not see the plaintext of the caller outside the mesh ({} segments)",
                outside.len()
            );
            let exposition = metrics(pod.addr(4191))?;
            let accepted = series_sum(
                &exposition,
                "outrigger_inbound_connections_total",
                r#"tls="true",result="accepted""#,
            );
            ensure!(
                accepted.is_some_and(|accepted| accepted >= 5.0),
                "mutual TLS connections accepted by the vault pod: {accepted:?}"
            );
            suite
                .kubectl(&["delete", "namespace", "vault", "--wait=false"])
                .map(drop)
        })(),
    );
}

/// A second meshed client of reviews, under a ServiceAccount of its own, and the policy that lets
/// only the first client's (`default`) call reviews.
const SECOND_CLIENT: &str = r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: ratings, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ratings, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: ratings}}
  template:
    metadata: {labels: {app: ratings}}
    spec:
      serviceAccountName: ratings
      terminationGracePeriodSeconds: 1
      containers:
      - name: app
        image: localhost/outrigger-test/app:dev
        imagePullPolicy: Never
        args: [idle]
"#;
const READERS_POLICY: &str = r#"apiVersion: outrigger.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: reviews-readers, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  rules: [{from: [{serviceAccounts: [shop/default]}]}]
"#;

/// `--requests=3` calls to reviews from the second client's pod.
fn second_client_calls(suite: &Suite) -> Result<Calls, String> {
    calls_from(
        suite,
        SHOP,
        "deploy/ratings",
        &["--url", REVIEWS_URL, "--requests=3"],
    )
}

/// 6b. An AuthorizationPolicy on reviews: the client's ServiceAccount gets through, another
/// meshed client's gets 403 from the reviews pods' proxies, and the pods stay ready; deleted,
/// everyone gets through again.
fn authorization(suite: &mut Suite) {
    let deployed = suite
        .apply(SECOND_CLIENT)
        .and_then(|()| suite.rollout(SHOP, "ratings"));
    if !suite.check(
        "a second meshed client, ServiceAccount ratings, comes up",
        deployed,
    ) {
        return;
    }
    suite.check(
        "an AuthorizationPolicy lets the client's ServiceAccount through and refuses another's",
        (|| {
            suite.apply(READERS_POLICY)?;
            // Every reviews pod has refused the second client at least once, so each holds the
            // policy before the first client's calls are counted.
            let decisions = |pod: &Pod, decision: &str| -> Result<Option<f64>, String> {
                let labels = format!(r#"policy="shop/reviews-readers",decision="{decision}""#);
                Ok(series_sum(
                    &metrics(pod.addr(4191))?,
                    "outrigger_authz_decisions_total",
                    &labels,
                ))
            };
            eventually(
                "every reviews pod refuses the second client",
                PATIENCE,
                || {
                    let calls = second_client_calls(suite)?;
                    let refused = calls.count("statuses", "403") == calls.calls();
                    let mut everywhere = true;
                    for pod in suite.pods(SHOP, "app=reviews")? {
                        everywhere &= decisions(&pod, "deny")?.is_some();
                    }
                    Ok(refused && everywhere)
                },
            )?;
            // The client's are the first calls the policy can allow. Each pod that answers one
            // must count it, whatever state the pod is in by then (it may have begun to stop).
            let calls = suite.client_calls(&["--url", REVIEWS_URL, "--requests=5"])?;
            calls.all_ok()?;
            for (name, answered) in calls.0["bodies"].as_object().into_iter().flatten() {
                let pod = suite.pod(SHOP, name)?;
                let counted = decisions(&pod, "allow")?;
                ensure!(
                    counted == answered.as_f64(),
                    "{name} answered {answered} calls and counted {counted:?} allows; its status: {}",
                    pod.json["status"]
                );
            }
            let accepted = suite.kubectl(&[
                "get",
                "azp",
                "reviews-readers",
                "-n",
                SHOP,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Accepted")].status}"#,
            ])?;
            ensure!(accepted == "True", "Accepted: {accepted:?}");
            Ok(())
        })(),
    );
    suite.check(
        "the reviews pods stay ready under the policy",
        (|| {
            std::thread::sleep(Duration::from_secs(5));
            for pod in suite.pods(SHOP, "app=reviews")? {
                let ready = &pod.json["status"]["containerStatuses"][0]["ready"];
                ensure!(*ready == true, "{}: not ready", pod.name());
            }
            Ok(())
        })(),
    );
    suite.check(
        "without the policy, every caller gets through again",
        (|| {
            suite.kubectl(&["delete", "azp", "reviews-readers", "-n", SHOP])?;
            eventually("the second client gets through", PATIENCE, || {
                Ok(second_client_calls(suite)?.all_ok().is_ok())
            })?;
            suite
                .kubectl(&[
                    "delete",
                    "deploy/ratings",
                    "-n",
                    SHOP,
                    "--cascade=foreground",
                    "--wait",
                ])
                .map(drop)
        })(),
    );
}

/// The reviews versions as Services of their own, for routes to choose between.
const VERSION_SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: shop}
spec:
  selector: {app: reviews, version: v1}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop}
spec:
  selector: {app: reviews, version: v2}
  ports: [{name: http, port: 9080}]
"#;

/// A meshed namespace `frontend` with a client, and its consumer route: its own calls to
/// reviews all go to v2.
const FRONTEND: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: frontend
  labels: {outrigger.dev/inject: enabled}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: frontend}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: app
        image: localhost/outrigger-test/app:dev
        imagePullPolicy: Never
        args: [idle]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-for-frontend, namespace: frontend}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, namespace: shop}]
  rules:
  - backendRefs: [{name: reviews-v2, namespace: shop, port: 9080}]
"#;

/// gRPC calls of the service `shop.Reviews` to reviews, split 1:3 between its versions, their
/// answers marked.
const GRPC_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews-grpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{method: {service: shop.Reviews}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-route, value: reviews-grpc}]}
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 1}
    - {name: reviews-v2, port: 9080, weight: 3}
"#;

/// `--requests=N` calls to reviews from the frontend namespace's client.
fn frontend_calls(suite: &Suite, requests: usize) -> Result<Calls, String> {
    let requests = format!("--requests={requests}");
    calls_from(
        suite,
        "frontend",
        "deploy/web",
        &["--url", REVIEWS_URL, &requests],
    )
}

/// 6d. Gateway API routes, next to the DestinationPolicy still on reviews: the README's example
/// with other weights (a canary by HTTPRoute weights, per request), a redirect the client's proxy
/// answers, a consumer route for the frontend namespace's calls alone, a GRPCRoute's split, and
/// the routes' status.
fn routes(suite: &mut Suite) {
    let installed = (|| {
        let bundle = workspace_file("tests/conformance/crds/standard.yaml");
        suite.kubectl(&["apply", "--server-side", "-f", bundle.to_str().unwrap()])?;
        suite.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/httproutes.gateway.networking.k8s.io",
            "--timeout=60s",
        ])?;
        suite.apply(VERSION_SERVICES)
    })();
    if !suite.check(
        "the Gateway API CRDs install beside Outrigger's running controller",
        installed,
    ) {
        return;
    }
    suite.check(
        "helm upgrade's notes name the Gateway API bundle found",
        (|| {
            let chart = workspace_file("charts/outrigger");
            let (notes, _) = suite.helm(&[
                "upgrade",
                "outrigger",
                &chart.to_string_lossy(),
                "-n",
                SYSTEM,
                "--reuse-values",
                "--wait",
            ])?;
            ensure!(
                notes.contains(
                    "Gateway API: found the standard channel, bundle v1.6.3: HTTPRoutes and \
                     GRPCRoutes"
                ),
                "helm printed: {notes}"
            );
            Ok(())
        })(),
    );
    suite.check(
        "an HTTPRoute splits reviews' calls by its weights, in place of the policy's split",
        (|| {
            let example = std::fs::read_to_string(workspace_file("examples/reviews-route.yaml"))
                .map_err(|err| format!("reading the example: {err}"))?;
            // The policy on reviews splits 90/10 too: other weights tell the route's apart.
            let route = example
                .replace("weight: 90", "weight: 50")
                .replace("weight: 10", "weight: 50")
                .replace(
                    "  - backendRefs:\n",
                    "  - matches: [{path: {type: PathPrefix, value: /old}}]\n    filters:\n    - \
                     type: RequestRedirect\n      requestRedirect: {hostname: example.org, \
                     statusCode: 301}\n  - backendRefs:\n",
                );
            suite.apply(&route)?;
            eventually("the route's redirect answers", PATIENCE, || {
                let calls = suite.client_calls(&[
                    "--url",
                    "http://reviews.shop.svc.cluster.local:9080/old/page",
                    "--requests=3",
                ])?;
                Ok(calls.count("statuses", "301") == 3)
            })?;
            let n = 400;
            let calls = suite.client_calls(&[
                "--url",
                REVIEWS_URL,
                &format!("--requests={n}"),
                "--concurrency=2",
                PACE,
            ])?;
            calls.all_ok()?;
            calls.v2_share_is(0.5)?;
            let canary = suite.client_calls(&[
                "--url",
                REVIEWS_URL,
                "--requests=10",
                "--header=x-canary: true",
            ])?;
            ensure!(
                canary.answered_by("reviews-v2-") == 10,
                "x-canary: true must reach v2: {}",
                canary.0
            );
            let accepted = suite.kubectl(&[
                "get",
                "httproute",
                "reviews",
                "-n",
                SHOP,
                "-o",
                r#"jsonpath={.status.parents[0].controllerName} {.status.parents[0].conditions[?(@.type=="Accepted")].status} {.status.parents[0].conditions[?(@.type=="ResolvedRefs")].status}"#,
            ])?;
            ensure!(
                accepted == "outrigger.dev/mesh True True",
                "the route's status: {accepted:?}"
            );
            Ok(())
        })(),
    );
    suite.check(
        "a consumer route serves its own namespace's calls, and no one else's",
        (|| {
            suite.apply(FRONTEND)?;
            suite.rollout("frontend", "web")?;
            eventually(
                "the frontend namespace's calls take its route",
                PATIENCE,
                || {
                    let calls = frontend_calls(suite, 10)?;
                    Ok(calls.answered_by("reviews-v2-") == 10)
                },
            )?;
            let shop = suite.client_calls(&["--url", REVIEWS_URL, "--requests=40", PACE])?;
            ensure!(
                shop.answered_by("reviews-v1-") > 0,
                "the shop's calls must keep the producer route's split: {}",
                shop.0
            );
            Ok(())
        })(),
    );
    suite.check(
        "a GRPCRoute splits reviews' gRPC calls by its weights, beside the HTTPRoute",
        (|| {
            suite.apply(GRPC_ROUTE)?;
            let url = "http://reviews.shop.svc.cluster.local:9080/shop.Reviews/List";
            // Its weights (1:3) tell its answers from the HTTPRoute's (1:1) and the policy's.
            let n = 200;
            eventually("the GRPCRoute serves", PATIENCE, || {
                let calls = suite.client_calls(&["--grpc", "--url", url])?;
                Ok(calls.0["last"]["headers"]["x-route"] == "reviews-grpc")
            })?;
            let calls = suite.client_calls(&[
                "--grpc",
                "--url",
                url,
                &format!("--requests={n}"),
                "--concurrency=2",
                PACE,
            ])?;
            calls.all_ok()?;
            let last = &calls.0["last"]["headers"];
            ensure!(
                last["grpc-status"] == "0" && last["x-route"] == "reviews-grpc",
                "the last answer: {last}"
            );
            calls.v2_share_is(0.75)?;
            let accepted = suite.kubectl(&[
                "get",
                "grpcroute",
                "reviews-grpc",
                "-n",
                SHOP,
                "-o",
                r#"jsonpath={.status.parents[0].conditions[?(@.type=="Accepted")].status}"#,
            ])?;
            ensure!(accepted == "True", "the GRPCRoute's status: {accepted:?}");
            suite.kubectl(&["delete", "grpcroute", "reviews-grpc", "-n", SHOP])?;
            Ok(())
        })(),
    );
    suite.check(
        "without the routes, the DestinationPolicy's split is back",
        (|| {
            suite.kubectl(&["delete", "httproute", "reviews", "-n", SHOP])?;
            suite.kubectl(&["delete", "namespace", "frontend", "--wait=false"])?;
            eventually("redirects stop", PATIENCE, || {
                let calls = suite.client_calls(&[
                    "--url",
                    "http://reviews.shop.svc.cluster.local:9080/old/page",
                    "--requests=3",
                ])?;
                Ok(calls.count("statuses", "200") == 3)
            })
        })(),
    );
}

/// 6e. A pod calling a Service that selects it alone (as a conformance suite's client does): its
/// proxy calls its own app in plaintext, as the proxy's connections are not redirected to its
/// inbound listener and TLS would reach the app's plaintext port.
fn self_calls(suite: &mut Suite) {
    suite.check(
        "a meshed pod calling a Service that selects it alone is answered by its own app",
        (|| {
            suite.apply(VERSION_SERVICES)?;
            let v2 = suite.only_pod(SHOP, "app=reviews,version=v2")?;
            eventually("reviews-v2 answers its own calls", PATIENCE, || {
                let calls = calls_from(
                    suite,
                    SHOP,
                    v2.name(),
                    &[
                        "--url",
                        "http://reviews-v2.shop.svc.cluster.local:9080/api/reviews",
                        "--requests=5",
                    ],
                )?;
                Ok(calls.answered_by(v2.name()) == 5)
            })
        })(),
    );
}

/// A Service `ratings` on the reviews pods whose policy every proxy rejects (a header regex the
/// API server and the controller let through), for the dashboards' rejected-configuration panel.
const REJECTED_POLICY: &str = r#"apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: outrigger.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings
  routes:
  - name: broken
    match: {headers: {x-user: {regex: "(unclosed"}}}
"#;

/// 7. Prometheus finds the meshed pods through the API server; every dashboard query has data.
fn dashboards(suite: &mut Suite) {
    let outcome = (|| {
        let certs = suite.cluster.certificates();
        let config = format!(
            r#"- job_name: outrigger
  kubernetes_sd_configs:
  - role: pod
    api_server: {server}
    tls_config: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}
    namespaces: {{names: [{SHOP}, {SYSTEM}]}}
  relabel_configs:
  # The proxies' admin port and the controller's, by the names the injector and the chart give.
  - source_labels: [__meta_kubernetes_pod_container_port_name]
    regex: outrigger-admin|admin-http
    action: keep
  - source_labels: [__meta_kubernetes_namespace]
    target_label: namespace
  - source_labels: [__meta_kubernetes_pod_name]
    target_label: pod
"#,
            server = suite.cluster.server_url(),
            ca = certs.ca_cert.display(),
            cert = certs.admin_cert.display(),
            key = certs.admin_key.display(),
        );
        let runtime = tokio::runtime::Runtime::new().map_err(|err| err.to_string())?;
        // Built with the cluster: Debian's has no Kubernetes service discovery.
        let binary = suite.cluster.binaries().program("prometheus");
        let mut prometheus = Prometheus::start(&binary, &config);
        runtime.block_on(prometheus.ready());
        let expected_targets = suite.pods(SHOP, "app")?.len() + 1;
        eventually(
            "Prometheus discovers every meshed pod and the controller through the API server",
            PATIENCE,
            || Ok(runtime.block_on(prometheus.targets_up()) >= expected_targets),
        )
        .map_err(|err| format!("{err}\n{}", prometheus.log()))?;

        let load_start = unix_now();
        let load = suite.start_load()?;
        let provoked = provoke_what_the_dashboards_show(suite);
        // A few more healthy scrapes, then the load stops.
        std::thread::sleep(Duration::from_secs(3));
        let load_end = unix_now();
        let calls = load.finish()?;
        provoked?;
        ensure!(calls.calls() > 0, "the steady load made no call");
        eventually(
            "Prometheus scrapes past the end of the load",
            PATIENCE,
            || Ok(runtime.block_on(prometheus.last_scraped()) > load_end + 1.0),
        )?;
        let dashboards = load_dashboards();
        let problems = runtime
            .block_on(query_every_panel(
                &dashboards,
                &prometheus,
                SHOP,
                "reviews",
                load_start,
                load_end,
            ))
            .problems;
        ensure!(
            problems.is_empty(),
            "{} dashboard problem(s):\n{}",
            problems.len(),
            problems.join("\n")
        );
        Ok(())
    })();
    suite.check(
        "Prometheus discovers the meshed pods and every dashboard query has data for shop",
        outcome,
    );
}

/// What only changes and failures make: a policy change pushed to the proxies, retries, timeouts,
/// an exhausted retry budget, requests over the rate limit, a configuration the proxies reject.
fn provoke_what_the_dashboards_show(suite: &Suite) -> Outcome {
    // The canary is rolled out further: a change the controller pushes and the proxy acknowledges.
    let controller = suite.only_pod(SYSTEM, "app.kubernetes.io/component=controller")?;
    let pushes = || {
        metrics(controller.addr(9990)).map(|exposition| {
            series_sum(&exposition, "outrigger_controller_push_seconds_count", "").unwrap_or(0.0)
        })
    };
    let pushed_before = pushes()?;
    suite.kubectl(&[
        "patch",
        "dp",
        "reviews",
        "-n",
        SHOP,
        "--type=merge",
        "-p",
        r#"{"spec":{"trafficSplit":[{"subset":"stable","weight":50},{"subset":"canary","weight":50}]}}"#,
    ])?;
    eventually(
        "the client's proxy acknowledges the 50/50 canary",
        PATIENCE,
        || Ok(pushes()? > pushed_before),
    )?;
    let reviews = suite.pods(SHOP, "app=reviews")?;
    let v2 = suite.only_pod(SHOP, "app=reviews,version=v2")?;
    // Slower than the testers' route's 2 s timeout and the per-try timeout.
    steer(&v2, "delay 2500ms")?;
    let slow = suite.client_calls(&[
        "--url",
        REVIEWS_URL,
        "--header=x-canary: true",
        "--requests=3",
    ]);
    steer(&v2, "answer")?;
    slow?;
    // Everything fails: retries would double the load; the budget stops them.
    for pod in &reviews {
        steer(pod, "status 503")?;
    }
    let failing = suite.client_calls(&[
        "--url",
        REVIEWS_URL,
        "--requests=200",
        "--concurrency=4",
        PACE,
    ]);
    for pod in &reviews {
        steer(pod, "answer")?;
    }
    failing?;
    // A burst over the rate limit (100/s, burst 200).
    let burst =
        suite.client_calls(&["--url", REVIEWS_URL, "--requests=600", "--concurrency=32"])?;
    ensure!(
        burst.count("statuses", "429") > 0 || burst.0.to_string().contains("429"),
        "the burst was not rate limited: {}",
        burst.0["statuses"]
    );
    suite.apply(REJECTED_POLICY)?;
    let proxy = suite.client_proxy()?;
    eventually(
        "the client's proxy rejects the ratings policy",
        PATIENCE,
        || {
            let _ = suite.client_calls(&["--url", "http://ratings.shop.svc.cluster.local:9080/"]);
            Ok(series_sum(
                &metrics(proxy)?,
                "outrigger_config_updates_total",
                r#"result="rejected""#,
            )
            .is_some_and(|rejected| rejected >= 1.0))
        },
    )
}

/// 8. A pod that cannot be meshed, stopping order, and what `helm uninstall` leaves.
fn bad_input_and_uninstall(suite: &mut Suite) {
    let chart = workspace_file("charts/outrigger");
    let chart = chart.to_string_lossy().into_owned();
    let upgrade = |suite: &Suite, extra: &[&str]| {
        let mut args = vec![
            "upgrade",
            "outrigger",
            &chart,
            "-n",
            SYSTEM,
            "--reuse-values",
            "--wait",
        ];
        args.extend(extra);
        suite.helm(&args).map(drop)
    };
    suite.check(
        "helm upgrade without changes keeps the controller running",
        (|| {
            let before = suite.only_pod(SYSTEM, "app.kubernetes.io/component=controller")?;
            upgrade(suite, &[])?;
            let after = suite.pods(SYSTEM, "app.kubernetes.io/component=controller")?;
            ensure!(
                after.len() == 1 && after[0].name() == before.name(),
                "the controller was replaced: {} -> {:?}",
                before.name(),
                after.iter().map(Pod::name).collect::<Vec<_>>()
            );
            Ok(())
        })(),
    );
    suite.check(
        "a pod that cannot be meshed says why in its events and logs",
        (|| {
            // A CIDR the chart's schema lets through and the init step refuses.
            upgrade(suite, &["--set", "proxy.skipOutboundCIDRs={10.0.0.0/99}"])?;
            suite.apply(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: unmeshable\n  labels: \
                 {outrigger.dev/inject: enabled}\n---\napiVersion: v1\nkind: Pod\nmetadata: \
                 {name: victim, namespace: unmeshable}\nspec:\n  containers:\n  - name: app\n    \
                 image: localhost/outrigger-test/app:dev\n    imagePullPolicy: Never\n    args: \
                 [idle]\n",
            )?;
            let failure = eventually("the init step fails", PATIENCE, || {
                let pod = suite.json(&["get", "pod", "victim", "-n", "unmeshable"])?;
                let init = &pod["status"]["initContainerStatuses"][0];
                Ok(init["name"] == "outrigger-init"
                    && (init["lastState"]["terminated"]["exitCode"]
                        .as_i64()
                        .unwrap_or(0)
                        != 0
                        || init["state"]["terminated"]["exitCode"]
                            .as_i64()
                            .unwrap_or(0)
                            != 0))
            });
            let restored = upgrade(suite, &["--set-json", "proxy.skipOutboundCIDRs=[]"]);
            failure?;
            restored?;
            let logs =
                suite.kubectl(&["logs", "victim", "-n", "unmeshable", "-c", "outrigger-init"]);
            let logs = match logs {
                Ok(logs) => logs,
                // Between restarts the current container may not have run yet.
                Err(_) => suite.kubectl(&[
                    "logs",
                    "victim",
                    "-n",
                    "unmeshable",
                    "-c",
                    "outrigger-init",
                    "--previous",
                ])?,
            };
            ensure!(
                logs.contains("10.0.0.0/99"),
                "its log does not say what is wrong: {logs:?}"
            );
            eventually("its events say the init step fails", PATIENCE, || {
                let events = suite.kubectl(&[
                    "get",
                    "events",
                    "-n",
                    "unmeshable",
                    "--field-selector=involvedObject.name=victim",
                ])?;
                Ok(events.contains("outrigger-init")
                    && (events.contains("BackOff") || events.contains("Failed")))
            })?;
            suite.kubectl(&["delete", "namespace", "unmeshable", "--wait=false"])?;
            Ok(())
        })(),
    );
    suite.check(
        "the proxy stops after the app: the app's last call works",
        (|| {
            let client = suite.only_pod(SHOP, "app=client")?;
            let mut logs = suite
                .cluster
                .kubectl_command()
                .args(["logs", "-f", "-n", SHOP, client.name(), "-c", "app"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|err| format!("kubectl logs -f: {err}"))?;
            let mut stdout = logs.stdout.take().ok_or("kubectl's stdout")?;
            suite.kubectl(&["delete", "pod", "-n", SHOP, client.name(), "--wait=false"])?;
            // The stream ends when the app's container exits.
            let reader = std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stdout.read_to_string(&mut text);
                text
            });
            let deadline = Instant::now() + PATIENCE;
            while !reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = logs.kill();
            let _ = logs.wait();
            let text = reader.join().map_err(|_| "reading the logs panicked")?;
            ensure!(
                text.lines()
                    .any(|line| line.starts_with("on stop:") && line.ends_with("answered 200")),
                "the app's call while stopping did not get through: {text:?}"
            );
            suite.rollout(SHOP, "client")
        })(),
    );
    let uninstalled = suite.helm(&["uninstall", "outrigger", "-n", SYSTEM, "--wait"]);
    if !suite.check("helm uninstall", uninstalled.map(drop)) {
        return;
    }
    suite.check(
        "after helm uninstall, pods are created and run in the labelled namespace",
        (|| {
            let webhooks = suite.kubectl(&["get", "mutatingwebhookconfigurations", "-o", "name"])?;
            ensure!(
                !webhooks.contains("outrigger"),
                "a webhook is left: {webhooks}"
            );
            suite.apply(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: after-uninstall, namespace: shop}\n\
                 spec:\n  containers:\n  - name: app\n    image: localhost/outrigger-test/app:dev\n    \
                 imagePullPolicy: Never\n    args: [idle]\n",
            )?;
            let pod = Pod {
                json: suite.json(&["get", "pod", "after-uninstall", "-n", SHOP])?,
            };
            ensure!(
                pod.init_containers().is_empty(),
                "a pod created after uninstalling was injected"
            );
            suite
                .kubectl(&[
                    "wait",
                    "-n",
                    SHOP,
                    "--for=condition=Ready",
                    "pod/after-uninstall",
                    &format!("--timeout={}s", PATIENCE.as_secs()),
                ])
                .map(drop)
        })(),
    );
    suite.check(
        "after helm uninstall, a meshed pod reaches a Service it never called",
        (|| {
            suite.apply(
                "apiVersion: v1\nkind: Service\nmetadata: {name: details, namespace: shop}\n\
                 spec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080, \
                 targetPort: http}]\n",
            )?;
            // A new Service is refused (kube-proxy's REJECT) until its endpoints are programmed:
            // the node, whose traffic kube-proxy routes too, waits for that, not the client.
            let service = suite.json(&["get", "service", "details", "-n", SHOP])?;
            let cluster_ip = service["spec"]["clusterIP"]
                .as_str()
                .ok_or("details has no ClusterIP")?;
            let service_addr: SocketAddr = format!("{cluster_ip}:9080")
                .parse()
                .map_err(|err| format!("{cluster_ip}: {err}"))?;
            eventually("kube-proxy serves details", PATIENCE, || {
                Ok(TcpStream::connect_timeout(&service_addr, Duration::from_secs(5)).is_ok())
            })?;
            let calls = suite.client_calls(&[
                "--url",
                "http://details.shop.svc.cluster.local:9080/",
                "--requests=3",
                "--timeout=10s",
            ])?;
            calls.all_ok()
        })(),
    );
    // The rest of the README's uninstall procedure.
    suite.check(
        "unlabelled and restarted, a pod runs without the proxy and still calls meshed pods",
        (|| {
            suite.kubectl(&["label", "namespace", SHOP, "outrigger.dev/inject-"])?;
            suite.kubectl(&["rollout", "restart", "-n", SHOP, "deployment/client"])?;
            suite.rollout(SHOP, "client")?;
            let client = suite.only_pod(SHOP, "app=client")?;
            ensure!(
                client.init_containers().is_empty(),
                "the restarted client still has {:?}",
                client.init_containers()
            );
            suite
                .client_calls(&["--url", REVIEWS_URL, "--requests=5"])?
                .all_ok()
        })(),
    );
    suite.check(
        "deleting the CRDs and the namespace leaves nothing of the mesh",
        (|| {
            let crds = workspace_file("crds");
            suite.kubectl(&["delete", "-f", &crds.to_string_lossy(), "--wait"])?;
            suite.kubectl(&["delete", "namespace", SYSTEM, "--wait"])?;
            let crds = suite.kubectl(&["get", "crds", "-o", "name"])?;
            ensure!(!crds.contains("outrigger.dev"), "CRDs left: {crds}");
            let left = suite.kubectl(&["get", "namespace", SYSTEM, "--ignore-not-found"])?;
            ensure!(left.trim().is_empty(), "{SYSTEM} is left: {left}");
            // The node's own heartbeat (kube-node-lease/outrigger-node) is the cluster's.
            let leases = suite.kubectl(&["get", "leases", "-A", "-o", "name"])?;
            ensure!(
                !leases.contains("outrigger-controller"),
                "a Lease is left: {leases}"
            );
            Ok(())
        })(),
    );
}

#[test]
fn the_readmes_flow_in_meshed_pods() {
    let started = Instant::now();
    let cluster = Cluster::builder()
        .node(true)
        .images(image_archives())
        .start()
        .expect("starting the test cluster with its node");
    let mut suite = Suite {
        cluster,
        passed: Vec::new(),
        failed: Vec::new(),
    };
    if install_the_chart(&mut suite) && deploy_the_shop(&mut suite) {
        canary(&mut suite);
        failures(&mut suite);
        restarts(&mut suite);
        pass_through(&mut suite);
        authorization(&mut suite);
        strict_namespace(&mut suite);
        routes(&mut suite);
        self_calls(&mut suite);
        dashboards(&mut suite);
        bad_input_and_uninstall(&mut suite);
    }
    eprintln!(
        "pods_e2e: {} checks passed, {} failed, in {:?}",
        suite.passed.len(),
        suite.failed.len(),
        started.elapsed()
    );
    let failed = std::mem::take(&mut suite.failed);
    let logs = suite.cluster.state_dir().join("logs");
    drop(suite);
    assert!(
        failed.is_empty(),
        "{} check(s) failed (the node's logs were in {}):\n{}",
        failed.len(),
        logs.display(),
        failed.join("\n\n")
    );
}
