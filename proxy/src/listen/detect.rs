//! Telling a connection's protocol by its first bytes: HTTP/1, HTTP/2 (its preface), TLS (a
//! handshake record, which may be the mesh's mutual TLS inbound), or anything else (database
//! protocols), which a redirected connection forwards as it is.
//!
//! The bytes are read, not peeked: waiting for more of them waits on the socket, and they are
//! handed back in front of the connection (`io::Prefixed`).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::listen::io::Prefixed;

/// A redirected client that has sent nothing by then is taken to speak a protocol where the
/// server speaks first (SMTP, MySQL), which is not HTTP. Such ports are better skipped by the
/// redirection (`--skip-outbound-ports`), which spares their connections this wait.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Methods longer than this are not HTTP methods anyone uses.
const MAX_METHOD: usize = 20;

const HTTP2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// A TLS record of content type handshake (22), with a major version of 3.
const TLS_HANDSHAKE_START: &[u8] = &[0x16, 0x03];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS handshake: the mesh's, or the app's own.
    Tls,
    /// Not HTTP, or nothing sent in time.
    Opaque,
    /// Closed before a byte.
    Closed,
}

/// Reads the first bytes of `io` until they tell its protocol or `wait` passes (then: opaque),
/// and gives them back in front of it.
pub async fn detect<T: AsyncRead + Unpin>(
    mut io: T,
    wait: Duration,
) -> std::io::Result<(Protocol, Prefixed<T>)> {
    let mut prefix = BytesMut::with_capacity(HTTP2_PREFACE_START.len().max(MAX_METHOD + 1));
    let protocol = tokio::time::timeout(wait, async {
        loop {
            if io.read_buf(&mut prefix).await? == 0 {
                return Ok(if prefix.is_empty() {
                    Protocol::Closed
                } else {
                    Protocol::Opaque
                });
            }
            if let Some(protocol) = classify(&prefix) {
                return Ok::<_, std::io::Error>(protocol);
            }
        }
    })
    .await
    .unwrap_or(Ok(Protocol::Opaque))?;
    Ok((protocol, Prefixed::new(Bytes::from(prefix), io)))
}

/// An HTTP/1 request starts with a method token and a space, the HTTP/2 preface with
/// `PRI * HTTP/2.0` and TLS with a handshake record; None when the prefix is too short to say.
fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.first() == TLS_HANDSHAKE_START.first() {
        return match prefix.get(1) {
            None => None,
            Some(&version) if version == TLS_HANDSHAKE_START[1] => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    let shared = prefix.len().min(HTTP2_PREFACE_START.len());
    if prefix[..shared] == HTTP2_PREFACE_START[..shared] {
        return (shared == HTTP2_PREFACE_START.len()).then_some(Protocol::Http2);
    }
    for (i, byte) in prefix.iter().enumerate() {
        match byte {
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            b' ' if i > 0 => return Some(Protocol::Http1),
            _ => return Some(Protocol::Opaque),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use super::*;
    use tokio::io::{AsyncWriteExt, ReadBuf};

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        for http1 in [&b"GET / HTTP/1.1\r\n"[..], b"POST ", b"M-SEARCH * HTTP/1.1"] {
            assert_eq!(classify(http1), Some(Protocol::Http1), "{http1:?}");
        }
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Protocol::Http2));
        // A ClientHello, in a TLS 1.0 record as TLS 1.3 sends it.
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Tls));
        for opaque in [
            &b"\x16\x01"[..],
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"*1\r\n$4\r\nPING\r\n",             // Redis
            b"PING\r\n",
            b"get key\r\n",
            b" GET",
            b"AAAAAAAAAAAAAAAAAAAAAAAA ",
        ] {
            assert_eq!(classify(opaque), Some(Protocol::Opaque), "{opaque:?}");
        }
        for short in [&b"GE"[..], b"", b"PRI * HTT", b"PR", b"\x16"] {
            assert_eq!(classify(short), None, "{short:?}");
        }
    }

    #[tokio::test]
    async fn a_request_line_in_pieces_is_http_and_nothing_is_lost() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GE").await.unwrap();
        let detected = tokio::spawn(detect(server, DETECT_TIMEOUT));
        tokio::task::yield_now().await;
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let (protocol, mut prefixed) = detected.await.unwrap().unwrap();
        assert_eq!(protocol, Protocol::Http1);
        let mut all = String::new();
        prefixed.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\n");
    }

    /// Counts how often it is polled; never has anything to read.
    struct Silent(Arc<AtomicUsize>);

    impl AsyncRead for Silent {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_wait_and_costs_no_polling() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (protocol, _) = detect(Silent(polls.clone()), DETECT_TIMEOUT).await.unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        // Waiting is on the socket's readiness: polled when it starts and when the wait ends,
        // not once a millisecond.
        let polls = polls.load(Ordering::Relaxed);
        assert!(polls <= 2, "{polls} polls");
    }

    #[tokio::test]
    async fn a_connection_closed_at_once_is_told_apart() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        let (protocol, _) = detect(server, DETECT_TIMEOUT).await.unwrap();
        assert_eq!(protocol, Protocol::Closed);
    }
}
