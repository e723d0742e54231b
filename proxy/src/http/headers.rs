//! Hop-by-hop headers (RFC 9110 section 7.6.1): they describe one connection, so the proxy drops
//! them between its two connections, except what an upgrade needs; and the framing headers that
//! two hops could read differently.

use http::header::{self, HeaderMap, HeaderName};

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// True for an HTTP/1.1 request asking to switch protocols (WebSocket and the like). Not to h2c:
/// the upgraded connection would carry HTTP/2 requests past the proxy's routing and policy, so
/// such a request is passed on as a plain one (as are upgrades that cannot be read).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    let h2c_or_unreadable = headers.get_all(header::UPGRADE).iter().any(|value| {
        value.to_str().map_or(true, |value| {
            value
                .split(',')
                .any(|protocol| protocol.trim().eq_ignore_ascii_case("h2c"))
        })
    });
    headers.contains_key(header::UPGRADE)
        && !h2c_or_unreadable
        && connection_tokens(headers).any(|t| t == "upgrade")
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay so
/// the next hop can switch protocols too. `TE: trailers` stays: gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // A message with both is read by its Transfer-Encoding; passed on with its Content-Length, the
    // next hop could read it by that instead (RFC 9112 section 6.1).
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<String> = connection_tokens(headers)
        .filter(|t| !(keep_upgrade && t == "upgrade"))
        .collect();
    for name in named {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    // The h2c upgrade's, which is never passed on.
    headers.remove("http2-settings");
    let te_is_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_is_trailers {
        headers.remove(header::TE);
    }
    if keep_upgrade {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn drops_hop_by_hop_and_connection_named_headers() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("x-end-to-end", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, headers(&[("x-end-to-end", "1")]));
    }

    #[test]
    fn content_length_goes_with_transfer_encoding() {
        let mut h = headers(&[("transfer-encoding", "chunked"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        let mut h = headers(&[("content-length", "3")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, headers(&[("content-length", "3")]));
    }

    #[test]
    fn an_h2c_upgrade_is_no_upgrade() {
        for upgrade in ["h2c", "H2C", "websocket, h2c"] {
            let mut h = headers(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", upgrade),
                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ]);
            assert!(!is_upgrade(&h), "{upgrade}");
            strip_hop_by_hop(&mut h, false);
            assert!(h.is_empty(), "{upgrade}: {h:?}");
        }
    }

    #[test]
    fn keeps_what_upgrades_and_grpc_need() {
        let mut h = headers(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("te", "trailers"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h,
            headers(&[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("te", "trailers")
            ])
        );
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
    }
}
