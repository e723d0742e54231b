//! EndpointSlices: the ready endpoints of a Service, and which pods they sit on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::source::ObjectKey;

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What destinations need of an EndpointSlice: its ready endpoints only.
#[derive(Debug, PartialEq)]
pub(super) struct SliceState {
    pub(super) service: ObjectKey,
    /// Port name -> the port endpoints listen on.
    pub(super) ports: BTreeMap<String, u16>,
    pub(super) endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, PartialEq)]
pub(super) struct SliceEndpoint {
    pub(super) ip: IpAddr,
    pub(super) pod: Option<String>,
}

/// Every EndpointSlice that names a Service, with the Services each pod has endpoints of.
#[derive(Default)]
pub(super) struct Slices {
    slices: HashMap<ObjectKey, SliceState>,
    by_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Per pod, the Services with a ready endpoint on it (and how many), so that a label change
    /// recomputes only those.
    pod_services: HashMap<ObjectKey, HashMap<ObjectKey, usize>>,
}

impl Slices {
    /// The slices of a Service, by name (so groups come in the same order whatever order the
    /// slices arrived in).
    pub(super) fn of_service<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a SliceState)> + 'a {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key, self.slices.get(key)?)))
    }

    /// The Services with a ready endpoint on `pod`.
    pub(super) fn services_on_pod(&self, pod: &ObjectKey) -> BTreeSet<ObjectKey> {
        self.pod_services
            .get(pod)
            .map(|services| services.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Records a slice; returns the Service it affects (none when it names none).
    pub(super) fn insert(&mut self, key: ObjectKey, slice: &EndpointSlice) -> Option<ObjectKey> {
        let slice = SliceState::new(&key.namespace, slice)?;
        for pod in slice.pods(&key.namespace) {
            *self
                .pod_services
                .entry(pod)
                .or_default()
                .entry(slice.service.clone())
                .or_default() += 1;
        }
        self.by_service
            .entry(slice.service.clone())
            .or_default()
            .insert(key.clone());
        let service = slice.service.clone();
        self.slices.insert(key, slice);
        Some(service)
    }

    /// Forgets a slice; returns the Service it affected.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<ObjectKey> {
        let slice = self.slices.remove(key)?;
        super::remove_from(&mut self.by_service, &slice.service, key);
        for pod in slice.pods(&key.namespace) {
            if let Some(services) = self.pod_services.get_mut(&pod) {
                if let Some(count) = services.get_mut(&slice.service) {
                    *count -= 1;
                    if *count == 0 {
                        services.remove(&slice.service);
                    }
                }
                if services.is_empty() {
                    self.pod_services.remove(&pod);
                }
            }
        }
        Some(slice.service)
    }
}

impl SliceState {
    /// None for a slice that names no Service.
    fn new(namespace: &str, slice: &EndpointSlice) -> Option<Self> {
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|port| {
                let number = u16::try_from(port.port?).ok()?;
                Some((port.name.clone().unwrap_or_default(), number))
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            // Unknown readiness counts as ready, as the EndpointSlice API says.
            .filter(|endpoint| {
                endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true)
            })
            // Consumers use the first address only; FQDN slices have no IPs and are skipped.
            .filter_map(|endpoint| {
                Some(SliceEndpoint {
                    ip: endpoint.addresses.first()?.parse().ok()?,
                    pod: endpoint
                        .target_ref
                        .as_ref()
                        .filter(|target| target.kind.as_deref() == Some("Pod"))
                        .and_then(|target| target.name.clone()),
                })
            })
            .collect();
        Some(Self {
            service: ObjectKey::new(namespace, service.as_str()),
            ports,
            endpoints,
        })
    }

    fn pods<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = ObjectKey> + 'a {
        self.endpoints
            .iter()
            .filter_map(move |endpoint| Some(ObjectKey::new(namespace, endpoint.pod.as_deref()?)))
    }
}
