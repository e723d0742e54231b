//! A destination's configuration as the proxy applies it: validated types only (`control::decode`
//! makes them from what the control plane sends, refusing what cannot be applied).

mod authz;
mod http_route;

use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderName;
use outrigger_api::identity::SpiffeId;
use serde::Serialize;

pub use self::authz::{
    Action, AuthorizationPolicy, AuthorizationRule, Call, CallMatch, CallerMatch,
    InboundAuthorization, PathMatch, judge,
};
pub use self::http_route::{
    HeaderModifier, HttpFilter, HttpPathMatch, HttpRouteMatch, HttpRouteRule, HttpRouteTable,
    PathRewrite, QueryParamMatch, Redirect, Rewrite, RouteBackend,
};

#[derive(Debug, Clone, Serialize)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub pod: String,
    pub subsets: Vec<String>,
    pub h2c: bool,
    /// A meshed endpoint's identity, which it must present over mutual TLS; None: plaintext.
    #[serde(serialize_with = "serialize_identity")]
    pub identity: Option<SpiffeId>,
}

impl EndpointConfig {
    /// An endpoint known only by its address (the local app).
    pub fn at(address: SocketAddr) -> Self {
        Self {
            address,
            pod: String::new(),
            subsets: Vec::new(),
            h2c: false,
            identity: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationConfig {
    pub version: String,
    pub namespace: String,
    pub service: String,
    pub port: u16,
    /// `namespace/name` of the DestinationPolicy in force.
    pub policy: Option<String>,
    pub policy_generation: i64,
    pub subsets: Vec<String>,
    pub endpoints: Vec<EndpointConfig>,
    pub load_balancer: Algorithm,
    #[serde(serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
    /// For requests no route matches.
    pub traffic: TrafficPolicy,
    /// First match wins.
    pub routes: Vec<RouteConfig>,
    pub outlier_detection: Option<OutlierConfig>,
    pub connection_pool: PoolLimits,
    pub rate_limit: Option<RateLimitConfig>,
    pub fault_injection: Option<FaultConfig>,
    /// The Gateway API routes that serve this proxy's calls to this Service port, if any: then
    /// they, not `routes` and `traffic`, decide where a call goes.
    pub http_routes: Option<HttpRouteTable>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Algorithm {
    PeakEwma,
    RoundRobin,
    LeastRequest,
    Random,
    /// Requests with the same value of this header go to the same endpoint while the set is
    /// unchanged; adding or removing an endpoint moves only its share of keys.
    ConsistentHash {
        #[serde(serialize_with = "serialize_header")]
        header: HeaderName,
    },
}

/// What a route may override: the split, the timeout and the retries.
#[derive(Debug, Clone, Serialize)]
pub struct TrafficPolicy {
    /// `None`: every endpoint, whatever its subset.
    pub split: Option<Vec<WeightedSubset>>,
    #[serde(serialize_with = "serialize_optional_duration")]
    pub timeout: Option<Duration>,
    /// `None`: only connect failures are retried, once.
    pub retries: Option<RetryPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightedSubset {
    pub subset: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteConfig {
    pub name: String,
    pub matcher: RouteMatch,
    pub traffic: TrafficPolicy,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteMatch {
    pub headers: Vec<HeaderMatch>,
    pub path_prefix: Option<String>,
    #[serde(serialize_with = "serialize_optional_method")]
    pub method: Option<http::Method>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatch {
    #[serde(serialize_with = "serialize_header")]
    pub name: HeaderName,
    pub value: HeaderValueMatch,
}

#[derive(Debug, Clone, Serialize)]
pub enum HeaderValueMatch {
    Exact(String),
    /// Anchored to the whole value; the `regex` crate runs in linear time, so a hostile pattern
    /// or header cannot stall the proxy.
    Regex(#[serde(serialize_with = "serialize_regex")] regex::Regex),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    pub server_error: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub retriable_status_codes: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    #[serde(serialize_with = "serialize_optional_duration")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    pub retriable_status_codes: Vec<u16>,
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_base: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_max: Duration,
    pub budget_percent: u32,
    pub budget_min_per_second: u32,
    pub retry_non_idempotent: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierConfig {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub base_ejection_time: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolLimits {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateLimitConfig {
    pub requests_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FaultConfig {
    pub delay_percent: f64,
    #[serde(serialize_with = "serialize_duration")]
    pub delay: Duration,
    pub abort_percent: f64,
    pub abort_status: u16,
}

fn serialize_identity<S: serde::Serializer>(
    id: &Option<SpiffeId>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_str(&id.to_string()),
        None => s.serialize_none(),
    }
}

pub fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn serialize_optional_duration<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => serialize_duration(d, s),
        None => s.serialize_none(),
    }
}

fn serialize_optional_method<S: serde::Serializer>(
    m: &Option<http::Method>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.as_str()),
        None => s.serialize_none(),
    }
}

fn serialize_regex<S: serde::Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

pub fn serialize_header<S: serde::Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.as_str())
}
