//! The connections proxies open to the discovery service: HTTP/2, over TLS when the controller
//! has an identity (the client's certificate, if any, proving who calls: see [`PeerIdentity`]),
//! each bounded in the time to its handshake, the streams it may open, its header size and its
//! silence, and closed once it has had no request in flight for [`IDLE_TIMEOUT`] (a proxy keeps
//! its configuration stream open for as long as it is connected, so only connections that do
//! nothing are closed).
//!
//! On shutdown every connection is closed the same way, GOAWAY and then its configuration stream
//! ended with UNAVAILABLE (see [`Closing`]), each at its own moment of [`DRAIN_WINDOW`]: a proxy
//! reconnects when its stream ends, and they must not all come back in the same instant.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::server::{Closing, DiscoveryService, PeerIdentity};
use crate::identity::{IdentityService, ServingTls, peer_identity};
use crate::listen;

/// Proxies that vanish without closing their connection are noticed within about this long.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A proxy opens one configuration stream and fetches endpoints with a few calls beside it.
pub(super) const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// gRPC requests carry a handful of short headers.
pub(super) const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// A connection with no request in flight for this long is closed, one that never opened a stream
/// included.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection being closed has to finish what it has in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// On shutdown, connections are closed one after another over this long: the proxies add a
/// spread of their own (up to 3 s) before reconnecting, so that a replica's proxies come back to
/// the others over some 8 s rather than in the same 100 ms.
pub(super) const DRAIN_WINDOW: Duration = Duration::from_secs(5);
/// The longest [`serve_grpc`] takes to return once shutdown begins: the last connection's turn,
/// then its grace.
pub const DRAIN_BOUND: Duration = match DRAIN_WINDOW.checked_add(CLOSE_GRACE) {
    Some(bound) => bound,
    None => panic!("the bound overflows a Duration"),
};
/// Connections open at once; the next waits in the kernel's backlog until one closes.
pub(crate) const MAX_CONNECTIONS: usize = 20_000;

/// The certificate authority and the TLS the gRPC listener serves with.
pub struct Authenticated {
    pub identity: IdentityService,
    pub tls: Arc<ServingTls>,
}

/// Serves the configuration streams (and, when `authenticated`, certificates, all over TLS)
/// until `shutdown`, then closes the connections over [`DRAIN_WINDOW`] and returns within
/// [`DRAIN_BOUND`]. New connections are refused from the start; the proxies reconnect, to another
/// replica or to this one restarted, keeping their configuration meanwhile.
pub async fn serve_grpc(
    listener: TcpListener,
    discovery: DiscoveryService,
    authenticated: Option<Authenticated>,
    shutdown: watch::Receiver<bool>,
) {
    let mut server = tonic::service::Routes::new(discovery.into_server());
    let mut tls = None;
    if let Some(authenticated) = authenticated {
        server = server.add_service(authenticated.identity.into_server());
        tls = Some(authenticated.tls);
    }
    let stop = listen::stopping(shutdown.clone());
    let mut accepted = 0u64;
    let connections = listen::serve(listener, "gRPC", MAX_CONNECTIONS, stop, |stream, peer| {
        // A reply's frames go out as separate small writes: without this, Nagle holds the later
        // ones until the proxy's delayed ACK, some 40 ms.
        let _ = stream.set_nodelay(true);
        let turn = drain_turn(accepted);
        accepted += 1;
        let (server, shutdown, tls) = (server.clone(), shutdown.clone(), tls.clone());
        async move {
            let Some(tls) = tls else {
                return serve_connection(stream, None, server, turn, shutdown).await;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            if let Some(stream) = listen::handshake(acceptor, stream, "gRPC", peer).await {
                let identity = peer_identity(stream.get_ref().1).map(PeerIdentity);
                serve_connection(stream, identity, server, turn, shutdown).await;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(DRAIN_BOUND, connections.join_all()).await;
}

/// When, after shutdown begins, the `number`th connection accepted is closed: the fractional
/// parts of multiples of the golden ratio, which spread any run of consecutive numbers evenly
/// over the window, without counting the connections open.
pub(super) fn drain_turn(number: u64) -> Duration {
    const GOLDEN_RATIO_FRACTION: f64 = 0.618_033_988_749_895;
    let spread = (number as f64 * GOLDEN_RATIO_FRACTION).fract();
    DRAIN_WINDOW.mul_f64(spread)
}

/// One proxy's connection, closed when idle, or `turn` after shutdown begins. Its requests carry
/// `peer`, when the client proved an identity.
pub(super) async fn serve_connection<I, S>(
    io: I,
    peer: Option<PeerIdentity>,
    service: S,
    turn: Duration,
    shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let in_flight = Arc::new(watch::Sender::new(0usize));
    let (closing, closed) = watch::channel(false);
    let service = TowerToHyperService::new(Counted {
        inner: service,
        in_flight: in_flight.clone(),
        closing: Closing::new(closed),
        peer,
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    let mut connection = pin!(builder.serve_connection(TokioIo::new(io), service));
    let mut idle = in_flight.subscribe();
    let its_turn = async {
        listen::stopping(shutdown).await;
        tokio::time::sleep(turn).await;
    };
    tokio::select! {
        _ = connection.as_mut() => return,
        () = idle_for(&mut idle, IDLE_TIMEOUT) => {}
        () = its_turn => {}
    }
    // GOAWAY, so that the proxy opens no new stream here, then the configuration stream ends and
    // whatever else is in flight finishes; a connection still opening (it never sent the HTTP/2
    // preface) is dropped after the same grace.
    connection.as_mut().graceful_shutdown();
    closing.send_replace(true);
    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
}

/// Returns once no request has been in flight for `period`.
async fn idle_for(in_flight: &mut watch::Receiver<usize>, period: Duration) {
    loop {
        if in_flight.wait_for(|count| *count == 0).await.is_err() {
            return;
        }
        if tokio::time::timeout(period, in_flight.wait_for(|count| *count > 0))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A service that counts its requests in flight, each until its response body is done with (a
/// configuration stream is one request for its whole life), and hands each the connection's
/// [`Closing`] and [`PeerIdentity`].
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    in_flight: Arc<watch::Sender<usize>>,
    closing: Closing,
    peer: Option<PeerIdentity>,
}

/// One request in flight, until dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn new(count: &Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|count| *count += 1);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

impl<S, B> tower::Service<http::Request<hyper::body::Incoming>> for Counted<S>
where
    S: tower::Service<hyper::http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<hyper::body::Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.closing.clone());
        if let Some(peer) = &self.peer {
            request.extensions_mut().insert(peer.clone());
        }
        let in_flight = InFlight::new(&self.in_flight);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| CountedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight.
    struct CountedBody<B> {
        #[pin]
        body: B,
        _in_flight: InFlight,
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
