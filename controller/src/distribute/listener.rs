//! The connections proxies open to the discovery service: HTTP/2 without TLS, each bounded in the
//! streams it may open, its header size and its silence, and closed once it has had no request in
//! flight for [`IDLE_TIMEOUT`] (a proxy keeps its configuration stream open for as long as it is
//! connected, so only connections that do nothing are closed).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::server::DiscoveryService;
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
/// Connections open at once; the next waits in the kernel's backlog until one closes.
pub(crate) const MAX_CONNECTIONS: usize = 20_000;

/// Serves the configuration streams until `shutdown`. Streams have no natural end to drain to,
/// so stopping drops them all at once and the proxies reconnect, to another replica or to this
/// one restarted, keeping their configuration meanwhile.
pub async fn serve_grpc(
    listener: TcpListener,
    discovery: DiscoveryService,
    mut shutdown: watch::Receiver<bool>,
) {
    let server = discovery.into_server();
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let connections = listen::serve(listener, "gRPC", MAX_CONNECTIONS, stop, |stream, _| {
        serve_connection(stream, server.clone())
    })
    .await;
    drop(connections);
}

/// One proxy's connection.
async fn serve_connection<S>(stream: TcpStream, service: S)
where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    // A reply's frames go out as separate small writes: without this, Nagle holds the later ones
    // until the proxy's delayed ACK, some 40 ms.
    let _ = stream.set_nodelay(true);
    let in_flight = Arc::new(watch::Sender::new(0usize));
    let service = TowerToHyperService::new(Counted {
        inner: service,
        in_flight: in_flight.clone(),
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut idle = in_flight.subscribe();
    tokio::select! {
        _ = connection.as_mut() => return,
        () = idle_for(&mut idle, IDLE_TIMEOUT) => {}
    }
    // GOAWAY, then whatever is left finishes; a connection still opening (it never sent the
    // HTTP/2 preface) is dropped after the same grace.
    connection.as_mut().graceful_shutdown();
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
/// configuration stream is one request for its whole life).
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    in_flight: Arc<watch::Sender<usize>>,
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

    fn call(&mut self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
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
