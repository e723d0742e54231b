//! What the proxy must not do for a client or a control plane it cannot trust: connect where an
//! endpoint address would take it inside its own pod or to the node, or pass on requests that the
//! next hop would read differently from the proxy (upgrades around its policy, framing).

mod support;

use std::time::Duration;

use outrigger_tests::{ControlPlane, ProxyEvent, destination};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WEB: &str = "web.default.svc.cluster.local:80";

#[tokio::test]
async fn endpoints_inside_the_pod_or_on_the_node_are_refused() {
    let mut cp = ControlPlane::start().await;
    let good = cp.publish(WEB, destination("default", "web", 80, &[]));
    let mut settings = settings(&cp.url(), "127.0.0.1:1".parse().unwrap());
    settings.allow_loopback_endpoints = false;
    let proxy = RunningProxy::start(settings).await.ready().await;
    // Subscribes; no endpoints yet.
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 503);
    cp.next_event(|e| match e {
        ProxyEvent::Acked { version, .. } if version == good => Some(()),
        _ => None,
    })
    .await;

    for (address, problem) in [
        ("127.0.0.1:80", "loopback"),
        ("127.1.2.3:80", "loopback"),
        ("[::1]:80", "loopback"),
        ("[::ffff:127.0.0.1]:80", "loopback"),
        ("169.254.169.254:80", "link-local"),
        ("[fe80::1]:80", "link-local"),
        ("0.0.0.0:80", "unspecified"),
        ("[::]:80", "unspecified"),
        ("224.0.0.1:80", "multicast"),
        ("[ff02::1]:80", "multicast"),
        ("255.255.255.255:80", "broadcast"),
    ] {
        let mut bad = destination(
            "default",
            "web",
            80,
            &[("10.0.0.1:80".parse().unwrap(), &[])],
        );
        bad.endpoints.push(outrigger_api::proto::Endpoint {
            address: address.into(),
            ..Default::default()
        });
        let version = cp.publish(WEB, bad);
        let reason = cp
            .next_event(|e| match e {
                ProxyEvent::Rejected {
                    version: v, reason, ..
                } if v == version => Some(reason),
                ProxyEvent::Acked { version: v, .. } if v == version => {
                    panic!("{address} was accepted")
                }
                _ => None,
            })
            .await;
        assert!(
            reason.starts_with(&format!("endpoints[1].address: `{address}` is {problem}")),
            "{address}: {reason}"
        );
        let config: serde_json::Value =
            serde_json::from_str(&admin_get(proxy.admin, "/config").await.body).unwrap();
        assert_eq!(
            config["destinations"][WEB]["version"],
            good.as_str(),
            "the last good version stays"
        );
    }
}

/// A backend speaking raw HTTP/1.1: records each request as it arrived (head and body) and
/// answers `response`, byte for byte, then closes.
struct RawBackend {
    addr: std::net::SocketAddr,
    requests: mpsc::UnboundedReceiver<(String, String)>,
}

impl RawBackend {
    async fn start(response: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let request = read_message(&mut stream).await;
                let _ = tx.send(request);
                stream.write_all(response).await.unwrap();
                let _ = stream.shutdown().await;
            }
        });
        Self { addr, requests }
    }

    async fn next_request(&mut self) -> (String, String) {
        self.requests.recv().await.expect("backend stopped")
    }
}

/// One HTTP/1.1 message: its head as it came, lowercased, and its body as its framing says
/// (chunked, or `content-length` bytes).
async fn read_message(stream: &mut TcpStream) -> (String, String) {
    let head = read_line_until(stream, b"\r\n\r\n")
        .await
        .to_ascii_lowercase();
    let mut body = Vec::new();
    if head.contains("transfer-encoding: chunked") {
        loop {
            let size = read_line_until(stream, b"\r\n").await;
            let size = usize::from_str_radix(size.trim_end(), 16).expect("a chunk size");
            let mut chunk = vec![0; size + 2];
            stream.read_exact(&mut chunk).await.unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
    {
        body.resize(length.trim().parse().unwrap(), 0);
        stream.read_exact(&mut body).await.unwrap();
    }
    (head, String::from_utf8(body).unwrap())
}

/// Bytes up to and with `end`.
async fn read_line_until(stream: &mut TcpStream, end: &[u8]) -> String {
    let mut bytes = Vec::new();
    while !bytes.ends_with(end) {
        bytes.push(stream.read_u8().await.expect("the rest of the message"));
    }
    String::from_utf8(bytes).unwrap()
}

/// A proxy whose `web` is `backend`.
async fn proxy_to(backend: &RawBackend) -> (ControlPlane, RunningProxy) {
    let cp = ControlPlane::start().await;
    cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let proxy = RunningProxy::start(settings(&cp.url(), backend.addr))
        .await
        .ready()
        .await;
    (cp, proxy)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok";

#[tokio::test]
async fn an_h2c_upgrade_is_not_passed_on() {
    let mut backend = RawBackend::start(OK).await;
    let (_cp, proxy) = proxy_to(&backend).await;
    for to in [proxy.outbound, proxy.inbound] {
        let mut client = TcpStream::connect(to).await.unwrap();
        client
            .write_all(
                b"GET / HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                  Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            )
            .await
            .unwrap();
        let (seen, _) = backend.next_request().await;
        for header in ["upgrade", "http2-settings"] {
            assert!(
                !seen.contains(header),
                "{to}: the backend saw {header}: {seen}"
            );
        }
        let (answer, body) = read_message(&mut client).await;
        assert!(answer.starts_with("http/1.1 200"), "{to}: {answer}");
        assert_eq!(body, "ok");
    }
}

#[tokio::test]
async fn content_length_never_travels_with_transfer_encoding() {
    // The backend frames its answer both ways: the proxy must read it as chunked and say so alone.
    let mut backend = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let (_cp, proxy) = proxy_to(&backend).await;
    for request in [
        &b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            [..],
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    ] {
        let mut client = TcpStream::connect(proxy.outbound).await.unwrap();
        client.write_all(request).await.unwrap();
        client.write_all(b"5\r\nhello\r\n0\r\n\r\n").await.unwrap();
        let (seen, body) = backend.next_request().await;
        assert!(!seen.contains("content-length"), "{seen}");
        assert_eq!(body, "hello", "{seen}");

        let (answer, body) = read_message(&mut client).await;
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(!answer.contains("content-length"), "{answer}");
        assert_eq!(body, "hello", "{answer}");
    }
}

#[tokio::test]
async fn a_flood_of_connections_holds_at_most_the_cap() {
    let mut backend = RawBackend::start(OK).await;
    let cp = ControlPlane::start().await;
    cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let mut settings = settings(&cp.url(), backend.addr);
    settings.max_connections = 2;
    let proxy = RunningProxy::start(settings).await.ready().await;
    // Two clients that connect and say nothing take the outbound listener's two places.
    let silent = [
        TcpStream::connect(proxy.outbound).await.unwrap(),
        TcpStream::connect(proxy.outbound).await.unwrap(),
    ];
    let open = r#"outrigger_connections_open{direction="outbound"}"#;
    eventually("both are served", || async {
        metric_if_present(proxy.admin, open).await == Some(2.0)
    })
    .await;
    // A third waits in the kernel's queue: it is not answered while they stay.
    let mut third = TcpStream::connect(proxy.outbound).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
    assert!(early.is_err(), "answered past the cap: {early:?}");
    assert_eq!(metric(proxy.admin, open).await, 2.0);
    // They leave: the third is served.
    drop(silent);
    let (answer, body) = read_message(&mut third).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert_eq!(body, "ok");
    backend.next_request().await;
}

/// Whatever a plaintext request to `addr` gets back before the connection closes.
async fn raw_exchange(addr: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /ready HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_strict_proxy_refuses_plaintext_but_for_the_probes_it_was_given() {
    let app = outrigger_tests::Backend::start("app").await;
    let cp = ControlPlane::start().await;
    let permissive = RunningProxy::start(settings(&cp.url(), app.addr)).await;
    assert_eq!(get(permissive.inbound, "app", "/ready").await.status, 200);

    let mut strict = settings(&cp.url(), app.addr);
    strict.inbound_mtls = outrigger_proxy::InboundMtls::Strict;
    let refused = RunningProxy::start(strict.clone()).await;
    assert_eq!(raw_exchange(refused.inbound).await, "", "closed unanswered");
    let counted = r#"outrigger_inbound_connections_total{tls="false",result="refused"}"#;
    assert_eq!(metric(refused.admin, counted).await, 1.0);

    // The probes are of the port the kubelet calls, which is the one the connection was made to.
    strict.inbound_addr = outrigger_tests::process::free_port().unwrap();
    let port = strict.inbound_addr.port();
    strict.inbound_probes = vec![format!("{port}:/ready").parse().unwrap()];
    let probed = RunningProxy::start(strict).await;
    let mut kubelet = Conn::http1(probed.inbound).await;
    assert_eq!(kubelet.get("app", "/ready").await.status, 200);
    let other = kubelet.get("app", "/admin").await;
    assert_eq!(other.status, 403, "{}", other.body);
    assert!(
        other.body.contains("only the pod's probes"),
        "{}",
        other.body
    );
    assert_eq!(app.hits(), 2, "the refused request never reached the app");
}
