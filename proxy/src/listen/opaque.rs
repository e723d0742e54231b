//! Redirected connections that are not HTTP (TLS, database protocols, anything else), and those to
//! addresses the mesh does not know, are forwarded as they are to where they were going, as if
//! there were no proxy: injecting the sidecar must not break what the app talked to before.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// A client that has sent nothing by then is taken to speak a protocol where the server speaks
/// first (SMTP, MySQL), which is not HTTP. Such ports are better skipped by the redirection
/// (`--skip-outbound-ports`), which spares their connections this wait.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Forwarded connections to an address that does not answer give up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Methods longer than this are not HTTP methods anyone uses.
const MAX_METHOD: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Opaque,
}

/// Tells HTTP from anything else by the first bytes of a connection, without consuming them.
pub async fn detect(stream: &TcpStream) -> std::io::Result<Protocol> {
    let deadline = Instant::now() + DETECT_TIMEOUT;
    let mut prefix = [0u8; MAX_METHOD + 1];
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut prefix)).await {
            Ok(peeked) => peeked?,
            Err(_) => return Ok(Protocol::Opaque),
        };
        // Closed before a byte: HTTP serving closes it quietly.
        if peeked == 0 {
            return Ok(Protocol::Http);
        }
        match classify(&prefix[..peeked]) {
            Some(protocol) => return Ok(protocol),
            // A method cut short: peeking again returns at once until more arrives.
            None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(1)).await,
            None => return Ok(Protocol::Opaque),
        }
    }
}

/// An HTTP/1 request starts with a method token and a space, and so does the HTTP/2 preface
/// (`PRI * HTTP/2.0`); None when the prefix is too short to say.
fn classify(prefix: &[u8]) -> Option<Protocol> {
    for (i, byte) in prefix.iter().enumerate() {
        match byte {
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            b' ' if i > 0 => return Some(Protocol::Http),
            _ => return Some(Protocol::Opaque),
        }
    }
    None
}

/// Copies bytes both ways between the client and `to` until both sides are done.
pub async fn forward(mut client: TcpStream, to: SocketAddr) {
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await;
    let mut upstream = match upstream {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            tracing::debug!(%to, %error, "forwarded connection refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%to, "forwarded connection timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%to, %error, "forwarded connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST ",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"M-SEARCH * HTTP/1.1",
        ] {
            assert_eq!(classify(http), Some(Protocol::Http), "{http:?}");
        }
        for opaque in [
            &b"\x16\x03\x01\x02\x00"[..],        // TLS ClientHello
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"*1\r\n$4\r\nPING\r\n",             // Redis
            b"PING\r\n",
            b"get key\r\n",
            b" GET",
            b"AAAAAAAAAAAAAAAAAAAAAAAA ",
        ] {
            assert_eq!(classify(opaque), Some(Protocol::Opaque), "{opaque:?}");
        }
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b""), None);
    }

    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_request_line_in_pieces_is_http_and_silence_is_not() {
        let (mut client, server) = connected_pair().await;
        client.write_all(b"GE").await.unwrap();
        let detected = tokio::spawn(async move { detect(&server).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(5)).await;
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(detected.await.unwrap(), Protocol::Http);

        let (_client, server) = connected_pair().await;
        assert_eq!(detect(&server).await.unwrap(), Protocol::Opaque);
    }

    #[tokio::test]
    async fn forwarded_bytes_flow_both_ways_unchanged() {
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.unwrap();
            let (mut read, mut write) = stream.split();
            tokio::io::copy(&mut read, &mut write).await.unwrap();
        });
        let (mut client, server) = connected_pair().await;
        tokio::spawn(forward(server, echo_addr));
        client.write_all(b"\x16\x03\x01 not http").await.unwrap();
        client.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        client.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"\x16\x03\x01 not http");
    }
}
