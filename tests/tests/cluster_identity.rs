//! Workload identity end to end against a real API server (etcd and kube-apiserver on loopback):
//! a real controller with `--identity-dir` and real proxies, started from their flags, each with
//! a ServiceAccount token in a file as the kubelet projects it. A proxy whose token is for the
//! audience `outrigger` gets its certificate and only then is ready; one whose token is for
//! another audience stays unready, its failures counted and retried.
//!
//! Needs the cluster binaries (`cargo xtask cluster build`, or built on first use) and `openssl`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outrigger_cluster::Cluster;
use outrigger_tests::dashboards::http_get;
use outrigger_tests::identity::write_authority;
use outrigger_tests::live;

const NAMESPACE: &str = "shop";
const ACCOUNT: &str = "reviews";
const PATIENCE: Duration = Duration::from_secs(60);

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    cluster
        .kubectl(args)
        .unwrap_or_else(|error| panic!("kubectl {args:?}: {error}"))
}

/// A proxy of `reviews` whose token (for `audience`) is in a file of `dir`.
async fn proxy(
    cluster: &Cluster,
    control_plane: &str,
    dir: &Path,
    audience: &str,
) -> live::LiveProxy {
    let token = kubectl(
        cluster,
        &[
            "create",
            "token",
            ACCOUNT,
            "-n",
            NAMESPACE,
            "--audience",
            audience,
        ],
    );
    let file = dir.join(format!("token-{audience}"));
    std::fs::write(&file, token).unwrap();
    let file = file.to_str().unwrap().to_string();
    // The app is never called here.
    let app: SocketAddr = "127.0.0.1:1".parse().unwrap();
    live::start_proxy(
        control_plane,
        app,
        &[
            "--namespace",
            NAMESPACE,
            "--service-account",
            ACCOUNT,
            "--identity-token-file",
            &file,
        ],
    )
    .await
}

/// The value of the sample `name` (with its labels, as exposed) at `/metrics`.
async fn sample(admin: SocketAddr, name: &str) -> Option<f64> {
    let (_, metrics) = http_get(admin, "admin", "/metrics").await.ok()?;
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_ready_once_certified_for_its_service_account_and_not_with_another_audience() {
    let cluster = Cluster::start().expect("starting the test cluster");
    let crds = outrigger_tests::workspace().join("crds");
    kubectl(&cluster, &["apply", "-f", crds.to_str().unwrap()]);
    kubectl(&cluster, &["create", "namespace", NAMESPACE]);
    kubectl(
        &cluster,
        &["create", "serviceaccount", ACCOUNT, "-n", NAMESPACE],
    );

    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("identity");
    std::fs::create_dir(&secret).unwrap();
    write_authority(&secret);
    let controller = live::start_controller_with(&[
        "--kubeconfig",
        cluster.kubeconfig().to_str().unwrap(),
        "--leader-namespace",
        "default",
        "--identity-dir",
        secret.to_str().unwrap(),
    ])
    .await;
    let url = controller.url.clone();

    let certified = proxy(&cluster, &url, dir.path(), "outrigger").await;
    let refused = proxy(&cluster, &url, dir.path(), "someone-else").await;

    let until = Instant::now() + PATIENCE;
    loop {
        match http_get(certified.admin, "admin", "/ready").await {
            Ok((200, _)) => break,
            answer => assert!(
                Instant::now() < until,
                "the proxy was not ready within {PATIENCE:?}: {answer:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let success = r#"outrigger_identity_renewals_total{result="success"}"#;
    let failure = r#"outrigger_identity_renewals_total{result="failure"}"#;
    assert_eq!(sample(certified.admin, success).await, Some(1.0));
    assert_eq!(sample(certified.admin, failure).await, Some(0.0));
    let expiry = sample(
        certified.admin,
        "outrigger_identity_cert_expiry_timestamp_seconds",
    )
    .await
    .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let day = 24.0 * 3600.0;
    assert!(
        (now + day - 600.0..=now + day).contains(&expiry),
        "a certificate for a day: expires at {expiry}, now {now}"
    );

    // Refused, counted, and asked again with backoff (1 s, then 2 s).
    let until = Instant::now() + PATIENCE;
    while sample(refused.admin, failure).await.unwrap_or(0.0) < 2.0 {
        assert!(
            Instant::now() < until,
            "no second failure within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sample(refused.admin, success).await, Some(0.0));
    let (status, body) = http_get(refused.admin, "admin", "/ready").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("certificate"), "{body}");
}
