//! The accept loop every listener of the controller shares: at most so many connections open at
//! once (the next waits in the kernel's backlog until one closes), and a pause after an accept
//! error instead of a busy loop (out of file descriptors, accept fails at once, every time).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The first pause after a failed accept; it doubles with each failure in a row, up to
/// [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long an HTTP/1 client may take to send a request head, the first or the next: a client
/// that sends nothing for this long, opening or idle, is dropped. Probes, scrapes and the API
/// server send theirs at once.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where connections come from: a TCP listener, or in tests one that fails on purpose.
pub(crate) trait Accept: Send {
    type Io: Send + 'static;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    fn accept(&mut self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

/// Accepts connections and serves each with `serve`, at most `max_connections` at once, until
/// `stop` completes; then returns the connections still open, for the caller to drain or drop.
pub(crate) async fn serve<A, S, F>(
    mut listener: A,
    what: &'static str,
    max_connections: usize,
    stop: impl Future<Output = ()>,
    mut serve: S,
) -> JoinSet<()>
where
    A: Accept,
    S: FnMut(A::Io, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = accept(&mut listener, &slots) => accepted,
            Some(_) = connections.join_next() => continue,
            () = &mut stop => return connections,
        };
        match accepted {
            Ok((slot, io, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let connection = serve(io, peer);
                connections.spawn(async move {
                    connection.await;
                    drop(slot);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a {what} connection failed; pausing {backoff:?}");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut stop => return connections,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Serves HTTP/1 on one connection (what probes, Prometheus and the API server's webhook calls
/// speak), dropping a client that sends no request head within [`HEADER_READ_TIMEOUT`]. Once
/// `stop` completes, the connection closes as soon as no request is in flight, so that a client
/// keeping it alive makes its next request on a new one.
pub(crate) async fn serve_http1<I, S>(io: I, service: S, stop: impl Future<Output = ()>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut connection = std::pin::pin!(builder.serve_connection(TokioIo::new(io), service));
    tokio::select! {
        _ = connection.as_mut() => return,
        () = stop => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// How long a TLS client may take to complete its handshake: it sends its hello at once.
pub(crate) const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS side of a connection, once its handshake is done within [`TLS_HANDSHAKE_TIMEOUT`];
/// `None` (the failure logged) when it fails or takes longer.
pub(crate) async fn handshake<I>(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: I,
    what: &'static str,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "{what} TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "{what} TLS handshake timed out");
            None
        }
    }
}

/// Completes once `shutdown` is true (or its sender is gone).
pub(crate) async fn stopping(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A free slot, then a connection to fill it.
async fn accept<A: Accept>(
    listener: &mut A,
    slots: &Arc<Semaphore>,
) -> io::Result<(tokio::sync::OwnedSemaphorePermit, A::Io, SocketAddr)> {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let (io, peer) = listener.accept().await?;
    Ok((slot, io, peer))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::{mpsc, oneshot};

    use super::*;

    /// A listener whose accepts fail, or hand out the connections a test queues.
    struct Scripted {
        accepts: Arc<AtomicUsize>,
        connections: mpsc::UnboundedReceiver<oneshot::Receiver<()>>,
        fail: bool,
    }

    impl Accept for Scripted {
        /// Held open until its sender is dropped.
        type Io = oneshot::Receiver<()>;

        async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
            let calls = self.accepts.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail {
                // A loop that never pauses comes back here at once; stop it before it hangs the
                // test, which then fails on the count.
                if calls > 1_000 {
                    std::future::pending::<()>().await;
                }
                return Err(io::Error::other("too many open files"));
            }
            let io = self
                .connections
                .recv()
                .await
                .expect("the test holds the sender");
            Ok((io, SocketAddr::from(([127, 0, 0, 1], 1))))
        }
    }

    fn scripted(
        fail: bool,
    ) -> (
        Scripted,
        Arc<AtomicUsize>,
        mpsc::UnboundedSender<oneshot::Receiver<()>>,
    ) {
        let accepts = Arc::new(AtomicUsize::new(0));
        let (queue, connections) = mpsc::unbounded_channel();
        let listener = Scripted {
            accepts: accepts.clone(),
            connections,
            fail,
        };
        (listener, accepts, queue)
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_pause_with_backoff_instead_of_spinning() {
        let (listener, accepts, _queue) = scripted(true);
        let (stopped, stop) = oneshot::channel::<()>();
        let serving = tokio::spawn(serve(
            listener,
            "test",
            8,
            async {
                let _ = stop.await;
            },
            |_, _| async {},
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        // 10 ms, 20 ms, ... 1 s, then one a second: about 17 in 10 s.
        let calls = accepts.load(Ordering::SeqCst);
        assert!((10..=20).contains(&calls), "{calls} accepts in 10 s");
        drop(stopped);
        serving.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_connections_are_accepted_until_one_closes() {
        let (listener, accepts, queue) = scripted(false);
        let served = Arc::new(AtomicUsize::new(0));
        let counted = served.clone();
        tokio::spawn(serve(
            listener,
            "test",
            2,
            std::future::pending(),
            move |io, _| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = io.await;
                }
            },
        ));
        let mut open = Vec::new();
        for _ in 0..3 {
            let (hold, io) = oneshot::channel::<()>();
            queue.send(io).unwrap();
            open.push(hold);
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(served.load(Ordering::SeqCst), 2);
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            2,
            "no accept without a free slot"
        );

        drop(open.remove(0));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(served.load(Ordering::SeqCst), 3);
    }
}
