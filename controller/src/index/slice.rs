//! EndpointSlices: the ready endpoints of a Service, which pods they sit on, and which slices
//! share an address (as they do while they are rebalanced), so that a change to one slice says
//! exactly which endpoint groups it changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::source::ObjectKey;

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What destinations need of an EndpointSlice: its ready endpoints; and for pods' inbound sides,
/// the pods of the others too.
#[derive(Debug, PartialEq)]
pub(super) struct SliceState {
    pub(super) service: ObjectKey,
    /// Port name -> the port endpoints listen on.
    pub(super) ports: BTreeMap<String, u16>,
    pub(super) endpoints: Vec<SliceEndpoint>,
    /// The pods of endpoints not ready: starting (the app not ready yet) or terminating. No
    /// caller is sent to them through the mesh, but their proxies enforce the Service's
    /// AuthorizationPolicies all the same: a pod is reachable at its address before it is ready
    /// and while it drains, and its policy must be in force by then.
    pub(super) unready_pods: Vec<String>,
}

#[derive(Debug, PartialEq)]
pub(super) struct SliceEndpoint {
    pub(super) ip: IpAddr,
    pub(super) pod: Option<String>,
}

/// Every EndpointSlice that names a Service, by Service and by the pods they have endpoints on.
#[derive(Default)]
pub(super) struct Slices {
    slices: HashMap<ObjectKey, SliceState>,
    by_service: HashMap<ObjectKey, ServiceSlices>,
    /// Per pod, the slices with an endpoint on it (ready or not), so that a label change rebuilds
    /// only their groups.
    by_pod: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
}

/// The slices of one Service.
#[derive(Default)]
struct ServiceSlices {
    /// By name, the order of the Service's endpoint groups.
    names: BTreeSet<ObjectKey>,
    /// Per endpoint IP, the slices listing it: an address in two slices belongs to the group of
    /// the first.
    by_ip: HashMap<IpAddr, BTreeSet<ObjectKey>>,
}

/// What a change to a slice affects: its Service, and the slices of that Service whose groups it
/// changes (its own, and those of the slices that share an address with it before or after).
pub(super) struct Touched {
    pub(super) service: ObjectKey,
    pub(super) slices: BTreeSet<ObjectKey>,
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
            .flat_map(|slices| &slices.names)
            .filter_map(|key| Some((key, self.slices.get(key)?)))
    }

    pub(super) fn get(&self, key: &ObjectKey) -> Option<&SliceState> {
        self.slices.get(key)
    }

    /// The pods with an endpoint of `service`, ready or not.
    pub(super) fn pods_of_service<'a>(
        &'a self,
        service: &'a ObjectKey,
    ) -> impl Iterator<Item = ObjectKey> + 'a {
        self.of_service(service)
            .flat_map(move |(_, slice)| slice.pods(&service.namespace))
    }

    /// The slices with an endpoint on `pod`, ready or not, with their Service.
    pub(super) fn on_pod<'a>(
        &'a self,
        pod: &ObjectKey,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a ObjectKey)> + 'a {
        self.by_pod
            .get(pod)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key, &self.slices.get(key)?.service)))
    }

    /// Whether a slice of `service` named before `slice` has `ip` listening on `target_port` for
    /// the Service port `port`: the address is in that slice's group, not in this one's.
    pub(super) fn listed_before(
        &self,
        service: &ObjectKey,
        slice: &ObjectKey,
        ip: IpAddr,
        port: &str,
        target_port: u16,
    ) -> bool {
        self.by_service
            .get(service)
            .and_then(|slices| slices.by_ip.get(&ip))
            .into_iter()
            .flat_map(|listing| listing.range(..slice))
            .filter_map(|earlier| self.slices.get(earlier))
            .any(|earlier| earlier.ports.get(port) == Some(&target_port))
    }

    /// Records a slice (none when it names no Service).
    pub(super) fn insert(&mut self, key: ObjectKey, slice: &EndpointSlice) -> Option<Touched> {
        let slice = SliceState::new(&key.namespace, slice)?;
        for pod in slice.pods(&key.namespace) {
            self.by_pod.entry(pod).or_default().insert(key.clone());
        }
        let slices = self.by_service.entry(slice.service.clone()).or_default();
        slices.names.insert(key.clone());
        for endpoint in &slice.endpoints {
            slices
                .by_ip
                .entry(endpoint.ip)
                .or_default()
                .insert(key.clone());
        }
        let touched = slices.touched_by(&key, &slice, slice.service.clone());
        self.slices.insert(key, slice);
        Some(touched)
    }

    /// Forgets a slice.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<Touched> {
        let slice = self.slices.remove(key)?;
        for pod in slice.pods(&key.namespace) {
            if let Some(slices) = self.by_pod.get_mut(&pod) {
                slices.remove(key);
                if slices.is_empty() {
                    self.by_pod.remove(&pod);
                }
            }
        }
        let slices = self.by_service.get_mut(&slice.service)?;
        let touched = slices.touched_by(key, &slice, slice.service.clone());
        slices.names.remove(key);
        for endpoint in &slice.endpoints {
            if let Some(listing) = slices.by_ip.get_mut(&endpoint.ip) {
                listing.remove(key);
                if listing.is_empty() {
                    slices.by_ip.remove(&endpoint.ip);
                }
            }
        }
        if slices.names.is_empty() {
            self.by_service.remove(&slice.service);
        }
        Some(touched)
    }
}

impl ServiceSlices {
    /// `key` itself and the slices that share an address with `slice` (its content before or
    /// after the change).
    fn touched_by(&self, key: &ObjectKey, slice: &SliceState, service: ObjectKey) -> Touched {
        let sharing = slice
            .endpoints
            .iter()
            .filter_map(|endpoint| self.by_ip.get(&endpoint.ip))
            .flatten()
            .cloned();
        Touched {
            service,
            slices: std::iter::once(key.clone()).chain(sharing).collect(),
        }
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
        let pod_of = |endpoint: &k8s_openapi::api::discovery::v1::Endpoint| {
            endpoint
                .target_ref
                .as_ref()
                .filter(|target| target.kind.as_deref() == Some("Pod"))
                .and_then(|target| target.name.clone())
        };
        // Unknown readiness counts as ready, as the EndpointSlice API says.
        let (ready, unready): (Vec<_>, Vec<_>) = slice.endpoints.iter().partition(|endpoint| {
            endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true)
        });
        let endpoints = ready
            .into_iter()
            // Consumers use the first address only; FQDN slices have no IPs and are skipped.
            .filter_map(|endpoint| {
                Some(SliceEndpoint {
                    ip: endpoint.addresses.first()?.parse().ok()?,
                    pod: pod_of(endpoint),
                })
            })
            .collect();
        Some(Self {
            service: ObjectKey::new(namespace, service.as_str()),
            ports,
            endpoints,
            unready_pods: unready.into_iter().filter_map(pod_of).collect(),
        })
    }

    /// The pods of its endpoints, ready or not.
    fn pods<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = ObjectKey> + 'a {
        self.endpoints
            .iter()
            .filter_map(|endpoint| endpoint.pod.as_deref())
            .chain(self.unready_pods.iter().map(String::as_str))
            .map(move |pod| ObjectKey::new(namespace, pod))
    }
}
