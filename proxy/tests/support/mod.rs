//! Starting proxies in-process against a test control plane, and a small HTTP client.

#![allow(dead_code)] // Each test file uses a different part.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_proxy::{Proxy, Settings};
use tokio::net::TcpStream;
use tokio::sync::watch;

pub fn settings(control_plane: &str, app_addr: SocketAddr) -> Settings {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Settings {
        control_plane: control_plane.to_string(),
        namespace: "default".into(),
        workload: "client-0".into(),
        service_account: "client".into(),
        outbound_addr: any,
        inbound_addr: any,
        app_addr,
        admin_addr: any,
        max_connections: 10_000,
        max_header_bytes: 16 * 1024,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(3600),
        drain_timeout: Duration::from_secs(5),
        discovery_timeout: Duration::from_secs(2),
        discovery_idle_timeout: Duration::from_secs(60),
        // The test backends listen on loopback, as the proxy does.
        allow_loopback_endpoints: true,
        pod_ips: Vec::new(),
        identity_token_file: None,
        control_plane_identity: None,
        trust_anchors: None,
        trust_domain: outrigger_api::identity::DEFAULT_TRUST_DOMAIN.into(),
        inbound_mtls: outrigger_proxy::InboundMtls::Permissive,
        inbound_probes: Vec::new(),
    }
}

pub struct RunningProxy {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    pub async fn start(settings: Settings) -> Self {
        let proxy = Proxy::bind(settings).await.expect("bind proxy");
        let (shutdown, stop) = watch::channel(false);
        let (outbound, inbound, admin) = (
            proxy.outbound_addr(),
            proxy.inbound_addr(),
            proxy.admin_addr(),
        );
        let task = tokio::spawn(proxy.run(stop));
        Self {
            outbound,
            inbound,
            admin,
            shutdown,
            task,
        }
    }

    /// Waits until `/ready` answers 200.
    pub async fn ready(self) -> Self {
        for _ in 0..100 {
            if admin_get(self.admin, "/ready").await.status == 200 {
                return self;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("proxy never became ready");
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

/// One client connection, HTTP/1.1 (sequential requests) or h2c (multiplexed).
pub enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    pub async fn http1(addr: SocketAddr) -> Self {
        Self::http1_over(TcpStream::connect(addr).await.expect("connect")).await
    }

    /// HTTP/1.1 over a connection made elsewhere (from another network namespace, say).
    pub async fn http1_over(stream: TcpStream) -> Self {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn.with_upgrades());
        Self::Http1(send)
    }

    pub async fn http2(addr: SocketAddr) -> Self {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self::Http2(send)
    }

    /// Another handle on the same h2c connection.
    pub fn share(&self) -> Self {
        match self {
            Self::Http2(send) => Self::Http2(send.clone()),
            Self::Http1(_) => panic!("an HTTP/1.1 connection carries one request at a time"),
        }
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Reply {
        self.send(request(host, path))
            .await
            .expect("request failed")
    }

    pub async fn send(
        &mut self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<Reply, hyper::Error> {
        let response = self.send_raw(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn send_raw(
        &mut self,
        mut request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match self {
            Self::Http1(send) => {
                send.ready().await?;
                send.send_request(request).await
            }
            Self::Http2(send) => {
                // h2 carries the destination in :authority.
                let host = request.headers_mut().remove(http::header::HOST).unwrap();
                let path = request.uri().path_and_query().unwrap().as_str().to_string();
                *request.uri_mut() = format!("http://{}{path}", host.to_str().unwrap())
                    .parse()
                    .unwrap();
                *request.version_mut() = http::Version::HTTP_2;
                send.ready().await?;
                send.send_request(request).await
            }
        }
    }
}

pub fn request(host: &str, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(path)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    Conn::http1(addr).await.get(host, path).await
}

pub async fn admin_get(admin: SocketAddr, path: &str) -> Reply {
    match TcpStream::connect(admin).await {
        Ok(_) => get(admin, "admin", path).await,
        Err(_) => Reply {
            status: 0,
            headers: Default::default(),
            body: String::new(),
        },
    }
}

/// The value of one series in the proxy's `/metrics`; a series that is not there fails the test
/// (a counter never incremented is absent, and must not read as 0).
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    match metric_if_present(admin, series).await {
        Some(value) => value,
        None => panic!(
            "no series {series} in /metrics:\n{}",
            admin_get(admin, "/metrics").await.body
        ),
    }
}

/// The value of one series, for a test to which its absence means something.
pub async fn metric_if_present(admin: SocketAddr, series: &str) -> Option<f64> {
    let text = admin_get(admin, "/metrics").await.body;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
}

/// Retries `check` until it holds, for state that changes asynchronously (config pushes, ejection
/// windows); gives up after 30 s, long enough for a loaded machine.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}
