//! Accepting connections and serving HTTP/1.1 and h2c on them, with the limits that keep a bad
//! client from costing more than a 4xx or a closed connection, and graceful draining. Redirected
//! connections that are not HTTP are forwarded as they are (`opaque`).

pub mod opaque;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::http::body::Body;
use crate::metrics::{ConnectionGuard, Direction, Metrics};
use crate::shutdown::stopped;
use opaque::Protocol;

/// Limits applied to every downstream connection.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Largest request head (request line plus headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// A client must send a complete request head within this time, or the connection is closed.
    pub header_read_timeout: Duration,
}

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

/// Serves connections from `listener` (counted in `connections_open` under `direction`) until
/// `shutdown` turns true, then stops accepting and waits up to `drain` for in-flight requests to
/// finish. `handle` says what becomes of each HTTP connection, or None to close it before a byte
/// is read or forwarded.
pub async fn serve<S, F, H>(
    listener: TcpListener,
    direction: Option<Direction>,
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
    loop {
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
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let guard = direction.map(|d| ConnectionGuard::open(&metrics, d));
        tokio::spawn(async move {
            let _guard = guard;
            if let Some(original_dst) = info.original_dst {
                match opaque::detect(&stream).await {
                    Ok(Protocol::Http) => {}
                    Ok(Protocol::Opaque) => return opaque::forward(stream, original_dst).await,
                    Err(_) => return,
                }
            }
            let service = match handling.await {
                Handling::Serve(service) => service,
                Handling::Forward(to) => return opaque::forward(stream, to).await,
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(conn).await {
                tracing::debug!(%error, peer = %info.peer, "connection ended with an error");
            }
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
