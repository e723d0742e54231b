//! Opening connections to one endpoint, within the destination's `maxConnections`.
//!
//! Connections notice a peer that vanished (a dead node, a partition) without a request timeout:
//! TCP keepalive probes idle ones, and `TCP_USER_TIMEOUT` fails one whose sent data goes
//! unacknowledged; HTTP/2 connections are also pinged (see `client`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Opens connections to one address, whatever the request URI says, so the URI can keep the
/// authority the app used (`Host`, `:authority`).
#[derive(Clone)]
pub struct Connector {
    pub addr: SocketAddr,
    pub timeout: Duration,
    /// `maxConnections` of the destination, shared by its endpoints.
    pub slots: Option<Arc<Semaphore>>,
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
            configure(&stream)?;
            Ok(TokioIo::new(PooledStream::new(stream, slot)))
        })
    }
}

/// Idle connections are probed after this long, then every `KEEPALIVE_INTERVAL`, and dropped after
/// `KEEPALIVE_PROBES` unanswered probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// Data sent and not acknowledged for this long fails the connection.
const USER_TIMEOUT: Duration = Duration::from_secs(30);

fn configure(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// A connection that gives its pool slot back when it closes.
pub struct PooledStream {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
}

impl PooledStream {
    pub fn new(stream: TcpStream, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            stream,
            _slot: slot,
        }
    }
}

impl Connection for PooledStream {
    fn connected(&self) -> Connected {
        self.stream.connected()
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

crate::io::write_through!(PooledStream, stream);

#[cfg(test)]
mod tests {
    use super::*;
    use tower::Service as _;

    #[tokio::test]
    async fn upstream_connections_notice_a_vanished_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut connector = Connector {
            addr: listener.local_addr().unwrap(),
            timeout: Duration::from_secs(1),
            slots: None,
        };
        let connected = connector
            .call(http::Uri::from_static("http://web"))
            .await
            .unwrap();
        let socket = socket2::SockRef::from(&connected.inner().stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(connected.inner().stream.nodelay().unwrap());
    }
}
