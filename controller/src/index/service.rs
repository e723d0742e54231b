//! Services: their ClusterIPs and TCP ports, which name the destinations, and the pods they
//! select.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::source::ObjectKey;

/// The appProtocol of a Service port whose endpoints speak HTTP/2 without TLS.
const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

/// What destinations need of a Service.
#[derive(Debug, PartialEq)]
pub(super) struct ServiceState {
    pub(super) cluster_ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePort>,
    /// The labels of the pods it selects; empty for a Service without a selector, whose
    /// endpoints someone else writes.
    selector: BTreeMap<String, String>,
}

#[derive(Debug, PartialEq)]
pub(super) struct ServicePort {
    /// Empty for a Service's single unnamed port; EndpointSlice ports match by this name.
    pub(super) name: String,
    pub(super) port: u16,
    /// The pods' port, when the Service names it by number (as it does unless it names a
    /// container port, which only the pod's spec resolves).
    pub(super) target_port: Option<u16>,
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
                let number = u16::try_from(port.port).ok()?;
                let target_port = match port.target_port {
                    None => Some(number),
                    Some(IntOrString::Int(target)) => u16::try_from(target).ok(),
                    Some(IntOrString::String(_)) => None,
                };
                Some(ServicePort {
                    name: port.name.unwrap_or_default(),
                    port: number,
                    target_port,
                    h2c: port.app_protocol.as_deref() == Some(H2C_APP_PROTOCOL),
                })
            })
            .collect();
        Self {
            cluster_ips,
            ports,
            selector: spec.selector.unwrap_or_default(),
        }
    }

    /// Whether it selects a pod with these labels.
    pub(super) fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.selector.is_empty() && super::pod::carries(labels, &self.selector)
    }
}
