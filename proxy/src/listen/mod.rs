//! Accepting connections and serving HTTP/1.1 and h2c on them, with the limits that keep a bad
//! client from costing more than a 4xx or a closed connection, and graceful draining. Each
//! connection's protocol is told by its first bytes (`detect`); redirected connections that are
//! not HTTP are forwarded as they are (`forward`), or outbound, to an endpoint the destination's
//! side picks. Inbound, the mesh's mutual TLS is terminated first (`mesh`), and what it carries is
//! told and served the same way.

mod deadlines;
mod detect;
mod forward;
mod io;
mod mesh;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::ctx::ClientId;
use crate::http::body::{Body, BoxError, proxy_error, watched};
use crate::metrics::{ConnectionGuard, Direction, InboundResult, Metrics, Tls};
use crate::shutdown::stopped;
use crate::tls;
use deadlines::{Activity, Timed, Timeouts};
use detect::{DETECT_TIMEOUT, Protocol, detect};
pub use forward::OpaqueUpstream;
use io::Prefixed;
use mesh::Accepted;
pub use mesh::{InboundMtls, InboundProbe, InboundTls, is_probe};

/// Limits applied to every downstream connection.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Connections served at once; the next is accepted when one closes.
    pub max_connections: usize,
    /// Largest request head (request line plus headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// A client must send a complete request head within this time of starting it, or the
    /// connection is closed.
    pub header_read_timeout: Duration,
    /// An HTTP/1 connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
}

/// HTTP/2 connections are pinged this often when quiet, and closed when a ping goes unanswered
/// this long: a client that vanished (a dead node) does not hold its streams forever.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);

/// What the proxy knows about an accepted connection when it chooses where a request goes.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// The address the connection was accepted on.
    pub local: SocketAddr,
    /// Where the client meant to connect before iptables redirected it to the proxy; `None` when it
    /// connected to the proxy's own address.
    pub original_dst: Option<SocketAddr>,
}

impl ConnectionInfo {
    fn of(stream: &TcpStream, listen_addr: SocketAddr) -> std::io::Result<Self> {
        let peer = stream.peer_addr()?;
        let local = stream.local_addr()?;
        let original_dst = original_dst(stream).filter(|dst| *dst != local && *dst != listen_addr);
        Ok(Self {
            peer,
            local,
            original_dst,
        })
    }
}

/// Which of the proxy's servers a listener is, and what it does besides serving HTTP.
#[derive(Clone)]
pub enum Side {
    /// The admin server: HTTP only.
    Admin,
    /// Other pods' connections: the mesh's mutual TLS is terminated first.
    Inbound(Box<InboundTls>),
    /// The app's connections: one redirected that is not HTTP goes where this opens.
    Outbound(Arc<dyn OpaqueUpstream>),
}

impl Side {
    /// Under which direction its connections are counted; the admin server's are not.
    fn direction(&self) -> Option<Direction> {
        match self {
            Self::Admin => None,
            Self::Inbound(_) => Some(Direction::Inbound),
            Self::Outbound(_) => Some(Direction::Outbound),
        }
    }
}

/// What becomes of an HTTP connection.
pub enum Handling<S> {
    Serve(S),
    /// Forwarded as it is to this address, as if there were no proxy.
    Forward(SocketAddr),
}

/// SO_ORIGINAL_DST: the destination before an iptables REDIRECT. On a connection that was not
/// redirected it is the local address, or an error without conntrack.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    addr.ok()?.as_socket()
}

/// Serves connections from `listener` (counted in `connections_open` under its side's direction)
/// until `shutdown` turns true, then stops accepting and waits up to `drain` for in-flight requests
/// to finish. `handle` says what becomes of each HTTP connection, or None to close it before a
/// byte is read or forwarded.
pub async fn serve<S, F, H>(
    listener: TcpListener,
    side: Side,
    limits: ServerLimits,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    handle: F,
) where
    F: Fn(ConnectionInfo) -> Option<H>,
    H: Future<Output = Handling<S>> + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let listen_addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let direction = side.direction();
    let servers = Arc::new(Servers::new(&limits, side, metrics.clone()));
    let graceful = GracefulShutdown::new();
    let capacity = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // Waiting here leaves further connections in the kernel's queue: a flood of them (or of
        // clients that never say what they speak) holds at most the cap.
        let permit = tokio::select! {
            permit = capacity.clone().acquire_owned() => permit.expect("the semaphore stays open"),
            _ = stopped(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, ?direction, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let Ok(info) = ConnectionInfo::of(&stream, listen_addr) else {
            continue;
        };
        let Some(handling) = handle(info) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (servers, watcher) = (servers.clone(), graceful.watcher());
        let guard = direction.map(|d| ConnectionGuard::open(&metrics, d));
        tokio::spawn(async move {
            let _guard = guard;
            let _permit = permit;
            servers.connection(stream, info, handling, watcher).await;
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?direction, "drain deadline passed with requests in flight");
    }
}

/// How HTTP is served on a connection once its protocol is known.
struct Servers {
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    timeouts: Timeouts,
    side: Side,
    metrics: Metrics,
}

impl Servers {
    fn new(limits: &ServerLimits, side: Side, metrics: Metrics) -> Self {
        let mut http1 = auto::Builder::new(TokioExecutor::new()).http1_only();
        http1
            .http1()
            // Kept by `deadlines` instead, which does not run it while the connection is idle.
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(8192));
        let mut http2 = auto::Builder::new(TokioExecutor::new()).http2_only();
        http2
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_KEEPALIVE)
            .keep_alive_timeout(HTTP2_KEEPALIVE)
            .max_header_list_size(limits.max_header_bytes as u32);
        Self {
            http1,
            http2,
            timeouts: Timeouts {
                header_read: limits.header_read_timeout,
                idle: limits.idle_timeout,
            },
            side,
            metrics,
        }
    }

    async fn connection<S, H>(
        &self,
        stream: TcpStream,
        info: ConnectionInfo,
        handling: H,
        watcher: Watcher,
    ) where
        H: Future<Output = Handling<S>>,
        S: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        // A redirected client may speak anything; one that called the proxy speaks HTTP.
        let wait = match info.original_dst {
            Some(_) => DETECT_TIMEOUT,
            None => self.timeouts.header_read,
        };
        let Ok((protocol, stream)) = detect(stream, wait).await else {
            return;
        };
        let Side::Inbound(inbound) = &self.side else {
            return self
                .serve(protocol, stream, info, handling, watcher, Only::Any)
                .await;
        };
        if protocol == Protocol::Closed {
            return;
        }
        let accepted = match protocol {
            Protocol::Tls => mesh::accept(stream, &inbound.identity).await,
            _ => Accepted::Other(stream),
        };
        match accepted {
            Accepted::Mesh(stream, peer) => {
                self.metrics
                    .inbound_connection(Tls::True, InboundResult::Accepted);
                let Ok((protocol, stream)) = detect(stream, wait).await else {
                    return;
                };
                let client = Only::Client(ClientId(tls::label(&peer)));
                self.serve(protocol, stream, info, handling, watcher, client)
                    .await
            }
            Accepted::Failed(error) => {
                self.metrics
                    .inbound_connection(Tls::True, InboundResult::Failed);
                tracing::debug!(error = format!("{error:#}"), peer = %info.peer, "mutual TLS failed");
            }
            Accepted::Other(stream) if inbound.mode == InboundMtls::Strict => {
                // The kubelet is not meshed: its probes of this port, and nothing else, are served.
                let port = info.original_dst.unwrap_or(info.local).port();
                match inbound
                    .probes_of(port)
                    .filter(|_| protocol == Protocol::Http1)
                {
                    Some(probes) => {
                        self.metrics
                            .inbound_connection(Tls::False, InboundResult::Accepted);
                        let only = Only::Probes(probes);
                        self.serve(protocol, stream, info, handling, watcher, only)
                            .await
                    }
                    None => {
                        self.metrics
                            .inbound_connection(Tls::False, InboundResult::Refused);
                        tracing::debug!(peer = %info.peer, "not mutual TLS, refused (strict)");
                    }
                }
            }
            Accepted::Other(stream) => {
                self.metrics
                    .inbound_connection(Tls::False, InboundResult::Accepted);
                self.serve(protocol, stream, info, handling, watcher, Only::Any)
                    .await
            }
        }
    }

    /// Serves a connection whose protocol is known, the requests `only` says.
    async fn serve<IO, S, H>(
        &self,
        protocol: Protocol,
        stream: Prefixed<IO>,
        info: ConnectionInfo,
        handling: H,
        watcher: Watcher,
        only: Only,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Future<Output = Handling<S>>,
        S: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let protocol = match (protocol, info.original_dst) {
            (Protocol::Closed, _) => return,
            (Protocol::Opaque | Protocol::Tls, Some(original_dst)) => {
                return self.opaque(stream, original_dst, &only).await;
            }
            // Not HTTP, sent to the proxy itself: HTTP/1 serving answers 400.
            (Protocol::Opaque | Protocol::Tls, None) => Protocol::Http1,
            (protocol, _) => protocol,
        };
        let service = match handling.await {
            Handling::Serve(service) => PerConnection {
                inner: service,
                only,
            },
            Handling::Forward(to) => return forward::forward(stream, to).await,
        };
        let served = match protocol {
            Protocol::Http2 => {
                let activity = Arc::new(Activity::default());
                let io = Timed::http2(stream, activity.clone(), self.timeouts.idle);
                let service = Tracked {
                    inner: service,
                    activity,
                };
                let conn = self.http2.serve_connection(TokioIo::new(io), service);
                watcher.watch(conn.into_owned()).await
            }
            _ => self.http1_connection(stream, service, watcher).await,
        };
        if let Err(error) = served {
            tracing::debug!(%error, peer = %info.peer, "connection ended with an error");
        }
    }

    /// A redirected connection that is not HTTP: authorized and forwarded inbound; outbound,
    /// relayed to the endpoint its destination picks, or forwarded as it is outside the mesh.
    async fn opaque<IO>(&self, stream: Prefixed<IO>, original_dst: SocketAddr, only: &Only)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match &self.side {
            Side::Inbound(inbound)
                if !inbound
                    .authorizer
                    .allows_connection(original_dst.port(), only.client()) => {}
            Side::Outbound(upstreams) => match upstreams.open(original_dst).await {
                Some(Ok(upstream)) => forward::relay(stream, upstream, original_dst).await,
                Some(Err(error)) => {
                    tracing::debug!(to = %original_dst, %error, "no connection to an endpoint");
                }
                None => forward::forward(stream, original_dst).await,
            },
            Side::Inbound(_) | Side::Admin => forward::forward(stream, original_dst).await,
        }
    }

    async fn http1_connection<IO, S>(
        &self,
        stream: Prefixed<IO>,
        service: S,
        watcher: Watcher,
    ) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let activity = Arc::new(Activity::default());
        let io = Timed::new(stream, activity.clone(), self.timeouts);
        let service = Tracked {
            inner: service,
            activity,
        };
        let conn = self
            .http1
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        watcher.watch(conn).await
    }
}

/// Counts each request in flight on its connection until its response body is done, for the
/// connection's deadlines.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Service<http::Request<Incoming>> for Tracked<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| watched(body, in_flight)))
        })
    }
}

/// Which requests of a connection are served, and what they carry.
enum Only {
    Any,
    /// Any, from this caller over mutual TLS: its identity goes on each request.
    Client(ClientId),
    /// Plaintext refused (strict) but for the kubelet's probes: `GET` of these paths.
    Probes(Arc<[String]>),
}

impl Only {
    /// The caller's identity, over mutual TLS.
    fn client(&self) -> Option<&ClientId> {
        match self {
            Self::Client(client) => Some(client),
            Self::Any | Self::Probes(_) => None,
        }
    }
}

struct PerConnection<S> {
    inner: S,
    only: Only,
}

impl<S> Service<http::Request<Incoming>> for PerConnection<S>
where
    S: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, std::future::Ready<Result<http::Response<Body>, Infallible>>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        match &self.only {
            Only::Any => {}
            Only::Client(client) => {
                request.extensions_mut().insert(client.clone());
            }
            Only::Probes(paths) => {
                if !mesh::is_probe(&request, paths) {
                    return Either::Right(std::future::ready(Ok(proxy_error(
                        http::StatusCode::FORBIDDEN,
                        "plaintext is refused here (strict mutual TLS): only the pod's probes are served",
                    ))));
                }
            }
        }
        Either::Left(self.inner.call(request))
    }
}
