//! A destination as applied: its validated configuration, its endpoints (kept across versions, so
//! their connections, load and health survive a change) and the stack of layers requests go
//! through:
//!
//! rate limit > fault injection > route > timeout > retry > per-try timeout > pool limit > split >
//! balance (with outlier detection) > endpoint

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::Request;

use crate::client::Endpoint;
use crate::http::body::Body;
use crate::http::error::ProxyError;
use crate::metrics::{
    DestinationLabels, Direction, DstLabels, EndpointLabels, EndpointState, Metrics, TimeoutKind,
    TimeoutLabels,
};
use crate::outbound::balance::outlier::OutlierDetector;
use crate::outbound::balance::{Balance, Balancer};
use crate::outbound::layers::deadline::Deadline;
use crate::outbound::layers::fault::Faults;
use crate::outbound::layers::pool::{Pool, PoolLimit};
use crate::outbound::layers::ratelimit::{RateLimit, TokenBucket};
use crate::outbound::layers::retry::Retry;
use crate::outbound::split::{ChosenSubset, Split, WeightedBalance};
use crate::outbound::stack::{Leaf, ResponseFuture, Stack, layer, leaf};
use crate::policy::{DestinationConfig, RouteMatch, TrafficPolicy};

pub struct Destination {
    pub config: Arc<DestinationConfig>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub outlier: Option<Arc<OutlierDetector>>,
    /// Labels of requests no route matched.
    pub labels: DstLabels,
    pool: Pool,
    service: Stack,
}

impl Destination {
    /// Builds the new version, reusing what `previous` had that is unchanged.
    pub fn build(
        config: DestinationConfig,
        previous: Option<&Destination>,
        metrics: &Metrics,
    ) -> Self {
        // Endpoints dial with the pool's settings: a change there needs new ones.
        let same_pool = previous.filter(|p| {
            p.config.connect_timeout == config.connect_timeout
                && p.config.connection_pool == config.connection_pool
        });
        let pool = same_pool
            .map(|p| p.pool.clone())
            .unwrap_or_else(|| Pool::new(config.connection_pool));
        let reusable: HashMap<SocketAddr, &Arc<Endpoint>> = same_pool
            .map(|p| p.endpoints.iter().map(|e| (e.addr, e)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<Endpoint>> = config
            .endpoints
            .iter()
            .map(|wanted| match reusable.get(&wanted.address) {
                Some(existing)
                    if existing.pod == wanted.pod
                        && existing.subsets == wanted.subsets
                        && existing.h2c == wanted.h2c =>
                {
                    Arc::clone(existing)
                }
                _ => Arc::new(Endpoint::new(
                    wanted.address,
                    wanted.pod.clone(),
                    wanted.subsets.clone(),
                    wanted.h2c,
                    config.connect_timeout,
                    pool.connections.clone(),
                )),
            })
            .collect();

        let destination_labels = DestinationLabels {
            dst_namespace: Arc::new(config.namespace.clone()),
            dst_service: Arc::new(config.service.clone()),
        };
        let outlier = config.outlier_detection.clone().map(|outlier| {
            OutlierDetector::new(
                outlier,
                endpoints.clone(),
                destination_labels.clone(),
                metrics.clone(),
            )
        });
        if outlier.is_none() {
            for (state, count) in [
                (EndpointState::Healthy, endpoints.len()),
                (EndpointState::Ejected, 0),
                (EndpointState::Probation, 0),
            ] {
                let labels = EndpointLabels {
                    dst: destination_labels.clone(),
                    state,
                };
                metrics.endpoints.get_or_create(&labels).set(count as i64);
            }
        }

        let name: Arc<str> =
            format!("{}.{}:{}", config.service, config.namespace, config.port).into();
        let balance = |members: Vec<Arc<Endpoint>>| {
            let balancer = Arc::new(Balancer::new(config.load_balancer.clone(), members));
            Balance::new(name.clone(), balancer, outlier.clone())
        };
        let subsets: HashMap<&str, Balance> = config
            .subsets
            .iter()
            .map(|subset| {
                let members = endpoints
                    .iter()
                    .filter(|e| e.subsets.contains(subset))
                    .cloned()
                    .collect();
                (subset.as_str(), balance(members))
            })
            .collect();
        let all = balance(endpoints.clone());
        let route_labels = |route: &str| DstLabels {
            direction: Direction::Outbound,
            dst_namespace: destination_labels.dst_namespace.clone(),
            dst_service: destination_labels.dst_service.clone(),
            dst_subset: Arc::default(),
            route: Arc::new(route.to_string()),
        };
        let layers = RouteLayers {
            metrics,
            pool: &pool,
            all: &all,
            subsets: &subsets,
        };
        let routes: Arc<[Route]> = config
            .routes
            .iter()
            .map(|route| {
                let labels = route_labels(&route.name);
                Route {
                    matcher: Some(route.matcher.clone()),
                    service: layers.stack(&route.traffic, &labels),
                    labels,
                }
            })
            .chain(std::iter::once({
                let labels = route_labels("");
                Route {
                    matcher: None,
                    service: layers.stack(&config.traffic, &labels),
                    labels,
                }
            }))
            .collect();
        let labels = route_labels("");
        let mut service = leaf(RouteTable { routes });
        if let Some(config) = config.fault_injection {
            service = layer(Faults { config }, service);
        }
        if let Some(limit) = config.rate_limit {
            let rate_limit = RateLimit {
                bucket: Arc::new(TokenBucket::new(limit)),
                limited: metrics.rate_limited.get_or_create_owned(&labels),
            };
            service = layer(rate_limit, service);
        }
        Self {
            config: Arc::new(config),
            endpoints,
            outlier,
            labels,
            pool,
            service,
        }
    }

    /// The stack one request goes through.
    pub fn service(&self) -> Stack {
        self.service.clone()
    }

    pub fn endpoint_state(&self, endpoint: &Endpoint, now: Instant) -> EndpointState {
        match &self.outlier {
            Some(_) => endpoint.health.state(now),
            None => EndpointState::Healthy,
        }
    }
}

/// What every route's stack is built from.
struct RouteLayers<'a> {
    metrics: &'a Metrics,
    pool: &'a Pool,
    all: &'a Balance,
    subsets: &'a HashMap<&'a str, Balance>,
}

impl RouteLayers<'_> {
    fn stack(&self, traffic: &TrafficPolicy, labels: &DstLabels) -> Stack {
        let split = match &traffic.split {
            None => Split::All(self.all.clone()),
            Some(weights) => Split::Weighted(
                weights
                    .iter()
                    .map(|w| WeightedBalance {
                        subset: Arc::new(w.subset.clone()),
                        weight: w.weight,
                        balance: self.subsets[w.subset.as_str()].clone(),
                    })
                    .collect(),
            ),
        };
        let timeouts = |kind| {
            self.metrics.timeouts.get_or_create_owned(&TimeoutLabels {
                dst: labels.clone(),
                kind,
            })
        };
        let deadline = |after, kind| Deadline {
            after,
            kind,
            timeouts: timeouts(kind),
        };
        let mut attempt = leaf(split);
        if let Some(requests) = &self.pool.requests {
            let limit = PoolLimit {
                requests: requests.clone(),
            };
            attempt = layer(limit, attempt);
        }
        if let Some(per_try) = traffic.retries.as_ref().and_then(|r| r.per_try_timeout) {
            attempt = layer(deadline(per_try, TimeoutKind::PerTry), attempt);
        }
        let retry = Retry::new(
            traffic.retries.clone(),
            labels.clone(),
            self.metrics.retries.clone(),
            self.metrics
                .retry_budget_exhausted
                .get_or_create_owned(labels),
        );
        let mut request = layer(retry, attempt);
        if let Some(timeout) = traffic.timeout {
            request = layer(deadline(timeout, TimeoutKind::Request), request);
        }
        request
    }
}

struct Route {
    /// `None` for the spec-level policy, which takes what no route matched.
    matcher: Option<RouteMatch>,
    labels: DstLabels,
    service: Stack,
}

/// Sends each request down the first route that matches, and labels the response with the route
/// and subset, including the responses the proxy makes for errors.
#[derive(Clone)]
struct RouteTable {
    routes: Arc<[Route]>,
}

impl Leaf for RouteTable {
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
            response.extensions_mut().insert(labels);
            Ok(response)
        })
    }
}
