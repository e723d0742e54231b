//! HTTP/1 requests between two proxies travel over HTTP/2, multiplexed on one mutual TLS
//! connection per endpoint instead of one connection per request in flight. A header tells the
//! server proxy which version the caller spoke, so that its app is called in that version: an
//! app that speaks only HTTP/1 never sees HTTP/2. Upgrades (WebSocket) stay on HTTP/1, which
//! alone can carry them.

use http::{HeaderName, HeaderValue, Request, Version};

/// The version the calling app spoke, on a request one proxy sends another over HTTP/2.
pub const ORIGINAL_VERSION: HeaderName = HeaderName::from_static("outrigger-orig-proto");

/// Client side: marks an HTTP/1 request that goes to a meshed endpoint's proxy over HTTP/2.
/// Whatever the app itself sent in the header is dropped: it is the proxies' alone.
pub fn mark<B>(request: &mut Request<B>, over_http2: bool) {
    request.headers_mut().remove(ORIGINAL_VERSION);
    if !over_http2 {
        return;
    }
    let original = match request.version() {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        _ => return,
    };
    request
        .headers_mut()
        .insert(ORIGINAL_VERSION, HeaderValue::from_static(original));
}

/// Server side: an HTTP/2 request a client proxy marked becomes the HTTP/1 request its app sent.
/// The header never reaches the app.
pub fn restore<B>(request: &mut Request<B>) {
    let Some(original) = request.headers_mut().remove(ORIGINAL_VERSION) else {
        return;
    };
    if request.version() != Version::HTTP_2 {
        return;
    }
    match original.as_bytes() {
        b"HTTP/1.0" => *request.version_mut() = Version::HTTP_10,
        b"HTTP/1.1" => *request.version_mut() = Version::HTTP_11,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, header: Option<&'static str>) -> Request<()> {
        let mut request = Request::builder().version(version);
        if let Some(value) = header {
            request = request.header(ORIGINAL_VERSION, value);
        }
        request.body(()).unwrap()
    }

    #[test]
    fn an_http1_request_is_marked_for_the_http2_hop_and_restored_after_it() {
        for version in [Version::HTTP_10, Version::HTTP_11] {
            let mut sent = request(version, None);
            mark(&mut sent, true);
            assert!(sent.headers().contains_key(ORIGINAL_VERSION));
            // As the server proxy receives it.
            *sent.version_mut() = Version::HTTP_2;
            restore(&mut sent);
            assert_eq!(sent.version(), version);
            assert!(sent.headers().is_empty(), "the app never sees the header");
        }
    }

    #[test]
    fn what_an_app_sends_in_the_header_is_dropped_and_http2_stays_unmarked() {
        let mut forged = request(Version::HTTP_2, Some("HTTP/1.1"));
        mark(&mut forged, true);
        assert!(forged.headers().is_empty(), "HTTP/2 from the app: no mark");
        let mut forged = request(Version::HTTP_11, Some("HTTP/1.0"));
        mark(&mut forged, false);
        assert!(forged.headers().is_empty(), "not over HTTP/2: no mark");
    }

    #[test]
    fn restore_leaves_what_it_does_not_know_as_it_is_but_removes_the_header() {
        let mut unknown = request(Version::HTTP_2, Some("HTTP/3"));
        restore(&mut unknown);
        assert_eq!(unknown.version(), Version::HTTP_2);
        assert!(unknown.headers().is_empty());
        // Marked, but it came over HTTP/1: there is nothing to undo.
        let mut plain = request(Version::HTTP_11, Some("HTTP/1.0"));
        restore(&mut plain);
        assert_eq!(plain.version(), Version::HTTP_11);
        assert!(plain.headers().is_empty());
    }
}
