//! The Helm chart as `helm` sees it: lint, rendering, the values schema refusing bad values, and
//! what it grants and configures. (Installing it into a real API server is in cluster_chart.rs.)

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use serde_json::Value;

fn chart() -> PathBuf {
    outrigger_tests::workspace().join("charts/outrigger")
}

fn helm(args: &[&str]) -> std::process::Output {
    let binaries = outrigger_cluster::Binaries::ensure_built().expect("helm is built");
    Command::new(binaries.helm())
        .args(args)
        .output()
        .expect("run helm")
}

/// The documents `helm template` renders with these `--set` values.
fn render(sets: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "outrigger",
        chart.to_str().unwrap(),
        "-n",
        "outrigger-system",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let output = helm(&args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    text.split("\n---")
        .filter_map(|doc| serde_norway::from_str::<Value>(doc).ok())
        .filter(|doc| doc.is_object())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn secret<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    find(docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Secret {name}"))
}

/// The mounted files of a rendered Secret, base64 as Kubernetes decodes it.
fn write_secret(secret: &Value, dir: &std::path::Path) {
    for (file, value) in secret["data"].as_object().unwrap() {
        let output = Command::new("base64")
            .args(["-d"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(value.as_str().unwrap().as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(output.status.success(), "decoding {file}");
        std::fs::write(dir.join(file), output.stdout).unwrap();
    }
}

#[test]
fn the_generated_certificate_authority_is_one_the_controller_loads_and_mounts() {
    let docs = render(&[]);
    let dir = tempfile::tempdir().unwrap();
    write_secret(secret(&docs, "outrigger-controller-identity"), dir.path());
    outrigger_controller::IdentityAuthority::load(dir.path())
        .expect("the controller loads the chart's certificate authority");
    let deployment = find(&docs, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "identity")
        .unwrap();
    assert_eq!(
        volume["secret"]["secretName"],
        "outrigger-controller-identity"
    );
    let args = pod["containers"][0]["args"].as_array().unwrap();
    assert!(args.contains(&Value::from("--identity-dir=/etc/outrigger/identity")));
    assert!(args.contains(&Value::from("--trust-domain=cluster.local")));
    let injector = find(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "outrigger-controller-injector")
        .unwrap();
    let injector: outrigger_controller::InjectorConfig =
        serde_norway::from_str(injector["data"]["injector.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(
        injector
            .identity
            .map(|identity| identity.trust_domain)
            .as_deref(),
        Some("cluster.local")
    );

    // The user's own Secret instead: nothing generated, that one mounted.
    let docs = render(&[
        "identity.issuerSecret=mesh-issuer",
        "identity.trustDomain=example.org",
    ]);
    assert_eq!(find(&docs, "Secret").len(), 1, "the webhook's alone");
    let pod = &find(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "mesh-issuer")
    );
    assert!(
        pod["containers"][0]["args"]
            .as_array()
            .unwrap()
            .contains(&Value::from("--trust-domain=example.org"))
    );

    // Identity off: no Secret, no flag, no permission to review tokens.
    let docs = render(&["identity.enabled=false"]);
    assert_eq!(find(&docs, "Secret").len(), 1);
    let args = &find(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(!args.to_string().contains("identity"));
    assert!(
        !find(&docs, "ClusterRole")[0]["rules"]
            .to_string()
            .contains("tokenreviews")
    );
}

#[test]
fn lint_is_clean() {
    let chart = chart();
    let output = helm(&["lint", "--strict", chart.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn bad_values_are_refused_naming_the_value() {
    let chart = chart();
    for (set, named) in [
        ("controller.replicas=0", "/controller/replicas"),
        (
            "injector.failurePolicy=Sometimes",
            "/injector/failurePolicy",
        ),
        ("controller.grpcPort=70000", "/controller/grpcPort"),
        ("proxy.uid=-1", "/proxy/uid"),
        ("image.pullPolicy=Often", "/image/pullPolicy"),
        ("injector.timeoutSeconds=300", "/injector/timeoutSeconds"),
        (
            "proxy.skipOutboundCIDRs[0]=nowhere",
            "/proxy/skipOutboundCIDRs/0",
        ),
        ("controller.replica=2", "replica"),
        (
            "identity.trustDomain=Cluster_Local",
            "/identity/trustDomain",
        ),
    ] {
        let output = helm(&[
            "template",
            "outrigger",
            chart.to_str().unwrap(),
            "--set",
            set,
        ]);
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{set} was accepted");
        assert!(error.contains(named), "{set}: {error}");
    }
}

#[test]
fn it_installs_the_crds_the_controller_and_the_webhook() {
    let docs = render(&[]);
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "MutatingWebhookConfiguration",
    ] {
        assert_eq!(find(&docs, kind).len(), 1, "{kind}");
    }
    // The webhook's certificate, and the mesh's certificate authority.
    assert_eq!(find(&docs, "Secret").len(), 2);
    let dashboards = find(&docs, "ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .count();
    assert_eq!(dashboards, 3);
    // CRDs come from the chart's crds/ (kept on uninstall): the generated files themselves.
    let crd = std::fs::read_to_string(chart().join("crds/destinationpolicies.outrigger.dev.yaml"))
        .unwrap();
    assert!(crd.contains("kind: CustomResourceDefinition"));
    assert_eq!(
        find(&docs, "PodDisruptionBudget").len(),
        0,
        "no PDB for one replica"
    );
}

#[test]
fn several_replicas_get_a_disruption_budget_and_spread() {
    let docs = render(&["controller.replicas=3"]);
    assert_eq!(
        find(&docs, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"],
        1
    );
    let deployment = find(&docs, "Deployment")[0];
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert!(deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"].is_object());
}

#[test]
fn the_controller_gets_least_privilege() {
    let docs = render(&[]);
    let rules = |kind: &str| -> Vec<(String, String, Vec<String>)> {
        let mut rules: Vec<_> = find(&docs, kind)[0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| {
                let verbs: Vec<String> = rule["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect();
                let groups = rule["apiGroups"].as_array().unwrap().clone();
                rule["resources"]
                    .as_array()
                    .unwrap()
                    .clone()
                    .into_iter()
                    .flat_map(move |resource| {
                        let verbs = verbs.clone();
                        groups.clone().into_iter().map(move |group| {
                            (
                                group.as_str().unwrap().to_string(),
                                resource.as_str().unwrap().to_string(),
                                verbs.clone(),
                            )
                        })
                    })
            })
            .collect();
        rules.sort();
        rules
    };
    let read = || vec!["get".to_string(), "list".into(), "watch".into()];
    assert_eq!(
        rules("ClusterRole"),
        vec![
            // The injector reads a pod's namespace for its mTLS setting.
            ("".into(), "namespaces".into(), vec!["get".to_string()]),
            ("".into(), "pods".into(), read()),
            ("".into(), "services".into(), read()),
            (
                "authentication.k8s.io".into(),
                "tokenreviews".into(),
                vec!["create".into()]
            ),
            ("discovery.k8s.io".into(), "endpointslices".into(), read()),
            (
                "gateway.networking.k8s.io".into(),
                "grpcroutes".into(),
                read()
            ),
            (
                "gateway.networking.k8s.io".into(),
                "grpcroutes/status".into(),
                vec!["patch".into()]
            ),
            (
                "gateway.networking.k8s.io".into(),
                "httproutes".into(),
                read()
            ),
            (
                "gateway.networking.k8s.io".into(),
                "httproutes/status".into(),
                vec!["patch".into()]
            ),
            (
                "outrigger.dev".into(),
                "authorizationpolicies".into(),
                read()
            ),
            (
                "outrigger.dev".into(),
                "authorizationpolicies/status".into(),
                vec!["patch".into()]
            ),
            ("outrigger.dev".into(), "destinationpolicies".into(), read()),
            (
                "outrigger.dev".into(),
                "destinationpolicies/status".into(),
                vec!["patch".into()]
            ),
        ]
    );
    assert_eq!(
        rules("Role"),
        vec![(
            "coordination.k8s.io".into(),
            "leases".into(),
            vec!["get".into(), "create".into(), "update".into()]
        )]
    );
}

#[derive(Parser)]
struct ControllerCli {
    #[command(flatten)]
    settings: outrigger_controller::Settings,
}

#[test]
fn the_deployment_passes_flags_the_controller_accepts() {
    let docs = render(&[]);
    let container = &find(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let parsed = ControllerCli::try_parse_from(
        std::iter::once("outrigger-controller").chain(args.iter().copied()),
    );
    assert!(parsed.is_ok(), "{args:?}: {}", parsed.err().unwrap());
    // Probes and ports point at what the controller serves.
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/live");
    let ports: Vec<i64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [8090, 9990, 9443]);
}

#[tokio::test]
async fn the_webhook_certificate_is_for_the_controller_service_and_trusted_by_the_webhook() {
    let docs = render(&[]);
    let secret = secret(&docs, "outrigger-controller-webhook-tls");
    let webhooks = find(&docs, "MutatingWebhookConfiguration")[0]["webhooks"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(webhooks.len(), 2);
    for webhook in &webhooks {
        assert_eq!(
            webhook["clientConfig"]["caBundle"],
            secret["data"]["ca.crt"]
        );
        assert_eq!(
            webhook["clientConfig"]["service"]["name"],
            "outrigger-controller"
        );
    }
    let paths: Vec<&str> = webhooks
        .iter()
        .map(|w| w["clientConfig"]["service"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            outrigger_controller::INJECT_NAMESPACED_PATH,
            outrigger_controller::INJECT_POD_PATH
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let decode = |field: &str, file: &str| {
        let path = dir.path().join(file);
        let output = Command::new("base64")
            .args(["-d"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(secret["data"][field].as_str().unwrap().as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        std::fs::write(&path, output.stdout).unwrap();
        path
    };
    let (cert, ca) = (decode("tls.crt", "tls.crt"), decode("ca.crt", "ca.crt"));
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            ca.to_str().unwrap(),
            cert.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let names = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            cert.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&names.stdout);
    assert!(
        names.contains("DNS:outrigger-controller.outrigger-system.svc"),
        "{names}"
    );
    // And the controller can serve with it.
    let key = decode("tls.key", "tls.key");
    let injector = find(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "outrigger-controller-injector")
        .unwrap()["data"]["injector.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let config: outrigger_controller::InjectorConfig = serde_norway::from_str(&injector).unwrap();
    assert_eq!(
        config.control_plane,
        "http://outrigger-controller.outrigger-system.svc:8090"
    );
    assert_eq!(config.proxy_image, "ghcr.io/outrigger-dev/proxy:0.1.0");
    let _ = key;
}
