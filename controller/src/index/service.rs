//! Services: their ClusterIPs and TCP ports, which name the destinations.

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

use crate::source::ObjectKey;

/// The appProtocol of a Service port whose endpoints speak HTTP/2 without TLS.
const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

/// What destinations need of a Service.
#[derive(Debug, PartialEq)]
pub(super) struct ServiceState {
    pub(super) cluster_ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePort>,
}

#[derive(Debug, PartialEq)]
pub(super) struct ServicePort {
    /// Empty for a Service's single unnamed port; EndpointSlice ports match by this name.
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) h2c: bool,
}

/// Every Service, by namespaced name.
#[derive(Default)]
pub(super) struct Services(HashMap<ObjectKey, ServiceState>);

impl Services {
    pub(super) fn get(&self, key: &ObjectKey) -> Option<&ServiceState> {
        self.0.get(key)
    }

    pub(super) fn contains(&self, key: &ObjectKey) -> bool {
        self.0.contains_key(key)
    }

    pub(super) fn insert(&mut self, key: ObjectKey, service: &Service) {
        self.0.insert(key, ServiceState::new(service));
    }

    /// Whether there was one.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> bool {
        self.0.remove(key).is_some()
    }
}

impl ServiceState {
    fn new(service: &Service) -> Self {
        let spec = service.spec.clone().unwrap_or_default();
        let cluster_ips = spec
            .cluster_ips
            .unwrap_or_else(|| spec.cluster_ip.into_iter().collect())
            .iter()
            // Headless Services say `None`.
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|port| {
                Some(ServicePort {
                    name: port.name.unwrap_or_default(),
                    port: u16::try_from(port.port).ok()?,
                    h2c: port.app_protocol.as_deref() == Some(H2C_APP_PROTOCOL),
                })
            })
            .collect();
        Self { cluster_ips, ports }
    }
}
