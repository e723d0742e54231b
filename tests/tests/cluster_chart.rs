//! The Helm chart and the sidecar injector against a real kube-apiserver: the chart installs,
//! upgrades and uninstalls (keeping the CRDs), and a Pod that opts in (in a labelled namespace, or
//! labelled itself) is stored with the proxy injected by the controller's webhook, while no other
//! pod is sent to it.

use std::path::{Path, PathBuf};
use std::process::Command;

use outrigger_cluster::Cluster;
use serde_json::Value;

fn chart() -> PathBuf {
    outrigger_tests::workspace().join("charts/outrigger")
}

fn helm(cluster: &Cluster, args: &[&str]) -> String {
    let output = cluster
        .helm_command()
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        output.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json(cluster: &Cluster, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    serde_json::from_str(&cluster.kubectl(&args).expect("kubectl get")).unwrap()
}

#[test]
fn the_chart_installs_upgrades_and_uninstalls_keeping_the_crds() {
    let cluster = Cluster::start().expect("start the test cluster");
    let chart = chart();
    let chart = chart.to_str().unwrap();
    helm(
        &cluster,
        &[
            "install",
            "outrigger",
            chart,
            "-n",
            "outrigger-system",
            "--create-namespace",
        ],
    );
    json(
        &cluster,
        &["get", "crd", "destinationpolicies.outrigger.dev"],
    );
    let deployment = json(
        &cluster,
        &[
            "get",
            "deployment",
            "outrigger-controller",
            "-n",
            "outrigger-system",
        ],
    );
    assert_eq!(deployment["spec"]["replicas"], 1);
    json(
        &cluster,
        &[
            "get",
            "mutatingwebhookconfiguration",
            "outrigger-controller-injector",
        ],
    );
    let dashboards = json(
        &cluster,
        &[
            "get",
            "configmap",
            "-n",
            "outrigger-system",
            "-l",
            "grafana_dashboard=1",
        ],
    );
    assert_eq!(dashboards["items"].as_array().unwrap().len(), 3);
    let ca = json(
        &cluster,
        &[
            "get",
            "secret",
            "outrigger-controller-webhook-tls",
            "-n",
            "outrigger-system",
        ],
    )["data"]["ca.crt"]
        .clone();
    let identity = || {
        json(
            &cluster,
            &[
                "get",
                "secret",
                "outrigger-controller-identity",
                "-n",
                "outrigger-system",
            ],
        )["data"]
            .clone()
    };
    let anchor = identity();
    assert!(anchor["tls.key"].is_string(), "{anchor}");

    helm(
        &cluster,
        &[
            "upgrade",
            "outrigger",
            chart,
            "-n",
            "outrigger-system",
            "--set",
            "controller.replicas=2",
        ],
    );
    let deployment = json(
        &cluster,
        &[
            "get",
            "deployment",
            "outrigger-controller",
            "-n",
            "outrigger-system",
        ],
    );
    assert_eq!(deployment["spec"]["replicas"], 2);
    json(
        &cluster,
        &[
            "get",
            "poddisruptionbudget",
            "outrigger-controller",
            "-n",
            "outrigger-system",
        ],
    );
    let kept = json(
        &cluster,
        &[
            "get",
            "secret",
            "outrigger-controller-webhook-tls",
            "-n",
            "outrigger-system",
        ],
    )["data"]["ca.crt"]
        .clone();
    assert_eq!(kept, ca, "an upgrade keeps the webhook certificate");
    assert_eq!(
        identity(),
        anchor,
        "an upgrade keeps the trust anchor and issuer: workload certificates stay trusted"
    );

    helm(
        &cluster,
        &["uninstall", "outrigger", "-n", "outrigger-system"],
    );
    let gone = cluster.kubectl(&[
        "get",
        "deployment",
        "outrigger-controller",
        "-n",
        "outrigger-system",
    ]);
    assert!(gone.is_err(), "the controller is uninstalled");
    json(
        &cluster,
        &["get", "crd", "destinationpolicies.outrigger.dev"],
    );
}

/// A CA and a serving certificate for 127.0.0.1, made with openssl like the chart makes its own.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, String) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "tls.crt",
    ]);
    let ca = Command::new("base64")
        .args(["-w0", dir.join("ca.crt").to_str().unwrap()])
        .output()
        .unwrap()
        .stdout;
    (
        dir.join("tls.crt"),
        dir.join("tls.key"),
        String::from_utf8(ca).unwrap(),
    )
}

fn init_container_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .map(|containers| {
            containers
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_pods_that_opt_in_are_sent_to_the_injector_and_stored_meshed() {
    let cluster = Cluster::start().expect("start the test cluster");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = certificates(dir.path());
    // The injector configuration the chart renders.
    let injector = dir.path().join("injector.yaml");
    std::fs::write(
        &injector,
        "proxyImage: ghcr.io/outrigger-dev/proxy:0.1.0\ninitImage: ghcr.io/outrigger-dev/proxy-init:0.1.0\n\
         controlPlane: http://outrigger-controller.outrigger-system.svc:8090\n",
    )
    .unwrap();
    // The controller serves the webhook (reading namespaces with the API), until the test ends.
    let webhook = outrigger_tests::process::free_port().unwrap();
    let _controller = outrigger_tests::live::start_controller_with(&[
        "--kubeconfig",
        cluster.kubeconfig().to_str().unwrap(),
        "--leader-namespace",
        "default",
        "--webhook-addr",
        &webhook.to_string(),
        "--webhook-cert",
        cert.to_str().unwrap(),
        "--webhook-key",
        key.to_str().unwrap(),
        "--injector-config",
        injector.to_str().unwrap(),
    ])
    .await;
    let port = webhook.port();

    for namespace in ["meshed", "plain", "strict"] {
        cluster
            .kubectl(&["create", "namespace", namespace])
            .unwrap();
        // No kube-controller-manager here to make it, and pods need their service account.
        cluster
            .kubectl(&["create", "serviceaccount", "default", "-n", namespace])
            .unwrap();
    }
    for namespace in ["meshed", "strict"] {
        cluster
            .kubectl(&[
                "label",
                "namespace",
                namespace,
                "outrigger.dev/inject=enabled",
            ])
            .unwrap();
    }
    cluster
        .kubectl(&[
            "annotate",
            "namespace",
            "strict",
            "outrigger.dev/mtls=strict",
        ])
        .unwrap();
    let pod = |namespace: &str, name: &str, metadata: &str| {
        let manifest = format!(
            r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}", "namespace": "{namespace}"{metadata}}},
  "spec": {{"initContainers": [{{"name": "migrate", "image": "migrate"}}], "containers": [{{"name": "app", "image": "app"}}]}}}}"#
        );
        let created = cluster
            .kubectl_with_input(&["create", "-f", "-"], &manifest)
            .unwrap();
        assert!(
            created.status.success(),
            "creating pod {namespace}/{name}: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        json(&cluster, &["get", "pod", name, "-n", namespace])
    };
    let label = |value: &str| format!(r#", "labels": {{"outrigger.dev/inject": "{value}"}}"#);
    let annotation =
        |value: &str| format!(r#", "annotations": {{"outrigger.dev/inject": "{value}"}}"#);

    // The chart's webhooks, failing closed, first at an address where nothing answers: a pod
    // that is sent to them cannot be created, so those that are created were never sent.
    let closed = outrigger_tests::process::free_port().unwrap().port();
    register_chart_webhooks(&cluster, &ca, closed);
    for (namespace, name, metadata) in [
        ("plain", "unmeshed", String::new()),
        ("plain", "annotated-only", annotation("enabled")),
        ("meshed", "labelled-out", label("disabled")),
    ] {
        assert_eq!(
            init_container_names(&pod(namespace, name, &metadata)),
            ["migrate"]
        );
    }

    // Reached, they inject the pods that opted in.
    register_chart_webhooks(&cluster, &ca, port);
    let meshed = pod("meshed", "web", "");
    assert_eq!(
        init_container_names(&meshed),
        ["outrigger-init", "outrigger-proxy", "migrate"]
    );
    let proxy = &meshed["spec"]["initContainers"][1];
    assert_eq!(
        proxy["restartPolicy"], "Always",
        "stored as a native sidecar"
    );
    assert_eq!(
        meshed["metadata"]["annotations"]["outrigger.dev/injected"],
        "true"
    );
    assert_eq!(
        init_container_names(&pod("meshed", "opted-out", &annotation("disabled"))),
        ["migrate"]
    );
    assert_eq!(
        init_container_names(&pod("plain", "untouched", "")),
        ["migrate"]
    );
    assert_eq!(
        init_container_names(&pod("plain", "opted-in", &label("enabled"))),
        ["outrigger-init", "outrigger-proxy", "migrate"]
    );

    // A strict namespace's pods get a proxy that refuses plaintext, but for a pod that says
    // otherwise; a namespace that says nothing leaves its pods permissive.
    let inbound_mtls = |pod: &Value| {
        pod["spec"]["initContainers"][1]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|env| env["name"] == "OUTRIGGER_INBOUND_MTLS")
            .map(|env| env["value"].as_str().unwrap().to_string())
    };
    assert_eq!(
        inbound_mtls(&pod("strict", "web", "")).as_deref(),
        Some("strict")
    );
    let permissive = r#", "annotations": {"outrigger.dev/mtls": "permissive"}"#;
    assert_eq!(inbound_mtls(&pod("strict", "permissive", permissive)), None);
    assert_eq!(inbound_mtls(&meshed), None);

    // A pod that already carries the proxy (a copy of an injected spec) gets it once.
    let mut copy = meshed.clone();
    copy["metadata"] = serde_json::json!({"name": "copy", "namespace": "meshed"});
    copy.as_object_mut().unwrap().remove("status");
    let created = cluster
        .kubectl_with_input(&["create", "-f", "-"], &copy.to_string())
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let copy = json(&cluster, &["get", "pod", "copy", "-n", "meshed"]);
    assert_eq!(
        init_container_names(&copy),
        ["outrigger-init", "outrigger-proxy", "migrate"]
    );
}

/// The chart's MutatingWebhookConfiguration, failing closed, its webhooks reached by URL on
/// `port` (this API server has no Service routing).
fn register_chart_webhooks(cluster: &Cluster, ca: &str, port: u16) {
    let output = cluster
        .helm_command()
        .args(["template", "outrigger"])
        .arg(chart())
        .args(["--namespace", "outrigger-system"])
        .args(["--show-only", "templates/webhook.yaml"])
        .args(["--set", "injector.failurePolicy=Fail"])
        .output()
        .expect("run helm");
    assert!(
        output.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = String::from_utf8(output.stdout).unwrap();
    let mut configuration = rendered
        .split("\n---\n")
        .map(|document| serde_norway::from_str::<Value>(document).expect("helm renders YAML"))
        .find(|document| document["kind"] == "MutatingWebhookConfiguration")
        .expect("the chart has a MutatingWebhookConfiguration");
    for webhook in configuration["webhooks"].as_array_mut().unwrap() {
        let path = webhook["clientConfig"]["service"]["path"].clone();
        webhook["clientConfig"] = serde_json::json!({
            "url": format!("https://127.0.0.1:{port}{}", path.as_str().unwrap()),
            "caBundle": ca,
        });
    }
    let applied = cluster
        .kubectl_with_input(&["apply", "-f", "-"], &configuration.to_string())
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
}
