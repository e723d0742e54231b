//! DestinationPolicy spec -> the protocol's policy, checked on the way.

use std::collections::{BTreeMap, HashSet};

use outrigger_api::policy::{self, DestinationPolicySpec};
use outrigger_api::proto;
use outrigger_api::rules::{self, invalid};

use super::{PolicyError, millis};

/// A policy ready to be put into the destinations of its Service.
#[derive(Clone, Debug, PartialEq)]
pub struct Translated {
    /// Subset names and the pod labels that make a member, in declaration order.
    pub subsets: Vec<(String, BTreeMap<String, String>)>,
    pub policy: proto::Policy,
    pub routes: Vec<proto::Route>,
}

pub fn translate(spec: &DestinationPolicySpec) -> Result<Translated, PolicyError> {
    translate_spec(spec).map_err(|error| error.within("spec"))
}

/// [`translate`], with fields named from the spec.
fn translate_spec(spec: &DestinationPolicySpec) -> Result<Translated, PolicyError> {
    let names: HashSet<&str> = spec.subsets.iter().map(|s| s.name.as_str()).collect();
    rules::unique_names(
        "subsets",
        "subset",
        spec.subsets.iter().map(|s| s.name.as_str()),
    )?;
    rules::unique_names(
        "routes",
        "route",
        spec.routes.iter().map(|r| r.name.as_str()),
    )?;
    let split = |field: &str, split: &Option<policy::TrafficSplit>| {
        split
            .as_ref()
            .map(|s| traffic_split(field, s, &names))
            .transpose()
    };
    let routes = spec
        .routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            let field = format!("routes[{i}]");
            // What the route's requests get: its own timeout and retries, or the spec's.
            let timeout = route.timeout.as_ref().or(spec.timeout.as_ref());
            let retries = route.retries.as_ref().or(spec.retries.as_ref());
            check_per_try_timeout(&format!("{field}.retries"), retries, timeout)?;
            Ok(proto::Route {
                name: route.name.clone(),
                r#match: Some(route_match(&format!("{field}.match"), &route.r#match)?),
                traffic_split: split(&format!("{field}.trafficSplit"), &route.traffic_split)?,
                timeout_ms: route.timeout.as_ref().map(millis),
                retries: route
                    .retries
                    .as_ref()
                    .map(|r| retry_policy(&format!("{field}.retries"), r))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_per_try_timeout("retries", spec.retries.as_ref(), spec.timeout.as_ref())?;
    let policy = proto::Policy {
        traffic_split: split("trafficSplit", &spec.traffic_split)?,
        timeout_ms: spec.timeout.as_ref().map(millis),
        retries: spec
            .retries
            .as_ref()
            .map(|r| retry_policy("retries", r))
            .transpose()?,
        outlier_detection: spec
            .outlier_detection
            .as_ref()
            .map(outlier_detection)
            .transpose()?,
        load_balancer: spec.load_balancer.as_ref().map(load_balancer).transpose()?,
        connection_pool: spec
            .connection_pool
            .as_ref()
            .map(connection_pool)
            .transpose()?,
        rate_limit: spec.rate_limit.as_ref().map(rate_limit).transpose()?,
        fault_injection: spec
            .fault_injection
            .as_ref()
            .map(fault_injection)
            .transpose()?,
    };
    Ok(Translated {
        subsets: spec
            .subsets
            .iter()
            .map(|s| (s.name.clone(), s.labels.clone()))
            .collect(),
        policy,
        routes,
    })
}

fn traffic_split(
    field: &str,
    split: &policy::TrafficSplit,
    subsets: &HashSet<&str>,
) -> Result<proto::TrafficSplit, PolicyError> {
    rules::traffic_split(
        field,
        split.0.iter().map(|w| (w.subset.as_str(), w.weight)),
        |subset| subsets.contains(subset),
    )?;
    Ok(proto::TrafficSplit {
        weights: split
            .0
            .iter()
            .map(|w| proto::WeightedSubset {
                subset: w.subset.clone(),
                weight: w.weight,
            })
            .collect(),
    })
}

fn check_per_try_timeout(
    field: &str,
    retries: Option<&policy::Retries>,
    timeout: Option<&policy::Duration>,
) -> Result<(), PolicyError> {
    let text_and_value = |d: &policy::Duration| (d.as_str().to_string(), d.get());
    rules::per_try_timeout(
        &format!("{field}.perTryTimeout"),
        retries
            .and_then(|r| r.per_try_timeout.as_ref())
            .map(text_and_value),
        timeout.map(text_and_value),
    )
}

fn retry_policy(field: &str, retries: &policy::Retries) -> Result<proto::RetryPolicy, PolicyError> {
    use policy::RetryOn;
    rules::at_most(
        &format!("{field}.attempts"),
        retries.attempts,
        rules::MAX_ATTEMPTS,
    )?;
    if retries.retry_on.is_empty() {
        return Err(invalid(format!("{field}.retryOn"), "must not be empty"));
    }
    if retries.retry_on.contains(&RetryOn::RetriableStatusCodes)
        && retries.retriable_status_codes.is_empty()
    {
        return Err(invalid(
            format!("{field}.retriableStatusCodes"),
            "retryOn retriable-status-codes needs retriableStatusCodes",
        ));
    }
    for (i, code) in retries.retriable_status_codes.iter().enumerate() {
        rules::status_code(
            &format!("{field}.retriableStatusCodes[{i}]"),
            (*code).into(),
            rules::ANY_STATUS,
        )?;
    }
    rules::in_order(
        &format!("{field}.backoff"),
        ("baseInterval", retries.backoff.base_interval.get()),
        ("maxInterval", retries.backoff.max_interval.get()),
    )?;
    rules::percent(&format!("{field}.budget.percent"), retries.budget.percent)?;
    Ok(proto::RetryPolicy {
        attempts: retries.attempts,
        per_try_timeout_ms: retries.per_try_timeout.as_ref().map(millis),
        retry_on: retries
            .retry_on
            .iter()
            .map(|&condition| proto::RetryOn::from(condition) as i32)
            .collect(),
        retriable_status_codes: retries
            .retriable_status_codes
            .iter()
            .map(|&code| code.into())
            .collect(),
        backoff_base_ms: millis(&retries.backoff.base_interval),
        backoff_max_ms: millis(&retries.backoff.max_interval),
        budget: Some(proto::RetryBudget {
            percent: retries.budget.percent,
            min_retries_per_second: retries.budget.min_retries_per_second,
        }),
        retry_non_idempotent: retries.retry_non_idempotent,
    })
}

fn route_match(
    field: &str,
    matcher: &policy::RouteMatch,
) -> Result<proto::RouteMatch, PolicyError> {
    let headers = matcher
        .headers
        .iter()
        .map(|(name, value)| {
            let value = match (&value.exact, &value.regex) {
                (Some(exact), None) => proto::header_match::Value::Exact(exact.clone()),
                (None, Some(regex)) => proto::header_match::Value::Regex(regex.clone()),
                _ => {
                    return Err(invalid(
                        format!("{field}.headers.{name}"),
                        "exactly one of exact or regex must be set",
                    ));
                }
            };
            Ok(proto::HeaderMatch {
                name: name.clone(),
                value: Some(value),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(proto::RouteMatch {
        headers,
        path_prefix: matcher.path_prefix.clone().unwrap_or_default(),
        method: matcher.method.map(|m| m.to_string()).unwrap_or_default(),
    })
}

fn outlier_detection(
    outlier: &policy::OutlierDetection,
) -> Result<proto::OutlierDetection, PolicyError> {
    rules::in_order(
        "outlierDetection.baseEjectionTime",
        ("baseEjectionTime", outlier.base_ejection_time.get()),
        ("maxEjectionTime", outlier.max_ejection_time.get()),
    )?;
    rules::percent(
        "outlierDetection.maxEjectionPercent",
        outlier.max_ejection_percent,
    )?;
    Ok(proto::OutlierDetection {
        consecutive_5xx_errors: outlier.consecutive_5xx_errors,
        consecutive_gateway_errors: outlier.consecutive_gateway_errors,
        interval_ms: millis(&outlier.interval),
        base_ejection_time_ms: millis(&outlier.base_ejection_time),
        max_ejection_time_ms: millis(&outlier.max_ejection_time),
        max_ejection_percent: outlier.max_ejection_percent,
    })
}

fn load_balancer(lb: &policy::LoadBalancer) -> Result<proto::LoadBalancer, PolicyError> {
    use policy::Algorithm;
    let algorithm = match lb.algorithm {
        Algorithm::PeakEwma => proto::Algorithm::PeakEwma,
        Algorithm::RoundRobin => proto::Algorithm::RoundRobin,
        Algorithm::LeastRequest => proto::Algorithm::LeastRequest,
        Algorithm::Random => proto::Algorithm::Random,
        Algorithm::ConsistentHash => proto::Algorithm::ConsistentHash,
    };
    let hash_header = match (lb.algorithm, &lb.consistent_hash) {
        (Algorithm::ConsistentHash, Some(hash)) => hash.http_header_name.clone(),
        (Algorithm::ConsistentHash, None) => {
            return Err(invalid(
                "loadBalancer.consistentHash",
                "algorithm ConsistentHash needs consistentHash.httpHeaderName",
            ));
        }
        (_, Some(_)) => {
            return Err(invalid(
                "loadBalancer.consistentHash",
                "consistentHash applies only to algorithm ConsistentHash",
            ));
        }
        (_, None) => String::new(),
    };
    Ok(proto::LoadBalancer {
        algorithm: algorithm as i32,
        hash_header,
    })
}

fn connection_pool(pool: &policy::ConnectionPool) -> Result<proto::ConnectionPool, PolicyError> {
    if let Some(max) = pool.max_connections {
        rules::at_least_one("connectionPool.maxConnections", max)?;
    }
    Ok(proto::ConnectionPool {
        max_connections: pool.max_connections,
        max_pending_requests: pool.max_pending_requests,
        connect_timeout_ms: millis(&pool.connect_timeout),
    })
}

fn rate_limit(limit: &policy::RateLimit) -> Result<proto::RateLimit, PolicyError> {
    rules::at_least_one("rateLimit.requestsPerSecond", limit.requests_per_second)?;
    Ok(proto::RateLimit {
        requests_per_second: limit.requests_per_second,
        // The controller's one default: a bucket holding one second's worth.
        burst: limit.burst.unwrap_or(limit.requests_per_second).max(1),
    })
}

fn fault_injection(faults: &policy::FaultInjection) -> Result<proto::FaultInjection, PolicyError> {
    let check = rules::fraction_percent;
    let delay = faults
        .delay
        .as_ref()
        .map(|delay| {
            Ok(proto::FaultDelay {
                percent: check("faultInjection.delay.percent", delay.percent)?,
                fixed_delay_ms: millis(&delay.fixed_delay),
            })
        })
        .transpose()?;
    let abort = faults
        .abort
        .as_ref()
        .map(|abort| {
            Ok(proto::FaultAbort {
                percent: check("faultInjection.abort.percent", abort.percent)?,
                http_status: rules::status_code(
                    "faultInjection.abort.httpStatus",
                    abort.http_status.into(),
                    rules::FINAL_STATUS,
                )?
                .into(),
            })
        })
        .transpose()?;
    Ok(proto::FaultInjection { delay, abort })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_api::policy::DestinationPolicy;
    use serde_json::{Value, json};

    fn spec(value: Value) -> DestinationPolicySpec {
        serde_json::from_value(value).expect("a well-typed spec")
    }

    fn example() -> DestinationPolicy {
        serde_norway::from_str(include_str!("../../../examples/reviews-canary.yaml"))
            .expect("the example parses")
    }

    #[test]
    fn the_spec_example_translates_to_explicit_values() {
        let translated = translate(&example().spec).unwrap();
        assert_eq!(
            translated
                .subsets
                .iter()
                .map(|(name, labels)| (name.as_str(), labels["version"].as_str()))
                .collect::<Vec<_>>(),
            [("stable", "v1"), ("canary", "v2")]
        );
        let policy = &translated.policy;
        let weights: Vec<(&str, u32)> = policy
            .traffic_split
            .as_ref()
            .unwrap()
            .weights
            .iter()
            .map(|w| (w.subset.as_str(), w.weight))
            .collect();
        assert_eq!(weights, [("stable", 90), ("canary", 10)]);
        assert_eq!(policy.timeout_ms, Some(10_000));
        let retries = policy.retries.as_ref().unwrap();
        assert_eq!(retries.attempts, 3);
        assert_eq!(retries.per_try_timeout_ms, Some(2_000));
        assert_eq!(
            retries.retry_on,
            [
                proto::RetryOn::ServerError as i32,
                proto::RetryOn::GatewayError as i32,
                proto::RetryOn::ConnectFailure as i32,
                proto::RetryOn::Reset as i32,
                proto::RetryOn::RetriableStatusCodes as i32,
            ]
        );
        assert_eq!(retries.retriable_status_codes, [503]);
        assert_eq!((retries.backoff_base_ms, retries.backoff_max_ms), (25, 250));
        assert_eq!(
            retries.budget,
            Some(proto::RetryBudget {
                percent: 20,
                min_retries_per_second: 10
            })
        );
        assert_eq!(
            policy.outlier_detection,
            Some(proto::OutlierDetection {
                consecutive_5xx_errors: 5,
                consecutive_gateway_errors: 0,
                interval_ms: 10_000,
                base_ejection_time_ms: 30_000,
                max_ejection_time_ms: 300_000,
                max_ejection_percent: 50,
            })
        );
        assert_eq!(
            policy.load_balancer.as_ref().unwrap().algorithm,
            proto::Algorithm::PeakEwma as i32
        );
        assert_eq!(
            policy.connection_pool,
            Some(proto::ConnectionPool {
                max_connections: Some(1024),
                max_pending_requests: Some(1024),
                connect_timeout_ms: 1_000,
            })
        );
        assert_eq!(
            policy.rate_limit,
            Some(proto::RateLimit {
                requests_per_second: 100,
                burst: 200
            })
        );
        let faults = policy.fault_injection.as_ref().unwrap();
        assert_eq!(faults.abort.as_ref().unwrap().http_status, 503);
        assert_eq!(faults.delay.as_ref().unwrap().fixed_delay_ms, 0);

        let [route] = translated.routes.as_slice() else {
            panic!("one route")
        };
        assert_eq!(route.name, "canary-testers");
        assert_eq!(route.timeout_ms, Some(2_000));
        assert_eq!(route.retries, None, "inherits the spec's");
        let matcher = route.r#match.as_ref().unwrap();
        assert_eq!(matcher.path_prefix, "/api");
        assert_eq!(matcher.method, "GET");
        assert_eq!(
            matcher.headers,
            [proto::HeaderMatch {
                name: "x-canary".into(),
                value: Some(proto::header_match::Value::Exact("true".into())),
            }]
        );
        assert_eq!(
            route.traffic_split.as_ref().unwrap().weights,
            [proto::WeightedSubset {
                subset: "canary".into(),
                weight: 100
            }]
        );
    }

    #[test]
    fn blocks_left_out_stay_absent_and_defaults_arrive_explicit() {
        let translated = translate(&spec(json!({
            "host": "reviews",
            "retries": {},
            "loadBalancer": {"algorithm": "ConsistentHash", "consistentHash": {"httpHeaderName": "x-user"}},
            "rateLimit": {"requestsPerSecond": 50},
        })))
        .unwrap();
        let policy = translated.policy;
        // Absent blocks are off (the proxy's own defaults apply), present ones are complete.
        assert_eq!(policy.traffic_split, None);
        assert_eq!(policy.timeout_ms, None);
        assert_eq!(policy.outlier_detection, None);
        assert_eq!(policy.connection_pool, None);
        assert_eq!(policy.fault_injection, None);
        let retries = policy.retries.unwrap();
        assert_eq!(retries.attempts, 2);
        assert_eq!(retries.retry_on.len(), 3);
        assert_eq!((retries.backoff_base_ms, retries.backoff_max_ms), (25, 250));
        assert_eq!(retries.budget.unwrap().percent, 20);
        assert_eq!(
            policy.load_balancer,
            Some(proto::LoadBalancer {
                algorithm: proto::Algorithm::ConsistentHash as i32,
                hash_header: "x-user".into(),
            })
        );
        assert_eq!(
            policy.rate_limit.unwrap().burst,
            50,
            "burst defaults to a second's worth"
        );
    }

    /// Specs the CRD refuses through CEL, each with the field translation must name.
    fn refused_by_cel() -> Vec<(Value, &'static str)> {
        let subsets = json!([{"name": "stable", "labels": {"version": "v1"}}, {"name": "canary", "labels": {"version": "v2"}}]);
        vec![
            (
                json!({"host": "r", "subsets": subsets, "trafficSplit": [{"subset": "beta", "weight": 1}]}),
                "spec.trafficSplit[0].subset",
            ),
            (
                json!({"host": "r", "subsets": subsets, "trafficSplit": [{"subset": "stable", "weight": 0}]}),
                "spec.trafficSplit:",
            ),
            (
                json!({"host": "r", "subsets": subsets, "routes": [{"name": "a", "trafficSplit": [{"subset": "beta", "weight": 1}]}]}),
                "spec.routes[0].trafficSplit[0].subset",
            ),
            (
                json!({"host": "r", "timeout": "1s", "retries": {"perTryTimeout": "1500ms"}}),
                "spec.retries.perTryTimeout",
            ),
            (
                json!({"host": "r", "routes": [{"name": "a", "timeout": "1s", "retries": {"perTryTimeout": "2s"}}]}),
                "spec.routes[0].retries.perTryTimeout",
            ),
            (
                json!({"host": "r", "timeout": "1m", "routes": [{"name": "a", "retries": {"perTryTimeout": "1m1s"}}]}),
                "spec.routes[0].retries.perTryTimeout",
            ),
            (
                json!({"host": "r", "retries": {"perTryTimeout": "2s"}, "routes": [{"name": "a", "timeout": "1s"}]}),
                "spec.routes[0].retries.perTryTimeout",
            ),
            (
                json!({"host": "r", "loadBalancer": {"algorithm": "ConsistentHash"}}),
                "spec.loadBalancer.consistentHash",
            ),
            (
                json!({"host": "r", "loadBalancer": {"algorithm": "RoundRobin", "consistentHash": {"httpHeaderName": "x"}}}),
                "spec.loadBalancer.consistentHash",
            ),
            (
                json!({"host": "r", "routes": [{"name": "a", "match": {"headers": {"x": {"exact": "1", "regex": "1"}}}}]}),
                "spec.routes[0].match.headers.x",
            ),
            (
                json!({"host": "r", "routes": [{"name": "a", "match": {"headers": {"x": {}}}}]}),
                "spec.routes[0].match.headers.x",
            ),
            (
                json!({"host": "r", "retries": {"retryOn": ["retriable-status-codes"]}}),
                "spec.retries.retriableStatusCodes",
            ),
            (
                json!({"host": "r", "retries": {"backoff": {"baseInterval": "1s", "maxInterval": "500ms"}}}),
                "spec.retries.backoff",
            ),
            (
                json!({"host": "r", "outlierDetection": {"baseEjectionTime": "10m"}}),
                "spec.outlierDetection.baseEjectionTime",
            ),
        ]
    }

    /// Specs both must take, including CEL's reading of Gateway API durations.
    fn accepted() -> Vec<Value> {
        vec![
            serde_json::to_value(example().spec).unwrap(),
            json!({"host": "reviews.shop.svc.cluster.local"}),
            json!({"host": "r", "timeout": "1m30s", "retries": {"perTryTimeout": "90s"}}),
            json!({"host": "r", "timeout": "1h", "routes": [{"name": "a", "timeout": "100ms", "retries": {"perTryTimeout": "100ms"}}]}),
            json!({"host": "r", "subsets": [{"name": "a", "labels": {}}], "trafficSplit": [{"subset": "a", "weight": 1}]}),
        ]
    }

    fn cel_verdict(spec: &Value) -> Result<(), Vec<String>> {
        let crd = outrigger_api::policy::crd();
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap(),
        )
        .unwrap();
        kube_cel::Validator::new()
            .validate(&schema, &json!({ "spec": spec }), None)
            .map_err(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        assert_eq!(
                            e.kind,
                            kube_cel::ErrorKind::ValidationFailure,
                            "the rule itself must work: {e}"
                        );
                        e.to_string()
                    })
                    .collect()
            })
    }

    #[test]
    fn what_the_crd_refuses_with_cel_translation_refuses_too() {
        for (value, field) in refused_by_cel() {
            let cel = cel_verdict(&value);
            assert!(cel.is_err(), "CEL took {value}");
            let error = translate(&spec(value.clone()))
                .expect_err(&format!("translation took {value}"))
                .to_string();
            assert!(
                error.starts_with(field),
                "{value}: `{error}` does not name {field}"
            );
        }
        for value in accepted() {
            assert_eq!(cel_verdict(&value), Ok(()), "CEL refused {value}");
            translate(&spec(value.clone())).unwrap_or_else(|e| panic!("{value}: {e}"));
        }
    }

    /// What the schema's ranges and list keys refuse (the API server checks these without CEL).
    #[test]
    fn what_the_schema_refuses_translation_refuses_too() {
        let cases = [
            (
                json!({"retries": {"attempts": 11}}),
                "spec.retries.attempts",
            ),
            (
                json!({"retries": {"budget": {"percent": 101}}}),
                "spec.retries.budget.percent",
            ),
            (
                json!({"retries": {"retryOn": ["5xx"], "retriableStatusCodes": [700]}}),
                "spec.retries.retriableStatusCodes[0]",
            ),
            (json!({"retries": {"retryOn": []}}), "spec.retries.retryOn"),
            (
                json!({"outlierDetection": {"maxEjectionPercent": 101}}),
                "spec.outlierDetection.maxEjectionPercent",
            ),
            (
                json!({"rateLimit": {"requestsPerSecond": 0}}),
                "spec.rateLimit.requestsPerSecond",
            ),
            (
                json!({"connectionPool": {"maxConnections": 0}}),
                "spec.connectionPool.maxConnections",
            ),
            (
                json!({"faultInjection": {"delay": {"percent": 100.5, "fixedDelay": "1s"}}}),
                "spec.faultInjection.delay.percent",
            ),
            (
                json!({"faultInjection": {"abort": {"percent": 1, "httpStatus": 99}}}),
                "spec.faultInjection.abort.httpStatus",
            ),
            (
                json!({"subsets": [{"name": "a"}, {"name": "a"}]}),
                "spec.subsets[1].name",
            ),
            (
                json!({"routes": [{"name": "a"}, {"name": "a"}]}),
                "spec.routes[1].name",
            ),
            (
                json!({"subsets": [{"name": "a"}], "trafficSplit": [{"subset": "a", "weight": 1}, {"subset": "a", "weight": 2}]}),
                "spec.trafficSplit[1].subset",
            ),
        ];
        for (mut value, field) in cases {
            value["host"] = json!("reviews");
            let error = translate(&spec(value.clone()))
                .expect_err(&format!("translation took {value}"))
                .to_string();
            assert!(
                error.starts_with(field),
                "{value}: `{error}` does not name {field}"
            );
        }
    }
}
