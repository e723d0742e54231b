//! Redirected connections that are not HTTP (TLS, database protocols, anything else), and those to
//! addresses the mesh does not know, are forwarded as they are to where they were going, as if
//! there were no proxy: injecting the sidecar must not break what the app talked to before. The
//! outbound side relays those to a Service's address through an endpoint it picks instead
//! (`OpaqueUpstream`), so that a meshed endpoint is called over mutual TLS.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::io::Io;
use crate::listen::io::Prefixed;

/// Forwarded connections to an address that does not answer give up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the outbound side sends a redirected connection that is not HTTP.
pub trait OpaqueUpstream: Send + Sync {
    /// A connection to an endpoint of the destination at `original_dst` (mutual TLS to a meshed
    /// one), or `None` when the mesh does not place that address: it is forwarded as it is.
    fn open(&self, original_dst: SocketAddr)
    -> BoxFuture<'_, Option<std::io::Result<Box<dyn Io>>>>;
}

/// Copies bytes both ways between the client and `to` until both sides are done, starting with
/// what was read of the client already.
pub async fn forward<T: AsyncRead + AsyncWrite + Unpin>(client: Prefixed<T>, to: SocketAddr) {
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await;
    match upstream {
        Ok(Ok(upstream)) => {
            let _ = upstream.set_nodelay(true);
            relay(client, upstream, to).await;
        }
        Ok(Err(error)) => tracing::debug!(%to, %error, "forwarded connection refused"),
        Err(_) => tracing::debug!(%to, "forwarded connection timed out"),
    }
}

/// Copies bytes both ways between the client and `upstream` (to `to`, for logs) until
/// both sides are done, starting with what was read of the client already.
pub async fn relay<T, U>(client: Prefixed<T>, mut upstream: U, to: SocketAddr)
where
    T: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (prefix, mut client) = client.into_parts();
    if let Err(error) = upstream.write_all(&prefix).await {
        tracing::debug!(%to, %error, "forwarded connection ended with an error");
        return;
    }
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%to, %error, "forwarded connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn forwarded_bytes_flow_both_ways_unchanged() {
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.unwrap();
            let (mut read, mut write) = stream.split();
            tokio::io::copy(&mut read, &mut write).await.unwrap();
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // The proxy read the first bytes to tell the protocol.
        let detected = Prefixed::new(Bytes::from_static(b"\x16\x03\x01"), server);
        tokio::spawn(forward(detected, echo_addr));
        client.write_all(b" not http").await.unwrap();
        client.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        client.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"\x16\x03\x01 not http");
    }
}
