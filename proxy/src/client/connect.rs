//! Opening connections to one endpoint, within the destination's `maxConnections`: mutual TLS to
//! a meshed endpoint while this proxy holds a certificate, else plaintext.
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
use outrigger_api::identity::SpiffeId;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use crate::ctx::ServerId;
use crate::tls::{self, Held};

/// Opens connections to one address, whatever the request URI says, so the URI can keep the
/// authority the app used (`Host`, `:authority`).
#[derive(Clone)]
pub struct Connector {
    pub addr: SocketAddr,
    /// For the connection to open, the TLS handshake included.
    pub timeout: Duration,
    /// `maxConnections` of the destination, shared by its endpoints.
    pub slots: Option<Arc<Semaphore>>,
    /// For a meshed endpoint.
    pub tls: Option<MeshServer>,
}

/// A meshed endpoint: who it must be, and the identity this proxy calls it with.
#[derive(Clone)]
pub struct MeshServer {
    pub expected: SpiffeId,
    pub identity: Held,
}

impl MeshServer {
    /// Mutual TLS over `stream`, with the certificate held now; plaintext without one.
    async fn secure(&self, stream: TcpStream) -> std::io::Result<Transport> {
        let held = self.identity.borrow().clone();
        let Some(held) = held else {
            return Ok(Transport::plain(stream));
        };
        let refused = |error: std::io::Error| {
            std::io::Error::new(
                error.kind(),
                format!("mutual TLS with {}: {error}", self.expected),
            )
        };
        if held.id.trust_domain != self.expected.trust_domain {
            return Err(refused(std::io::Error::other(format!(
                "this proxy's trust domain is {}",
                held.id.trust_domain
            ))));
        }
        let server_name = tls::server_name(&self.expected)
            .map_err(|e| refused(std::io::Error::other(format!("{e:#}"))))?;
        let connector = TlsConnector::from(held.client.clone());
        let stream = connector
            .connect(server_name, stream)
            .await
            .map_err(refused)?;
        Ok(Transport {
            io: Either::Right(Box::new(stream)),
            server: Some(ServerId(tls::label(&self.expected))),
        })
    }
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
            tls,
        } = self.clone();
        Box::pin(async move {
            // Waiting here is queueing for a connection; the pool's request limit bounds it.
            let slot = match slots {
                Some(slots) => Some(slots.acquire_owned().await.map_err(std::io::Error::other)?),
                None => None,
            };
            let open = async {
                let stream = TcpStream::connect(addr).await?;
                configure(&stream)?;
                match &tls {
                    Some(server) => server.secure(stream).await,
                    None => Ok(Transport::plain(stream)),
                }
            };
            let stream = tokio::time::timeout(timeout, open).await.map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {timeout:?}"),
                )
            })??;
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

/// An upstream connection: plaintext, or mutual TLS with the server's identity.
pub struct Transport {
    io: Either<TcpStream, Box<TlsStream<TcpStream>>>,
    server: Option<ServerId>,
}

impl Transport {
    fn plain(stream: TcpStream) -> Self {
        Self {
            io: Either::Left(stream),
            server: None,
        }
    }

    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Either::Left(stream) => stream,
            Either::Right(stream) => stream.get_ref().0,
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

crate::io::write_through!(Transport, io);

/// A connection that gives its pool slot back when it closes.
pub struct PooledStream {
    stream: Transport,
    _slot: Option<OwnedSemaphorePermit>,
}

impl PooledStream {
    pub fn new(stream: Transport, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            stream,
            _slot: slot,
        }
    }
}

impl Connection for PooledStream {
    /// Over mutual TLS, the server's identity, which hyper puts on each response it brings.
    fn connected(&self) -> Connected {
        let connected = self.stream.tcp().connected();
        match &self.stream.server {
            None => connected,
            Some(server) => connected.extra(server.clone()),
        }
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
            tls: None,
        };
        let connected = connector
            .call(http::Uri::from_static("http://web"))
            .await
            .unwrap();
        let socket = socket2::SockRef::from(connected.inner().stream.tcp());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(connected.inner().stream.tcp().nodelay().unwrap());
    }
}
