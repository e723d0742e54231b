//! The `DestinationPolicy` custom resource (group `outrigger.dev`, version `v1alpha1`): traffic
//! policy for calls to one Service, enforced by every calling proxy.
//!
//! The schema generated from these types carries every check the API server can make, so that
//! `kubectl apply` refuses a bad policy with the field named: types, ranges, enums, the duration
//! pattern, and CEL rules for what spans fields. The controller repeats the checks when it
//! translates a policy (a manifests directory has no API server in front of it).
//!
//! Defaults: a field left out of a block that is present takes the value SPEC.md gives it
//! ([`crate::defaults`]), in the types, so serde (manifests mode) and the API server (from the schema's `default`) fill in
//! the same values. Only `rateLimit.burst`, whose default is another field, is left to the
//! controller.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duration;

/// Lists are bounded so that the API server can bound the cost of the CEL rules over them.
pub const MAX_SUBSETS: usize = 16;
pub const MAX_ROUTES: usize = 32;
pub const MAX_HEADER_MATCHES: usize = 16;
pub const MAX_STATUS_CODES: usize = 32;
pub use crate::rules::MAX_ATTEMPTS;

/// A DNS label (RFC 1123), as Kubernetes names subsets and routes.
const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A Service name, optionally qualified: `reviews`, `reviews.shop`, `reviews.shop.svc.cluster.local`.
const HOST: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An HTTP header name (an RFC 9110 token).
const HEADER_NAME: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

// Each printcolumn(...) repeats the same keys, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "outrigger.dev",
    version = "v1alpha1",
    kind = "DestinationPolicy",
    namespaced,
    shortname = "dp",
    category = "outrigger",
    status = "DestinationPolicyStatus",
    derive = "PartialEq",
    doc = "Traffic policy for calls to one Service, enforced by every calling proxy.",
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.host"),
    printcolumn(
        name = "Split",
        type_ = "string",
        json_path = ".status.split",
        description = "Traffic split by subset, e.g. stable=90,canary=10"
    ),
    printcolumn(name = "Timeout", type_ = "string", json_path = ".spec.timeout"),
    printcolumn(
        name = "Retries",
        type_ = "integer",
        json_path = ".spec.retries.attempts"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Proxies",
        type_ = "string",
        json_path = ".status.proxiesSummary",
        description = "Proxies that acknowledged the current generation / proxies connected"
    ),
    printcolumn(
        name = "Routed-By",
        type_ = "string",
        json_path = ".status.routedBy",
        description = "The Gateway API routes that serve calls to its Service"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.trafficSplit) || self.trafficSplit.all(w, has(self.subsets) && self.subsets.exists(s, s.name == w.subset))",
        "message": "every trafficSplit subset must be declared in subsets",
        "fieldPath": ".trafficSplit",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.routes) || self.routes.all(r, !has(r.trafficSplit) || r.trafficSplit.all(w, has(self.subsets) && self.subsets.exists(s, s.name == w.subset)))",
        "message": "every routes[].trafficSplit subset must be declared in subsets",
        "fieldPath": ".routes",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.timeout) || !has(self.retries) || !has(self.retries.perTryTimeout) || duration(self.retries.perTryTimeout) <= duration(self.timeout)",
        "message": "retries.perTryTimeout must not exceed timeout",
        "fieldPath": ".retries.perTryTimeout",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.routes) || self.routes.all(r, !has(r.retries) || !has(r.retries.perTryTimeout) || (has(r.timeout) ? duration(r.retries.perTryTimeout) <= duration(r.timeout) : !has(self.timeout) || duration(r.retries.perTryTimeout) <= duration(self.timeout)))",
        "message": "routes[].retries.perTryTimeout must not exceed the route's timeout (or the spec's when the route sets none)",
        "fieldPath": ".routes",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "!has(self.routes) || self.routes.all(r, !has(r.timeout) || has(r.retries) || !has(self.retries) || !has(self.retries.perTryTimeout) || duration(self.retries.perTryTimeout) <= duration(r.timeout))",
        "message": "retries.perTryTimeout must not exceed the timeout of a route that inherits these retries",
        "fieldPath": ".routes",
        "reason": "FieldValueInvalid",
    },
]))]
pub struct DestinationPolicySpec {
    /// The Service this policy applies to: its name in this namespace, or its FQDN
    /// (`reviews.shop.svc.cluster.local`).
    #[schemars(length(min = 1, max = 253), pattern(HOST))]
    pub host: String,
    /// Named groups of the Service's pods, by pod labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SUBSETS), extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
    ))]
    pub subsets: Vec<Subset>,
    /// Relative weights of the subsets. Absent: every ready endpoint, whatever its subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_split: Option<TrafficSplit>,
    /// Overrides for matching requests; the first match wins, unmatched requests use the
    /// spec-level policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ROUTES), extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
    ))]
    pub routes: Vec<Route>,
    /// The whole request, all retries included; 504 when exceeded. Absent: no timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Absent: only a request whose connection failed is retried, once, on another endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Passive health checking: a per-endpoint circuit breaker. Absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Absent: PeakEwma.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Absent: no limits, connect timeout 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// A local token bucket per calling proxy; 429 with Retry-After beyond it. Absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Delays and errors injected on purpose, for chaos tests. Absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjection>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Subset {
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL))]
    pub name: String,
    /// Pods carrying all these labels belong to the subset.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 16))]
    pub labels: BTreeMap<String, String>,
}

/// Relative weights of subsets; integers, at least one above 0. A subset of weight 0 gets nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct TrafficSplit(
    #[schemars(
        length(min = 1, max = MAX_SUBSETS),
        extend(
            "x-kubernetes-list-type" = "map",
            "x-kubernetes-list-map-keys" = ["subset"],
            "x-kubernetes-validations" = [{
                "rule": "self.exists(w, w.weight > 0)",
                "message": "at least one weight must be above 0",
            }],
        )
    )]
    pub Vec<WeightedSubset>,
);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WeightedSubset {
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL))]
    pub subset: String,
    #[schemars(range(max = 1_000_000))]
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL))]
    pub name: String,
    /// What a request must carry to take this route; every part given must match. Empty: all.
    #[serde(default)]
    pub r#match: RouteMatch,
    /// Absent: the spec-level split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_split: Option<TrafficSplit>,
    /// Absent: the spec-level timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Absent: the spec-level retries. Present: replaces them wholly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Request headers by name, each with the value it must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = MAX_HEADER_MATCHES))]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), pattern(r"^/"))]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
}

/// Exactly one of `exact` or `regex`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.exact) != has(self.regex)",
    "message": "exactly one of exact or regex must be set",
}]))]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub exact: Option<String>,
    /// RE2 syntax, matched against the whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serialized_name(self))
    }
}

/// The name serde gives a unit variant, so that `Display` cannot disagree with the schema.
fn serialized_name(variant: &impl Serialize) -> String {
    match serde_json::to_value(variant) {
        Ok(Value::String(name)) => name,
        _ => unreachable!("unit variants serialize as strings"),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!('retriable-status-codes' in self.retryOn) || has(self.retriableStatusCodes) && size(self.retriableStatusCodes) > 0",
    "message": "retryOn retriable-status-codes needs retriableStatusCodes",
    "fieldPath": ".retriableStatusCodes",
    "reason": "FieldValueRequired",
}]))]
pub struct Retries {
    /// Retries after the first try (so at most attempts + 1 tries).
    #[serde(default = "defaults::attempts")]
    #[schemars(range(max = MAX_ATTEMPTS))]
    pub attempts: u32,
    /// Each try's own timeout. Absent: only the overall timeout applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default = "defaults::retry_on")]
    #[schemars(length(min = 1, max = 5), extend("x-kubernetes-list-type" = "set"))]
    pub retry_on: Vec<RetryOn>,
    /// The statuses that `retriable-status-codes` retries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = MAX_STATUS_CODES),
        inner(range(min = 100, max = 599)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default)]
    pub budget: RetryBudget,
    /// POST and PATCH are retried only when true (other methods are idempotent).
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 and 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The connection was reset before a response.
    #[serde(rename = "reset")]
    Reset,
    /// The statuses listed in `retriableStatusCodes`.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
}

impl RetryOn {
    pub const ALL: [RetryOn; 5] = [
        RetryOn::ServerError,
        RetryOn::GatewayError,
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::RetriableStatusCodes,
    ];
}

impl From<RetryOn> for crate::proto::RetryOn {
    fn from(condition: RetryOn) -> Self {
        match condition {
            RetryOn::ServerError => Self::ServerError,
            RetryOn::GatewayError => Self::GatewayError,
            RetryOn::ConnectFailure => Self::ConnectFailure,
            RetryOn::Reset => Self::Reset,
            RetryOn::RetriableStatusCodes => Self::RetriableStatusCodes,
        }
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = serde_json::to_value(self).expect("a unit variant serializes");
        f.write_str(
            value
                .as_str()
                .expect("a unit variant serializes as a string"),
        )
    }
}

/// Exponential backoff between tries, with full jitter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.baseInterval) <= duration(self.maxInterval)",
    "message": "baseInterval must not exceed maxInterval",
}]))]
pub struct Backoff {
    #[serde(default = "defaults::backoff_base")]
    pub base_interval: Duration,
    #[serde(default = "defaults::backoff_max")]
    pub max_interval: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_interval: defaults::backoff_base(),
            max_interval: defaults::backoff_max(),
        }
    }
}

/// Retries may add at most `percent` of the requests, plus `minRetriesPerSecond`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    #[serde(default = "defaults::budget_percent")]
    #[schemars(range(max = 100))]
    pub percent: u32,
    #[serde(default = "defaults::budget_min_per_second")]
    #[schemars(range(max = 1_000_000))]
    pub min_retries_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: defaults::budget_percent(),
            min_retries_per_second: defaults::budget_min_per_second(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.baseEjectionTime) <= duration(self.maxEjectionTime)",
    "message": "baseEjectionTime must not exceed maxEjectionTime",
}]))]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint; 0 turns this check off.
    #[serde(default = "defaults::consecutive_5xx", rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: u32,
    /// Consecutive 502/503/504 responses and connect failures that eject an endpoint; 0 = off.
    #[serde(default)]
    pub consecutive_gateway_errors: u32,
    /// How often ejections are reviewed.
    #[serde(default = "defaults::outlier_interval")]
    pub interval: Duration,
    /// The n-th ejection of an endpoint lasts n times this, up to maxEjectionTime.
    #[serde(default = "defaults::base_ejection_time")]
    pub base_ejection_time: Duration,
    #[serde(default = "defaults::max_ejection_time")]
    pub max_ejection_time: Duration,
    /// Never eject more than this share of the endpoints (at least one while another stays).
    #[serde(default = "defaults::max_ejection_percent")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.algorithm != 'ConsistentHash' || has(self.consistentHash)",
        "message": "algorithm ConsistentHash needs consistentHash.httpHeaderName",
        "fieldPath": ".consistentHash",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "self.algorithm == 'ConsistentHash' || !has(self.consistentHash)",
        "message": "consistentHash applies only to algorithm ConsistentHash",
        "fieldPath": ".consistentHash",
        "reason": "FieldValueForbidden",
    },
]))]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Algorithm {
    /// The less loaded of two random endpoints, by a peak-sensitive latency average (P2C).
    #[default]
    PeakEwma,
    RoundRobin,
    /// The endpoint with the fewest requests in flight (of two random ones).
    LeastRequest,
    Random,
    /// The endpoint picked by a hash of a request header, so equal values stick to one endpoint.
    ConsistentHash,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    #[schemars(length(min = 1, max = 256), pattern(HEADER_NAME))]
    pub http_header_name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Connections from each calling proxy to the destination, all its endpoints together (as an
    /// Envoy circuit breaker counts them). Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,
    /// Tokens the bucket holds. Absent: requestsPerSecond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub burst: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Share of requests delayed, 0 to 100.
    #[schemars(range(min = 0, max = 100))]
    pub percent: f64,
    pub fixed_delay: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// Share of requests answered with httpStatus instead of being forwarded, 0 to 100.
    #[schemars(range(min = 0, max = 100))]
    pub percent: f64,
    #[schemars(range(min = 200, max = 599))]
    pub http_status: u16,
}

/// What the controller observed of a policy, written by the controller only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Accepted, ResolvedRefs, Programmed and Routed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"],
    ))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<ProxyCounts>,
    /// `acknowledged/connected`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies_summary: Option<String>,
    /// The split in force, e.g. `stable=90,canary=10`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// The HTTPRoutes and GRPCRoutes attached to its Service, e.g. `HTTPRoute/shop/reviews`, for
    /// `kubectl get`: the first three, then how many more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_by: Option<String>,
    /// What the proxies of each controller replica did, each entry written by its replica under a
    /// field manager of its own (server-side apply merges them by name); `proxies` sums them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
    ))]
    pub replicas: Vec<ReplicaStatus>,
}

/// The proxies connected to one controller replica, by what they did with the generation it last
/// saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// The replica's name in the leader Lease (its pod's name).
    pub name: String,
    /// The generation these counts are of.
    pub observed_generation: i64,
    #[serde(flatten)]
    pub proxies: ProxyCounts,
    /// `namespace/workload: reason` of one proxy that rejected that generation. The controller cuts
    /// the reason to 1 KiB; the names are bounded too, so this is too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub rejection: Option<String>,
    /// When the replica last wrote this entry (it writes it when its counts change). The leader
    /// removes the entries of replicas that are no longer alive.
    pub last_update_time: Time,
}

/// Proxies that subscribed to the policy's Service, by what they did with its current generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProxyCounts {
    pub connected: u32,
    pub acknowledged: u32,
    pub rejected: u32,
}

/// A duration in the Gateway API form (`250ms`, `10s`, `1m30s`), checked when read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

impl Duration {
    pub fn get(&self) -> std::time::Duration {
        self.value
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Written as a user would write it: whole seconds as `10s`, anything else in milliseconds.
impl From<std::time::Duration> for Duration {
    fn from(value: std::time::Duration) -> Self {
        let ms = value.as_millis();
        let text = if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        };
        Self { text, value }
    }
}

impl TryFrom<String> for Duration {
    type Error = duration::DurationError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let value = duration::parse(&text)?;
        Ok(Self { text, value })
    }
}

impl std::str::FromStr for Duration {
    type Err = duration::DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::try_from(text.to_string())
    }
}

/// Checked while the value is read (not after), so YAML errors point at the value's line.
impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 250ms, 10s, 1m or 1h30m")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl From<Duration> for String {
    fn from(duration: Duration) -> String {
        duration.text
    }
}

impl JsonSchema for Duration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": duration::PATTERN,
            // Four parts of at most five digits and a two-letter unit.
            "maxLength": 28,
        })
    }
}

/// The defaults SPEC.md gives to fields left out of a block that is present.
mod defaults {
    use super::{Duration, RetryOn};
    use crate::defaults::*;

    pub fn attempts() -> u32 {
        RETRY_ATTEMPTS
    }
    pub fn retry_on() -> Vec<RetryOn> {
        RetryOn::ALL
            .into_iter()
            .filter(|condition| RETRY_ON.contains(&(*condition).into()))
            .collect()
    }
    pub fn backoff_base() -> Duration {
        BACKOFF_BASE.into()
    }
    pub fn backoff_max() -> Duration {
        BACKOFF_MAX.into()
    }
    pub fn budget_percent() -> u32 {
        BUDGET_PERCENT
    }
    pub fn budget_min_per_second() -> u32 {
        BUDGET_MIN_RETRIES_PER_SECOND
    }
    pub fn consecutive_5xx() -> u32 {
        CONSECUTIVE_5XX
    }
    pub fn outlier_interval() -> Duration {
        OUTLIER_INTERVAL.into()
    }
    pub fn base_ejection_time() -> Duration {
        BASE_EJECTION_TIME.into()
    }
    pub fn max_ejection_time() -> Duration {
        MAX_EJECTION_TIME.into()
    }
    pub fn max_ejection_percent() -> u32 {
        MAX_EJECTION_PERCENT
    }
    pub fn connect_timeout() -> Duration {
        CONNECT_TIMEOUT.into()
    }
}

/// The CustomResourceDefinition, as `crds/` holds it.
pub fn crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt as _;
    as_installed(DestinationPolicy::crd())
}

/// A CRD as schemars generated it, made what the API server takes without warnings and as CEL
/// rules expect (see [`drop_nullable`] and [`known_integer_formats`]).
pub(crate) fn as_installed(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            let mut value = serde_json::to_value(&*schema).expect("a schema serializes");
            drop_nullable(&mut value);
            known_integer_formats(&mut value);
            *schema = serde_json::from_value(value).expect("the same schema deserializes");
        }
    }
    crd
}

/// schemars marks every `Option` field `nullable` (and lists `null` among an optional enum's
/// values), which makes the API server keep an explicit `null` rather than prune it as absent; CEL
/// rules would then see `has(field)` with no value behind it.
fn drop_nullable(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("nullable").is_some_and(Value::is_boolean) {
                map.remove("nullable");
            }
            if let Some(Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            map.values_mut().for_each(drop_nullable);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nullable),
        _ => {}
    }
}

/// schemars names unsigned integers `uint32` and `uint16`, formats the API server does not know
/// (`helm install` and `kubectl apply` warn about each): they become `int64` and `int32`, which
/// hold them, with the type's maximum where none is set, so the API server still refuses what the
/// Rust type could not hold.
fn known_integer_formats(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let known = match map.get("format").and_then(Value::as_str) {
                Some("uint32") => Some(("int64", u64::from(u32::MAX))),
                Some("uint16") => Some(("int32", u64::from(u16::MAX))),
                _ => None,
            };
            if let Some((format, maximum)) = known {
                map.insert("format".into(), format.into());
                map.entry("maximum").or_insert(Value::from(maximum as f64));
            }
            map.values_mut().for_each(known_integer_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(known_integer_formats),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_rejection_in_status_is_bounded() {
        let schema = schema();
        let rejection = &schema["properties"]["status"]["properties"]["replicas"]["items"]["properties"]
            ["rejection"];
        assert_eq!(rejection["maxLength"], 2048, "{rejection}");
    }

    #[test]
    fn integer_formats_are_ones_the_api_server_knows() {
        fn formats(schema: &Value, found: &mut Vec<String>) {
            match schema {
                Value::Object(map) => {
                    if let Some(format) = map.get("format").and_then(Value::as_str) {
                        found.push(format.to_owned());
                        // Ours: unsigned, so with a minimum, and bounded by the Rust type.
                        if format.starts_with("int") && map.contains_key("minimum") {
                            assert!(map.contains_key("maximum"), "{map:?}");
                        }
                    }
                    map.values().for_each(|v| formats(v, found));
                }
                Value::Array(items) => items.iter().for_each(|v| formats(v, found)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        formats(&schema(), &mut found);
        assert!(found.iter().any(|f| f == "int64"), "{found:?}");
        for format in found {
            assert!(
                ["int32", "int64", "double", "date-time"].contains(&format.as_str()),
                "{format}"
            );
        }
    }

    fn schema() -> Value {
        let crd = crd();
        let schema = crd.spec.versions[0]
            .schema
            .clone()
            .and_then(|s| s.open_api_v3_schema)
            .expect("a schema");
        serde_json::to_value(schema).unwrap()
    }

    #[test]
    fn the_resource_is_named_as_the_spec_says() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("destinationpolicies.outrigger.dev")
        );
        assert_eq!(crd.spec.group, "outrigger.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "DestinationPolicy");
        assert_eq!(crd.spec.names.short_names, Some(vec!["dp".to_string()]));
        assert_eq!(
            crd.spec.names.categories,
            Some(vec!["outrigger".to_string()])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<(String, String)> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.to_uppercase(), c.json_path.clone()))
            .collect();
        let expected = [
            ("HOST", ".spec.host"),
            ("SPLIT", ".status.split"),
            ("TIMEOUT", ".spec.timeout"),
            ("RETRIES", ".spec.retries.attempts"),
            (
                "ACCEPTED",
                r#".status.conditions[?(@.type=="Accepted")].status"#,
            ),
            ("PROXIES", ".status.proxiesSummary"),
            ("ROUTED-BY", ".status.routedBy"),
            ("AGE", ".metadata.creationTimestamp"),
        ];
        assert_eq!(
            columns,
            expected
                .iter()
                .map(|(n, p)| (n.to_string(), p.to_string()))
                .collect::<Vec<_>>()
        );
    }

    /// The API server takes only structural schemas: a type on every node, no references, no
    /// `nullable` (see `drop_nullable`).
    #[test]
    fn the_schema_is_structural() {
        fn walk(path: &str, node: &Value, problems: &mut Vec<String>) {
            let Some(map) = node.as_object() else { return };
            if !map.contains_key("type") {
                problems.push(format!("{path}: no type"));
            }
            for banned in ["$ref", "nullable", "anyOf", "oneOf", "allOf"] {
                if map.contains_key(banned) {
                    problems.push(format!("{path}: {banned}"));
                }
            }
            if let Some(values) = map.get("enum").and_then(Value::as_array)
                && values.iter().any(Value::is_null)
            {
                problems.push(format!("{path}: null in enum"));
            }
            for (name, property) in map
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                walk(&format!("{path}.{name}"), property, problems);
            }
            for child in ["items", "additionalProperties"] {
                if let Some(schema) = map.get(child).filter(|s| s.is_object()) {
                    walk(&format!("{path}.{child}"), schema, problems);
                }
            }
        }
        let mut problems = Vec::new();
        walk("", &schema(), &mut problems);
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn the_schema_carries_the_duration_pattern_and_the_ranges() {
        let schema = schema();
        let spec = &schema["properties"]["spec"]["properties"];
        assert_eq!(spec["timeout"]["pattern"], duration::PATTERN);
        let retries = &spec["retries"]["properties"];
        assert_eq!(retries["perTryTimeout"]["pattern"], duration::PATTERN);
        assert_eq!(retries["attempts"]["minimum"], 0.0);
        assert_eq!(retries["budget"]["properties"]["percent"]["maximum"], 100.0);
        assert_eq!(retries["retriableStatusCodes"]["items"]["minimum"], 100.0);
        assert_eq!(retries["retriableStatusCodes"]["items"]["maximum"], 599.0);
        assert_eq!(
            retries["retryOn"]["items"]["enum"],
            json!([
                "connect-failure",
                "5xx",
                "gateway-error",
                "reset",
                "retriable-status-codes"
            ])
        );
        assert_eq!(
            spec["trafficSplit"]["items"]["properties"]["weight"]["minimum"],
            0.0
        );
        assert_eq!(
            spec["faultInjection"]["properties"]["delay"]["properties"]["percent"]["maximum"],
            100.0
        );
        assert_eq!(
            spec["loadBalancer"]["properties"]["algorithm"]["enum"]
                .as_array()
                .map(Vec::len),
            Some(5)
        );
        // Unique names come from list-map keys, enforced by the API server itself.
        assert_eq!(
            spec["subsets"]["x-kubernetes-list-map-keys"],
            json!(["name"])
        );
        assert_eq!(
            spec["routes"]["x-kubernetes-list-map-keys"],
            json!(["name"])
        );
    }

    /// A block given empty reads as SPEC.md's defaults, in serde (manifests) and in the schema
    /// (the API server fills `default`s in) alike.
    #[test]
    fn blocks_left_empty_take_the_spec_defaults() {
        let spec: DestinationPolicySpec = serde_json::from_value(json!({
            "host": "reviews",
            "retries": {},
            "outlierDetection": {},
            "connectionPool": {},
            "loadBalancer": {},
        }))
        .unwrap();
        let retries = spec.retries.unwrap();
        assert_eq!(retries.attempts, 2);
        assert_eq!(
            retries.retry_on,
            [
                RetryOn::ServerError,
                RetryOn::ConnectFailure,
                RetryOn::Reset
            ]
        );
        assert_eq!(retries.backoff.base_interval.as_str(), "25ms");
        assert_eq!(retries.backoff.max_interval.as_str(), "250ms");
        assert_eq!(retries.budget.percent, 20);
        assert_eq!(retries.budget.min_retries_per_second, 10);
        assert!(!retries.retry_non_idempotent);
        assert_eq!(retries.per_try_timeout, None);
        let outlier = spec.outlier_detection.unwrap();
        assert_eq!(outlier.consecutive_5xx_errors, 5);
        assert_eq!(outlier.consecutive_gateway_errors, 0);
        assert_eq!(outlier.interval.as_str(), "10s");
        assert_eq!(outlier.base_ejection_time.as_str(), "30s");
        assert_eq!(outlier.max_ejection_time.as_str(), "300s");
        assert_eq!(outlier.max_ejection_percent, 50);
        assert_eq!(spec.connection_pool.unwrap().connect_timeout.as_str(), "1s");
        assert_eq!(spec.load_balancer.unwrap().algorithm, Algorithm::PeakEwma);

        let schema = schema();
        let retries = &schema["properties"]["spec"]["properties"]["retries"]["properties"];
        assert_eq!(retries["attempts"]["default"], 2);
        assert_eq!(
            retries["retryOn"]["default"],
            json!(["5xx", "connect-failure", "reset"])
        );
        assert_eq!(
            retries["budget"]["default"],
            json!({"percent": 20, "minRetriesPerSecond": 10})
        );
    }

    #[test]
    fn durations_are_checked_when_read() {
        let read = |timeout: &str| {
            serde_json::from_value::<DestinationPolicySpec>(json!({
                "host": "reviews",
                "timeout": timeout,
            }))
        };
        assert_eq!(
            read("1m30s").unwrap().timeout.unwrap().get(),
            std::time::Duration::from_secs(90)
        );
        let error = read("1.5s").unwrap_err().to_string();
        assert!(error.contains("`1.5s` is not a duration"), "{error}");
        // Written back as given.
        let spec = read("1m30s").unwrap();
        assert_eq!(serde_json::to_value(&spec).unwrap()["timeout"], "1m30s");
    }

    #[test]
    fn enums_read_and_print_their_manifest_names() {
        assert_eq!(RetryOn::ServerError.to_string(), "5xx");
        assert_eq!(
            serde_json::from_value::<RetryOn>(json!("retriable-status-codes")).unwrap(),
            RetryOn::RetriableStatusCodes
        );
        assert_eq!(Method::Patch.to_string(), "PATCH");
        assert!(serde_json::from_value::<Method>(json!("get")).is_err());
    }
}
