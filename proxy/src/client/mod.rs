//! One upstream endpoint: its connection pools (HTTP/1 keep-alive and HTTP/2 multiplexed), the
//! load the balancer reads and the health outlier detection keeps.

mod connect;
mod health;
mod load;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::http::body::{Body, boxed};
use crate::http::error::ProxyError;
use crate::http::headers::{is_upgrade, strip_hop_by_hop};
use crate::http::mesh_protocol;
use outrigger_api::defaults;

use crate::policy::EndpointConfig;
use crate::tls::Held;
pub use connect::PooledStream;
use connect::{Connector, MeshServer};
pub use health::{Claim, Health, Outcome, Recorded, Thresholds};
pub use load::Load;

/// How an endpoint's connections are made: the destination's settings, shared by its endpoints.
#[derive(Clone, Debug)]
pub struct Dial {
    pub connect_timeout: Duration,
    /// `maxConnections` of the destination, shared by its endpoints.
    pub slots: Option<Arc<Semaphore>>,
    /// This proxy's identity, for mutual TLS to meshed endpoints.
    pub identity: Held,
}

impl Dial {
    /// With the destination's defaults.
    pub fn new(identity: Held) -> Self {
        Self {
            connect_timeout: defaults::CONNECT_TIMEOUT,
            slots: None,
            identity,
        }
    }
}

pub struct Endpoint {
    pub addr: std::net::SocketAddr,
    /// Pod name, when known.
    pub pod: String,
    pub subsets: Vec<String>,
    /// The endpoint accepts HTTP/2 without TLS, so HTTP/1 requests may be multiplexed to it.
    pub h2c: bool,
    /// A meshed endpoint's identity.
    pub identity: Option<outrigger_api::identity::SpiffeId>,
    pub load: Load,
    pub health: Health,
    http1: Client<Connector, Body>,
    http2: Client<Connector, Body>,
    /// For connections of its own (not HTTP), as the clients' are made.
    connector: Connector,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

/// Idle pooled connections are closed after this long: less than the proxies' own server idle
/// timeout (`--idle-timeout`), so that a connection is not reused as the server closes it.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);

impl Endpoint {
    pub fn new(config: &EndpointConfig, dial: &Dial) -> Self {
        let connector = Connector {
            addr: config.address,
            timeout: dial.connect_timeout,
            slots: dial.slots.clone(),
            tls: config.identity.clone().map(|expected| MeshServer {
                expected,
                identity: dial.identity.clone(),
            }),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .timer(TokioTimer::new())
            // An HTTP/2 peer that stops answering pings is given up on, streams and all.
            .http2_keep_alive_interval(HTTP2_KEEPALIVE)
            .http2_keep_alive_timeout(HTTP2_KEEPALIVE)
            .http2_keep_alive_while_idle(true);
        let http1 = builder.build(connector.clone());
        let http2 = builder.http2_only(true).build(connector.clone());
        Self {
            addr: config.address,
            pod: config.pod.clone(),
            subsets: config.subsets.clone(),
            h2c: config.h2c,
            identity: config.identity.clone(),
            load: Load::default(),
            health: Health::default(),
            http1,
            http2,
            connector,
        }
    }

    /// Whether this endpoint is the one `config` describes, so that it can serve a new version.
    pub fn is(&self, config: &EndpointConfig) -> bool {
        self.addr == config.address
            && self.pod == config.pod
            && self.subsets == config.subsets
            && self.h2c == config.h2c
            && self.identity == config.identity
    }

    /// A connection of its own to this endpoint, for bytes that are not HTTP: mutual TLS to a
    /// meshed one while this proxy holds a certificate, within the destination's `maxConnections`.
    pub async fn open(&self) -> std::io::Result<PooledStream> {
        use tower::Service as _;
        let connected = self.connector.clone().call(http::Uri::default()).await?;
        Ok(connected.into_inner())
    }

    /// Sends `request` to this endpoint, over HTTP/2 when the app spoke it, the endpoint prefers
    /// it or is meshed (its proxy takes HTTP/1 over HTTP/2), and joins the two sides of an upgrade (WebSocket) into one byte tunnel.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Body>, ProxyError> {
        let in_flight = self.load.start();
        let downstream_version = request.version();
        let upgrade = is_upgrade(request.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        strip_hop_by_hop(request.headers_mut(), upgrade);
        // A meshed endpoint's proxy takes HTTP/1 over HTTP/2 and calls its app as it was called.
        let to_proxy = self.identity.is_some() && !upgrade;
        mesh_protocol::mark(&mut request, to_proxy);
        let use_http2 =
            downstream_version == Version::HTTP_2 || ((self.h2c || to_proxy) && !upgrade);
        let client = if use_http2 {
            set_absolute_uri(&mut request, true);
            &self.http2
        } else {
            set_absolute_uri(&mut request, false);
            &self.http1
        };
        let mut response = match client.request(request).await {
            Ok(response) => response,
            Err(source) => {
                in_flight.failed();
                return Err(if source.is_connect() {
                    ProxyError::Connect {
                        endpoint: self.addr,
                        source,
                    }
                } else {
                    ProxyError::Upstream {
                        endpoint: self.addr,
                        source,
                    }
                });
            }
        };
        // Gateway errors say the endpoint could not serve: they cost like failures.
        if matches!(response.status().as_u16(), 502..=504) {
            in_flight.failed();
        } else {
            in_flight.answered();
        }
        let switching = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        match downstream_upgrade {
            Some(downstream) if switching => {
                let upstream = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(downstream, upstream));
            }
            _ => strip_hop_by_hop(response.headers_mut(), false),
        }
        *response.version_mut() = downstream_version;
        Ok(response.map(boxed))
    }
}

/// The pool is keyed by the URI, and HTTP/2 sends its authority as `:authority`: keep the one the
/// app used (Host for HTTP/1), so the upstream sees the name it was called by.
fn set_absolute_uri(request: &mut Request<Body>, http2: bool) {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "localhost".to_string());
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if let Ok(uri) = format!("http://{authority}{path}").parse() {
        *request.uri_mut() = uri;
    }
    if http2 {
        request.headers_mut().remove(http::header::HOST);
        *request.version_mut() = Version::HTTP_2;
    } else {
        *request.version_mut() = Version::HTTP_11;
    }
}

async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(downstream), Ok(upstream)) = tokio::join!(downstream, upstream) else {
        return;
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(%error, "upgraded connection ended with an error");
    }
}

/// An endpoint on a loopback port, for tests of what picks among endpoints.
#[cfg(test)]
pub fn test_endpoint(port: u16, subsets: &[&str]) -> Arc<Endpoint> {
    let config = EndpointConfig {
        subsets: subsets.iter().map(|s| s.to_string()).collect(),
        ..EndpointConfig::at(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    };
    Arc::new(Endpoint::new(
        &config,
        &Dial::new(crate::tls::no_identity()),
    ))
}
