//! One upstream endpoint: its connection pools (HTTP/1 keep-alive and HTTP/2 multiplexed) and the
//! load the balancer reads.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::http::body::{Body, boxed};
use crate::http::error::ProxyError;
use crate::http::headers::{is_upgrade, strip_hop_by_hop};
use crate::outbound::balance::outlier::Health;
use crate::outbound::layers::pool::PooledStream;

/// Opens connections to one address, whatever the request URI says, so the URI can keep the
/// authority the app used (`Host`, `:authority`).
#[derive(Clone)]
struct Connector {
    addr: SocketAddr,
    timeout: Duration,
    /// `maxConnections` of the destination, shared by its endpoints.
    slots: Option<Arc<Semaphore>>,
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<PooledStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let Connector {
            addr,
            timeout,
            slots,
        } = self.clone();
        Box::pin(async move {
            // Waiting here is queueing for a connection; the pool's request limit bounds it.
            let slot = match slots {
                Some(slots) => Some(slots.acquire_owned().await.map_err(std::io::Error::other)?),
                None => None,
            };
            let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect timed out after {timeout:?}"),
                    )
                })??;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(PooledStream::new(stream, slot)))
        })
    }
}

/// What the balancer knows of an endpoint's load.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicUsize,
    /// Peak-EWMA of response latency in nanoseconds, and when it was last updated.
    ewma: Mutex<(f64, Instant)>,
}

/// Assumed latency of an endpoint that has not answered yet: pessimistic enough that a new
/// endpoint is not flooded, low enough that it is tried.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old latency observations fade.
const DECAY: Duration = Duration::from_secs(10);

impl Default for Load {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new((DEFAULT_RTT.as_nanos() as f64, Instant::now())),
        }
    }
}

impl Load {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// PeakEwma cost: expected latency, scaled by the work already queued on the endpoint.
    pub fn cost(&self) -> f64 {
        let (ewma, updated) = *self.ewma.lock().expect("ewma lock");
        let decayed = ewma * decay_weight(updated.elapsed());
        decayed * (self.in_flight() + 1) as f64
    }

    pub fn observe(&self, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let mut ewma = self.ewma.lock().expect("ewma lock");
        let now = Instant::now();
        let (previous, updated) = *ewma;
        // Peak: a slow response counts at once; fast ones pull the average down gradually.
        let next = if rtt > previous {
            rtt
        } else {
            let w = decay_weight(now - updated);
            previous * w + rtt * (1.0 - w)
        };
        *ewma = (next, now);
    }
}

fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

/// Counts a request against an endpoint's load until dropped.
pub struct InFlight<'a> {
    load: &'a Load,
    started: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight<'_> {
    fn answered(self) {
        self.load.observe(self.started.elapsed());
    }
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// Pod name, when known.
    pub pod: String,
    pub subsets: Vec<String>,
    /// The endpoint accepts HTTP/2 without TLS, so HTTP/1 requests may be multiplexed to it.
    pub h2c: bool,
    pub load: Load,
    pub health: Health,
    http1: Client<Connector, Body>,
    http2: Client<Connector, Body>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        pod: String,
        subsets: Vec<String>,
        h2c: bool,
        connect_timeout: Duration,
        slots: Option<Arc<Semaphore>>,
    ) -> Self {
        let connector = Connector {
            addr,
            timeout: connect_timeout,
            slots,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT);
        let http1 = builder.build(connector.clone());
        let http2 = builder.http2_only(true).build(connector);
        Self {
            addr,
            pod,
            subsets,
            h2c,
            load: Load::default(),
            health: Health::default(),
            http1,
            http2,
        }
    }

    /// Starts counting a request against this endpoint's load.
    pub fn start(&self) -> InFlight<'_> {
        self.load.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: &self.load,
            started: Instant::now(),
        }
    }

    /// Sends `request` to this endpoint, over HTTP/2 when the app spoke it or the endpoint prefers
    /// it, and joins the two sides of an upgrade (WebSocket) into one byte tunnel.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Body>, ProxyError> {
        let in_flight = self.start();
        let downstream_version = request.version();
        let upgrade = is_upgrade(request.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        strip_hop_by_hop(request.headers_mut(), upgrade);
        let use_http2 = downstream_version == Version::HTTP_2 || (self.h2c && !upgrade);
        let client = if use_http2 {
            set_absolute_uri(&mut request, true);
            &self.http2
        } else {
            set_absolute_uri(&mut request, false);
            &self.http1
        };
        let mut response = client.request(request).await.map_err(|source| {
            if source.is_connect() {
                ProxyError::Connect {
                    endpoint: self.addr,
                    source,
                }
            } else {
                ProxyError::Upstream {
                    endpoint: self.addr,
                    source,
                }
            }
        })?;
        in_flight.answered();
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
