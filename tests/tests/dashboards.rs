//! The chart's Grafana dashboards (charts/outrigger/dashboards), checked for real.
//!
//! - `every_panel_has_data_from_live_binaries`: a real controller (reading a manifests directory)
//!   and real proxies run in process on loopback, with load that makes every failure the
//!   dashboards show happen: a canary rollout, an endpoint failing until it is ejected, a slow
//!   canary (per-try and request timeouts), a total outage (retry budget exhausted), a burst over
//!   the rate limit, callers an AuthorizationPolicy denies, a broken manifest (reconcile error)
//!   and a configuration a proxy rejects. A real Prometheus (Debian's package) scrapes them all
//!   every second. Then every panel's query,
//!   its template variables filled in as Grafana would, is run through Prometheus' HTTP API over
//!   the load's time range and must return a series with a value, and every metric name it uses
//!   must be one the binaries expose; each template variable's own query must offer the value
//!   used. Every metric the binaries expose must appear on some dashboard.
//! - `dashboards_follow_the_import_conventions`: stable uids, a Prometheus `datasource` variable
//!   that every query uses, defined variables only, panels on the grid without overlap.
//! - `dashboards_match_grafanas_schema`: the JSON type-checks against Grafana's published
//!   dashboard schema (charts/outrigger/dashboards/schema-check).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_tests::dashboards::{
    Dashboard, GLOBAL_VARIABLES, Prometheus, dashboards_dir, exposed_names, family_of, http_get,
    load_dashboards, metric_names, on_path, query_every_panel, series_sum, static_scrape_configs,
    variable_references,
};
use outrigger_tests::live::{self, LiveProxy};
use outrigger_tests::{Backend, Behaviour, ControlPlane, destination};
use tokio::net::TcpStream;
use tokio::sync::watch;

const NAMESPACE: &str = "shop";
const SERVICE: &str = "reviews";
/// What the applications call, and the key the proxies subscribe to for it.
const AUTHORITY: &str = "reviews.shop:9080";
const DESTINATION_KEY: &str = "reviews.shop.svc.cluster.local:9080";

/// How long any one awaited effect (a scrape, an ejection, a pushed configuration) may take on a
/// loaded machine before the test gives up.
const PATIENCE: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------------
// Conventions and schema

#[test]
fn dashboards_follow_the_import_conventions() {
    let prometheus_ref = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    for dashboard in load_dashboards() {
        let file = &dashboard.file;
        let json = &dashboard.json;
        assert!(
            json["title"]
                .as_str()
                .is_some_and(|t| t.starts_with("Outrigger / ")),
            "{file}: titles start with `Outrigger / `"
        );
        assert!(
            json["tags"]
                .as_array()
                .is_some_and(|tags| tags.contains(&"outrigger".into())),
            "{file}: tagged `outrigger`, which the dashboards' links list"
        );

        let variables = dashboard.variables();
        let datasource = variables
            .iter()
            .find(|v| v["name"] == "datasource")
            .unwrap_or_else(|| panic!("{file}: no `datasource` variable"));
        assert_eq!(
            (&datasource["type"], &datasource["query"]),
            (&"datasource".into(), &"prometheus".into()),
            "{file}: `datasource` picks any Prometheus data source"
        );
        let defined: BTreeSet<&str> = variables
            .iter()
            .filter_map(|v| v["name"].as_str())
            .chain(GLOBAL_VARIABLES)
            .collect();
        for variable in &variables {
            if variable["type"] == "query" {
                assert_eq!(
                    variable["datasource"], prometheus_ref,
                    "{file}: variable {}",
                    variable["name"]
                );
                for used in variable_references(variable["query"].as_str().unwrap_or_default()) {
                    assert!(
                        defined.contains(used.as_str()),
                        "{file}: variable {} uses undefined ${used}",
                        variable["name"]
                    );
                }
            }
        }

        let mut ids = BTreeSet::new();
        let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
        for panel in json["panels"].as_array().unwrap().iter().chain(
            json["panels"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|p| p["panels"].as_array().into_iter().flatten()),
        ) {
            let title = panel["title"].as_str().unwrap_or("untitled");
            assert!(
                ids.insert(panel["id"].as_u64().expect("panel id")),
                "{file}: panel id of {title:?} reused"
            );
            let at = &panel["gridPos"];
            let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| at[k].as_u64().expect("gridPos"));
            assert!(x + w <= 24, "{file}: {title:?} is wider than the grid");
            for cell_x in x..x + w {
                for cell_y in y..y + h {
                    if let Some(other) = cells.insert((cell_x, cell_y), title.to_string()) {
                        panic!("{file}: {title:?} overlaps {other:?}");
                    }
                }
            }
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(panel["datasource"], prometheus_ref, "{file}: {title:?}");
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{file}: {title:?} says what it shows"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{file}: {title:?} has no query");
            for target in targets {
                assert_eq!(target["datasource"], prometheus_ref, "{file}: {title:?}");
                let expr = target["expr"].as_str().expect("expr");
                for used in variable_references(expr) {
                    assert!(
                        defined.contains(used.as_str()),
                        "{file}: {title:?} uses undefined ${used}"
                    );
                }
            }
        }
    }
}

#[test]
fn dashboards_match_grafanas_schema() {
    let dir = dashboards_dir().join("schema-check");
    let npm = on_path("npm").unwrap_or_else(|| {
        panic!(
            "npm is not installed: the dashboards' schema check needs node (20 or later) and npm"
        )
    });
    for args in [
        &["ci", "--no-audit", "--no-fund", "--loglevel=error"][..],
        &["run", "--silent", "check"][..],
    ] {
        let output = Command::new(&npm)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("running npm {}: {e}", args.join(" ")));
        assert!(
            output.status.success(),
            "npm {} in {} failed ({}):\n{}{}",
            args.join(" "),
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
}

// ------------------------------------------------------------------------------------------------
// HTTP on loopback

async fn scrape(admin: SocketAddr) -> String {
    match http_get(admin, "admin", "/metrics").await {
        Ok((200, body)) => body,
        other => panic!("scraping {admin}: {other:?}"),
    }
}

/// The sum of every series of `sample` in an exposition whose labels contain `labels`; zero
/// while there is none yet.
fn sum_of(exposition: &str, sample: &str, labels: &str) -> f64 {
    series_sum(exposition, sample, labels).unwrap_or(0.0)
}

/// An h2c connection from an application to its proxy's outbound listener.
async fn app_connection(outbound: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let io = TokioIo::new(TcpStream::connect(outbound).await?);
    let (send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
    tokio::spawn(connection);
    Ok(send)
}

/// A call to the reviews Service; `canary` sets the header that routes to the canary subset.
async fn call(send: &mut SendRequest<Full<Bytes>>, path: &str, canary: bool) -> u16 {
    let mut request = http::Request::get(format!("http://{AUTHORITY}{path}"))
        .version(http::Version::HTTP_2)
        .body(Full::new(Bytes::new()))
        .unwrap();
    if canary {
        request
            .headers_mut()
            .insert("x-canary", http::HeaderValue::from_static("true"));
    }
    if send.ready().await.is_err() {
        return 0;
    }
    match send.send_request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => 0,
    }
}

/// `count` concurrent calls over one connection; their statuses (0: no response).
async fn burst(outbound: SocketAddr, count: usize, path: &str, canary: bool) -> Vec<u16> {
    let Ok(send) = app_connection(outbound).await else {
        return vec![0; count];
    };
    let calls = (0..count).map(|_| {
        let mut send = send.clone();
        async move { call(&mut send, path, canary).await }
    });
    futures_util::future::join_all(calls).await
}

/// An application calling reviews steadily, a few requests at a time, until `stop`.
fn steady_load(
    outbound: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut sent = 0;
        while !*stop.borrow() {
            sent += burst(outbound, 4, "/", false).await.len() as u64;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                _ = stop.changed() => {}
            }
        }
        sent
    })
}

/// Fails the test, naming `what`, once `PATIENCE` has passed since it was made.
struct Deadline {
    what: &'static str,
    until: Instant,
}

impl Deadline {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            until: Instant::now() + PATIENCE,
        }
    }

    async fn tick(&self) {
        assert!(
            Instant::now() < self.until,
            "timed out after {PATIENCE:?} waiting for: {}",
            self.what
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ------------------------------------------------------------------------------------------------
// The mesh: a controller fed by a manifests directory, proxies, backends

/// A proxy of pod `workload` in namespace shop; returns once `/ready`.
async fn start_proxy(control_plane: &str, workload: &str, app: SocketAddr) -> LiveProxy {
    let identity = [
        "--namespace",
        NAMESPACE,
        "--workload",
        workload,
        "--service-account",
        "productpage",
    ];
    let proxy = live::start_proxy(control_plane, app, &identity).await;
    let deadline = Deadline::new("a proxy to be ready");
    while !matches!(http_get(proxy.admin, "admin", "/ready").await, Ok((200, _))) {
        deadline.tick().await;
    }
    proxy
}

/// The reviews Service, one EndpointSlice and Pod per backend (on loopback, each on its own
/// port), as `kubectl apply` would take them.
fn service_manifest(backends: &[(&Backend, &str)]) -> String {
    let mut manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {SERVICE}, namespace: {NAMESPACE}}}\n\
         spec:\n  ports: [{{name: http, port: 9080}}]\n"
    );
    for (backend, version) in backends {
        let pod = format!("{SERVICE}-{}", backend.name());
        manifest += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {pod}\n  namespace: {NAMESPACE}\n  labels: {{kubernetes.io/service-name: {SERVICE}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}}}]\n\
             endpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: {NAMESPACE}}}\n\
             ---\napiVersion: v1\nkind: Pod\n\
             metadata:\n  name: {pod}\n  namespace: {NAMESPACE}\n  labels: {{app: {SERVICE}, version: {version}}}\n",
            port = backend.addr.port(),
        );
    }
    manifest
}

/// The productpage Service, whose pod productpage-0 is reached on `port` (its proxy's inbound
/// listener), and an AuthorizationPolicy that lets only reviews call it: the tests' plaintext
/// calls to that proxy's inbound side are denied.
fn productpage_manifest(port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: productpage, namespace: {NAMESPACE}}}\n\
         spec:\n  ports: [{{name: http, port: 9080}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: productpage\n  namespace: {NAMESPACE}\n  labels: {{kubernetes.io/service-name: productpage}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}}}]\n\
         endpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: productpage-0, namespace: {NAMESPACE}}}\n\
         ---\napiVersion: outrigger.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: productpage-callers, namespace: {NAMESPACE}}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: productpage}}]\n\
         \x20 rules: [{{from: [{{serviceAccounts: [{NAMESPACE}/reviews]}}]}}]\n"
    )
}

/// The canary policy at `canary_weight` percent: retries within a small budget, outlier
/// detection, a rate limit, and routes that send testers (header x-canary) to the canary, with a
/// tight timeout on /reports.
fn policy_manifest(canary_weight: u32) -> String {
    format!(
        r#"apiVersion: outrigger.dev/v1alpha1
kind: DestinationPolicy
metadata: {{name: {SERVICE}, namespace: {NAMESPACE}}}
spec:
  host: {SERVICE}
  subsets:
  - {{name: stable, labels: {{version: v1}}}}
  - {{name: canary, labels: {{version: v2}}}}
  trafficSplit:
  - {{subset: stable, weight: {stable}}}
  - {{subset: canary, weight: {canary_weight}}}
  routes:
  - name: canary-reports
    match: {{headers: {{x-canary: {{exact: "true"}}}}, pathPrefix: /reports}}
    trafficSplit: [{{subset: canary, weight: 100}}]
    timeout: 150ms
    retries: {{attempts: 1, perTryTimeout: 100ms, retryOn: [gateway-error]}}
  - name: canary-testers
    match: {{headers: {{x-canary: {{exact: "true"}}}}}}
    trafficSplit: [{{subset: canary, weight: 100}}]
  timeout: 2s
  retries:
    attempts: 2
    perTryTimeout: 200ms
    retryOn: [5xx, gateway-error, connect-failure, reset]
    backoff: {{baseInterval: 5ms, maxInterval: 20ms}}
    budget: {{percent: 10, minRetriesPerSecond: 2}}
  outlierDetection:
    consecutive5xxErrors: 3
    baseEjectionTime: 2s
    maxEjectionTime: 10s
    maxEjectionPercent: 50
  loadBalancer: {{algorithm: RoundRobin}}
  rateLimit: {{requestsPerSecond: 200, burst: 50}}
"#,
        stable = 100 - canary_weight,
    )
}

// ------------------------------------------------------------------------------------------------
// The test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_has_data_from_live_binaries() {
    let started = Instant::now();
    let dashboards = load_dashboards();

    // Backends: two stable pods and a canary.
    let stable_0 = Backend::start("stable-0").await;
    let stable_1 = Backend::start("stable-1").await;
    let canary_0 = Backend::start("canary-0").await;

    // The controller, as the binary runs it, from a manifests directory.
    let manifests = tempfile::tempdir().unwrap();
    let write_manifest = |file: &str, content: &str| {
        // Written aside and renamed, so the controller never reads half a file.
        let aside = manifests.path().join(format!(".{file}"));
        std::fs::write(&aside, content).unwrap();
        std::fs::rename(&aside, manifests.path().join(file)).unwrap();
    };
    write_manifest(
        "reviews.yaml",
        &service_manifest(&[(&stable_0, "v1"), (&stable_1, "v1"), (&canary_0, "v2")]),
    );
    write_manifest("reviews-policy.yaml", &policy_manifest(10));
    write_manifest(
        "productpage.yaml",
        &productpage_manifest(stable_0.addr.port()),
    );
    let controller = live::start_controller(manifests.path()).await;
    let (controller_url, controller_admin) = (controller.url.clone(), controller.admin);

    // Two application pods calling reviews through their proxies.
    let productpage = [
        start_proxy(&controller_url, "productpage-0", stable_0.addr).await,
        start_proxy(&controller_url, "productpage-1", stable_0.addr).await,
    ];
    // And one whose control plane sends it a configuration it cannot apply: a test control plane
    // speaking the same protocol, which can publish what the controller never would.
    let rogue_control_plane = ControlPlane::start().await;
    let reviews = destination(NAMESPACE, SERVICE, 9080, &[(stable_0.addr, &[])]);
    rogue_control_plane.publish(DESTINATION_KEY, reviews.clone());
    let misconfigured = start_proxy(&rogue_control_plane.url(), "ratings-0", stable_0.addr).await;
    assert_eq!(
        burst(misconfigured.outbound, 1, "/", false).await,
        [200],
        "the misconfigured proxy's first configuration works"
    );

    write_manifest(
        "productpage.yaml",
        &productpage_manifest(productpage[0].inbound.port()),
    );
    for proxy in &productpage {
        assert_eq!(burst(proxy.outbound, 1, "/", false).await, [200]);
    }
    assert_eq!(
        sum_of(
            &scrape(controller_admin).await,
            "outrigger_controller_reconcile_errors_total",
            ""
        ),
        0.0,
        "the manifests are valid"
    );

    let proxy_admins: Vec<SocketAddr> = productpage
        .iter()
        .chain([&misconfigured])
        .map(|p| p.admin)
        .collect();
    let mut prometheus = Prometheus::start(
        &Prometheus::debian(),
        &static_scrape_configs(&[
            ("outrigger-proxy", proxy_admins.clone()),
            ("outrigger-controller", vec![controller_admin]),
        ]),
    );
    prometheus.ready().await;
    let deadline = Deadline::new("prometheus to scrape every proxy and the controller");
    while prometheus.targets_up().await < proxy_admins.len() + 1 {
        deadline.tick().await;
    }
    eprintln!("mesh and prometheus up after {:?}", started.elapsed());

    // Load. Each phase drives traffic until its effect shows in the proxies' own metrics, so that
    // a slow machine takes longer rather than failing.
    let load_start = unix_now();
    let (stop_load, load_stopped) = watch::channel(false);
    let steady: Vec<_> = productpage
        .iter()
        .map(|p| steady_load(p.outbound, load_stopped.clone()))
        .collect();
    let (caller, caller_admin) = (productpage[0].outbound, productpage[0].admin);
    let caller_metric = move |sample: &'static str, labels: &'static str| async move {
        sum_of(&scrape(caller_admin).await, sample, labels)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A stable pod fails: retried elsewhere, then ejected; probation and recovery follow.
    stable_1.set(Behaviour::Status(503));
    let deadline = Deadline::new("stable-1 to be ejected");
    while caller_metric("outrigger_outlier_ejections_total", "").await < 1.0 {
        burst(caller, 20, "/", false).await;
        deadline.tick().await;
    }
    stable_1.set(Behaviour::Answer);

    // The canary is rolled out further: a policy change pushed to every proxy.
    let pushes =
        |exposition: String| sum_of(&exposition, "outrigger_controller_push_seconds_count", "");
    let pushed_before = pushes(scrape(controller_admin).await);
    write_manifest("reviews-policy.yaml", &policy_manifest(50));
    let deadline = Deadline::new("the 50% canary to be acknowledged by both callers");
    while pushes(scrape(controller_admin).await) < pushed_before + productpage.len() as f64 {
        deadline.tick().await;
    }

    // The canary turns slow: attempts time out (and are retried), /reports times out whole.
    canary_0.set(Behaviour::Delay(Duration::from_millis(500)));
    let deadline = Deadline::new("per-try and request timeouts");
    while caller_metric("outrigger_timeouts_total", r#"kind="per_try""#).await < 1.0
        || caller_metric("outrigger_timeouts_total", r#"kind="request""#).await < 1.0
    {
        tokio::join!(
            burst(caller, 5, "/", true),
            burst(caller, 5, "/reports", true)
        );
        deadline.tick().await;
    }
    canary_0.set(Behaviour::Answer);

    // Every pod fails at once: retries would double the load, and the budget stops them.
    for backend in [&stable_0, &stable_1, &canary_0] {
        backend.set(Behaviour::Status(503));
    }
    let deadline = Deadline::new("the retry budget to run out");
    while caller_metric("outrigger_retry_budget_exhausted_total", "").await < 1.0 {
        burst(caller, 50, "/", false).await;
        deadline.tick().await;
    }
    for backend in [&stable_0, &stable_1, &canary_0] {
        backend.set(Behaviour::Answer);
    }

    // A burst over the rate limit.
    let deadline = Deadline::new("requests over the rate limit to be refused");
    while caller_metric("outrigger_rate_limited_total", "").await < 1.0 {
        burst(caller, 200, "/", false).await;
        deadline.tick().await;
    }

    // Someone saves a broken manifest: the controller reports it and keeps the last good state.
    write_manifest(
        "typo.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [not, a, map]\n",
    );
    let deadline = Deadline::new("the broken manifest to count as a reconcile error");
    while sum_of(
        &scrape(controller_admin).await,
        "outrigger_controller_reconcile_errors_total",
        "",
    ) < 1.0
    {
        deadline.tick().await;
    }

    // Callers productpage's AuthorizationPolicy does not allow: 403 from its inbound side.
    let deadline = Deadline::new("productpage-0 to deny callers its policy does not allow");
    while caller_metric("outrigger_authz_decisions_total", r#"decision="deny""#).await < 20.0 {
        let statuses = burst(productpage[0].inbound, 5, "/", false).await;
        assert!(
            statuses.iter().all(|status| [0, 200, 403].contains(status)),
            "{statuses:?}"
        );
        deadline.tick().await;
    }

    // A configuration the misconfigured proxy cannot apply: an endpoint in an undeclared subset.
    let mut unusable = reviews;
    unusable.endpoints[0].subsets = vec!["undeclared".into()];
    rogue_control_plane.publish(DESTINATION_KEY, unusable);
    let deadline = Deadline::new("the misconfigured proxy to reject its configuration");
    while sum_of(
        &scrape(misconfigured.admin).await,
        "outrigger_config_updates_total",
        r#"result="rejected""#,
    ) < 1.0
    {
        deadline.tick().await;
    }

    // Healthy traffic again for a few scrapes, then the load stops.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let load_end = unix_now();
    stop_load.send_replace(true);
    let mut steady_requests = 0;
    for load in steady {
        steady_requests += load.await.unwrap();
    }
    eprintln!(
        "load: {:.1}s, {steady_requests} steady requests besides the phases' bursts",
        load_end - load_start
    );

    // What the binaries expose, straight from their admin endpoints.
    let mut exposed_samples = BTreeSet::new();
    let mut exposed_families = BTreeSet::new();
    for admin in proxy_admins.iter().chain([&controller_admin]) {
        let (samples, families) = exposed_names(&scrape(*admin).await);
        exposed_samples.extend(samples);
        exposed_families.extend(families);
    }

    let deadline = Deadline::new("prometheus to scrape past the end of the load");
    while prometheus.last_scraped().await < load_end + 1.0 {
        deadline.tick().await;
    }

    // Every metric the panels read is one the binaries expose.
    let mut problems = Vec::new();
    let mut used_families = BTreeSet::new();
    for target in dashboards.iter().flat_map(Dashboard::targets) {
        for name in metric_names(&target.expr) {
            match family_of(&name, &exposed_families) {
                Some(family) if exposed_samples.contains(&name) => {
                    used_families.insert(family.to_string());
                }
                _ => problems.push(format!(
                    "{}: {name} is not a metric the binaries expose",
                    target.name
                )),
            }
        }
    }
    // Every panel, as Grafana would run it over the load's time range.
    let queries = query_every_panel(
        &dashboards,
        &prometheus,
        NAMESPACE,
        SERVICE,
        load_start,
        load_end,
    )
    .await;
    problems.extend(queries.problems);
    let queries_run = queries.queries_run;
    let unused: Vec<&String> = exposed_families.difference(&used_families).collect();
    if !unused.is_empty() {
        problems.push(format!("exposed but on no dashboard: {unused:?}"));
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}\n\nprometheus log:\n{}",
        problems.len(),
        problems.join("\n"),
        prometheus.log()
    );
    eprintln!(
        "{queries_run} dashboard queries answered with data; {} metric families, all on a \
         dashboard; {:?} in all",
        exposed_families.len(),
        started.elapsed()
    );
    drop(prometheus);
}
