//! AuthorizationPolicy end to end: a real controller (the certificate authority) against a real
//! API server (etcd and kube-apiserver on loopback), and real proxies certified with
//! ServiceAccount tokens. The API server refuses invalid policies naming the field; `kubectl get
//! azp` shows the policy with its status; the reviews pod's proxy lets productpage through and
//! answers ratings 403, both callers proving who they are over mutual TLS.
//!
//! EndpointSlices refuse loopback addresses, so the server proxy and the app listen on this
//! machine's own address. Needs the cluster binaries (built on first use) and `openssl`.

use std::net::SocketAddr;
use std::time::Duration;

use outrigger_cluster::Cluster;
use outrigger_tests::Backend;
use outrigger_tests::dashboards::{http_get, series_sum};
use outrigger_tests::e2e::{eventually_within, get};
use outrigger_tests::identity::{
    meshed_service, start_certified_proxy, start_certifying_controller,
};
use outrigger_tests::process::host_address;

const NAMESPACE: &str = "shop";
const PATIENCE: Duration = Duration::from_secs(60);

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    cluster
        .kubectl(args)
        .unwrap_or_else(|error| panic!("kubectl {args:?}: {error}"))
}

/// `kubectl apply -f -` of `manifest`: its stderr when refused, None when applied.
fn refusal(cluster: &Cluster, manifest: &str) -> Option<String> {
    let output = cluster
        .kubectl_with_input(&["apply", "-f", "-"], manifest)
        .expect("running kubectl");
    (!output.status.success()).then(|| String::from_utf8_lossy(&output.stderr).into_owned())
}

fn authorization_policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: outrigger.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n{spec}"
    )
}

/// `jsonpath` of the policy `name`, as kubectl prints it.
fn field(cluster: &Cluster, name: &str, jsonpath: &str) -> String {
    kubectl(
        cluster,
        &[
            "get",
            "azp",
            name,
            "-n",
            NAMESPACE,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_policy_lets_one_service_account_through_and_refuses_another() {
    let cluster = Cluster::start().expect("starting the test cluster");
    kubectl(&cluster, &["create", "namespace", NAMESPACE]);
    for account in ["productpage", "reviews", "ratings"] {
        kubectl(
            &cluster,
            &["create", "serviceaccount", account, "-n", NAMESPACE],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let crds = outrigger_tests::workspace().join("crds");
    kubectl(&cluster, &["apply", "-f", crds.to_str().unwrap()]);

    // The API server refuses what the schema and CEL rules do, naming the field.
    let target = "  targetRefs: [{kind: Service, name: reviews}]\n";
    for (name, spec, field) in [
        (
            "no-targets",
            "  targetRefs: []\n".to_string(),
            "spec.targetRefs",
        ),
        (
            "other-kind",
            "  targetRefs: [{kind: Pod, name: reviews}]\n".into(),
            "spec.targetRefs[0].kind",
        ),
        (
            "bad-action",
            format!("{target}  action: PERMIT\n"),
            "spec.action",
        ),
        (
            "empty-source",
            format!("{target}  rules: [{{from: [{{}}]}}]\n"),
            "spec.rules[0].from[0]",
        ),
        (
            "bad-account",
            format!("{target}  rules: [{{from: [{{serviceAccounts: [productpage]}}]}}]\n"),
            "spec.rules[0].from[0].serviceAccounts[0]",
        ),
        (
            "port-zero",
            format!("{target}  rules: [{{to: [{{ports: [0]}}]}}]\n"),
            "spec.rules[0].to[0].ports[0]",
        ),
        (
            "two-paths",
            format!("{target}  rules: [{{to: [{{paths: [{{exact: /a, prefix: /b}}]}}]}}]\n"),
            "spec.rules[0].to[0].paths[0]",
        ),
    ] {
        let refused = refusal(&cluster, &authorization_policy(name, &spec));
        assert!(
            refused
                .as_deref()
                .is_some_and(|stderr| stderr.contains(field)),
            "{name}: expected a refusal naming {field}, got {refused:?}"
        );
    }

    let controller = start_certifying_controller(cluster.kubeconfig(), dir.path(), &[]).await;
    let host = host_address();
    let app = Backend::start_on(SocketAddr::new(host, 0), "reviews-app").await;
    let inbound = format!("{host}:0");
    let server = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "reviews", "reviews-0"),
        app.addr,
        &["--inbound-addr", &inbound],
    )
    .await;
    let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let allowed = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "productpage", "productpage-0"),
        unused,
        &[],
    )
    .await;
    let refused = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "ratings", "ratings-0"),
        unused,
        &[],
    )
    .await;

    let file = dir.path().join("reviews.yaml");
    let readers = authorization_policy(
        "reviews-readers",
        &format!("{target}  rules: [{{from: [{{serviceAccounts: [shop/productpage]}}]}}]\n"),
    );
    std::fs::write(
        &file,
        format!(
            "{}---\n{readers}",
            meshed_service(NAMESPACE, "reviews", server.inbound, "reviews")
        ),
    )
    .unwrap();
    kubectl(&cluster, &["apply", "-f", file.to_str().unwrap()]);

    eventually_within(PATIENCE, "ratings is refused by the policy", || async {
        get(refused.outbound, "reviews.shop:9080", "/")
            .await
            .map(|(s, _)| s)
            == Some(403)
    })
    .await;
    let (status, body) = get(refused.outbound, "reviews.shop:9080", "/")
        .await
        .unwrap();
    assert_eq!(status, 403);
    assert!(
        body.contains("denied by AuthorizationPolicy shop/reviews-readers"),
        "{body}"
    );
    let (status, body) = get(allowed.outbound, "reviews.shop:9080", "/")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "reviews-app"));
    let metrics = http_get(server.admin, "admin", "/metrics").await.unwrap().1;
    for decision in ["allow", "deny"] {
        let counted = series_sum(
            &metrics,
            "outrigger_authz_decisions_total",
            &format!(r#"policy="shop/reviews-readers",decision="{decision}""#),
        );
        assert!(counted >= Some(1.0), "{decision}: {metrics}");
    }
    // Outside the mesh, no identity: refused too.
    assert_eq!(
        get(server.inbound, "reviews", "/").await.map(|(s, _)| s),
        Some(403)
    );

    // Status: accepted, its Service found, for the generation applied.
    eventually_within(PATIENCE, "the policy's status says Accepted", || async {
        field(
            &cluster,
            "reviews-readers",
            r#"{.status.conditions[?(@.type=="Accepted")].status}"#,
        ) == "True"
    })
    .await;
    assert_eq!(
        field(&cluster, "reviews-readers", "{.status.observedGeneration}"),
        "1"
    );
    assert_eq!(
        field(
            &cluster,
            "reviews-readers",
            r#"{.status.conditions[?(@.type=="ResolvedRefs")].status}"#
        ),
        "True"
    );
    let missing = authorization_policy(
        "ghost-readers",
        "  targetRefs: [{kind: Service, name: ghost}]\n",
    );
    assert_eq!(refusal(&cluster, &missing), None);
    eventually_within(
        PATIENCE,
        "a policy for a missing Service says so",
        || async {
            field(
                &cluster,
                "ghost-readers",
                r#"{.status.conditions[?(@.type=="ResolvedRefs")].reason}"#,
            ) == "ServiceNotFound"
        },
    )
    .await;
    let table = kubectl(&cluster, &["get", "azp", "-n", NAMESPACE]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "TARGETS", "ACTION", "MODE", "ACCEPTED", "AGE"],
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|line| line.split_whitespace().take(5).eq([
                "reviews-readers",
                "reviews",
                "ALLOW",
                "Enforce",
                "True"
            ])),
        "{table}"
    );
}
