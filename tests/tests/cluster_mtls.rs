//! Mutual TLS between proxies end to end: a real controller, the certificate authority, against a
//! real API server (etcd and kube-apiserver on loopback), and real proxies certified with
//! ServiceAccount tokens. `productpage`'s proxy calls `reviews` pods through their proxies: the
//! controller says which identity each endpoint has (from the pod's `outrigger.dev/identity`
//! annotation), the client proxy checks it, the server proxy records the caller, and a strict
//! server proxy refuses a plaintext caller that a permissive one serves. The trust anchor
//! rotates, in the documented three steps, under load and with a new handshake every request for
//! one caller, without a failed request (switching all at once leaves proxies unable to renew).
//!
//! EndpointSlices refuse loopback addresses, so the server proxies and the app listen on this
//! machine's own address. Needs the cluster binaries (built on first use) and `openssl`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use outrigger_cluster::Cluster;
use outrigger_tests::Backend;
use outrigger_tests::dashboards::{http_get, series_sum};
use outrigger_tests::e2e::{eventually_within, get};
use outrigger_tests::identity::{
    meshed_service, start_certified_proxy, start_certifying_controller, write_authority,
};
use outrigger_tests::live::LiveProxy;
use outrigger_tests::process::host_address;

const NAMESPACE: &str = "shop";
const PATIENCE: Duration = Duration::from_secs(60);

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    cluster
        .kubectl(args)
        .unwrap_or_else(|error| panic!("kubectl {args:?}: {error}"))
}

/// What a [`recording_relay`] saw: every byte it carried, both ways, and the connections it took.
#[derive(Clone, Default)]
struct Recorded {
    wire: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A TCP relay on `host` to `target` that keeps every byte it carries, both ways, and counts its
/// connections: what a capture of the wire between the two would show.
async fn recording_relay(host: std::net::IpAddr, target: SocketAddr) -> (SocketAddr, Recorded) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let recorded = Recorded::default();
    let relayed = recorded.clone();
    tokio::spawn(async move {
        while let Ok((caller, _)) = listener.accept().await {
            relayed
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (caller_read, caller_write) = caller.into_split();
            let (server_read, server_write) = server.into_split();
            for (mut from, mut to) in [(caller_read, server_write), (server_read, caller_write)] {
                let wire = relayed.wire.clone();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 16 * 1024];
                    while let Ok(read @ 1..) = from.read(&mut buffer).await {
                        wire.lock().unwrap().extend_from_slice(&buffer[..read]);
                        if to.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown().await;
                });
            }
        }
    });
    (addr, recorded)
}

async fn metrics(proxy: &LiveProxy) -> String {
    http_get(proxy.admin, "admin", "/metrics").await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_proxies_speak_mutual_tls_and_strict_ones_refuse_plaintext() {
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
    let controller = start_certifying_controller(cluster.kubeconfig(), dir.path(), &[]).await;

    let host = host_address();
    let app = Backend::start_on(SocketAddr::new(host, 0), "reviews-app").await;
    let inbound = format!("{host}:0");
    let permissive = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "reviews", "reviews-1"),
        app.addr,
        &["--inbound-addr", &inbound],
    )
    .await;
    let strict = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "reviews", "reviews-2"),
        app.addr,
        &["--inbound-addr", &inbound, "--inbound-mtls", "strict"],
    )
    .await;
    let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let client = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "productpage", "productpage-1"),
        unused,
        &[],
    )
    .await;

    // `impostor`'s pod claims to be `ratings`, but the proxy at its address is `reviews`.
    // `reviews` is reached through a relay that records the wire.
    let (relay, recorded) = recording_relay(host, permissive.inbound).await;
    let manifests = [
        meshed_service(NAMESPACE, "reviews", relay, "reviews"),
        meshed_service(NAMESPACE, "details", strict.inbound, "reviews"),
        meshed_service(NAMESPACE, "impostor", permissive.inbound, "ratings"),
    ]
    .join("---\n");
    let file = dir.path().join("services.yaml");
    std::fs::write(&file, manifests).unwrap();
    kubectl(&cluster, &["apply", "-f", file.to_str().unwrap()]);

    // Meshed to meshed: mutual TLS, each side naming the other.
    eventually_within(PATIENCE, "reviews answers productpage", || async {
        get(client.outbound, "reviews.shop:9080", "/")
            .await
            .map(|(s, _)| s)
            == Some(200)
    })
    .await;
    let inbound_mtls = series_sum(
        &metrics(&permissive).await,
        "outrigger_requests_total",
        r#"direction="inbound",dst_namespace="shop",dst_service="",dst_subset="",route="",tls="true",client_id="shop/productpage",server_id="""#,
    );
    assert!(inbound_mtls >= Some(1.0), "{}", metrics(&permissive).await);
    let outbound_mtls = series_sum(
        &metrics(&client).await,
        "outrigger_requests_total",
        r#"dst_service="reviews",dst_subset="",route="",tls="true",client_id="",server_id="shop/reviews",status_code="200""#,
    );
    assert!(outbound_mtls >= Some(1.0), "{}", metrics(&client).await);
    let accepted = series_sum(
        &metrics(&permissive).await,
        "outrigger_inbound_connections_total",
        r#"tls="true",result="accepted""#,
    );
    assert!(accepted >= Some(1.0));
    // On the wire, TLS records (a handshake first), and nothing of the HTTP inside: the request
    // line, its Host, the response. (The server name, `reviews.shop.serviceaccount...`, is in the
    // clear, as SNI is.)
    let wire = recorded.wire.lock().unwrap().clone();
    assert!(
        wire.starts_with(&[0x16, 0x03]),
        "not a TLS handshake: {:?}",
        &wire[..wire.len().min(16)]
    );
    let text = String::from_utf8_lossy(&wire);
    for clear in ["GET /", "HTTP/1.1", "reviews-app", "reviews.shop:9080"] {
        assert!(!text.contains(clear), "`{clear}` in clear on the wire");
    }

    http1_crosses_over_http2_to_the_app_as_it_was_sent(&client, &app, &recorded).await;

    // A strict server serves its meshed callers.
    let (status, body) = get(client.outbound, "details.shop:9080", "/")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // A server that is not who its endpoint says: the connection fails, and so the request.
    let (status, body) = get(client.outbound, "impostor.shop:9080", "/")
        .await
        .unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(
            "the server is spiffe://cluster.local/ns/shop/sa/reviews, not \
             spiffe://cluster.local/ns/shop/sa/ratings"
        ),
        "{body}"
    );
    // The server saw the handshake its caller gave up.
    let failed = series_sum(
        &metrics(&permissive).await,
        "outrigger_inbound_connections_total",
        r#"tls="true",result="failed""#,
    );
    assert!(failed >= Some(1.0), "{}", metrics(&permissive).await);

    // A caller outside the mesh: served in plaintext by the permissive proxy, refused by the
    // strict one.
    let (status, body) = get(permissive.inbound, "reviews", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "reviews-app"));
    let plaintext = series_sum(
        &metrics(&permissive).await,
        "outrigger_requests_total",
        r#"direction="inbound",dst_namespace="shop",dst_service="",dst_subset="",route="",tls="false",client_id="",server_id="""#,
    );
    assert!(plaintext >= Some(1.0), "{}", metrics(&permissive).await);
    assert_eq!(get(strict.inbound, "details", "/").await, None, "refused");
    let refused = series_sum(
        &metrics(&strict).await,
        "outrigger_inbound_connections_total",
        r#"tls="false",result="refused""#,
    );
    assert!(refused >= Some(1.0), "{}", metrics(&strict).await);
    let served_plain = series_sum(
        &metrics(&strict).await,
        "outrigger_requests_total",
        r#"tls="false""#,
    );
    assert_eq!(
        served_plain, None,
        "the strict proxy served no plaintext request"
    );
}

/// The client proxy sends its app's HTTP/1 calls to a meshed endpoint over HTTP/2: requests in
/// flight at once share one connection to the server proxy, which calls its app in HTTP/1.1 under
/// the name the caller used; an upgrade still crosses in HTTP/1 and becomes a tunnel.
async fn http1_crosses_over_http2_to_the_app_as_it_was_sent(
    client: &LiveProxy,
    app: &Backend,
    recorded: &Recorded,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let answer = outrigger_tests::e2e::request(
        client.outbound,
        "reviews.shop:9080",
        "/",
        &[("x-test-trace", "abc")],
    )
    .await
    .expect("an answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("x-seen-version"), "HTTP/1.1");
    assert_eq!(answer.header("x-seen-host"), "reviews.shop:9080");
    assert_eq!(answer.header("x-seen-trace"), "abc");

    let connections = recorded.connections.load(Ordering::SeqCst);
    app.set(outrigger_tests::Behaviour::Hold);
    let hits = app.hits();
    let calls: Vec<_> = (0..4)
        .map(|_| tokio::spawn(get(client.outbound, "reviews.shop:9080", "/")))
        .collect();
    eventually_within(PATIENCE, "4 calls are in flight at the app", || async {
        app.hits() >= hits + 4
    })
    .await;
    assert_eq!(
        recorded.connections.load(Ordering::SeqCst),
        connections,
        "the calls in flight share the proxies' connection"
    );
    app.release(4);
    for call in calls {
        assert_eq!(call.await.unwrap().map(|(status, _)| status), Some(200));
    }
    app.set(outrigger_tests::Behaviour::Answer);

    let mut stream = outrigger_tests::e2e::upgraded(client.outbound, "reviews.shop:9080").await;
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(
        &echoed, b"ping",
        "the upgrade became a tunnel through both proxies"
    );
}

/// Successful renewals of `proxy`'s certificate so far.
async fn renewals(proxy: &LiveProxy) -> f64 {
    series_sum(
        &metrics(proxy).await,
        "outrigger_identity_renewals_total",
        r#"result="success""#,
    )
    .expect("the renewals are counted")
}

/// Requests to reviews through `client` until `stop`, `pause` apart; what failed, with why.
fn load(
    client: SocketAddr,
    pause: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let (mut served, mut failed) = (0, Vec::new());
        while !*stop.borrow() {
            match get(client, "reviews.shop:9080", "/").await {
                Some((200, _)) => served += 1,
                other => failed.push(format!("{other:?}")),
            }
            tokio::time::sleep(pause).await;
        }
        (served, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_anchor_rotates_in_three_steps_without_a_failed_request() {
    let cluster = Cluster::start().expect("starting the test cluster");
    kubectl(&cluster, &["create", "namespace", NAMESPACE]);
    for account in ["productpage", "reviews"] {
        kubectl(
            &cluster,
            &["create", "serviceaccount", account, "-n", NAMESPACE],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let crds = outrigger_tests::workspace().join("crds");
    kubectl(&cluster, &["apply", "-f", crds.to_str().unwrap()]);
    // Short-lived certificates, so that every proxy renews within seconds of each step.
    let controller = start_certifying_controller(
        cluster.kubeconfig(),
        dir.path(),
        &["--certificate-lifetime", "12s"],
    )
    .await;
    // The authority it started with is the old one; the new one is rotated to.
    let secret = dir.path().join("identity");
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    for authority in [&old, &new] {
        std::fs::create_dir(authority).unwrap();
    }
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::copy(secret.join(file), old.join(file)).unwrap();
    }
    write_authority(&new);

    let host = host_address();
    let app = Backend::start_on(SocketAddr::new(host, 0), "reviews-app").await;
    let inbound = format!("{host}:0");
    // Connections idle for a second are closed by the server, so that the caller that pauses
    // longer makes a new handshake for each request.
    let server = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "reviews", "reviews-3"),
        app.addr,
        &["--inbound-addr", &inbound, "--idle-timeout", "1s"],
    )
    .await;
    let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let steady = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "productpage", "productpage-2"),
        unused,
        &[],
    )
    .await;
    let handshaking = start_certified_proxy(
        &cluster,
        &controller.url,
        dir.path(),
        (NAMESPACE, "productpage", "productpage-3"),
        unused,
        &[],
    )
    .await;
    let file = dir.path().join("services.yaml");
    std::fs::write(
        &file,
        meshed_service(NAMESPACE, "reviews", server.inbound, "reviews"),
    )
    .unwrap();
    kubectl(&cluster, &["apply", "-f", file.to_str().unwrap()]);
    eventually_within(PATIENCE, "reviews answers productpage", || async {
        get(steady.outbound, "reviews.shop:9080", "/")
            .await
            .map(|(s, _)| s)
            == Some(200)
            && get(handshaking.outbound, "reviews.shop:9080", "/")
                .await
                .map(|(s, _)| s)
                == Some(200)
    })
    .await;
    let handshakes_before = series_sum(
        &metrics(&server).await,
        "outrigger_inbound_connections_total",
        r#"tls="true",result="accepted""#,
    )
    .unwrap();

    let (stop, stopping) = tokio::sync::watch::channel(false);
    let steady_load = load(steady.outbound, Duration::from_millis(20), stopping.clone());
    let handshake_load = load(handshaking.outbound, Duration::from_millis(1500), stopping);

    let pem = |dir: &Path| std::fs::read_to_string(dir.join("ca.crt")).unwrap();
    let both = format!("{}{}", pem(&old), pem(&new));
    let steps: [(&str, &[(&str, &str)]); 3] = [
        ("the new anchor beside the old", &[("ca.crt", &both)]),
        (
            "the issuer under the new anchor",
            &[
                (
                    "tls.crt",
                    &std::fs::read_to_string(new.join("tls.crt")).unwrap(),
                ),
                (
                    "tls.key",
                    &std::fs::read_to_string(new.join("tls.key")).unwrap(),
                ),
            ],
        ),
        ("the new anchor alone", &[("ca.crt", &pem(&new))]),
    ];
    let mut started = Vec::new();
    for (step, files) in steps {
        let proxies = [&server, &steady, &handshaking];
        let mut before = Vec::new();
        for proxy in proxies {
            before.push(renewals(proxy).await);
        }
        for (name, content) in files {
            std::fs::write(secret.join(name), content).unwrap();
        }
        // The renewal in flight as the files changed may have been signed before; the next one
        // was not.
        for (proxy, before) in proxies.into_iter().zip(before) {
            eventually_within(PATIENCE, &format!("{step}: every proxy renews"), || async {
                renewals(proxy).await >= before + 2.0
            })
            .await;
        }
        // A pod started now, with the anchors the injector would give it, calls the server.
        let fresh = start_certified_proxy(
            &cluster,
            &controller.url,
            dir.path(),
            (NAMESPACE, "productpage", "productpage-4"),
            unused,
            &[],
        )
        .await;
        eventually_within(
            PATIENCE,
            &format!("{step}: a new pod calls reviews"),
            || async {
                get(fresh.outbound, "reviews.shop:9080", "/")
                    .await
                    .map(|(s, _)| s)
                    == Some(200)
            },
        )
        .await;
        started.push(fresh);
    }

    stop.send_replace(true);
    let (steady_served, steady_failed) = steady_load.await.unwrap();
    let (handshake_served, handshake_failed) = handshake_load.await.unwrap();
    assert_eq!(steady_failed, Vec::<String>::new(), "steady load");
    assert_eq!(
        handshake_failed,
        Vec::<String>::new(),
        "a handshake per request"
    );
    assert!(steady_served > 0 && handshake_served > 0);
    let handshakes = series_sum(
        &metrics(&server).await,
        "outrigger_inbound_connections_total",
        r#"tls="true",result="accepted""#,
    )
    .unwrap()
        - handshakes_before;
    assert!(
        handshakes >= f64::from(handshake_served),
        "{handshakes} handshakes for {handshake_served} requests paused past the idle timeout"
    );
}
