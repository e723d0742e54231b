//! Routes: matching by path prefix, headers (exact or regex) and method, and the table that sends
//! each request down the first route that matches.

use std::sync::Arc;

use http::Request;

use crate::ctx::{ChosenSubset, Labels};
use crate::http::body::Body;
use crate::http::error::ProxyError;
use crate::metrics::RequestLabels;
use crate::outbound::stack::{Built, Leaf, ResponseFuture, Stack};
use crate::policy::{HeaderMatch, HeaderValueMatch, RouteMatch};

pub struct Route {
    /// `None` for the spec-level policy, which takes what no route matched.
    matcher: Option<RouteMatch>,
    labels: RequestLabels,
    service: Stack,
    /// The route and attempt levels' parts, top-down.
    layers: Vec<&'static str>,
}

impl Route {
    pub fn new(matcher: Option<RouteMatch>, labels: RequestLabels, built: Built) -> Self {
        Self {
            matcher,
            labels,
            service: built.stack,
            layers: built.names,
        }
    }

    /// The route's name (empty for what no route matched) and its parts, top-down.
    pub fn describe(&self) -> (&str, &[&'static str]) {
        (&self.labels.route, &self.layers)
    }
}

/// Sends each request down the first route that matches, and labels the response with the route
/// and subset, including the responses the proxy makes for errors.
#[derive(Clone)]
pub struct RouteTable {
    routes: Arc<[Route]>,
}

impl RouteTable {
    /// The last route must match everything.
    pub fn new(routes: Vec<Route>) -> Self {
        assert!(
            routes.last().is_some_and(|route| route.matcher.is_none()),
            "a route table ends with the route for what no other matched"
        );
        Self {
            routes: routes.into(),
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

impl Leaf for RouteTable {
    fn name(&self) -> &'static str {
        "route table"
    }

    fn call(&self, request: Request<Body>) -> ResponseFuture {
        let route = self
            .routes
            .iter()
            .find(|r| r.matcher.as_ref().is_none_or(|m| m.matches(&request)))
            .expect("the last route matches everything");
        let mut labels = route.labels.clone();
        let response = tower::Service::call(&mut route.service.clone(), request);
        Box::pin(async move {
            let mut response = response.await.unwrap_or_else(ProxyError::into_response);
            if let Some(ChosenSubset(subset)) = response.extensions_mut().remove::<ChosenSubset>() {
                labels.dst_subset = subset;
            }
            response.extensions_mut().insert(Labels(labels));
            Ok(response)
        })
    }
}

impl RouteMatch {
    pub fn matches<B>(&self, request: &Request<B>) -> bool {
        self.path_prefix
            .as_deref()
            .is_none_or(|prefix| path_has_prefix(request.uri().path(), prefix))
            && self.method.as_ref().is_none_or(|m| m == request.method())
            && self
                .headers
                .iter()
                .all(|header| header.matches(request.headers()))
    }
}

impl HeaderMatch {
    /// Whether one of the header's values matches.
    pub(crate) fn matches(&self, headers: &http::HeaderMap) -> bool {
        headers
            .get_all(&self.name)
            .iter()
            // Header values may be any bytes; only UTF-8 ones can equal a pattern.
            .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
            .any(|value| self.value.matches(value))
    }
}

impl HeaderValueMatch {
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            HeaderValueMatch::Exact(exact) => value == exact,
            HeaderValueMatch::Regex(regex) => regex.is_match(value),
        }
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`: prefixes are whole path segments,
/// as in Gateway API and Istio.
pub(crate) fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    fn header(name: &str, value: HeaderValueMatch) -> HeaderMatch {
        HeaderMatch {
            name: name.parse().unwrap(),
            value,
        }
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        let m = RouteMatch {
            path_prefix: Some("/api".into()),
            ..Default::default()
        };
        for (path, expected) in [
            ("/api", true),
            ("/api/v1", true),
            ("/api/", true),
            ("/apix", false),
            ("/", false),
        ] {
            assert_eq!(m.matches(&request("GET", path, &[])), expected, "{path}");
        }
        let root = RouteMatch {
            path_prefix: Some("/".into()),
            ..Default::default()
        };
        assert!(root.matches(&request("GET", "/anything", &[])));
    }

    #[test]
    fn every_condition_must_hold() {
        let m = RouteMatch {
            headers: vec![
                header("x-canary", HeaderValueMatch::Exact("true".into())),
                header(
                    "x-user",
                    HeaderValueMatch::Regex(regex::Regex::new("^(?:user-[0-9]+)$").unwrap()),
                ),
            ],
            path_prefix: Some("/api".into()),
            method: Some(http::Method::GET),
        };
        let good = [("x-canary", "true"), ("x-user", "user-42")];
        assert!(m.matches(&request("GET", "/api/x", &good)));
        assert!(!m.matches(&request("POST", "/api/x", &good)));
        assert!(!m.matches(&request("GET", "/web", &good)));
        assert!(!m.matches(&request(
            "GET",
            "/api",
            &[("x-canary", "true"), ("x-user", "user-4x")]
        )));
        assert!(!m.matches(&request("GET", "/api", &[("x-user", "user-1")])));
        assert!(RouteMatch::default().matches(&request("DELETE", "/", &[])));
    }
}
