//! What an HTTPRoute rule's filters do to a request, as Gateway API defines them: header
//! modifiers change request or response headers, a redirect answers the request itself, and a
//! rewrite changes the path and Host the backend sees.

use http::header::{HOST, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};

use crate::http::body::{Body, full, proxy_error};
use crate::policy::{HeaderModifier, PathRewrite, Redirect, Rewrite};

impl HeaderModifier {
    /// In the spec's order: set, then add, then remove. Request and response headers alike.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name, value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name, value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// The redirect's answer to `request`, sent to the Service's `service_port` (the spec's listener
/// port). `matched_prefix` is what a prefix rewrite replaces.
pub(crate) fn redirect<B>(
    redirect: &Redirect,
    request: &Request<B>,
    matched_prefix: Option<&str>,
    service_port: u16,
) -> Response<Body> {
    let uri = request.uri();
    // The mesh terminates TLS: what the app sends is plain http unless its URI says otherwise.
    let scheme = redirect
        .scheme
        .as_deref()
        .or(uri.scheme_str())
        .unwrap_or("http");
    let Some(host) = redirect.hostname.clone().or_else(|| request_host(request)) else {
        return proxy_error(
            StatusCode::BAD_REQUEST,
            "the redirect keeps the request's host, and the request has none",
        );
    };
    let port = redirect
        .port
        .or_else(|| redirect.scheme.as_deref().and_then(well_known_port))
        .unwrap_or(service_port);
    let port = if well_known_port(scheme) == Some(port) {
        String::new()
    } else {
        format!(":{port}")
    };
    let path = match &redirect.path {
        Some(rewrite) => rewrite_path(rewrite, uri.path(), matched_prefix),
        None => uri.path().to_string(),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = format!("{scheme}://{host}{port}{path}{query}");
    // A configured path may hold what a URI may not (a space): no Location at all is better than
    // one the client cannot follow.
    let Some(location_value) = location
        .parse::<Uri>()
        .ok()
        .and_then(|_| HeaderValue::try_from(&location).ok())
    else {
        return proxy_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the redirect's location `{location}` is not a URI"),
        );
    };
    let mut response = Response::new(full(bytes::Bytes::new()));
    *response.status_mut() = redirect.status;
    response.headers_mut().insert(LOCATION, location_value);
    response
}

/// Changes `request`'s path and Host as `rewrite` says, keeping its query. `matched_prefix` is
/// what a prefix rewrite replaces.
pub(crate) fn rewrite<B>(
    rewrite: &Rewrite,
    request: &mut Request<B>,
    matched_prefix: Option<&str>,
) {
    match rewritten(rewrite, request, matched_prefix) {
        Ok((uri, host)) => {
            *request.uri_mut() = uri;
            if let Some(host) = host {
                request.headers_mut().insert(HOST, host);
            }
        }
        // A configured path may hold what a URI may not (a space): the request goes on as it
        // came, rather than with a URI no upstream could read, or a panic.
        Err(error) => tracing::debug!(%error, uri = %request.uri(), "rewrite not applied"),
    }
}

/// The URI and Host header `rewrite` makes of `request`'s, both or neither.
fn rewritten<B>(
    rewrite: &Rewrite,
    request: &Request<B>,
    matched_prefix: Option<&str>,
) -> Result<(Uri, Option<HeaderValue>), http::Error> {
    let uri = request.uri();
    let mut parts = uri.clone().into_parts();
    if let Some(path) = &rewrite.path {
        let path = rewrite_path(path, uri.path(), matched_prefix);
        let path_and_query = match uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        parts.path_and_query = Some(PathAndQuery::try_from(path_and_query)?);
    }
    let Some(hostname) = &rewrite.hostname else {
        return Ok((Uri::from_parts(parts)?, None));
    };
    // HTTP/2 carries the host as `:authority`, which is the URI's.
    if parts.authority.is_some() {
        parts.authority = Some(Authority::try_from(hostname.as_str())?);
    }
    Ok((
        Uri::from_parts(parts)?,
        Some(HeaderValue::try_from(hostname)?),
    ))
}

fn rewrite_path(rewrite: &PathRewrite, path: &str, matched_prefix: Option<&str>) -> String {
    match rewrite {
        PathRewrite::Full(full) => full.clone(),
        // A match without a path condition holds for every path, as the prefix `/` does (the
        // spec's default match).
        PathRewrite::Prefix(replacement) => {
            replace_prefix(path, matched_prefix.unwrap_or("/"), replacement)
        }
    }
}

/// `path` with the whole segments `prefix` covers replaced by `replacement`, as the spec's table
/// has it: with `/foo` replaced by `/xyz`, `/foo/bar` is `/xyz/bar` and `/foo` is `/xyz`; by `/`,
/// `/foo/bar` is `/bar` and `/foo` is `/`. Trailing slashes of the prefix and the replacement
/// count for nothing; the path's own stays.
fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let rest = match path.strip_prefix(prefix.trim_end_matches('/')) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        // The prefix does not cover the path (a match other than the one that held): nothing of
        // it to replace.
        _ => return path.to_string(),
    };
    let replaced = format!("{}{rest}", replacement.trim_end_matches('/'));
    if replaced.is_empty() {
        "/".to_string()
    } else {
        replaced
    }
}

/// The host the request was sent to, without its port: the URI's in absolute form (and HTTP/2),
/// else the Host header's.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    if let Some(host) = request.uri().host() {
        return Some(host.to_string());
    }
    let host = request.headers().get(HOST)?;
    let authority = Authority::try_from(host.as_bytes()).ok()?;
    Some(authority.host().to_string())
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, Version};
    use http_body::Body as _;

    use super::*;
    use crate::http::body::PROXY_ERROR_HEADER;

    fn request(uri: &str, host: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        builder.body(()).unwrap()
    }

    /// An HTTP/2 request as hyper hands it over: the host is in the URI, not a header.
    fn h2_request(uri: &str) -> Request<()> {
        Request::builder()
            .version(Version::HTTP_2)
            .uri(uri)
            .body(())
            .unwrap()
    }

    fn redirect_to() -> Redirect {
        Redirect {
            scheme: None,
            hostname: None,
            port: None,
            path: None,
            status: StatusCode::FOUND,
        }
    }

    fn location(response: &Response<Body>) -> &str {
        response.headers()[LOCATION].to_str().unwrap()
    }

    /// The Location of `redirect`'s answer to a request for `path` to Host `echo`, service port 80.
    fn redirected(redirect: &Redirect, path: &str, matched_prefix: Option<&str>) -> String {
        let response = super::redirect(redirect, &request(path, Some("echo")), matched_prefix, 80);
        assert_eq!(response.status(), redirect.status);
        location(&response).to_string()
    }

    fn header(name: &str, value: &str) -> (HeaderName, HeaderValue) {
        (name.parse().unwrap(), value.parse().unwrap())
    }

    fn values<'h>(headers: &'h HeaderMap, name: &str) -> Vec<&'h str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn a_header_modifier_sets_then_adds_then_removes() {
        let modifier = HeaderModifier {
            set: vec![header("X-Set", "set"), header("x-fresh", "fresh")],
            add: vec![
                header("x-set", "added"),
                header("x-add", "added"),
                header("x-gone", "added"),
            ],
            remove: vec!["X-Gone".parse().unwrap(), "x-absent".parse().unwrap()],
        };
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-set", "one"),
            ("x-set", "two"),
            ("x-add", "kept"),
            ("x-gone", "old"),
            ("x-other", "kept"),
        ] {
            headers.append(name, value.parse().unwrap());
        }
        modifier.apply(&mut headers);
        assert_eq!(values(&headers, "x-set"), ["set", "added"]);
        assert_eq!(values(&headers, "x-fresh"), ["fresh"]);
        assert_eq!(values(&headers, "x-add"), ["kept", "added"]);
        assert_eq!(values(&headers, "x-other"), ["kept"]);
        assert!(!headers.contains_key("x-gone"));
        assert!(!headers.contains_key("x-absent"));
    }

    #[test]
    fn a_header_modifier_changes_request_and_response_headers_alike() {
        let modifier = HeaderModifier {
            set: vec![header("x-set", "set")],
            add: vec![header("x-add", "added")],
            remove: vec!["x-remove".parse().unwrap()],
        };
        let mut request = request("/", Some("echo"));
        request
            .headers_mut()
            .insert("x-remove", "gone".parse().unwrap());
        modifier.apply(request.headers_mut());
        let mut response = Response::new(());
        response
            .headers_mut()
            .insert("x-set", "old".parse().unwrap());
        response
            .headers_mut()
            .insert("x-remove", "gone".parse().unwrap());
        modifier.apply(response.headers_mut());
        for headers in [request.headers(), response.headers()] {
            assert_eq!(values(headers, "x-set"), ["set"]);
            assert_eq!(values(headers, "x-add"), ["added"]);
            assert!(!headers.contains_key("x-remove"));
        }
        assert_eq!(values(request.headers(), "host"), ["echo"]);
    }

    #[test]
    fn a_prefix_replacement_follows_the_specs_table() {
        for (path, prefix, replacement, expected) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/foo/bar", "/foo", "/", "/bar"),
            ("/foo/bar", "/", "/xyz", "/xyz/foo/bar"),
            ("/", "/", "/xyz", "/xyz/"),
            (
                "/original-prefix/lemon",
                "/original-prefix",
                "/replacement-prefix",
                "/replacement-prefix/lemon",
            ),
            (
                "/original-prefix",
                "/original-prefix",
                "/replacement-prefix",
                "/replacement-prefix",
            ),
        ] {
            assert_eq!(
                replace_prefix(path, prefix, replacement),
                expected,
                "{path} with {prefix} replaced by {replacement}"
            );
        }
    }

    #[test]
    fn a_prefix_that_does_not_cover_the_path_replaces_nothing() {
        assert_eq!(replace_prefix("/foobar", "/foo", "/xyz"), "/foobar");
        assert_eq!(replace_prefix("/other", "/foo", "/xyz"), "/other");
    }

    #[test]
    fn a_redirect_replaces_the_matched_prefix() {
        let redirect = Redirect {
            path: Some(PathRewrite::Prefix("/replacement-prefix".into())),
            ..redirect_to()
        };
        let prefix = Some("/original-prefix");
        assert_eq!(
            redirected(&redirect, "/original-prefix/lemon", prefix),
            "http://echo/replacement-prefix/lemon"
        );
        assert_eq!(
            redirected(&redirect, "/original-prefix", prefix),
            "http://echo/replacement-prefix"
        );
    }

    #[test]
    fn a_redirect_replaces_the_full_path() {
        let redirect = Redirect {
            path: Some(PathRewrite::Full("/full-path-replaced".into())),
            ..redirect_to()
        };
        assert_eq!(
            redirected(&redirect, "/full/path/original", Some("/full")),
            "http://echo/full-path-replaced"
        );
    }

    #[test]
    fn a_redirect_to_a_hostname_drops_the_requests_port() {
        let redirect = Redirect {
            hostname: Some("example.org".into()),
            ..redirect_to()
        };
        assert_eq!(
            redirected(&redirect, "/hostname-redirect", None),
            "http://example.org/hostname-redirect"
        );
        let response = super::redirect(
            &redirect,
            &request("/hostname-redirect", Some("redirect.example:8080")),
            None,
            80,
        );
        assert_eq!(location(&response), "http://example.org/hostname-redirect");
    }

    #[test]
    fn a_redirect_to_a_port_names_it() {
        let redirect = Redirect {
            port: Some(8083),
            ..redirect_to()
        };
        assert_eq!(
            redirected(&redirect, "/port", None),
            "http://echo:8083/port"
        );
    }

    #[test]
    fn a_redirect_to_a_scheme_takes_its_well_known_port() {
        let https = Redirect {
            scheme: Some("https".into()),
            ..redirect_to()
        };
        assert_eq!(redirected(&https, "/scheme", None), "https://echo/scheme");
        // Not the Service port: the spec has the scheme's.
        let response = super::redirect(&https, &request("/scheme", Some("echo:8080")), None, 8080);
        assert_eq!(location(&response), "https://echo/scheme");
    }

    #[test]
    fn a_redirect_names_a_port_unless_it_is_the_schemes_own() {
        for (scheme, port, expected) in [
            ("https", 443, "https://echo/"),
            ("https", 8443, "https://echo:8443/"),
            ("https", 80, "https://echo:80/"),
            ("http", 80, "http://echo/"),
            ("http", 443, "http://echo:443/"),
        ] {
            let redirect = Redirect {
                scheme: Some(scheme.into()),
                port: Some(port),
                ..redirect_to()
            };
            assert_eq!(redirected(&redirect, "/", None), expected);
        }
    }

    #[test]
    fn a_redirect_that_changes_nothing_keeps_the_service_port() {
        let response = super::redirect(
            &redirect_to(),
            &request("/path", Some("echo:8080")),
            None,
            8080,
        );
        assert_eq!(location(&response), "http://echo:8080/path");
        let response = super::redirect(&redirect_to(), &request("/path", Some("echo")), None, 80);
        assert_eq!(location(&response), "http://echo/path");
    }

    #[test]
    fn a_redirect_keeps_its_status() {
        for status in [301, 302, 303, 307, 308] {
            let redirect = Redirect {
                status: StatusCode::from_u16(status).unwrap(),
                ..redirect_to()
            };
            let response = super::redirect(&redirect, &request("/", Some("echo")), None, 80);
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(location(&response), "http://echo/");
            assert_eq!(response.body().size_hint().exact(), Some(0));
        }
    }

    #[test]
    fn a_redirect_keeps_the_query() {
        let prefix = Redirect {
            path: Some(PathRewrite::Prefix("/new".into())),
            ..redirect_to()
        };
        assert_eq!(
            redirected(&prefix, "/old/x?a=1&b=%20", Some("/old")),
            "http://echo/new/x?a=1&b=%20"
        );
        let full = Redirect {
            path: Some(PathRewrite::Full("/new".into())),
            ..redirect_to()
        };
        assert_eq!(redirected(&full, "/old/x?a=1", None), "http://echo/new?a=1");
        assert_eq!(
            redirected(&redirect_to(), "/old?a=1", None),
            "http://echo/old?a=1"
        );
    }

    #[test]
    fn a_redirect_of_an_absolute_uri_keeps_its_scheme_and_host() {
        let request = h2_request("https://echo:8443/path?q=1");
        let response = super::redirect(&redirect_to(), &request, None, 8443);
        assert_eq!(location(&response), "https://echo:8443/path?q=1");
        let response = super::redirect(&redirect_to(), &request, None, 443);
        assert_eq!(location(&response), "https://echo/path?q=1");
    }

    #[test]
    fn a_redirect_keeps_an_ipv6_host_without_its_port() {
        let response = super::redirect(
            &redirect_to(),
            &request("/", Some("[fd00::1]:8080")),
            None,
            8080,
        );
        assert_eq!(location(&response), "http://[fd00::1]:8080/");
    }

    #[test]
    fn a_redirect_of_a_request_without_a_host_needs_a_hostname() {
        let response = super::redirect(&redirect_to(), &request("/", None), None, 80);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.headers().contains_key(PROXY_ERROR_HEADER));
        let redirect = Redirect {
            hostname: Some("example.org".into()),
            ..redirect_to()
        };
        let response = super::redirect(&redirect, &request("/", None), None, 80);
        assert_eq!(location(&response), "http://example.org/");
    }

    #[test]
    fn a_redirect_to_a_path_no_uri_may_hold_is_the_proxys_error() {
        let redirect = Redirect {
            path: Some(PathRewrite::Full("/a b".into())),
            ..redirect_to()
        };
        let response = super::redirect(&redirect, &request("/", Some("echo")), None, 80);
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!response.headers().contains_key(LOCATION));
    }

    fn path_rewrite(path: PathRewrite) -> Rewrite {
        Rewrite {
            hostname: None,
            path: Some(path),
        }
    }

    #[test]
    fn a_rewrite_replaces_the_matched_prefix_of_an_http1_request() {
        let rewrite = path_rewrite(PathRewrite::Prefix("/one".into()));
        let mut request = request("/prefix/one/two?x=1", Some("echo"));
        super::rewrite(&rewrite, &mut request, Some("/prefix/one"));
        assert_eq!(request.uri(), "/one/two?x=1");
        assert_eq!(request.headers()[HOST], "echo");
    }

    #[test]
    fn a_rewrite_replaces_the_matched_prefix_of_an_http2_request() {
        let rewrite = path_rewrite(PathRewrite::Prefix("/".into()));
        let mut request = h2_request("http://echo:8080/strip-prefix/three?x=1");
        super::rewrite(&rewrite, &mut request, Some("/strip-prefix"));
        assert_eq!(request.uri(), "http://echo:8080/three?x=1");
        assert!(!request.headers().contains_key(HOST));
    }

    #[test]
    fn a_rewrite_replaces_the_full_path() {
        let rewrite = path_rewrite(PathRewrite::Full("/one".into()));
        let mut http1 = request("/full/one/two?x=1", Some("echo"));
        super::rewrite(&rewrite, &mut http1, Some("/full"));
        assert_eq!(http1.uri(), "/one?x=1");
        let mut http2 = h2_request("http://echo/full/one/two");
        super::rewrite(&rewrite, &mut http2, Some("/full"));
        assert_eq!(http2.uri(), "http://echo/one");
    }

    #[test]
    fn a_rewrite_of_the_hostname_changes_the_host_header() {
        let rewrite = Rewrite {
            hostname: Some("one.example.org".into()),
            path: None,
        };
        let mut request = request("/path?x=1", Some("echo:8080"));
        super::rewrite(&rewrite, &mut request, None);
        assert_eq!(request.uri(), "/path?x=1");
        assert_eq!(values(request.headers(), "host"), ["one.example.org"]);
    }

    #[test]
    fn a_rewrite_of_the_hostname_changes_an_http2_requests_authority() {
        let rewrite = Rewrite {
            hostname: Some("one.example.org".into()),
            path: Some(PathRewrite::Prefix("/new".into())),
        };
        let mut request = h2_request("http://echo:8080/old/path?x=1");
        super::rewrite(&rewrite, &mut request, Some("/old"));
        assert_eq!(request.uri(), "http://one.example.org/new/path?x=1");
        assert_eq!(request.headers()[HOST], "one.example.org");
    }

    #[test]
    fn a_rewrite_that_would_make_an_invalid_uri_leaves_the_request_as_it_was() {
        let rewrite = Rewrite {
            hostname: Some("one.example.org".into()),
            path: Some(PathRewrite::Full("/a b".into())),
        };
        let mut request = request("/path?x=1", Some("echo"));
        super::rewrite(&rewrite, &mut request, None);
        assert_eq!(request.uri(), "/path?x=1");
        assert_eq!(request.headers()[HOST], "echo");
    }

    #[test]
    fn a_rewrite_without_a_path_prefix_match_treats_the_path_as_under_the_root() {
        let rewrite = path_rewrite(PathRewrite::Prefix("/api".into()));
        let mut request = request("/v1/x", Some("echo"));
        super::rewrite(&rewrite, &mut request, None);
        assert_eq!(request.uri(), "/api/v1/x");
    }
}
