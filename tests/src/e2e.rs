//! What the end-to-end suites share: real proxies in this process, plain HTTP calls, and bounded
//! polling.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use outrigger_proxy::{Proxy, Settings as ProxySettings};
use tokio::sync::watch;

/// A real proxy on loopback ports, configured by the controller at `control_plane`.
pub struct RunningProxy {
    pub outbound: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    /// A proxy of pod `workload` in `namespace`, whose calls to `svc` mean `svc.namespace`.
    pub async fn start(control_plane: SocketAddr, namespace: &str, workload: &str) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let proxy = Proxy::bind(ProxySettings {
            control_plane: format!("http://{control_plane}"),
            namespace: namespace.into(),
            workload: workload.into(),
            service_account: "client".into(),
            outbound_addr: any,
            inbound_addr: any,
            app_addr: any,
            admin_addr: any,
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(1),
            discovery_timeout: Duration::from_secs(2),
            discovery_idle_timeout: Duration::from_secs(60),
            // The backends listen on loopback too.
            allow_loopback_endpoints: true,
            pod_ips: Vec::new(),
            identity_token_file: None,
            control_plane_identity: None,
            trust_anchors: None,
            trust_domain: outrigger_api::identity::DEFAULT_TRUST_DOMAIN.into(),
            inbound_mtls: outrigger_proxy::InboundMtls::Permissive,
            inbound_probes: Vec::new(),
        })
        .await
        .expect("proxy binds");
        let outbound = proxy.outbound_addr();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(proxy.run(shutdown));
        Self {
            outbound,
            stop,
            task,
        }
    }

    /// Status and body of `GET /` to `authority` through this proxy; None when it fails outright.
    pub async fn call(&self, authority: &str) -> Option<(u16, String)> {
        get(self.outbound, authority, "/").await
    }

    /// True when the next `n` calls to `authority` all come back 200 from `backend`.
    pub async fn all_served_by(&self, authority: &str, backend: &str, n: usize) -> bool {
        for _ in 0..n {
            if self.call(authority).await != Some((200, backend.to_string())) {
                return false;
            }
        }
        true
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A controller in this process serving a directory of manifests.
pub struct RunningController {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningController {
    /// Started on `grpc` (port 0: any), and ready.
    pub async fn start(manifests: &Path, grpc: SocketAddr) -> Self {
        let controller = outrigger_controller::Controller::bind(outrigger_controller::Settings {
            manifests: Some(manifests.to_path_buf()),
            kubeconfig: None,
            leader: Default::default(),
            grpc_addr: grpc,
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            webhook: Default::default(),
            identity: Default::default(),
        })
        .await
        .expect("controller binds");
        let (grpc, admin) = (controller.grpc_addr(), controller.admin_addr());
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(controller.run(shutdown));
        let running = Self {
            grpc,
            admin,
            stop,
            task,
        };
        eventually("the controller is ready", || async {
            get(admin, "admin", "/ready").await.map(|r| r.0) == Some(200)
        })
        .await;
        running
    }

    /// Stops as a killed controller would look to proxies: every stream dropped at once.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap().expect("the controller ran");
    }

    pub async fn reconcile_errors(&self) -> f64 {
        let (_, metrics) = get(self.admin, "admin", "/metrics")
            .await
            .unwrap_or_default();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("outrigger_controller_reconcile_errors_total "))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

/// Status and body of `GET {path}` with `Host: {host}` sent to `addr`; None when there is no
/// answer within 10 s.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let answer = request(addr, host, path, &[]).await?;
    Some((answer.status, answer.body))
}

/// Asks the backend behind `addr` (`/upgrade`, as `host`) to switch to its echo protocol; returns
/// the connection once the 101 has come, to send bytes through the tunnel.
pub async fn upgraded(addr: SocketAddr, host: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /upgrade HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    stream
}

/// What a call got back.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    /// The value of a response header, empty when it has none.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// `GET {path}` with `Host: {host}` and `headers` sent to `addr`, on a connection of its own;
/// None when there is no answer within 10 s.
pub async fn request(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<Answer> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::<Bytes>::new()).unwrap();
        let response = send.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `deadline`.
pub async fn eventually_within<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {deadline:?} waiting until {what}");
}

/// [`eventually_within`] 20 s.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(Duration::from_secs(20), what, check).await
}
