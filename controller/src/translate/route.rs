//! Gateway API routes (HTTPRoute, GRPCRoute) -> the protocol's route tables. A route is
//! translated once when it changes ([`Route`]); each parent Service port then gets, per set of
//! callers, one table of every route attached to it, its matches in the order the spec's
//! precedence tries them ([`table`]), with each backend resolved against the Services known then.
//!
//! Nothing in a route makes translation fail: what cannot be served is answered 500 by the rule
//! it is in and said in the route's status, and fields a newer Gateway API added are ignored and
//! named there, so a route from a newer bundle still serves what this version understands.

use std::cmp::Reverse;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use outrigger_api::destination::DestinationKey;
use outrigger_api::gateway::{
    GRPCRoute, GRPCRouteMatch, GRPCRouteRule, HTTPBackendRef, HTTPRoute, HTTPRouteFilter,
    HTTPRouteMatch, HTTPRouteRetry, HTTPRouteRule, HTTPRouteTimeouts, ParentReference, Unknown,
    ValueMatch,
};
use outrigger_api::{defaults, duration, proto};

use super::duration_ms;

/// A route, translated: what every parent it attaches to gets of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// Its parentRefs that name a Service, as written.
    pub parents: Vec<ParentReference>,
    rules: Vec<Rule>,
    /// Rules that cannot be served as written, and why (they answer 500).
    pub invalid: Vec<String>,
    /// Fields this version does not know, which it ignores.
    pub ignored: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    /// Backends left unresolved (keys empty): `backends` resolves them for each table.
    proto: proto::HttpRouteRule,
    backends: Vec<BackendRef>,
    matches: Vec<(proto::HttpRouteMatch, Precedence)>,
}

#[derive(Clone, Debug, PartialEq)]
struct BackendRef {
    /// Namespace, name and port of the Service, or why it is not one that can be used.
    target: Result<(String, String, u16), Unresolved>,
    weight: u32,
    filters: Vec<proto::HttpFilter>,
}

/// Why a backend cannot be used: the ResolvedRefs reason, and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub reason: &'static str,
    pub message: String,
}

/// Orders matches as the spec does; smaller first. GRPCRoute matches come before HTTPRoute
/// ones on a port both attach to: they match gRPC paths only.
type Precedence = (u8, [Reverse<usize>; 5]);

/// The route a table's entry comes from, for the ties the precedence leaves: the oldest route,
/// then by namespace and name.
pub type RouteOrder<'a> = (&'a Option<Time>, &'a str, &'a str);

/// What resolving a rule's backends found, for the route's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    pub unresolved: Vec<Unresolved>,
}

/// What the rules of HTTPRoute and GRPCRoute have alike, and how each kind's own parts translate.
trait RuleSpec {
    type Match: Default + Clone;

    fn name(&self) -> &Option<String>;
    fn unknown(&self) -> &Unknown;
    fn matches(&self) -> &[Self::Match];
    fn filters(&self) -> &[HTTPRouteFilter];
    fn backend_refs(&self) -> &[HTTPBackendRef];
    fn match_unknown(m: &Self::Match) -> &Unknown;
    fn translate_match(m: &Self::Match) -> Result<(proto::HttpRouteMatch, Precedence), String>;

    /// Timeouts and retries, which only HTTPRoute has.
    fn more(&self, _route: &mut Route, _field: &str, _rule: &mut proto::HttpRouteRule) {}
}

impl RuleSpec for HTTPRouteRule {
    type Match = HTTPRouteMatch;

    fn name(&self) -> &Option<String> {
        &self.name
    }
    fn unknown(&self) -> &Unknown {
        &self.unknown
    }
    fn matches(&self) -> &[HTTPRouteMatch] {
        &self.matches
    }
    fn filters(&self) -> &[HTTPRouteFilter] {
        &self.filters
    }
    fn backend_refs(&self) -> &[HTTPBackendRef] {
        &self.backend_refs
    }
    fn match_unknown(m: &HTTPRouteMatch) -> &Unknown {
        &m.unknown
    }
    fn translate_match(m: &HTTPRouteMatch) -> Result<(proto::HttpRouteMatch, Precedence), String> {
        http_match(m)
    }

    fn more(&self, route: &mut Route, field: &str, rule: &mut proto::HttpRouteRule) {
        route.timeouts(field, self.timeouts.as_ref(), rule);
        rule.retries = self.retry.as_ref().and_then(|retry| {
            retry_policy(retry)
                .map_err(|why| route.invalid(&format!("{field}.retry"), why))
                .ok()
        });
    }
}

impl RuleSpec for GRPCRouteRule {
    type Match = GRPCRouteMatch;

    fn name(&self) -> &Option<String> {
        &self.name
    }
    fn unknown(&self) -> &Unknown {
        &self.unknown
    }
    fn matches(&self) -> &[GRPCRouteMatch] {
        &self.matches
    }
    fn filters(&self) -> &[HTTPRouteFilter] {
        &self.filters
    }
    fn backend_refs(&self) -> &[HTTPBackendRef] {
        &self.backend_refs
    }
    fn match_unknown(m: &GRPCRouteMatch) -> &Unknown {
        &m.unknown
    }
    fn translate_match(m: &GRPCRouteMatch) -> Result<(proto::HttpRouteMatch, Precedence), String> {
        grpc_match(m)
    }
}

impl Route {
    pub fn of_http(route: &HTTPRoute) -> Self {
        let spec = &route.spec;
        Self::of(
            "HTTPRoute",
            &route.metadata,
            &spec.parent_refs,
            &spec.unknown,
            &spec.rules,
        )
    }

    pub fn of_grpc(route: &GRPCRoute) -> Self {
        let spec = &route.spec;
        Self::of(
            "GRPCRoute",
            &route.metadata,
            &spec.parent_refs,
            &spec.unknown,
            &spec.rules,
        )
    }

    fn of<R: RuleSpec>(
        kind: &'static str,
        metadata: &ObjectMeta,
        parent_refs: &[ParentReference],
        unknown: &Unknown,
        rules: &[R],
    ) -> Self {
        let namespace = metadata.namespace.clone().unwrap_or_default();
        let name = metadata.name.clone().unwrap_or_default();
        let mut translated = Self::new(kind, namespace, name, parent_refs);
        translated.ignore("spec", unknown);
        for (i, rule) in rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            translated.ignore(&field, rule.unknown());
            // No matches: one that matches every request.
            let every = [R::Match::default()];
            let matches = if rule.matches().is_empty() {
                &every[..]
            } else {
                rule.matches()
            };
            let matches = matches
                .iter()
                .enumerate()
                .filter_map(|(j, m)| {
                    let field = format!("{field}.matches[{j}]");
                    translated.ignore(&field, R::match_unknown(m));
                    R::translate_match(m)
                        .map_err(|why| translated.invalid(&field, why))
                        .ok()
                })
                .collect();
            let mut proto = proto::HttpRouteRule {
                route: translated.label(),
                name: rule.name().clone().unwrap_or_default(),
                ..Default::default()
            };
            rule.more(&mut translated, &field, &mut proto);
            let rule = translated.rule(&field, proto, rule.filters(), rule.backend_refs(), matches);
            translated.rules.push(rule);
        }
        translated
    }

    fn new(
        kind: &'static str,
        namespace: String,
        name: String,
        parents: &[ParentReference],
    ) -> Self {
        Self {
            kind,
            namespace,
            name,
            parents: parents.iter().filter(|p| p.is_service()).cloned().collect(),
            rules: Vec::new(),
            invalid: Vec::new(),
            ignored: Vec::new(),
        }
    }

    /// `HTTPRoute/namespace/name`, as metrics and DestinationPolicy status name it.
    pub fn label(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }

    fn ignore(&mut self, field: &str, unknown: &Unknown) {
        self.ignored
            .extend(unknown.keys().map(|name| format!("{field}.{name}")));
    }

    fn invalid(&mut self, field: &str, why: String) {
        self.invalid.push(format!("{field}: {why}"));
    }

    fn timeouts(
        &mut self,
        field: &str,
        timeouts: Option<&HTTPRouteTimeouts>,
        rule: &mut proto::HttpRouteRule,
    ) {
        let Some(timeouts) = timeouts else { return };
        let mut parse = |name: &str, value: &Option<String>| {
            let value = value.as_deref()?;
            match duration::parse(value) {
                // Zero turns the timeout off.
                Ok(d) if d.is_zero() => None,
                Ok(d) => Some(duration_ms(d)),
                Err(error) => {
                    self.invalid(&format!("{field}.timeouts.{name}"), error.to_string());
                    None
                }
            }
        };
        rule.request_timeout_ms = parse("request", &timeouts.request);
        rule.backend_request_timeout_ms = parse("backendRequest", &timeouts.backend_request);
    }

    /// A rule's filters and backends; what cannot be served makes the rule answer 500.
    fn rule(
        &mut self,
        field: &str,
        mut proto: proto::HttpRouteRule,
        filters: &[HTTPRouteFilter],
        backend_refs: &[HTTPBackendRef],
        matches: Vec<(proto::HttpRouteMatch, Precedence)>,
    ) -> Rule {
        let mut unservable = None;
        for (i, filter) in filters.iter().enumerate() {
            let field = format!("{field}.filters[{i}]");
            self.ignore(&field, &filter.unknown);
            match http_filter(filter) {
                Ok(filter) => proto.filters.push(filter),
                Err(why) => {
                    self.invalid(&field, why.clone());
                    unservable.get_or_insert(why);
                }
            }
        }
        let mut backends: Vec<BackendRef> = backend_refs
            .iter()
            .enumerate()
            .map(|(i, backend)| {
                let field = format!("{field}.backendRefs[{i}]");
                self.ignore(&field, &backend.unknown);
                self.backend(&field, backend)
            })
            .collect();
        if let Some(why) = unservable {
            proto.filters.clear();
            backends = vec![BackendRef {
                target: Err(Unresolved {
                    reason: "UnsupportedValue",
                    message: why,
                }),
                weight: 1,
                filters: Vec::new(),
            }];
        }
        Rule {
            proto,
            backends,
            matches,
        }
    }

    fn backend(&mut self, field: &str, backend: &HTTPBackendRef) -> BackendRef {
        let weight = u32::try_from(backend.weight.unwrap_or(1)).unwrap_or(0);
        let mut filters = Vec::new();
        for (i, filter) in backend.filters.iter().enumerate() {
            let field = format!("{field}.filters[{i}]");
            self.ignore(&field, &filter.unknown);
            match http_filter(filter) {
                Ok(
                    filter @ proto::HttpFilter {
                        kind:
                            Some(
                                proto::http_filter::Kind::RequestHeaders(_)
                                | proto::http_filter::Kind::ResponseHeaders(_),
                            ),
                    },
                ) => filters.push(filter),
                Ok(_) => self.invalid(
                    &field,
                    "a backend's filters may only modify headers; ignored".into(),
                ),
                Err(why) => self.invalid(&field, format!("{why}; ignored")),
            }
        }
        let is_service = backend.group.as_deref().unwrap_or("").is_empty()
            && backend.kind.as_deref().unwrap_or("Service") == "Service";
        let target = if !is_service {
            Err(Unresolved {
                reason: "InvalidKind",
                message: format!(
                    "{field} is a {}/{}, not a Service",
                    backend.group.as_deref().unwrap_or(""),
                    backend.kind.as_deref().unwrap_or("")
                ),
            })
        } else {
            match backend.port.and_then(|p| u16::try_from(p).ok()) {
                Some(port) => Ok((
                    backend
                        .namespace
                        .clone()
                        .unwrap_or_else(|| self.namespace.clone()),
                    backend.name.clone(),
                    port,
                )),
                None => Err(Unresolved {
                    reason: "UnsupportedValue",
                    message: format!("{field}.port is required for a Service"),
                }),
            }
        };
        BackendRef {
            target,
            weight,
            filters,
        }
    }

    /// Whether the route attaches to the Service `namespace/name` on `port`, and as whose routes:
    /// `Some("")` for the producer routes, `Some(namespace)` for a consumer namespace's.
    pub fn attaches(&self, namespace: &str, name: &str, port: u16) -> Option<&str> {
        self.parents
            .iter()
            .any(|parent| {
                parent.name == name
                    && parent.namespace.as_deref().unwrap_or(&self.namespace) == namespace
                    && parent.port.is_none_or(|p| i32::from(port) == p)
            })
            .then(|| {
                if self.namespace == namespace {
                    ""
                } else {
                    self.namespace.as_str()
                }
            })
    }

    /// The Services its backends name.
    pub fn backend_services(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules
            .iter()
            .flat_map(|rule| &rule.backends)
            .filter_map(|backend| backend.target.as_ref().ok())
            .map(|(namespace, name, _)| (namespace.as_str(), name.as_str()))
    }

    /// What resolving its backends finds now; `has_port` says whether a Service has a port.
    pub fn resolve(&self, has_port: &impl Fn(&str, &str, u16) -> Option<bool>) -> Resolution {
        let unresolved = self
            .rules
            .iter()
            .flat_map(|rule| &rule.backends)
            .filter_map(|backend| resolve(backend, has_port).err())
            .collect();
        Resolution { unresolved }
    }
}

/// The destination key of a backend, or why it cannot be used.
fn resolve(
    backend: &BackendRef,
    has_port: &impl Fn(&str, &str, u16) -> Option<bool>,
) -> Result<String, Unresolved> {
    let (namespace, name, port) = backend.target.as_ref().map_err(Clone::clone)?;
    match has_port(namespace, name, *port) {
        Some(true) => Ok(DestinationKey::Service {
            namespace: namespace.clone(),
            name: name.clone(),
            port: *port,
        }
        .to_string()),
        Some(false) => Err(Unresolved {
            reason: "BackendNotFound",
            message: format!("Service {namespace}/{name} has no port {port}"),
        }),
        None => Err(Unresolved {
            reason: "BackendNotFound",
            message: format!("no Service {namespace}/{name}"),
        }),
    }
}

/// One table of the routes `attached` (each with its order), for one set of callers.
pub fn table(
    consumer_namespace: &str,
    attached: &[(&Route, RouteOrder<'_>)],
    has_port: &impl Fn(&str, &str, u16) -> Option<bool>,
) -> proto::HttpRouteTable {
    let mut rules = Vec::new();
    let mut entries = Vec::new();
    let mut attached = attached.to_vec();
    attached.sort_by(|a, b| a.1.cmp(&b.1));
    for (route, order) in attached {
        for rule in &route.rules {
            let index = u32::try_from(rules.len()).expect("rules are bounded by the API server");
            let mut proto = rule.proto.clone();
            proto.backends = rule
                .backends
                .iter()
                .map(|backend| match resolve(backend, has_port) {
                    Ok(key) => proto::RouteBackend {
                        key,
                        weight: backend.weight,
                        filters: backend.filters.clone(),
                        unresolved: String::new(),
                    },
                    Err(unresolved) => proto::RouteBackend {
                        key: String::new(),
                        weight: backend.weight,
                        filters: Vec::new(),
                        unresolved: unresolved.message,
                    },
                })
                .collect();
            rules.push(proto);
            for (position, (matcher, precedence)) in rule.matches.iter().enumerate() {
                let mut matcher = matcher.clone();
                matcher.rule = index;
                entries.push(((*precedence, order, index, position), matcher));
            }
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    proto::HttpRouteTable {
        consumer_namespace: consumer_namespace.to_string(),
        rules,
        matches: entries.into_iter().map(|(_, matcher)| matcher).collect(),
    }
}

fn http_match(m: &HTTPRouteMatch) -> Result<(proto::HttpRouteMatch, Precedence), String> {
    use proto::http_route_match::Path;
    let (path, rank, length) = match &m.path {
        None => (Path::Prefix("/".into()), 1, 1),
        Some(path) => {
            let value = path.value.clone().unwrap_or_else(|| "/".into());
            let length = value.len();
            match path.match_type.as_deref().unwrap_or("PathPrefix") {
                "Exact" => (Path::Exact(value), 0, length),
                "PathPrefix" => (Path::Prefix(value), 1, length),
                "RegularExpression" => (Path::Regex(value), 2, length),
                other => return Err(format!("path match type `{other}` is not supported")),
            }
        }
    };
    let headers = value_matches("headers", &m.headers)?;
    let query_params = value_matches("queryParams", &m.query_params)?;
    let precedence = (
        1,
        [
            Reverse(usize::from(rank == 0)),
            Reverse(if rank == 2 { 0 } else { length }),
            Reverse(usize::from(m.method.is_some())),
            Reverse(headers.len()),
            Reverse(query_params.len()),
        ],
    );
    Ok((
        proto::HttpRouteMatch {
            rule: 0,
            path: Some(path),
            headers,
            query_params,
            method: m.method.clone().unwrap_or_default(),
        },
        precedence,
    ))
}

/// A gRPC method match is a match on the request's path, `/<service>/<method>`.
fn grpc_match(m: &GRPCRouteMatch) -> Result<(proto::HttpRouteMatch, Precedence), String> {
    use proto::http_route_match::Path;
    let (service, method) = m
        .method
        .as_ref()
        .map(|method| (method.service.clone(), method.method.clone()))
        .unwrap_or_default();
    let regex = match m.method.as_ref().and_then(|m| m.match_type.as_deref()) {
        None | Some("Exact") => false,
        Some("RegularExpression") => true,
        Some(other) => return Err(format!("method match type `{other}` is not supported")),
    };
    let segment = |value: &Option<String>| match value {
        Some(value) if regex => value.clone(),
        Some(value) => regex::escape(value),
        None => "[^/]+".to_string(),
    };
    let path = match (&service, &method, regex) {
        (None, None, _) => None,
        (Some(service), Some(method), false) => Some(Path::Exact(format!("/{service}/{method}"))),
        (Some(service), None, false) => Some(Path::Prefix(format!("/{service}"))),
        _ => Some(Path::Regex(format!(
            "/{}/{}",
            segment(&service),
            segment(&method)
        ))),
    };
    let headers = value_matches("headers", &m.headers)?;
    let length = |value: &Option<String>| value.as_ref().map_or(0, String::len);
    let precedence = (
        0,
        [
            Reverse(length(&service)),
            Reverse(length(&method)),
            Reverse(headers.len()),
            Reverse(0),
            Reverse(0),
        ],
    );
    Ok((
        proto::HttpRouteMatch {
            rule: 0,
            path,
            headers,
            query_params: Vec::new(),
            method: String::new(),
        },
        precedence,
    ))
}

/// Header or query parameter matches; of several for one name, the first counts, as the spec
/// says.
fn value_matches(field: &str, matches: &[ValueMatch]) -> Result<Vec<proto::HeaderMatch>, String> {
    use proto::header_match::Value;
    let mut seen = std::collections::HashSet::new();
    let mut translated = Vec::new();
    for m in matches {
        let name = if field == "headers" {
            m.name.to_ascii_lowercase()
        } else {
            m.name.clone()
        };
        if !seen.insert(name.clone()) {
            continue;
        }
        let value = match m.match_type.as_deref().unwrap_or("Exact") {
            "Exact" => Value::Exact(m.value.clone()),
            "RegularExpression" => Value::Regex(m.value.clone()),
            other => return Err(format!("{field} match type `{other}` is not supported")),
        };
        translated.push(proto::HeaderMatch {
            name,
            value: Some(value),
        });
    }
    Ok(translated)
}

fn http_filter(filter: &HTTPRouteFilter) -> Result<proto::HttpFilter, String> {
    use proto::http_filter::Kind;
    let missing = |field: &str| format!("a {} filter needs `{field}`", filter.filter_type);
    let kind = match filter.filter_type.as_str() {
        "RequestHeaderModifier" => Kind::RequestHeaders(header_modifier(
            filter
                .request_header_modifier
                .as_ref()
                .ok_or_else(|| missing("requestHeaderModifier"))?,
        )),
        "ResponseHeaderModifier" => Kind::ResponseHeaders(header_modifier(
            filter
                .response_header_modifier
                .as_ref()
                .ok_or_else(|| missing("responseHeaderModifier"))?,
        )),
        "RequestRedirect" => {
            let redirect = filter
                .request_redirect
                .as_ref()
                .ok_or_else(|| missing("requestRedirect"))?;
            Kind::Redirect(proto::Redirect {
                scheme: redirect.scheme.clone().unwrap_or_default(),
                hostname: redirect.hostname.clone().unwrap_or_default(),
                port: redirect.port.and_then(|p| u32::try_from(p).ok()),
                path: redirect.path.as_ref().map(path_modifier).transpose()?,
                status: redirect
                    .status_code
                    .and_then(|s| u32::try_from(s).ok())
                    .unwrap_or(302),
            })
        }
        "URLRewrite" => {
            let rewrite = filter
                .url_rewrite
                .as_ref()
                .ok_or_else(|| missing("urlRewrite"))?;
            Kind::Rewrite(proto::Rewrite {
                hostname: rewrite.hostname.clone().unwrap_or_default(),
                path: rewrite.path.as_ref().map(path_modifier).transpose()?,
            })
        }
        other => return Err(format!("filter type `{other}` is not supported")),
    };
    Ok(proto::HttpFilter { kind: Some(kind) })
}

fn header_modifier(filter: &outrigger_api::gateway::HeaderFilter) -> proto::HeaderModifier {
    let values = |headers: &[outrigger_api::gateway::HTTPHeader]| {
        headers
            .iter()
            .map(|h| proto::HeaderValue {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect()
    };
    proto::HeaderModifier {
        set: values(&filter.set),
        add: values(&filter.add),
        remove: filter
            .remove
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect(),
    }
}

fn path_modifier(
    path: &outrigger_api::gateway::HTTPPathModifier,
) -> Result<proto::PathRewrite, String> {
    use proto::path_rewrite::Kind;
    let kind = match path.modifier_type.as_str() {
        "ReplaceFullPath" => Kind::Full(path.replace_full_path.clone().unwrap_or_default()),
        "ReplacePrefixMatch" => Kind::Prefix(
            path.replace_prefix_match
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
        ),
        other => return Err(format!("path modifier type `{other}` is not supported")),
    };
    Ok(proto::PathRewrite { kind: Some(kind) })
}

/// GEP-1731: up to `attempts` retries of a response with one of `codes` (or a failed
/// connection), at least `backoff` apart.
fn retry_policy(retry: &HTTPRouteRetry) -> Result<proto::RetryPolicy, String> {
    let backoff = retry
        .backoff
        .as_deref()
        .map(duration::parse)
        .transpose()
        .map_err(|error| error.to_string())?
        .unwrap_or(defaults::BACKOFF_BASE);
    Ok(proto::RetryPolicy {
        attempts: retry
            .attempts
            .map_or(defaults::RETRY_ATTEMPTS, |a| u32::try_from(a).unwrap_or(0)),
        per_try_timeout_ms: None,
        retry_on: vec![
            proto::RetryOn::RetriableStatusCodes as i32,
            proto::RetryOn::ConnectFailure as i32,
        ],
        retriable_status_codes: retry
            .codes
            .iter()
            .filter_map(|c| u32::try_from(*c).ok())
            .collect(),
        backoff_base_ms: duration_ms(backoff),
        backoff_max_ms: duration_ms(backoff.max(defaults::BACKOFF_MAX)),
        budget: Some(proto::RetryBudget {
            percent: defaults::BUDGET_PERCENT,
            min_retries_per_second: defaults::BUDGET_MIN_RETRIES_PER_SECOND,
        }),
        retry_non_idempotent: false,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn http(name: &str, rules: Value) -> Route {
        Route::of_http(
            &serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"namespace": "shop", "name": name},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                    "rules": rules,
                },
            }))
            .unwrap(),
        )
    }

    fn every_service(_: &str, _: &str, _: u16) -> Option<bool> {
        Some(true)
    }

    /// Each match of the table as (rule's route, its path, how many headers).
    fn order(table: &proto::HttpRouteTable) -> Vec<(String, String, usize)> {
        use proto::http_route_match::Path;
        table
            .matches
            .iter()
            .map(|m| {
                let path = match &m.path {
                    Some(Path::Exact(p)) => format!("= {p}"),
                    Some(Path::Prefix(p)) => format!("^ {p}"),
                    Some(Path::Regex(p)) => format!("~ {p}"),
                    None => "any".into(),
                };
                (
                    table.rules[m.rule as usize].route.clone(),
                    path,
                    m.headers.len(),
                )
            })
            .collect()
    }

    #[test]
    fn matches_are_tried_in_the_specs_order_whichever_rule_or_route_they_are_in() {
        let old = http(
            "old",
            json!([
                {"matches": [
                    {"path": {"type": "PathPrefix", "value": "/"}},
                    {"headers": [{"name": "version", "value": "one"}]},
                ]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}]},
            ]),
        );
        let new = http(
            "new",
            json!([
                {"matches": [
                    {"path": {"type": "Exact", "value": "/v2"}},
                    {"path": {"type": "PathPrefix", "value": "/"}, "method": "POST"},
                    // A tie with the old route's `PathPrefix /`: the older route wins it.
                    {"path": {"type": "PathPrefix", "value": "/"}},
                ]},
            ]),
        );
        let at = |second| {
            Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(second).unwrap(),
            ))
        };
        let (earlier, later) = (at(10), at(20));
        let table = table(
            "",
            &[
                (&new, (&later, "shop", "new")),
                (&old, (&earlier, "shop", "old")),
            ],
            &every_service,
        );
        let old = "HTTPRoute/shop/old".to_string();
        let new = "HTTPRoute/shop/new".to_string();
        assert_eq!(
            order(&table),
            [
                (new.clone(), "= /v2".into(), 0),
                (old.clone(), "^ /v2".into(), 0),
                (new.clone(), "^ /".into(), 0),
                (old.clone(), "^ /".into(), 1),
                (old, "^ /".into(), 0),
                (new, "^ /".into(), 0),
            ]
        );
        assert_eq!(table.matches[2].method, "POST");
    }

    #[test]
    fn grpc_methods_become_paths_and_come_before_http_matches() {
        let grpc = Route::of_grpc(
            &serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "GRPCRoute",
                "metadata": {"namespace": "shop", "name": "grpc"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 7070}],
                    "rules": [
                        {"matches": [{"method": {"service": "proto.Echo", "method": "Echo"}}]},
                        {"matches": [{"method": {"service": "proto.Echo"}}]},
                        {"matches": [{"method": {"method": "Ping"}}]},
                        {"matches": [{"method": {
                            "type": "RegularExpression", "service": "proto\\..*", "method": "E.*",
                        }}]},
                        {"backendRefs": [{"name": "echo-v1", "port": 7070}]},
                    ],
                },
            }))
            .unwrap(),
        );
        let http = http("web", json!([{}]));
        let table = table(
            "",
            &[
                (&http, (&None, "shop", "web")),
                (&grpc, (&None, "shop", "grpc")),
            ],
            &every_service,
        );
        let paths: Vec<_> = order(&table).into_iter().map(|(_, path, _)| path).collect();
        assert_eq!(
            paths,
            [
                "= /proto.Echo/Echo",
                // More characters of service name first, whatever the match type.
                "^ /proto.Echo",
                "~ /proto\\..*/E.*",
                "~ /[^/]+/Ping",
                "any",
                "^ /",
            ]
        );
    }

    #[test]
    fn filters_and_timeouts_are_translated_and_what_cannot_be_served_answers_500() {
        let route = http(
            "filters",
            json!([
                {
                    "filters": [
                        {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                            "set": [{"name": "X-Set", "value": "a"}],
                            "add": [{"name": "X-Add", "value": "b"}],
                            "remove": ["X-Gone"],
                        }},
                        {"type": "URLRewrite", "urlRewrite": {
                            "hostname": "elsewhere",
                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"},
                        }},
                    ],
                    "backendRefs": [{"name": "echo-v1", "port": 8080, "filters": [
                        {"type": "ResponseHeaderModifier",
                         "responseHeaderModifier": {"set": [{"name": "X-Backend", "value": "v1"}]}},
                    ]}],
                    "timeouts": {"request": "10s", "backendRequest": "0s"},
                },
                {"filters": [{"type": "RequestRedirect", "requestRedirect": {
                    "scheme": "https", "port": 8443,
                }}]},
                {"filters": [{"type": "RequestMirror", "requestMirror": {}}],
                 "backendRefs": [{"name": "echo-v1", "port": 8080}]},
                {"backendRefs": [{"kind": "ServiceImport", "group": "multicluster.x-k8s.io",
                                  "name": "echo", "port": 80}]},
            ]),
        );
        let table = table("", &[(&route, (&None, "shop", "filters"))], &every_service);
        use proto::http_filter::Kind;
        let rewrite = &table.rules[0];
        assert!(matches!(
            &rewrite.filters[0].kind,
            Some(Kind::RequestHeaders(m)) if m.set[0].name == "x-set" && m.remove == ["x-gone"]
        ));
        assert!(matches!(
            &rewrite.filters[1].kind,
            Some(Kind::Rewrite(proto::Rewrite { hostname, path: Some(proto::PathRewrite {
                kind: Some(proto::path_rewrite::Kind::Prefix(prefix)) }) }))
                if hostname == "elsewhere" && prefix == "/new"
        ));
        assert_eq!(rewrite.backends[0].filters.len(), 1);
        assert_eq!(rewrite.request_timeout_ms, Some(10_000));
        assert_eq!(rewrite.backend_request_timeout_ms, None, "0s turns it off");
        assert!(matches!(
            &table.rules[1].filters[0].kind,
            Some(Kind::Redirect(proto::Redirect { scheme, port: Some(8443), status: 302, .. }))
                if scheme == "https"
        ));
        assert!(
            table.rules[1].backends.is_empty(),
            "a redirect sends nowhere"
        );
        let mirror = &table.rules[2];
        assert!(mirror.filters.is_empty());
        assert_eq!(
            backends_of(mirror),
            [(
                String::new(),
                "filter type `RequestMirror` is not supported".into()
            )]
        );
        assert_eq!(
            backends_of(&table.rules[3]),
            [(
                String::new(),
                "spec.rules[3].backendRefs[0] is a multicluster.x-k8s.io/ServiceImport, not a \
                 Service"
                    .into()
            )]
        );
        assert_eq!(
            route.invalid,
            ["spec.rules[2].filters[0]: filter type `RequestMirror` is not supported"]
        );
    }

    fn backends_of(rule: &proto::HttpRouteRule) -> Vec<(String, String)> {
        rule.backends
            .iter()
            .map(|b| (b.key.clone(), b.unresolved.clone()))
            .collect()
    }

    #[test]
    fn a_retry_follows_gep_1731() {
        let route = http(
            "retry",
            json!([{"retry": {"codes": [500, 503], "attempts": 3, "backoff": "100ms"},
                    "backendRefs": [{"name": "echo-v1", "port": 8080}]}]),
        );
        let table = table("", &[(&route, (&None, "shop", "retry"))], &every_service);
        let retries = table.rules[0].retries.clone().unwrap();
        assert_eq!(retries.attempts, 3);
        assert_eq!(retries.retriable_status_codes, [500, 503]);
        assert_eq!(retries.backoff_base_ms, 100);
        assert_eq!(
            retries.retry_on,
            [
                proto::RetryOn::RetriableStatusCodes as i32,
                proto::RetryOn::ConnectFailure as i32
            ]
        );
    }
}
