//! A destination as applied: its validated configuration, its endpoints (kept across versions, so
//! their connections, load and health survive a change) and the stack requests go through, built
//! in that order, in three levels:
//!
//! - destination: rate limit > fault injection > route table (first matching route);
//! - route (each route, and one for what no route matched): request timeout > retry;
//! - attempt (each try): per-try timeout > pool limit > split > balance (with outlier detection)
//!   > endpoint.
//!
//! A new version carries on what its settings did not change: endpoints (with their connections,
//! load and health), the rate limit's tokens, each route's retry budget, and balancers (with their
//! hash rings) whose members are the same. Otherwise every rollout step would hand out a fresh
//! burst and a fresh budget, and re-sort every ring.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::{Dial, Endpoint};
use crate::metrics::{
    Direction, EndpointLabels, EndpointState, Metrics, RequestLabels, ServiceLabels, TimeoutKind,
    TimeoutLabels,
};
use crate::outbound::balance::outlier::OutlierDetector;
use crate::outbound::balance::{Balance, Balancer};
use crate::outbound::http_route::{HttpRoutes, RuleStack, WeightedBackends};
use crate::outbound::layers::deadline::Deadline;
use crate::outbound::layers::fault::Faults;
use crate::outbound::layers::pool::{Pool, PoolLimit};
use crate::outbound::layers::ratelimit::{RateLimit, TokenBucket};
use crate::outbound::layers::retry::{Budget, Retry};
use crate::outbound::resolve::Backends;
use crate::outbound::route::{Route, RouteTable};
use crate::outbound::split::{Split, WeightedBalance};
use crate::outbound::stack::{Built, Layers, Stack};
use crate::policy::{DestinationConfig, HttpRouteRule, HttpRouteTable, RetryPolicy, TrafficPolicy};
use crate::tls::Held;

pub struct Destination {
    pub config: Arc<DestinationConfig>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub outlier: Option<Arc<OutlierDetector>>,
    /// Labels of requests no route matched.
    pub labels: RequestLabels,
    pool: Pool,
    /// Requests to this Service port as a route's backend, and all of them when no route serves
    /// this proxy's calls to it.
    service: Stack,
    table: RouteTable,
    /// The Gateway API routes that serve this proxy's calls to this Service port.
    http_routes: Option<(Stack, HttpRoutes)>,
    balancers: Balancers,
    bucket: Option<Arc<TokenBucket>>,
    /// Each route's retry budget, by route name.
    budgets: HashMap<String, Arc<Budget>>,
    /// The destination level's parts, top-down.
    layers: Vec<&'static str>,
}

impl Destination {
    /// Builds the new version, reusing what `previous` had that is unchanged.
    pub fn build(
        config: DestinationConfig,
        previous: Option<&Destination>,
        metrics: &Metrics,
        identity: &Held,
        backends: &Backends,
    ) -> Self {
        // Endpoints dial with the pool's settings: a change there needs new ones.
        let same_pool = previous.filter(|p| {
            p.config.connect_timeout == config.connect_timeout
                && p.config.connection_pool == config.connection_pool
        });
        let pool = same_pool
            .map(|p| p.pool.clone())
            .unwrap_or_else(|| Pool::new(config.connection_pool));
        let dial = Dial {
            connect_timeout: config.connect_timeout,
            slots: pool.connections.clone(),
            identity: identity.clone(),
        };
        let endpoints = endpoints(&config, same_pool, &dial);
        let service_labels = ServiceLabels {
            dst_namespace: Arc::new(config.namespace.clone()),
            dst_service: Arc::new(config.service.clone()),
        };
        let outlier = config.outlier_detection.clone().map(|outlier| {
            OutlierDetector::new(
                outlier,
                endpoints.clone(),
                service_labels.clone(),
                metrics.clone(),
            )
        });
        if outlier.is_none() {
            report_all_healthy(metrics, &service_labels, endpoints.len());
        }
        let routes = Routes {
            metrics,
            service_labels: &service_labels,
            pool: &pool,
            balancers: Balancers::new(
                &config,
                &endpoints,
                &outlier,
                previous.map(|p| &p.balancers),
            ),
            previous_budgets: previous.map(|p| &p.budgets),
            budgets: Default::default(),
        };
        let labels = routes.labels("");
        let table = RouteTable::new(
            config
                .routes
                .iter()
                .map(|route| routes.route(Some(route.matcher.clone()), &route.name, &route.traffic))
                .chain(std::iter::once(routes.route(None, "", &config.traffic)))
                .collect(),
        );
        let bucket = config.rate_limit.map(|limit| {
            previous
                .and_then(|p| p.bucket.clone())
                .filter(|bucket| bucket.config == limit)
                .unwrap_or_else(|| Arc::new(TokenBucket::new(limit)))
        });
        let Built { stack, names } = Layers::new()
            .push_if(bucket.clone().map(|bucket| RateLimit {
                bucket,
                limited: metrics.rate_limited.get_or_create_owned(&labels),
            }))
            .push_if(config.fault_injection.map(|config| Faults { config }))
            .over(table.clone());
        let http_routes = config
            .http_routes
            .as_ref()
            .map(|table| routes.http_routes(table, config.port, backends));
        let Routes {
            balancers, budgets, ..
        } = routes;
        Self {
            config: Arc::new(config),
            endpoints,
            outlier,
            labels,
            pool,
            service: stack,
            table,
            http_routes,
            balancers,
            bucket,
            budgets: budgets.into_inner(),
            layers: names,
        }
    }

    /// The parts of the stack, top-down: the destination level, then each route's (named, or
    /// empty for what no route matched) route and attempt levels.
    pub fn layers(&self) -> Vec<(String, serde_json::Value)> {
        let http_routes = self.http_routes.iter().flat_map(|(_, routes)| {
            routes
                .describe()
                .map(|(name, layers)| (format!("http route {name}"), layers))
        });
        http_routes
            .chain(std::iter::once((
                "destination".to_string(),
                self.layers.as_slice(),
            )))
            .chain(self.table.routes().iter().map(|route| {
                let (name, layers) = route.describe();
                (format!("route {name:?}"), layers)
            }))
            .map(|(level, layers)| (level, serde_json::json!(layers)))
            .collect()
    }

    /// The stack a request the app sent to this Service port goes through: its routes, when
    /// routes serve this proxy's calls to it.
    pub fn service(&self) -> Stack {
        match &self.http_routes {
            Some((stack, _)) => stack.clone(),
            None => self.service.clone(),
        }
    }

    /// The stack a request a route sent to this Service port goes through: routes are not
    /// applied twice.
    pub fn backend_service(&self) -> Stack {
        self.service.clone()
    }

    pub fn endpoint_state(&self, endpoint: &Endpoint, now: Instant) -> EndpointState {
        match &self.outlier {
            Some(_) => endpoint.health.state(now),
            None => EndpointState::Healthy,
        }
    }
}

/// The endpoints of `config`, reusing those of `previous` that are the same.
fn endpoints(
    config: &DestinationConfig,
    previous: Option<&Destination>,
    dial: &Dial,
) -> Vec<Arc<Endpoint>> {
    let reusable: HashMap<SocketAddr, &Arc<Endpoint>> = previous
        .map(|p| p.endpoints.iter().map(|e| (e.addr, e)).collect())
        .unwrap_or_default();
    config
        .endpoints
        .iter()
        .map(|wanted| match reusable.get(&wanted.address) {
            Some(existing) if existing.is(wanted) => Arc::clone(existing),
            _ => Arc::new(Endpoint::new(wanted, dial)),
        })
        .collect()
}

/// Without outlier detection every endpoint is healthy, and the gauges say so.
fn report_all_healthy(metrics: &Metrics, labels: &ServiceLabels, endpoints: usize) {
    for (state, count) in [
        (EndpointState::Healthy, endpoints),
        (EndpointState::Ejected, 0),
        (EndpointState::Probation, 0),
    ] {
        let labels = EndpointLabels {
            dst: labels.clone(),
            state,
        };
        metrics
            .endpoints
            .with(&labels, |metric| metric.set(count as i64));
    }
}

/// A balancer over every endpoint, and one per subset.
struct Balancers {
    all: Balance,
    subsets: HashMap<String, Balance>,
}

impl Balancers {
    fn new(
        config: &DestinationConfig,
        endpoints: &[Arc<Endpoint>],
        outlier: &Option<Arc<OutlierDetector>>,
        previous: Option<&Balancers>,
    ) -> Self {
        let name: Arc<str> =
            format!("{}.{}:{}", config.service, config.namespace, config.port).into();
        let balance = |members: Vec<Arc<Endpoint>>, previous: Option<&Balance>| {
            let balancer = previous
                .map(|p| p.balancer())
                .filter(|b| b.is_over(&config.load_balancer, &members))
                .cloned()
                .unwrap_or_else(|| Arc::new(Balancer::new(config.load_balancer.clone(), members)));
            Balance::new(name.clone(), balancer, outlier.clone())
        };
        let subsets = config
            .subsets
            .iter()
            .map(|subset| {
                let members = endpoints
                    .iter()
                    .filter(|e| e.subsets.contains(subset))
                    .cloned()
                    .collect();
                let previous = previous.and_then(|p| p.subsets.get(subset));
                (subset.clone(), balance(members, previous))
            })
            .collect();
        Self {
            all: balance(endpoints.to_vec(), previous.map(|p| &p.all)),
            subsets,
        }
    }
}

/// What the route and attempt levels are built from.
struct Routes<'a> {
    metrics: &'a Metrics,
    service_labels: &'a ServiceLabels,
    pool: &'a Pool,
    balancers: Balancers,
    previous_budgets: Option<&'a HashMap<String, Arc<Budget>>>,
    /// The budgets of the routes built so far.
    budgets: std::cell::RefCell<HashMap<String, Arc<Budget>>>,
}

impl Routes<'_> {
    fn labels(&self, route: &str) -> RequestLabels {
        RequestLabels {
            direction: Direction::Outbound,
            dst_namespace: self.service_labels.dst_namespace.clone(),
            dst_service: self.service_labels.dst_service.clone(),
            dst_subset: Arc::default(),
            route: Arc::new(route.to_string()),
        }
    }

    fn route(
        &self,
        matcher: Option<crate::policy::RouteMatch>,
        name: &str,
        traffic: &TrafficPolicy,
    ) -> Route {
        let labels = self.labels(name);
        let attempt = self.attempt(traffic, &labels);
        let built = Layers::new()
            .push_if(
                traffic
                    .timeout
                    .map(|after| self.deadline(after, TimeoutKind::Request, &labels)),
            )
            .push(self.retry(name, traffic.retries.clone(), &labels))
            .over_stack(attempt);
        Route::new(matcher, labels, built)
    }

    /// The routes' table, each rule's stack: request timeout > retry > backend request timeout
    /// > the backends.
    fn http_routes(
        &self,
        table: &HttpRouteTable,
        port: u16,
        backends: &Backends,
    ) -> (Stack, HttpRoutes) {
        let rules = table
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| self.http_rule(i, rule, backends))
            .collect();
        let routes = HttpRoutes::new(table.matches.clone(), rules, self.labels(""), port);
        let Built { stack, .. } = Layers::new().over(routes.clone());
        (stack, routes)
    }

    fn http_rule(&self, index: usize, rule: &HttpRouteRule, backends: &Backends) -> RuleStack {
        let labels = self.labels(&rule.route);
        let built = Layers::new()
            .push_if(
                rule.request_timeout
                    .map(|after| self.deadline(after, TimeoutKind::Request, &labels)),
            )
            .push(self.retry(
                &format!("{}#{index}", rule.route),
                rule.retries.clone(),
                &labels,
            ))
            .push_if(
                rule.backend_request_timeout
                    .map(|after| self.deadline(after, TimeoutKind::PerTry, &labels)),
            )
            .over(WeightedBackends::new(
                rule.backends.clone(),
                backends.clone(),
            ));
        RuleStack {
            rule: rule.clone(),
            labels,
            built,
        }
    }

    fn attempt(&self, traffic: &TrafficPolicy, labels: &RequestLabels) -> Built {
        let per_try = traffic
            .retries
            .as_ref()
            .and_then(|retries| retries.per_try_timeout);
        Layers::new()
            .push_if(per_try.map(|after| self.deadline(after, TimeoutKind::PerTry, labels)))
            .push_if(
                self.pool
                    .requests
                    .clone()
                    .map(|requests| PoolLimit { requests }),
            )
            .over(self.split(traffic))
    }

    fn split(&self, traffic: &TrafficPolicy) -> Split {
        match &traffic.split {
            None => Split::All(self.balancers.all.clone()),
            Some(weights) => Split::Weighted(
                weights
                    .iter()
                    .map(|w| WeightedBalance {
                        subset: Arc::new(w.subset.clone()),
                        weight: w.weight,
                        balance: self.balancers.subsets[&w.subset].clone(),
                    })
                    .collect(),
            ),
        }
    }

    fn deadline(&self, after: Duration, kind: TimeoutKind, labels: &RequestLabels) -> Deadline {
        Deadline {
            after,
            kind,
            timeouts: self.metrics.timeouts.get_or_create_owned(&TimeoutLabels {
                dst: labels.clone(),
                kind,
            }),
        }
    }

    fn retry(&self, route: &str, policy: Option<RetryPolicy>, labels: &RequestLabels) -> Retry {
        let budget = |policy: &RetryPolicy| {
            self.previous_budgets
                .and_then(|budgets| budgets.get(route))
                .filter(|budget| budget.is_of(policy))
                .cloned()
                .unwrap_or_else(|| {
                    Arc::new(Budget::new(
                        policy.budget_percent,
                        policy.budget_min_per_second,
                    ))
                })
        };
        let retry = Retry::new(
            policy,
            budget,
            labels.clone(),
            self.metrics.retries.clone(),
            self.metrics
                .retry_budget_exhausted
                .get_or_create_owned(labels),
        );
        if let Some(budget) = retry.budget() {
            self.budgets
                .borrow_mut()
                .insert(route.to_string(), budget.clone());
        }
        retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        Algorithm, EndpointConfig, FaultConfig, OutlierConfig, PoolLimits, RateLimitConfig,
        RetryOn, RouteConfig, RouteMatch, WeightedSubset,
    };
    use crate::tls::no_identity;

    fn retries(per_try_timeout: Option<Duration>) -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout,
            retry_on: RetryOn::default(),
            retriable_status_codes: Vec::new(),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_percent: 20,
            budget_min_per_second: 10,
            retry_non_idempotent: false,
        }
    }

    fn endpoint(port: u16, subset: &str) -> EndpointConfig {
        EndpointConfig {
            pod: format!("pod-{port}"),
            subsets: vec![subset.to_string()],
            ..EndpointConfig::at(SocketAddr::from(([10, 0, 0, 1], port)))
        }
    }

    /// Every policy on, and one route with its own split and timeout.
    fn everything() -> DestinationConfig {
        DestinationConfig {
            version: "1".into(),
            namespace: "shop".into(),
            service: "reviews".into(),
            port: 9080,
            policy: Some("shop/reviews".into()),
            policy_generation: 1,
            subsets: vec!["stable".into(), "canary".into()],
            endpoints: vec![
                endpoint(1, "stable"),
                endpoint(2, "stable"),
                endpoint(3, "canary"),
            ],
            load_balancer: Algorithm::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            traffic: TrafficPolicy {
                split: None,
                timeout: Some(Duration::from_secs(10)),
                retries: Some(retries(Some(Duration::from_secs(2)))),
            },
            routes: vec![RouteConfig {
                name: "canary-testers".into(),
                matcher: RouteMatch::default(),
                traffic: TrafficPolicy {
                    split: Some(vec![WeightedSubset {
                        subset: "canary".into(),
                        weight: 100,
                    }]),
                    timeout: None,
                    retries: None,
                },
            }],
            outlier_detection: Some(OutlierConfig {
                consecutive_5xx: 5,
                consecutive_gateway_errors: 0,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_time: Duration::from_secs(300),
                max_ejection_percent: 50,
            }),
            connection_pool: PoolLimits {
                max_connections: Some(10),
                max_pending_requests: Some(10),
            },
            rate_limit: Some(RateLimitConfig {
                requests_per_second: 100,
                burst: 200,
            }),
            fault_injection: Some(FaultConfig {
                delay_percent: 0.0,
                delay: Duration::ZERO,
                abort_percent: 0.0,
                abort_status: 503,
            }),
            http_routes: None,
        }
    }

    #[tokio::test]
    async fn the_stack_runs_destination_then_route_then_attempt_levels() {
        let destination = Destination::build(
            everything(),
            None,
            &Metrics::new(),
            &no_identity(),
            &Backends::none(),
        );
        let attempt = ["per-try timeout", "pool limit", "split"];
        assert_eq!(
            destination.layers(),
            [
                (
                    "destination".to_string(),
                    serde_json::json!(["rate limit", "fault injection", "route table"])
                ),
                (
                    "route \"canary-testers\"".to_string(),
                    serde_json::json!(["retry", "pool limit", "split"])
                ),
                (
                    "route \"\"".to_string(),
                    serde_json::json!([&["request timeout", "retry"][..], &attempt[..]].concat())
                ),
            ]
        );

        // Policies left out leave no layer; a retry layer is always there (connect failures
        // are retried once without a policy).
        let bare = DestinationConfig {
            traffic: TrafficPolicy {
                split: None,
                timeout: None,
                retries: None,
            },
            routes: Vec::new(),
            connection_pool: PoolLimits::default(),
            rate_limit: None,
            fault_injection: None,
            http_routes: None,
            ..everything()
        };
        let bare = Destination::build(
            bare,
            None,
            &Metrics::new(),
            &no_identity(),
            &Backends::none(),
        );
        assert_eq!(
            bare.layers(),
            [
                (
                    "destination".to_string(),
                    serde_json::json!(["route table"])
                ),
                (
                    "route \"\"".to_string(),
                    serde_json::json!(["retry", "split"])
                ),
            ]
        );
    }

    #[tokio::test]
    async fn endpoints_survive_a_new_version_unless_they_or_their_dialling_change() {
        let metrics = Metrics::new();
        let first = Destination::build(
            everything(),
            None,
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        let same = |a: &Destination, b: &Destination, i: usize| {
            Arc::ptr_eq(&a.endpoints[i], &b.endpoints[i])
        };

        // A policy edit: the same endpoints, with their connections, load and health.
        let edited = DestinationConfig {
            version: "2".into(),
            load_balancer: Algorithm::Random,
            ..everything()
        };
        let second = Destination::build(
            edited,
            Some(&first),
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        assert!((0..3).all(|i| same(&first, &second, i)));

        // One endpoint's pod changed (a new pod on a reused IP): only it is new.
        let mut moved = everything();
        moved.endpoints[1].pod = "pod-2-replaced".into();
        let third = Destination::build(
            moved,
            Some(&second),
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        assert!(same(&second, &third, 0) && !same(&second, &third, 1) && same(&second, &third, 2));

        // Another connect timeout: every endpoint dials anew.
        let dialling = DestinationConfig {
            connect_timeout: Duration::from_secs(2),
            ..everything()
        };
        let fourth = Destination::build(
            dialling,
            Some(&third),
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        assert!((0..3).all(|i| !same(&third, &fourth, i)));
    }

    async fn status(destination: &Destination) -> u16 {
        let request = http::Request::builder()
            .uri("/")
            .body(crate::http::body::full(""))
            .unwrap();
        tower::ServiceExt::oneshot(destination.service(), request)
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_and_retry_budgets_survive_versions_that_keep_their_settings() {
        let metrics = Metrics::new();
        // Every request that passes the rate limit is aborted by fault injection: no network.
        let limited = DestinationConfig {
            rate_limit: Some(RateLimitConfig {
                requests_per_second: 1,
                burst: 3,
            }),
            fault_injection: Some(FaultConfig {
                abort_percent: 100.0,
                ..everything().fault_injection.unwrap()
            }),
            http_routes: None,
            ..everything()
        };
        let first = Destination::build(
            limited.clone(),
            None,
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        for _ in 0..3 {
            assert_eq!(status(&first).await, 503);
        }
        assert_eq!(status(&first).await, 429);

        // An endpoint-only change, as in a rollout: the spent burst stays spent.
        let mut rollout = limited.clone();
        rollout.endpoints.push(endpoint(4, "canary"));
        let second = Destination::build(
            rollout.clone(),
            Some(&first),
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        assert_eq!(status(&second).await, 429);
        assert!(Arc::ptr_eq(&first.budgets[""], &second.budgets[""]));

        // New settings are a new limit and a new budget.
        let mut changed = rollout;
        changed.rate_limit = Some(RateLimitConfig {
            requests_per_second: 1,
            burst: 5,
        });
        changed.traffic.retries = Some(RetryPolicy {
            budget_percent: 50,
            ..retries(None)
        });
        let third = Destination::build(
            changed,
            Some(&second),
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        assert_eq!(status(&third).await, 503);
        assert!(!Arc::ptr_eq(&second.budgets[""], &third.budgets[""]));
    }

    #[tokio::test]
    async fn balancers_and_their_rings_are_kept_while_their_members_are() {
        let metrics = Metrics::new();
        let hashed = DestinationConfig {
            load_balancer: Algorithm::ConsistentHash {
                header: http::HeaderName::from_static("x-user"),
            },
            ..everything()
        };
        let first = Destination::build(
            hashed.clone(),
            None,
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        let kept = |a: &Destination, b: &Destination, subset: &str| {
            let of = |d: &Destination| match subset {
                "" => d.balancers.all.balancer().clone(),
                subset => d.balancers.subsets[subset].balancer().clone(),
            };
            Arc::ptr_eq(&of(a), &of(b))
        };
        // A policy edit: every ring stays.
        let edited = DestinationConfig {
            version: "2".into(),
            traffic: TrafficPolicy {
                timeout: Some(Duration::from_secs(3)),
                ..hashed.traffic.clone()
            },
            ..hashed.clone()
        };
        let second = Destination::build(
            edited,
            Some(&first),
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        assert!(kept(&first, &second, "") && kept(&first, &second, "stable"));

        // A canary pod added: the canary subset and the whole set change, stable stays.
        let mut grown = hashed.clone();
        grown.endpoints.push(endpoint(4, "canary"));
        let third = Destination::build(
            grown.clone(),
            Some(&second),
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        assert!(!kept(&second, &third, "") && !kept(&second, &third, "canary"));
        assert!(kept(&second, &third, "stable"));

        // Another algorithm: new balancers.
        let other = DestinationConfig {
            load_balancer: Algorithm::Random,
            ..grown
        };
        let fourth = Destination::build(
            other,
            Some(&third),
            &metrics,
            &no_identity(),
            &Backends::none(),
        );
        assert!(!kept(&third, &fourth, "stable"));
    }
}
