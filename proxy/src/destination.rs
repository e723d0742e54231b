//! A destination as applied: its validated configuration, its endpoints (kept across versions, so
//! their connections and load survive a change) and the service stack requests go through.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::balance::{Balance, Balancer};
use crate::config::DestinationConfig;
use crate::endpoint::Endpoint;
use crate::metrics::{
    DestinationLabels, Direction, DstLabels, EndpointLabels, EndpointState, Metrics,
};

pub struct Destination {
    pub config: Arc<DestinationConfig>,
    pub balancer: Arc<Balancer>,
    pub labels: DstLabels,
    balance: Balance,
}

impl Destination {
    /// Builds the new version, reusing the endpoints of `previous` that are unchanged.
    pub fn build(
        config: DestinationConfig,
        previous: Option<&Destination>,
        metrics: &Metrics,
    ) -> Self {
        let reusable: HashMap<SocketAddr, &Arc<Endpoint>> = previous
            .map(|p| p.balancer.endpoints().iter().map(|e| (e.addr, e)).collect())
            // Pools dial with the connect timeout: a new one needs new pools.
            .filter(|_| {
                previous.is_some_and(|p| p.config.connect_timeout == config.connect_timeout)
            })
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
                )),
            })
            .collect();
        let destination_labels = DestinationLabels {
            dst_namespace: Arc::new(config.namespace.clone()),
            dst_service: Arc::new(config.service.clone()),
        };
        metrics
            .endpoints
            .get_or_create(&EndpointLabels {
                dst: destination_labels.clone(),
                state: EndpointState::Healthy,
            })
            .set(endpoints.len() as i64);
        let labels = DstLabels {
            direction: Direction::Outbound,
            dst_namespace: destination_labels.dst_namespace,
            dst_service: destination_labels.dst_service,
            dst_subset: Arc::default(),
            route: Arc::default(),
        };
        let name: Arc<str> =
            format!("{}.{}:{}", config.service, config.namespace, config.port).into();
        let balancer = Arc::new(Balancer::new(config.load_balancer.clone(), endpoints));
        Self {
            balance: Balance::new(name, balancer.clone()),
            config: Arc::new(config),
            balancer,
            labels,
        }
    }

    /// The stack one request goes through.
    pub fn service(&self) -> Balance {
        self.balance.clone()
    }
}
