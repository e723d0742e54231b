//! What the control plane sends, decoded into `policy` types: everything the proxy cannot apply is
//! refused here, with the field named, before anything changes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use std::str::FromStr as _;

use http::{HeaderName, HeaderValue, StatusCode};
use outrigger_api::identity::{NotAWorkloadId, SpiffeId};
use outrigger_api::rules::{self, FieldError};
use outrigger_api::{defaults, proto};

use crate::policy::{
    Action, Algorithm, AuthorizationPolicy, AuthorizationRule, CallMatch, CallerMatch,
    DestinationConfig, EndpointConfig, FaultConfig, HeaderMatch, HeaderModifier, HeaderValueMatch,
    HttpFilter, HttpPathMatch, HttpRouteMatch, HttpRouteRule, HttpRouteTable, InboundAuthorization,
    OutlierConfig, PathMatch, PathRewrite, PoolLimits, QueryParamMatch, RateLimitConfig, Redirect,
    RetryOn, RetryPolicy, Rewrite, RouteBackend, RouteConfig, RouteMatch, TrafficPolicy,
    WeightedSubset,
};
use crate::tls;

pub use outrigger_api::rules::invalid;

/// A field of a version that cannot be applied, named by its path in the version.
pub type ConfigError = FieldError;

/// Whether endpoints may be loopback addresses: only where the controller, the endpoints and the
/// proxy share one host (tests, the demo). In a pod, loopback is the caller's own pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopbackEndpoints {
    Refused,
    Allowed,
}

/// The proxy a destination is decoded for: where it stands changes what the destination means to
/// it.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// Whose consumer routes serve this proxy's calls.
    pub namespace: &'a str,
    /// This pod's addresses. An endpoint at one of them is this pod: it is called in plaintext,
    /// as the traffic stays in the pod, and must be, as the proxy's own connections are not
    /// redirected to its inbound listener, so TLS would reach the app's plaintext port.
    pub pod_ips: &'a [IpAddr],
    pub loopback: LoopbackEndpoints,
}

/// Decodes one version of a destination with the endpoints its groups hold.
pub fn destination(
    version: String,
    destination: proto::Destination,
    endpoints: Vec<proto::Endpoint>,
    caller: Caller<'_>,
) -> Result<DestinationConfig, ConfigError> {
    let port = u16::try_from(destination.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid("port", format!("{} is not a TCP port", destination.port)))?;
    let subsets = destination.subsets;
    rules::unique_names("subsets", "subset", subsets.iter().map(String::as_str))?;
    let endpoints = endpoint_configs(endpoints, &subsets, caller)?;
    let policy = destination.policy_spec.unwrap_or_default();
    let traffic = TrafficPolicy {
        split: split("policy.trafficSplit", policy.traffic_split, &subsets)?,
        timeout: policy.timeout_ms.map(Duration::from_millis),
        retries: policy
            .retries
            .map(|r| retry_policy("policy.retries", r))
            .transpose()?,
    };
    let routes = routes(destination.routes, &traffic, &subsets)?;
    let http_routes = http_route_table(destination.http_routes, caller.namespace)?;
    Ok(DestinationConfig {
        version,
        namespace: destination.namespace,
        service: destination.service,
        port,
        policy: Some(destination.policy).filter(|p| !p.is_empty()),
        policy_generation: destination.policy_generation,
        subsets,
        endpoints,
        load_balancer: load_balancer(policy.load_balancer.unwrap_or_default())?,
        connect_timeout: connect_timeout(policy.connection_pool.as_ref()),
        traffic,
        routes,
        outlier_detection: policy.outlier_detection.map(outlier_config).transpose()?,
        connection_pool: connection_pool(policy.connection_pool)?,
        rate_limit: policy.rate_limit.map(rate_limit).transpose()?,
        fault_injection: policy.fault_injection.map(fault_config).transpose()?,
        http_routes,
    })
}

fn endpoint_configs(
    endpoints: Vec<proto::Endpoint>,
    subsets: &[String],
    caller: Caller<'_>,
) -> Result<Vec<EndpointConfig>, ConfigError> {
    endpoints
        .into_iter()
        .enumerate()
        .map(|(i, endpoint)| {
            let address: SocketAddr = endpoint.address.parse().map_err(|_| {
                invalid(
                    format!("endpoints[{i}].address"),
                    format!("`{}` is not ip:port", endpoint.address),
                )
            })?;
            if let Some(problem) = not_a_peer(address.ip(), caller.loopback) {
                return Err(invalid(
                    format!("endpoints[{i}].address"),
                    format!("`{}` is {problem}", endpoint.address),
                ));
            }
            if let Some(unknown) = endpoint.subsets.iter().find(|s| !subsets.contains(s)) {
                return Err(invalid(
                    format!("endpoints[{i}].subsets"),
                    format!("subset `{unknown}` is not declared in subsets"),
                ));
            }
            let identity = Some(endpoint.identity)
                .filter(|id| !id.is_empty())
                .map(|id| {
                    let id: SpiffeId = id.parse().map_err(|e: NotAWorkloadId| {
                        invalid(format!("endpoints[{i}].identity"), e.to_string())
                    })?;
                    // Checked here so that a connection never finds it unusable.
                    tls::server_name(&id).map_err(|e| {
                        invalid(format!("endpoints[{i}].identity"), format!("{e:#}"))
                    })?;
                    Ok::<_, ConfigError>(id)
                })
                .transpose()?
                .filter(|_| !caller.pod_ips.contains(&address.ip().to_canonical()));
            Ok(EndpointConfig {
                address,
                pod: endpoint.pod,
                subsets: endpoint.subsets,
                h2c: endpoint.h2c,
                identity,
            })
        })
        .collect()
}

/// Why the proxy must not connect to `ip` for anyone, if so: the caller's own pod, the node or
/// its cloud's metadata service, or no single host. The controller should never send these; an
/// EndpointSlice can hold them.
fn not_a_peer(ip: IpAddr, loopback: LoopbackEndpoints) -> Option<&'static str> {
    // `::ffff:127.0.0.1` is 127.0.0.1 to a dual-stack socket.
    let ip = ip.to_canonical();
    let link_local = match ip {
        IpAddr::V4(ip) => ip.is_link_local(),
        IpAddr::V6(ip) => ip.is_unicast_link_local(),
    };
    if ip.is_loopback() && loopback == LoopbackEndpoints::Refused {
        Some("loopback: inside the caller's own pod")
    } else if link_local {
        Some("link-local: the node's, or its cloud's metadata service")
    } else if ip.is_unspecified() {
        Some("unspecified: no host")
    } else if ip.is_multicast() {
        Some("multicast: not one host")
    } else if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("broadcast: not one host")
    } else {
        None
    }
}

/// Routes in order; what a route leaves out it takes from the destination's `traffic`.
fn routes(
    routes: Vec<proto::Route>,
    traffic: &TrafficPolicy,
    subsets: &[String],
) -> Result<Vec<RouteConfig>, ConfigError> {
    rules::unique_names("routes", "route", routes.iter().map(|r| r.name.as_str()))?;
    routes
        .into_iter()
        .enumerate()
        .map(|(i, route)| {
            let field = format!("routes[{i}]");
            Ok(RouteConfig {
                matcher: route_match(&field, route.r#match.unwrap_or_default())?,
                traffic: TrafficPolicy {
                    split: match route.traffic_split {
                        Some(weights) => {
                            split(&format!("{field}.trafficSplit"), Some(weights), subsets)?
                        }
                        None => traffic.split.clone(),
                    },
                    timeout: route
                        .timeout_ms
                        .map(Duration::from_millis)
                        .or(traffic.timeout),
                    retries: match route.retries {
                        Some(r) => Some(retry_policy(&format!("{field}.retries"), r)?),
                        None => traffic.retries.clone(),
                    },
                },
                name: route.name,
            })
        })
        .collect()
}

fn connect_timeout(pool: Option<&proto::ConnectionPool>) -> Duration {
    ms_or(
        pool.map_or(0, |pool| pool.connect_timeout_ms),
        defaults::CONNECT_TIMEOUT,
    )
}

/// A duration on the wire, where 0 means "left out": then the default.
fn ms_or(ms: u64, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms)
    }
}

fn connection_pool(pool: Option<proto::ConnectionPool>) -> Result<PoolLimits, ConfigError> {
    let limits = pool
        .map(|pool| PoolLimits {
            max_connections: pool.max_connections,
            max_pending_requests: pool.max_pending_requests,
        })
        .unwrap_or_default();
    if let Some(max) = limits.max_connections {
        rules::at_least_one("policy.connectionPool.maxConnections", max)?;
    }
    Ok(limits)
}

fn rate_limit(limit: proto::RateLimit) -> Result<RateLimitConfig, ConfigError> {
    rules::at_least_one(
        "policy.rateLimit.requestsPerSecond",
        limit.requests_per_second,
    )?;
    Ok(RateLimitConfig {
        requests_per_second: limit.requests_per_second,
        burst: limit.burst.max(1),
    })
}

fn split(
    field: &str,
    split: Option<proto::TrafficSplit>,
    subsets: &[String],
) -> Result<Option<Vec<WeightedSubset>>, ConfigError> {
    let Some(split) = split else { return Ok(None) };
    rules::traffic_split(
        field,
        split.weights.iter().map(|w| (w.subset.as_str(), w.weight)),
        |subset| subsets.iter().any(|s| s == subset),
    )?;
    Ok(Some(
        split
            .weights
            .into_iter()
            .map(|w| WeightedSubset {
                subset: w.subset,
                weight: w.weight,
            })
            .collect(),
    ))
}

fn retry_policy(field: &str, retries: proto::RetryPolicy) -> Result<RetryPolicy, ConfigError> {
    rules::at_most(
        &format!("{field}.attempts"),
        retries.attempts,
        rules::MAX_ATTEMPTS,
    )?;
    let conditions: Vec<i32> = if retries.retry_on.is_empty() {
        defaults::RETRY_ON.iter().map(|&c| c as i32).collect()
    } else {
        retries.retry_on
    };
    let mut retry_on = RetryOn::default();
    for (i, condition) in conditions.iter().enumerate() {
        match proto::RetryOn::try_from(*condition) {
            Ok(proto::RetryOn::ServerError) => retry_on.server_error = true,
            Ok(proto::RetryOn::GatewayError) => retry_on.gateway_error = true,
            Ok(proto::RetryOn::ConnectFailure) => retry_on.connect_failure = true,
            Ok(proto::RetryOn::Reset) => retry_on.reset = true,
            Ok(proto::RetryOn::RetriableStatusCodes) => retry_on.retriable_status_codes = true,
            Ok(proto::RetryOn::Unspecified) | Err(_) => {
                return Err(invalid(
                    format!("{field}.retryOn[{i}]"),
                    format!("unknown condition {condition}"),
                ));
            }
        }
    }
    let retriable_status_codes = retries
        .retriable_status_codes
        .iter()
        .enumerate()
        .map(|(i, &code)| {
            rules::status_code(
                &format!("{field}.retriableStatusCodes[{i}]"),
                code,
                rules::ANY_STATUS,
            )
        })
        .collect::<Result<_, _>>()?;
    let backoff_base = ms_or(retries.backoff_base_ms, defaults::BACKOFF_BASE);
    let backoff_max = ms_or(
        retries.backoff_max_ms,
        defaults::BACKOFF_MAX.max(backoff_base),
    );
    rules::in_order(
        &format!("{field}.backoff"),
        ("baseInterval", backoff_base),
        ("maxInterval", backoff_max),
    )?;
    let budget = retries.budget.unwrap_or(proto::RetryBudget {
        percent: defaults::BUDGET_PERCENT,
        min_retries_per_second: defaults::BUDGET_MIN_RETRIES_PER_SECOND,
    });
    rules::percent(&format!("{field}.budget.percent"), budget.percent)?;
    Ok(RetryPolicy {
        attempts: retries.attempts,
        per_try_timeout: retries.per_try_timeout_ms.map(Duration::from_millis),
        retry_on,
        retriable_status_codes,
        backoff_base,
        backoff_max,
        budget_percent: budget.percent,
        budget_min_per_second: budget.min_retries_per_second,
        retry_non_idempotent: retries.retry_non_idempotent,
    })
}

fn route_match(field: &str, matcher: proto::RouteMatch) -> Result<RouteMatch, ConfigError> {
    Ok(RouteMatch {
        headers: header_matches(&format!("{field}.match.headers"), matcher.headers)?,
        path_prefix: Some(matcher.path_prefix).filter(|p| !p.is_empty()),
        method: method(&format!("{field}.match.method"), matcher.method)?,
    })
}

fn header_matches(
    field: &str,
    headers: Vec<proto::HeaderMatch>,
) -> Result<Vec<HeaderMatch>, ConfigError> {
    headers
        .into_iter()
        .enumerate()
        .map(|(i, header)| {
            let field = format!("{field}[{i}]");
            let name = header_name(&format!("{field}.name"), &header.name)?;
            let value = value_match(&field, header.value)?;
            Ok(HeaderMatch { name, value })
        })
        .collect()
}

fn value_match(
    field: &str,
    value: Option<proto::header_match::Value>,
) -> Result<HeaderValueMatch, ConfigError> {
    match value {
        Some(proto::header_match::Value::Exact(exact)) => Ok(HeaderValueMatch::Exact(exact)),
        Some(proto::header_match::Value::Regex(pattern)) => Ok(HeaderValueMatch::Regex(
            anchored_regex(&format!("{field}.regex"), &pattern)?,
        )),
        None => Err(invalid(field, "needs exact or regex")),
    }
}

/// Matches the whole value; the size limit bounds what a pattern may cost to build.
fn anchored_regex(field: &str, pattern: &str) -> Result<regex::Regex, ConfigError> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| invalid(field, e.to_string()))
}

fn header_name(field: &str, name: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| invalid(field, format!("`{name}` is not a header name")))
}

fn method(field: &str, method: String) -> Result<Option<http::Method>, ConfigError> {
    Some(method)
        .filter(|m| !m.is_empty())
        .map(|m| {
            http::Method::from_bytes(m.as_bytes())
                .map_err(|_| invalid(field, format!("`{m}` is not a method")))
        })
        .transpose()
}

/// The table that serves this proxy's calls: its own namespace's consumer routes, else the
/// producer routes. Every table is checked, so that a version is refused alike by every proxy.
fn http_route_table(
    tables: Vec<proto::HttpRouteTable>,
    caller_namespace: &str,
) -> Result<Option<HttpRouteTable>, ConfigError> {
    let mut producer = None;
    let mut consumer = None;
    let mut namespaces = std::collections::HashSet::new();
    for (i, table) in tables.into_iter().enumerate() {
        let field = format!("httpRoutes[{i}]");
        if !namespaces.insert(table.consumer_namespace.clone()) {
            return Err(invalid(
                format!("{field}.consumerNamespace"),
                format!("a second table for `{}`", table.consumer_namespace),
            ));
        }
        let namespace = table.consumer_namespace.clone();
        let decoded = http_routes(&field, table)?;
        if namespace.is_empty() {
            producer = Some(decoded);
        } else if namespace == caller_namespace {
            consumer = Some(decoded);
        }
    }
    Ok(consumer.or(producer))
}

fn http_routes(field: &str, table: proto::HttpRouteTable) -> Result<HttpRouteTable, ConfigError> {
    let rules: Vec<HttpRouteRule> = table
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| http_route_rule(&format!("{field}.rules[{i}]"), rule))
        .collect::<Result<_, _>>()?;
    let matches = table
        .matches
        .into_iter()
        .enumerate()
        .map(|(i, matcher)| {
            let field = format!("{field}.matches[{i}]");
            let rule = usize::try_from(matcher.rule)
                .ok()
                .filter(|&rule| rule < rules.len())
                .ok_or_else(|| {
                    invalid(
                        format!("{field}.rule"),
                        format!("no rule {} of {}", matcher.rule, rules.len()),
                    )
                })?;
            let path = match matcher.path {
                None => None,
                Some(proto::http_route_match::Path::Exact(path)) => {
                    Some(HttpPathMatch::Exact(absolute_path(&field, path)?))
                }
                Some(proto::http_route_match::Path::Prefix(path)) => {
                    Some(HttpPathMatch::Prefix(absolute_path(&field, path)?))
                }
                Some(proto::http_route_match::Path::Regex(pattern)) => Some(HttpPathMatch::Regex(
                    anchored_regex(&format!("{field}.path.regex"), &pattern)?,
                )),
            };
            let query_params = matcher
                .query_params
                .into_iter()
                .enumerate()
                .map(|(j, param)| {
                    let field = format!("{field}.queryParams[{j}]");
                    Ok(QueryParamMatch {
                        value: value_match(&field, param.value)?,
                        name: param.name,
                    })
                })
                .collect::<Result<_, ConfigError>>()?;
            Ok(HttpRouteMatch {
                rule,
                path,
                headers: header_matches(&format!("{field}.headers"), matcher.headers)?,
                query_params,
                method: method(&format!("{field}.method"), matcher.method)?,
            })
        })
        .collect::<Result<_, ConfigError>>()?;
    Ok(HttpRouteTable { rules, matches })
}

fn absolute_path(field: &str, path: String) -> Result<String, ConfigError> {
    if path.starts_with('/') {
        Ok(path)
    } else {
        Err(invalid(
            format!("{field}.path"),
            format!("`{path}` does not start with `/`"),
        ))
    }
}

fn http_route_rule(field: &str, rule: proto::HttpRouteRule) -> Result<HttpRouteRule, ConfigError> {
    let backends = rule
        .backends
        .into_iter()
        .enumerate()
        .map(|(i, backend)| {
            let field = format!("{field}.backends[{i}]");
            let filters = http_filters(&format!("{field}.filters"), backend.filters)?;
            if let Some(i) = filters
                .iter()
                .position(|f| matches!(f, HttpFilter::Redirect(_) | HttpFilter::Rewrite(_)))
            {
                return Err(invalid(
                    format!("{field}.filters[{i}]"),
                    "a backend's filters may only modify headers",
                ));
            }
            Ok(RouteBackend {
                target: if backend.key.is_empty() {
                    Err(backend.unresolved)
                } else {
                    Ok(backend.key)
                },
                weight: backend.weight,
                filters,
            })
        })
        .collect::<Result<_, ConfigError>>()?;
    Ok(HttpRouteRule {
        route: rule.route,
        name: Some(rule.name).filter(|n| !n.is_empty()),
        filters: http_filters(&format!("{field}.filters"), rule.filters)?,
        backends,
        request_timeout: rule.request_timeout_ms.map(Duration::from_millis),
        backend_request_timeout: rule.backend_request_timeout_ms.map(Duration::from_millis),
        retries: rule
            .retries
            .map(|r| retry_policy(&format!("{field}.retries"), r))
            .transpose()?,
    })
}

fn http_filters(
    field: &str,
    filters: Vec<proto::HttpFilter>,
) -> Result<Vec<HttpFilter>, ConfigError> {
    use proto::http_filter::Kind;
    filters
        .into_iter()
        .enumerate()
        .map(|(i, filter)| {
            let field = format!("{field}[{i}]");
            Ok(match filter.kind {
                Some(Kind::RequestHeaders(m)) => HttpFilter::RequestHeaders(header_modifier(
                    &format!("{field}.requestHeaders"),
                    m,
                )?),
                Some(Kind::ResponseHeaders(m)) => HttpFilter::ResponseHeaders(header_modifier(
                    &format!("{field}.responseHeaders"),
                    m,
                )?),
                Some(Kind::Redirect(redirect)) => {
                    let field = format!("{field}.redirect");
                    let status = match redirect.status {
                        301 | 302 | 303 | 307 | 308 => {
                            StatusCode::from_u16(redirect.status as u16).expect("a 3xx status")
                        }
                        other => {
                            return Err(invalid(
                                format!("{field}.status"),
                                format!("{other} is not a redirect status"),
                            ));
                        }
                    };
                    let scheme = Some(redirect.scheme).filter(|s| !s.is_empty());
                    if let Some(scheme) = &scheme
                        && scheme != "http"
                        && scheme != "https"
                    {
                        return Err(invalid(
                            format!("{field}.scheme"),
                            format!("`{scheme}` is neither http nor https"),
                        ));
                    }
                    HttpFilter::Redirect(Redirect {
                        scheme,
                        hostname: hostname(&field, redirect.hostname)?,
                        port: redirect
                            .port
                            .map(|port| {
                                u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(|| {
                                    invalid(
                                        format!("{field}.port"),
                                        format!("{port} is not a TCP port"),
                                    )
                                })
                            })
                            .transpose()?,
                        path: path_rewrite(&field, redirect.path)?,
                        status,
                    })
                }
                Some(Kind::Rewrite(rewrite)) => {
                    let field = format!("{field}.rewrite");
                    HttpFilter::Rewrite(Rewrite {
                        hostname: hostname(&field, rewrite.hostname)?,
                        path: path_rewrite(&field, rewrite.path)?,
                    })
                }
                None => return Err(invalid(field, "names no filter")),
            })
        })
        .collect()
}

fn header_modifier(
    field: &str,
    modifier: proto::HeaderModifier,
) -> Result<HeaderModifier, ConfigError> {
    let values = |which: &str, headers: Vec<proto::HeaderValue>| {
        headers
            .into_iter()
            .enumerate()
            .map(|(i, header)| {
                let field = format!("{field}.{which}[{i}]");
                let name = header_name(&format!("{field}.name"), &header.name)?;
                let value = HeaderValue::from_str(&header.value).map_err(|_| {
                    invalid(
                        format!("{field}.value"),
                        "is not a header value".to_string(),
                    )
                })?;
                Ok((name, value))
            })
            .collect::<Result<Vec<_>, ConfigError>>()
    };
    Ok(HeaderModifier {
        set: values("set", modifier.set)?,
        add: values("add", modifier.add)?,
        remove: modifier
            .remove
            .iter()
            .enumerate()
            .map(|(i, name)| header_name(&format!("{field}.remove[{i}]"), name))
            .collect::<Result<_, _>>()?,
    })
}

fn hostname(field: &str, hostname: String) -> Result<Option<String>, ConfigError> {
    if hostname.is_empty() {
        return Ok(None);
    }
    http::uri::Authority::from_str(&hostname)
        .ok()
        .filter(|authority| authority.port().is_none() && authority.host() == hostname)
        .map(|_| Some(hostname.clone()))
        .ok_or_else(|| {
            invalid(
                format!("{field}.hostname"),
                format!("`{hostname}` is not a host name"),
            )
        })
}

fn path_rewrite(
    field: &str,
    path: Option<proto::PathRewrite>,
) -> Result<Option<PathRewrite>, ConfigError> {
    let Some(path) = path else { return Ok(None) };
    let field = format!("{field}.path");
    Ok(Some(match path.kind {
        Some(proto::path_rewrite::Kind::Full(full)) => {
            PathRewrite::Full(absolute_path(&field, full)?)
        }
        Some(proto::path_rewrite::Kind::Prefix(prefix)) => {
            PathRewrite::Prefix(absolute_path(&field, prefix)?)
        }
        None => return Err(invalid(field, "needs full or prefix")),
    }))
}

fn outlier_config(outlier: proto::OutlierDetection) -> Result<OutlierConfig, ConfigError> {
    let field = "policy.outlierDetection";
    let base_ejection_time = ms_or(outlier.base_ejection_time_ms, defaults::BASE_EJECTION_TIME);
    let max_ejection_time = ms_or(outlier.max_ejection_time_ms, defaults::MAX_EJECTION_TIME);
    rules::in_order(
        &format!("{field}.baseEjectionTime"),
        ("baseEjectionTime", base_ejection_time),
        ("maxEjectionTime", max_ejection_time),
    )?;
    rules::percent(
        &format!("{field}.maxEjectionPercent"),
        outlier.max_ejection_percent,
    )?;
    Ok(OutlierConfig {
        consecutive_5xx: outlier.consecutive_5xx_errors,
        consecutive_gateway_errors: outlier.consecutive_gateway_errors,
        interval: ms_or(outlier.interval_ms, defaults::OUTLIER_INTERVAL),
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent: outlier.max_ejection_percent,
    })
}

fn fault_config(faults: proto::FaultInjection) -> Result<FaultConfig, ConfigError> {
    let delay = faults.delay.unwrap_or_default();
    let abort = faults.abort.unwrap_or_default();
    let field = "policy.faultInjection";
    let delay_percent = rules::fraction_percent(&format!("{field}.delay.percent"), delay.percent)?;
    let abort_percent = rules::fraction_percent(&format!("{field}.abort.percent"), abort.percent)?;
    // Without an abort, its status is never used.
    let abort_status = if abort_percent > 0.0 {
        rules::status_code(
            &format!("{field}.abort.httpStatus"),
            abort.http_status,
            rules::FINAL_STATUS,
        )?
    } else {
        503
    };
    Ok(FaultConfig {
        delay_percent,
        delay: Duration::from_millis(delay.fixed_delay_ms),
        abort_percent,
        abort_status,
    })
}

fn load_balancer(lb: proto::LoadBalancer) -> Result<Algorithm, ConfigError> {
    let field = "policy.loadBalancer";
    Ok(match proto::Algorithm::try_from(lb.algorithm) {
        Ok(proto::Algorithm::PeakEwma) => Algorithm::PeakEwma,
        Ok(proto::Algorithm::RoundRobin) => Algorithm::RoundRobin,
        Ok(proto::Algorithm::LeastRequest) => Algorithm::LeastRequest,
        Ok(proto::Algorithm::Random) => Algorithm::Random,
        Ok(proto::Algorithm::ConsistentHash) => {
            let header = HeaderName::from_bytes(lb.hash_header.as_bytes()).map_err(|_| {
                invalid(
                    format!("{field}.hashHeader"),
                    format!(
                        "`{}` is not a header name (ConsistentHash needs one)",
                        lb.hash_header
                    ),
                )
            })?;
            Algorithm::ConsistentHash { header }
        }
        Err(_) => {
            return Err(invalid(
                format!("{field}.algorithm"),
                format!("unknown algorithm {}", lb.algorithm),
            ));
        }
    })
}

/// Decodes one version of the pod's inbound side (the `inbound` of a `Destination` under its
/// inbound key).
pub fn inbound(
    version: String,
    destination: proto::Destination,
) -> Result<InboundAuthorization, ConfigError> {
    let inbound = destination
        .inbound
        .ok_or_else(|| invalid("inbound", "is missing under an inbound key"))?;
    let mut ports = HashMap::new();
    for (i, port) in inbound.ports.into_iter().enumerate() {
        let field = format!("inbound.ports[{i}]");
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                invalid(
                    format!("{field}.port"),
                    format!("{} is not a TCP port", port.port),
                )
            })?;
        let policies = port
            .authorizations
            .into_iter()
            .enumerate()
            .map(|(j, policy)| authorization(&format!("{field}.authorizations[{j}]"), policy))
            .collect::<Result<_, _>>()?;
        if ports.insert(number, policies).is_some() {
            return Err(invalid(
                format!("{field}.port"),
                format!("port {number} is listed twice"),
            ));
        }
    }
    Ok(InboundAuthorization { version, ports })
}

fn authorization(
    field: &str,
    policy: proto::Authorization,
) -> Result<AuthorizationPolicy, ConfigError> {
    if policy.policy.is_empty() {
        return Err(invalid(format!("{field}.policy"), "names no policy"));
    }
    let action = match proto::AuthorizationAction::try_from(policy.action) {
        Ok(proto::AuthorizationAction::Allow) => Action::Allow,
        Ok(proto::AuthorizationAction::Deny) => Action::Deny,
        Err(_) => {
            return Err(invalid(
                format!("{field}.action"),
                format!("{} is not an action", policy.action),
            ));
        }
    };
    let rules = policy
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| {
            let field = format!("{field}.rules[{i}]");
            let sources = rule
                .sources
                .into_iter()
                .map(|source| CallerMatch {
                    service_accounts: source.service_accounts,
                    namespaces: source.namespaces,
                })
                .collect();
            let targets = rule
                .targets
                .into_iter()
                .enumerate()
                .map(|(j, target)| call_match(&format!("{field}.targets[{j}]"), target))
                .collect::<Result<_, _>>()?;
            Ok(AuthorizationRule { sources, targets })
        })
        .collect::<Result<_, ConfigError>>()?;
    Ok(AuthorizationPolicy {
        name: Arc::new(policy.policy),
        action,
        audit: policy.audit,
        rules,
    })
}

fn call_match(field: &str, target: proto::AuthorizationTarget) -> Result<CallMatch, ConfigError> {
    use proto::path_match::Kind;
    let paths = target
        .paths
        .into_iter()
        .enumerate()
        .map(|(i, path)| {
            let field = format!("{field}.paths[{i}]");
            let path = match path.kind {
                Some(Kind::Exact(exact)) => PathMatch::Exact(exact),
                // `/api/` matches as `/api` does: by whole segments.
                Some(Kind::Prefix(prefix)) if prefix.len() > 1 => {
                    PathMatch::Prefix(prefix.trim_end_matches('/').to_string())
                }
                Some(Kind::Prefix(prefix)) => PathMatch::Prefix(prefix),
                None => return Err(invalid(field, "needs exact or prefix")),
            };
            let (PathMatch::Exact(value) | PathMatch::Prefix(value)) = &path;
            if !value.starts_with('/') {
                return Err(invalid(field, format!("`{value}` does not start with /")));
            }
            Ok(path)
        })
        .collect::<Result<_, _>>()?;
    let methods = target
        .methods
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            http::Method::from_bytes(m.as_bytes()).map_err(|_| {
                invalid(
                    format!("{field}.methods[{i}]"),
                    format!("`{m}` is not a method"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(CallMatch { paths, methods })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviews() -> proto::Destination {
        proto::Destination {
            namespace: "shop".into(),
            service: "reviews".into(),
            port: 9080,
            subsets: vec!["v1".into()],
            ..Default::default()
        }
    }

    fn endpoints() -> Vec<proto::Endpoint> {
        vec![proto::Endpoint {
            address: "10.0.0.1:9080".into(),
            subsets: vec!["v1".into()],
            ..Default::default()
        }]
    }

    /// A proxy in `namespace` at 10.0.9.9.
    fn caller(namespace: &str) -> Caller<'_> {
        const POD_IPS: &[IpAddr] = &[IpAddr::V4(Ipv4Addr::new(10, 0, 9, 9))];
        Caller {
            namespace,
            pod_ips: POD_IPS,
            loopback: LoopbackEndpoints::Refused,
        }
    }

    fn rejected(change: impl FnOnce(&mut proto::Destination, &mut [proto::Endpoint])) -> String {
        let (mut d, mut e) = (reviews(), endpoints());
        change(&mut d, &mut e);
        destination("1".into(), d, e, caller("shop"))
            .unwrap_err()
            .to_string()
    }

    fn table(consumer_namespace: &str, route: &str) -> proto::HttpRouteTable {
        proto::HttpRouteTable {
            consumer_namespace: consumer_namespace.into(),
            rules: vec![proto::HttpRouteRule {
                route: route.into(),
                backends: vec![proto::RouteBackend {
                    key: "reviews-v1.shop.svc.cluster.local:9080".into(),
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            matches: vec![proto::HttpRouteMatch {
                rule: 0,
                path: Some(proto::http_route_match::Path::Prefix("/".into())),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn a_proxy_takes_its_own_namespaces_route_table_else_the_producers() {
        let route_of = |tables: &[proto::HttpRouteTable], namespace: &str| {
            let d = proto::Destination {
                http_routes: tables.to_vec(),
                ..reviews()
            };
            let config = destination("1".into(), d, endpoints(), caller(namespace)).unwrap();
            config.http_routes.map(|table| table.rules[0].route.clone())
        };
        let both = [table("", "producer"), table("frontend", "consumer")];
        assert_eq!(route_of(&both, "frontend").as_deref(), Some("consumer"));
        assert_eq!(route_of(&both, "shop").as_deref(), Some("producer"));
        let consumer_only = [table("frontend", "consumer")];
        assert_eq!(
            route_of(&consumer_only, "shop"),
            None,
            "no table serves the shop's calls"
        );
    }

    #[test]
    fn a_route_table_the_proxy_cannot_apply_is_refused_naming_the_field() {
        let with = |change: fn(&mut proto::HttpRouteTable)| {
            rejected(|d, _| {
                let mut table = table("", "r");
                change(&mut table);
                d.http_routes = vec![table];
            })
        };
        assert_eq!(
            with(|t| t.matches[0].rule = 1),
            "httpRoutes[0].matches[0].rule: no rule 1 of 1"
        );
        assert_eq!(
            with(|t| t.matches[0].path = Some(proto::http_route_match::Path::Exact("v2".into()))),
            "httpRoutes[0].matches[0].path: `v2` does not start with `/`"
        );
        assert_eq!(
            with(|t| {
                t.rules[0].filters = vec![proto::HttpFilter {
                    kind: Some(proto::http_filter::Kind::Redirect(proto::Redirect {
                        status: 200,
                        ..Default::default()
                    })),
                }]
            }),
            "httpRoutes[0].rules[0].filters[0].redirect.status: 200 is not a redirect status"
        );
        assert_eq!(
            with(|t| {
                t.rules[0].backends[0].filters = vec![proto::HttpFilter {
                    kind: Some(proto::http_filter::Kind::Rewrite(proto::Rewrite::default())),
                }]
            }),
            "httpRoutes[0].rules[0].backends[0].filters[0]: a backend's filters may only modify \
             headers"
        );
        assert_eq!(
            rejected(|d, _| d.http_routes = vec![table("", "a"), table("", "b")]),
            "httpRoutes[1].consumerNamespace: a second table for ``"
        );
    }

    #[test]
    fn defaults_apply_when_the_policy_is_silent() {
        let config = destination("1".into(), reviews(), endpoints(), caller("shop")).unwrap();
        assert_eq!(config.load_balancer, Algorithm::PeakEwma);
        assert_eq!(config.connect_timeout, defaults::CONNECT_TIMEOUT);
        assert_eq!(
            config.endpoints[0].address,
            "10.0.0.1:9080".parse().unwrap()
        );
    }

    #[test]
    fn a_meshed_endpoint_keeps_its_identity_and_an_unmeshed_one_or_the_caller_s_own_pod_has_none() {
        let mut meshed = endpoints();
        meshed.push(proto::Endpoint {
            address: "10.0.0.2:9080".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/reviews".into(),
            ..Default::default()
        });
        for own in ["10.0.9.9:9080", "[::ffff:10.0.9.9]:9080"] {
            meshed.push(proto::Endpoint {
                address: own.into(),
                identity: "spiffe://cluster.local/ns/shop/sa/reviews".into(),
                ..Default::default()
            });
        }
        let config = destination("1".into(), reviews(), meshed, caller("shop")).unwrap();
        let identities: Vec<Option<String>> = config
            .endpoints
            .iter()
            .map(|e| e.identity.as_ref().map(ToString::to_string))
            .collect();
        assert_eq!(
            identities,
            [
                None,
                Some("spiffe://cluster.local/ns/shop/sa/reviews".into()),
                None,
                None
            ]
        );
    }

    #[test]
    fn loopback_endpoints_are_refused_unless_allowed() {
        let mut loopback = endpoints();
        loopback[0].address = "127.0.0.1:9080".into();
        let refused = destination("1".into(), reviews(), loopback.clone(), caller("shop"));
        assert_eq!(
            refused.unwrap_err().to_string(),
            "endpoints[0].address: `127.0.0.1:9080` is loopback: inside the caller's own pod"
        );
        let allowed = destination(
            "1".into(),
            reviews(),
            loopback,
            Caller {
                loopback: LoopbackEndpoints::Allowed,
                ..caller("shop")
            },
        );
        assert_eq!(
            allowed.unwrap().endpoints[0].address,
            "127.0.0.1:9080".parse().unwrap()
        );
    }

    #[test]
    fn what_cannot_be_applied_is_refused_with_the_field_named() {
        assert_eq!(
            rejected(|_, e| e[0].address = "nowhere".into()),
            "endpoints[0].address: `nowhere` is not ip:port"
        );
        assert_eq!(
            rejected(|_, e| e[0].identity = "spiffe://cluster.local/sa/reviews".into()),
            "endpoints[0].identity: `spiffe://cluster.local/sa/reviews` is not \
             spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
        );
        let long = "a".repeat(250);
        assert_eq!(
            rejected(|_, e| e[0].identity = format!("spiffe://cluster.local/ns/shop/sa/{long}")),
            format!(
                "endpoints[0].identity: spiffe://cluster.local/ns/shop/sa/{long} makes no TLS \
                 server name"
            )
        );
        assert_eq!(
            rejected(|_, e| e[0].address = "169.254.169.254:80".into()),
            "endpoints[0].address: `169.254.169.254:80` is link-local: the node's, or its \
             cloud's metadata service"
        );
        assert_eq!(
            rejected(|_, e| e[0].subsets = vec!["v9".into()]),
            "endpoints[0].subsets: subset `v9` is not declared in subsets"
        );
        assert_eq!(
            rejected(|d, _| d.port = 70000),
            "port: 70000 is not a TCP port"
        );
        assert_eq!(
            rejected(|d, _| {
                d.policy_spec = Some(proto::Policy {
                    load_balancer: Some(proto::LoadBalancer {
                        algorithm: 42,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
            }),
            "policy.loadBalancer.algorithm: unknown algorithm 42"
        );
        assert!(
            rejected(|d, _| {
                d.policy_spec = Some(proto::Policy {
                    load_balancer: Some(proto::LoadBalancer {
                        algorithm: proto::Algorithm::ConsistentHash as i32,
                        hash_header: String::new(),
                    }),
                    ..Default::default()
                })
            })
            .starts_with("policy.loadBalancer.hashHeader")
        );
    }

    /// The rules the controller checks too (`outrigger_api::rules`): a version that breaks one is
    /// refused in the controller's words, field named from the version.
    #[test]
    fn the_rules_the_controller_checks_are_checked_here_too() {
        let with_policy =
            |policy: proto::Policy| rejected(move |d, _| d.policy_spec = Some(policy));
        let weights = |pairs: &[(&str, u32)]| proto::TrafficSplit {
            weights: pairs
                .iter()
                .map(|&(subset, weight)| proto::WeightedSubset {
                    subset: subset.into(),
                    weight,
                })
                .collect(),
        };
        assert_eq!(
            rejected(|d, _| d.subsets.push("v1".into())),
            "subsets[1].name: duplicate subset `v1`"
        );
        assert_eq!(
            rejected(|d, _| {
                d.routes = vec![
                    proto::Route {
                        name: "a".into(),
                        ..Default::default()
                    };
                    2
                ]
            }),
            "routes[1].name: duplicate route `a`"
        );
        assert_eq!(
            with_policy(proto::Policy {
                traffic_split: Some(weights(&[("v1", 1), ("v1", 1)])),
                ..Default::default()
            }),
            "policy.trafficSplit[1].subset: subset `v1` is listed twice"
        );
        assert_eq!(
            with_policy(proto::Policy {
                traffic_split: Some(weights(&[("v1", 0)])),
                ..Default::default()
            }),
            "policy.trafficSplit: at least one weight must be above 0"
        );
        assert_eq!(
            with_policy(proto::Policy {
                retries: Some(proto::RetryPolicy {
                    attempts: 11,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "policy.retries.attempts: 11 is above 10"
        );
        assert_eq!(
            with_policy(proto::Policy {
                retries: Some(proto::RetryPolicy {
                    budget: Some(proto::RetryBudget {
                        percent: 101,
                        min_retries_per_second: 1,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "policy.retries.budget.percent: 101 is above 100"
        );
        assert_eq!(
            with_policy(proto::Policy {
                outlier_detection: Some(proto::OutlierDetection {
                    base_ejection_time_ms: 60_000,
                    max_ejection_time_ms: 1_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "policy.outlierDetection.baseEjectionTime: baseEjectionTime must not exceed \
             maxEjectionTime"
        );
        assert_eq!(
            with_policy(proto::Policy {
                outlier_detection: Some(proto::OutlierDetection {
                    max_ejection_percent: 150,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "policy.outlierDetection.maxEjectionPercent: 150 is above 100"
        );
    }

    fn inbound_rejected(change: impl FnOnce(&mut proto::InboundPort)) -> String {
        let mut port = proto::InboundPort {
            port: 9080,
            authorizations: vec![proto::Authorization {
                policy: "shop/readers".into(),
                rules: vec![proto::AuthorizationRule {
                    sources: Vec::new(),
                    targets: vec![proto::AuthorizationTarget {
                        paths: vec![proto::PathMatch {
                            kind: Some(proto::path_match::Kind::Prefix("/api/".into())),
                        }],
                        methods: vec!["GET".into()],
                    }],
                }],
                ..Default::default()
            }],
        };
        let good = proto::Destination {
            inbound: Some(proto::Inbound {
                ports: vec![port.clone()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let decoded = inbound("1".into(), good).unwrap();
        let policies = decoded.policies(9080).unwrap();
        assert!(matches!(
            &policies[0].rules[0].targets[0].paths[0],
            PathMatch::Prefix(prefix) if prefix == "/api"
        ));
        change(&mut port);
        let destination = proto::Destination {
            inbound: Some(proto::Inbound {
                ports: vec![port.clone(), port],
                ..Default::default()
            }),
            ..Default::default()
        };
        inbound("2".into(), destination).unwrap_err().to_string()
    }

    #[test]
    fn an_inbound_version_the_proxy_cannot_apply_is_refused_naming_the_field() {
        assert_eq!(
            inbound("1".into(), reviews()).unwrap_err().to_string(),
            "inbound: is missing under an inbound key"
        );
        assert_eq!(
            inbound_rejected(|_| {}),
            "inbound.ports[1].port: port 9080 is listed twice"
        );
        assert_eq!(
            inbound_rejected(|port| port.port = 70_000),
            "inbound.ports[0].port: 70000 is not a TCP port"
        );
        assert_eq!(
            inbound_rejected(|port| port.authorizations[0].action = 7),
            "inbound.ports[0].authorizations[0].action: 7 is not an action"
        );
        assert_eq!(
            inbound_rejected(|port| port.authorizations[0].policy.clear()),
            "inbound.ports[0].authorizations[0].policy: names no policy"
        );
        assert_eq!(
            inbound_rejected(
                |port| port.authorizations[0].rules[0].targets[0].methods[0] = "G ET".into()
            ),
            "inbound.ports[0].authorizations[0].rules[0].targets[0].methods[0]: `G ET` is not a method"
        );
        assert_eq!(
            inbound_rejected(
                |port| port.authorizations[0].rules[0].targets[0].paths[0].kind = None
            ),
            "inbound.ports[0].authorizations[0].rules[0].targets[0].paths[0]: needs exact or prefix"
        );
    }
}
