//! Gateway API routes (HTTPRoute, GRPCRoute) of a Service port, as the proxy applies them: the
//! table of the caller's namespace, its matches in the order the spec's precedence tries them.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use serde::Serialize;

use super::{
    HeaderMatch, HeaderValueMatch, RetryPolicy, serialize_optional_duration,
    serialize_optional_method, serialize_regex,
};

#[derive(Debug, Clone, Serialize)]
pub struct HttpRouteTable {
    pub rules: Vec<HttpRouteRule>,
    /// Tried in order; the first that holds picks its rule. None: 404.
    pub matches: Vec<HttpRouteMatch>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpRouteMatch {
    /// Index into the table's rules.
    pub rule: usize,
    pub path: Option<HttpPathMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryParamMatch>,
    #[serde(serialize_with = "serialize_optional_method")]
    pub method: Option<Method>,
}

#[derive(Debug, Clone, Serialize)]
pub enum HttpPathMatch {
    Exact(String),
    /// Whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    /// Anchored to the whole path.
    Regex(#[serde(serialize_with = "serialize_regex")] regex::Regex),
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryParamMatch {
    /// Case-sensitive, as the spec says.
    pub name: String,
    pub value: HeaderValueMatch,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRouteRule {
    /// `<kind>/<namespace>/<name>` of the route.
    pub route: String,
    pub name: Option<String>,
    pub filters: Vec<HttpFilter>,
    pub backends: Vec<RouteBackend>,
    #[serde(serialize_with = "serialize_optional_duration")]
    pub request_timeout: Option<Duration>,
    #[serde(serialize_with = "serialize_optional_duration")]
    pub backend_request_timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteBackend {
    /// The backend Service port's destination key, or why the backend cannot be resolved.
    pub target: Result<String, String>,
    pub weight: u32,
    pub filters: Vec<HttpFilter>,
}

#[derive(Debug, Clone, Serialize)]
pub enum HttpFilter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderModifier {
    #[serde(serialize_with = "serialize_header_values")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "serialize_header_values")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "serialize_header_names")]
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    /// `http` or `https`; None keeps the request's.
    pub scheme: Option<String>,
    /// None keeps the request's Host (without its port).
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    #[serde(serialize_with = "serialize_status")]
    pub status: StatusCode,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathRewrite>,
}

#[derive(Debug, Clone, Serialize)]
pub enum PathRewrite {
    /// The whole path becomes this.
    Full(String),
    /// The part of the path the matched prefix covered becomes this.
    Prefix(String),
}

fn serialize_header_values<S: serde::Serializer>(
    headers: &[(HeaderName, HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap_or("<binary>"))),
    )
}

fn serialize_header_names<S: serde::Serializer>(
    names: &[HeaderName],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(names.iter().map(HeaderName::as_str))
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}
