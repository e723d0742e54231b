//! Shutdown and bad input: SIGTERM drains in-flight requests; malformed, oversized and slow
//! clients get a 4xx or a closed connection and the proxy keeps serving.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use outrigger_tests::{Backend, Behaviour, ControlPlane, destination};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB: &str = "web.default.svc.cluster.local:80";

/// The proxy binary, started on ports of its own choosing, and where it listens (read from its
/// first JSON log line: a port chosen here and handed to it could be taken meanwhile).
struct ProxyProcess {
    child: std::process::Child,
    outbound: SocketAddr,
    admin: SocketAddr,
    /// The runtime's workers, as it counts them (the OS's thread names would count its blocking
    /// threads too, which carry the same name).
    worker_threads: u64,
}

impl ProxyProcess {
    fn start(control_plane: &str, app: SocketAddr, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outrigger-proxy"))
            .args(["--control-plane", control_plane, "--workload", "client-0"])
            .args([
                "--outbound-addr",
                "127.0.0.1:0",
                "--inbound-addr",
                "127.0.0.1:0",
            ])
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--app-addr",
                &app.to_string(),
            ])
            .args(["--log-format", "json", "--allow-loopback-endpoints"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start proxy");
        let lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let mut listening = None;
        for line in lines {
            let line = line.expect("read the proxy's log");
            let entry: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
            if entry["fields"]["message"] == "proxy listening" {
                listening = Some(entry["fields"].clone());
                break;
            }
        }
        let fields = listening.expect("the proxy exited before listening");
        let addr = |name: &str| fields[name].as_str().unwrap().parse().unwrap();
        Self {
            worker_threads: fields["worker_threads"].as_u64().expect("worker_threads"),
            outbound: addr("outbound"),
            admin: addr("admin"),
            child,
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let cp = ControlPlane::start().await;
    let backend = Backend::start("slow").await;
    cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let mut proxy = ProxyProcess::start(&cp.url(), backend.addr, &["--drain-timeout", "10s"]);
    let (outbound, admin) = (proxy.outbound, proxy.admin);
    eventually("the proxy is ready", || async {
        admin_get(admin, "/ready").await.status == 200
    })
    .await;
    assert_eq!(get(outbound, "web", "/").await.status, 200);

    backend.set(Behaviour::Delay(Duration::from_millis(800)));
    let in_flight = tokio::spawn(async move { get(outbound, "web", "/").await });
    eventually("the slow request reaches the backend", || async {
        backend.hits() == 2
    })
    .await;
    let pid = proxy.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);

    let reply = in_flight.await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "slow"));
    eventually("the listener is closed", || async {
        TcpStream::connect(outbound).await.is_err()
    })
    .await;
    let status = tokio::task::spawn_blocking(move || proxy.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn the_proxy_serves_on_the_worker_threads_it_is_given() {
    let cp = ControlPlane::start().await;
    let backend = Backend::start("web").await;
    let default = ProxyProcess::start(&cp.url(), backend.addr, &[]);
    assert_eq!(default.worker_threads, 2);
    let one = ProxyProcess::start(&cp.url(), backend.addr, &["--worker-threads", "1"]);
    assert_eq!(one.worker_threads, 1);
}

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outrigger-proxy"))
        .args([
            "--outbound-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--admin-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start proxy");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = lines
        .by_ref()
        .map(|line| line.unwrap())
        .find(|line| line.contains("proxy listening"));
    let _ = child.kill();
    let _ = child.wait();
    let line = listening.expect("the proxy logged that it listens");
    assert!(!line.contains('\u{1b}'), "{line:?}");
}

async fn limited_proxy() -> (ControlPlane, Backend, RunningProxy) {
    let cp = ControlPlane::start().await;
    let backend = Backend::start("web").await;
    cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let mut settings = settings(&cp.url(), backend.addr);
    settings.max_header_bytes = 8 * 1024;
    settings.header_read_timeout = Duration::from_millis(300);
    let proxy = RunningProxy::start(settings).await.ready().await;
    (cp, backend, proxy)
}

/// Sends raw bytes and reads until the proxy closes the connection (bounded).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .expect("the proxy neither answered nor closed the connection")
        .ok();
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let (_cp, backend, proxy) = limited_proxy().await;
    for listener in [proxy.outbound, proxy.inbound] {
        let reply = exchange(listener, b"THIS IS NOT HTTP\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
        let reply = exchange(
            listener,
            b"GET / HTTP/1.1\r\nHost: web\r\nContent-Length: x\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    }
    // Garbage after the HTTP/2 preface closes the connection.
    exchange(
        proxy.outbound,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    )
    .await;
    assert_eq!(backend.hits(), 0);
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (_cp, backend, proxy) = limited_proxy().await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let reply = exchange(proxy.outbound, big.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    assert_eq!(backend.hits(), 0);
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let (_cp, backend, proxy) = limited_proxy().await;
    // Half a request head, then silence: the proxy must not wait forever.
    let reply = exchange(proxy.outbound, b"GET / HTTP/1.1\r\nHost: we").await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "{reply:?}"
    );
    assert_eq!(backend.hits(), 0);
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);
}

#[tokio::test]
async fn a_keep_alive_connection_idle_past_the_header_read_timeout_is_reused() {
    let (_cp, backend, proxy) = limited_proxy().await;
    for listener in [proxy.outbound, proxy.inbound] {
        let mut conn = Conn::http1(listener).await;
        assert_eq!(conn.get("web", "/").await.status, 200);
        // Idle well past the 300 ms header-read timeout, as a pooled client connection is.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let again = conn.send(request("web", "/")).await;
        assert_eq!(again.expect("the idle connection was closed").status, 200);
    }
    assert_eq!(backend.hits(), 4);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let cp = ControlPlane::start().await;
    let backend = Backend::start("web").await;
    cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let mut settings = settings(&cp.url(), backend.addr);
    settings.idle_timeout = Duration::from_millis(300);
    let proxy = RunningProxy::start(settings).await.ready().await;
    let reply = exchange(proxy.outbound, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
}

#[tokio::test]
async fn a_request_without_authority_gets_400() {
    let (_cp, _backend, proxy) = limited_proxy().await;
    let reply = exchange(proxy.outbound, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        reply.starts_with("HTTP/1.0 400") || reply.starts_with("HTTP/1.1 400"),
        "{reply:?}"
    );
    assert!(reply.contains("no Host"), "{reply:?}");
}
