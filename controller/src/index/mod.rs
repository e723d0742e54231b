//! The index: what the controller knows of the cluster, turned into one `proto::Destination` per
//! Service port.
//!
//! Sources (a manifests directory; the Kubernetes API) feed it [`Change`]s. It keeps only what
//! destinations are made of (Service ports and ClusterIPs, ready endpoints, pod labels, translated
//! policies), and on each change recomputes only the Services that change can affect. A destination
//! is published under the Service port's name (`reviews.shop.svc.cluster.local:9080`) and under
//! each ClusterIP:port (what a redirected connection was addressed to), and only when its content
//! changed, so streams are not woken for nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use outrigger_api::destination::DestinationKey;
use outrigger_api::policy::{DestinationPolicy, DestinationPolicySpec, DestinationPolicyStatus};
use outrigger_api::proto;
use tokio::sync::{mpsc, watch};

use crate::distribute::{Snapshot, Snapshots};
use crate::metrics::Metrics;
use crate::source::{Change, Kind, Object, ObjectKey, ObjectRef};
use crate::translate::{PolicyError, Translated, translate};

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The appProtocol of a Service port whose endpoints speak HTTP/2 without TLS.
const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

/// What destinations need of a Service.
#[derive(Debug, PartialEq)]
struct ServiceState {
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
}

#[derive(Debug, PartialEq)]
struct ServicePort {
    /// Empty for a Service's single unnamed port; EndpointSlice ports match by this name.
    name: String,
    port: u16,
    h2c: bool,
}

/// What destinations need of an EndpointSlice: its ready endpoints only.
#[derive(Debug, PartialEq)]
struct SliceState {
    service: ObjectKey,
    /// Port name -> the port endpoints listen on.
    ports: BTreeMap<String, u16>,
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, PartialEq)]
struct SliceEndpoint {
    ip: IpAddr,
    pod: Option<String>,
}

struct PolicyState {
    uid: Option<String>,
    host: String,
    /// The Service its host names, when the host names one in the policy's namespace.
    service: Option<ObjectKey>,
    created: Option<Time>,
    generation: i64,
    /// An invalid policy is not in force; the error is kept for status.
    translated: Result<Arc<Translated>, PolicyError>,
    split: String,
    status: Option<DestinationPolicyStatus>,
}

/// Why a condition is False: a CamelCase reason and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// What the index knows of one DestinationPolicy, for its status.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyReport {
    /// Tells a policy from one deleted and created again under its name.
    pub uid: Option<String>,
    pub generation: i64,
    /// The split it asks for: `stable=90,canary=10`, or `all` without one.
    pub split: String,
    /// Err when it is not in force: invalid, or another policy governs its Service.
    pub accepted: Result<(), Problem>,
    /// Err when its Service does not exist or one of its subsets has no ready endpoints.
    pub resolved_refs: Result<(), Problem>,
    /// The keys its Service is published under, which the proxies that call it subscribe to;
    /// Err when there is nothing to program (not in force, or no such Service).
    pub destination_keys: Result<Vec<String>, Problem>,
    /// The status the object carried when the index last read its spec.
    pub status: Option<DestinationPolicyStatus>,
}

/// Every DestinationPolicy the index knows, by namespaced name.
pub type PolicyReports = BTreeMap<ObjectKey, PolicyReport>;

pub struct Index {
    snapshots: Snapshots,
    metrics: Metrics,
    services: HashMap<ObjectKey, ServiceState>,
    slices: HashMap<ObjectKey, SliceState>,
    slices_by_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    pod_labels: HashMap<ObjectKey, BTreeMap<String, String>>,
    /// Per pod, the Services with a ready endpoint on it (and how many), so that a label change
    /// recomputes only those.
    pod_services: HashMap<ObjectKey, HashMap<ObjectKey, usize>>,
    policies: HashMap<ObjectKey, PolicyState>,
    policies_by_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Per Service, the keys published for it and their versions.
    published: HashMap<ObjectKey, HashMap<String, String>>,
    synced: watch::Sender<bool>,
    reports: watch::Sender<PolicyReports>,
}

impl Index {
    pub fn new(snapshots: Snapshots, metrics: Metrics) -> Self {
        Self {
            snapshots,
            metrics,
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            pod_labels: HashMap::new(),
            pod_services: HashMap::new(),
            policies: HashMap::new(),
            policies_by_service: HashMap::new(),
            published: HashMap::new(),
            synced: watch::Sender::new(false),
            reports: watch::Sender::new(PolicyReports::new()),
        }
    }

    /// Turns true once a source has delivered its full initial state.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// What status needs of every DestinationPolicy (translation errors included), kept up to
    /// date as changes are applied.
    pub fn policy_reports(&self) -> watch::Receiver<PolicyReports> {
        self.reports.subscribe()
    }

    /// Applies changes until every sender is gone.
    pub async fn run(mut self, mut changes: mpsc::Receiver<Change>) {
        while let Some(change) = changes.recv().await {
            self.apply(change);
        }
    }

    pub fn apply(&mut self, change: Change) {
        let changed_at = Instant::now();
        let changed = match &change {
            Change::Applied(object) => object.reference(),
            Change::Deleted(reference) => Some(reference.clone()),
            Change::Synced => None,
        };
        let changed_policy = changed
            .filter(|reference| reference.kind == Kind::DestinationPolicy)
            .map(|reference| reference.key);
        let affected: BTreeSet<ObjectKey> = match change {
            Change::Applied(object) => {
                let Some(reference) = object.reference() else {
                    tracing::warn!(kind = ?object.kind(), "ignoring an object without a name or namespace");
                    return;
                };
                // Pods change often (status) and matter only by their labels.
                if let Object::Pod(pod) = &object
                    && self.pod_labels.get(&reference.key)
                        == Some(pod.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
                {
                    return;
                }
                self.remove(&reference)
                    .into_iter()
                    .chain(self.insert(reference.key, object))
                    .collect()
            }
            Change::Deleted(reference) => self.remove(&reference),
            Change::Synced => {
                self.snapshots.mark_synced();
                self.synced.send_replace(true);
                return;
            }
        };
        for service in &affected {
            self.recompute(service, changed_at);
        }
        let policies = affected
            .iter()
            .filter_map(|service| self.policies_by_service.get(service))
            .flatten()
            .cloned()
            .chain(changed_policy)
            .collect();
        self.report(policies);
    }

    /// Brings the reports of these policies up to date.
    fn report(&self, policies: BTreeSet<ObjectKey>) {
        self.reports.send_if_modified(|reports| {
            let mut modified = false;
            for key in policies {
                match self.policies.get(&key) {
                    Some(state) => {
                        let report = self.policy_report(&key, state);
                        if reports.get(&key) != Some(&report) {
                            reports.insert(key, report);
                            modified = true;
                        }
                    }
                    None => modified |= reports.remove(&key).is_some(),
                }
            }
            modified
        });
    }

    fn policy_report(&self, key: &ObjectKey, state: &PolicyState) -> PolicyReport {
        let governing = state.service.as_ref().and_then(|service| {
            let (governing, ..) = self.policy_for(service)?;
            Some((service, governing))
        });
        let accepted = match (&state.translated, governing) {
            (Err(error), _) => Err(Problem::new("Invalid", error.to_string())),
            (Ok(_), Some((service, governing))) if governing != key => Err(Problem::new(
                "Conflicted",
                format!(
                    "DestinationPolicy {governing} governs Service {service}: of the policies \
                     for a Service, the oldest is in force"
                ),
            )),
            (Ok(_), _) => Ok(()),
        };
        let service = match &state.service {
            None => Err(Problem::new(
                "ServiceNotFound",
                format!(
                    "host `{}` names no Service in namespace {}, the only one a policy there \
                     applies to",
                    state.host, key.namespace
                ),
            )),
            Some(service) if !self.services.contains_key(service) => Err(Problem::new(
                "ServiceNotFound",
                format!("Service {service} does not exist"),
            )),
            Some(service) => Ok(service),
        };
        let resolved_refs = match (&service, &state.translated) {
            (Err(problem), _) => Err(problem.clone()),
            (Ok(service), Ok(translated)) => {
                let unserved = self.subsets_without_endpoints(service, translated);
                if unserved.is_empty() {
                    Ok(())
                } else {
                    Err(Problem::new(
                        "SubsetsWithoutEndpoints",
                        format!(
                            "no ready endpoints in subset {}: while another subset has some, \
                             it gets no traffic",
                            unserved.join(", ")
                        ),
                    ))
                }
            }
            // Its subsets are unknown: only the Service can be checked.
            (Ok(_), Err(_)) => Ok(()),
        };
        let destination_keys = match (&accepted, &service) {
            (Err(problem), _) | (Ok(()), Err(problem)) => Err(problem.clone()),
            (Ok(()), Ok(service)) => {
                let mut keys: Vec<String> = self
                    .published
                    .get(*service)
                    .map(|keys| keys.keys().cloned().collect())
                    .unwrap_or_default();
                keys.sort();
                Ok(keys)
            }
        };
        PolicyReport {
            uid: state.uid.clone(),
            generation: state.generation,
            split: state.split.clone(),
            accepted,
            resolved_refs,
            destination_keys,
            status: state.status.clone(),
        }
    }

    /// The policy's subsets that no ready endpoint of the Service belongs to, in declaration
    /// order.
    fn subsets_without_endpoints(
        &self,
        service: &ObjectKey,
        translated: &Translated,
    ) -> Vec<String> {
        let mut unserved: Vec<&str> = translated
            .subsets
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        let endpoints = self
            .slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.slices.get(key))
            .flat_map(|slice| &slice.endpoints);
        for endpoint in endpoints {
            let subsets = self.subsets_of(service, endpoint.pod.as_deref(), translated);
            unserved.retain(|name| !subsets.iter().any(|subset| subset == name));
            if unserved.is_empty() {
                break;
            }
        }
        unserved.into_iter().map(String::from).collect()
    }

    /// Forgets an object; returns the Services it affected.
    fn remove(&mut self, reference: &ObjectRef) -> BTreeSet<ObjectKey> {
        let key = &reference.key;
        match reference.kind {
            Kind::Service => self
                .services
                .remove(key)
                .map(|_| key.clone())
                .into_iter()
                .collect(),
            Kind::EndpointSlice => {
                let Some(slice) = self.slices.remove(key) else {
                    return BTreeSet::new();
                };
                remove_from(&mut self.slices_by_service, &slice.service, key);
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
                BTreeSet::from([slice.service])
            }
            Kind::Pod => match self.pod_labels.remove(key) {
                Some(_) => self.services_on_pod(key),
                None => BTreeSet::new(),
            },
            Kind::DestinationPolicy => {
                let Some(policy) = self.policies.remove(key) else {
                    return BTreeSet::new();
                };
                let Some(service) = policy.service else {
                    return BTreeSet::new();
                };
                remove_from(&mut self.policies_by_service, &service, key);
                BTreeSet::from([service])
            }
        }
    }

    /// Records an object; returns the Services it affects.
    fn insert(&mut self, key: ObjectKey, object: Object) -> BTreeSet<ObjectKey> {
        match object {
            Object::Service(service) => {
                self.services
                    .insert(key.clone(), ServiceState::new(&service));
                BTreeSet::from([key])
            }
            Object::EndpointSlice(slice) => {
                let Some(slice) = SliceState::new(&key.namespace, &slice) else {
                    return BTreeSet::new();
                };
                for pod in slice.pods(&key.namespace) {
                    *self
                        .pod_services
                        .entry(pod)
                        .or_default()
                        .entry(slice.service.clone())
                        .or_default() += 1;
                }
                self.slices_by_service
                    .entry(slice.service.clone())
                    .or_default()
                    .insert(key.clone());
                let service = slice.service.clone();
                self.slices.insert(key, slice);
                BTreeSet::from([service])
            }
            Object::Pod(pod) => {
                let labels = pod.metadata.labels.unwrap_or_default();
                self.pod_labels.insert(key.clone(), labels);
                self.services_on_pod(&key)
            }
            Object::DestinationPolicy(policy) => {
                let state = self.policy_state(&key, &policy);
                let service = state.service.clone();
                self.policies.insert(key.clone(), state);
                match service {
                    Some(service) => {
                        self.policies_by_service
                            .entry(service.clone())
                            .or_default()
                            .insert(key);
                        BTreeSet::from([service])
                    }
                    None => BTreeSet::new(),
                }
            }
        }
    }

    fn services_on_pod(&self, pod: &ObjectKey) -> BTreeSet<ObjectKey> {
        self.pod_services
            .get(pod)
            .map(|services| services.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn policy_state(&self, key: &ObjectKey, policy: &DestinationPolicy) -> PolicyState {
        let service = match DestinationKey::from_authority(&policy.spec.host, 0, &key.namespace) {
            // A policy governs a Service of its own namespace, as its RBAC allows.
            Ok(DestinationKey::Service {
                namespace, name, ..
            }) if namespace == key.namespace => Some(ObjectKey::new(namespace, name)),
            _ => {
                tracing::warn!(policy = %key, host = %policy.spec.host,
                    "DestinationPolicy host names no Service in its namespace");
                None
            }
        };
        let translated = translate(&policy.spec).map(Arc::new);
        if let Err(error) = &translated {
            self.metrics.reconcile_errors.inc();
            tracing::warn!(policy = %key, %error, "DestinationPolicy is invalid and not in force");
        }
        PolicyState {
            uid: policy.metadata.uid.clone(),
            host: policy.spec.host.clone(),
            service,
            created: policy.metadata.creation_timestamp.clone(),
            generation: policy.metadata.generation.unwrap_or_default(),
            translated,
            split: split_summary(&policy.spec),
            status: policy.status.clone(),
        }
    }

    /// The policy in force for a Service: of the valid ones naming it, the oldest (then by name),
    /// as Istio resolves competing DestinationRules.
    fn policy_for(&self, service: &ObjectKey) -> Option<(&ObjectKey, &PolicyState, &Translated)> {
        self.policies_by_service
            .get(service)?
            .iter()
            .filter_map(|key| {
                let state = self.policies.get(key)?;
                let translated = state.translated.as_ref().ok()?;
                Some((key, state, translated.as_ref()))
            })
            .min_by(|(a_key, a, _), (b_key, b, _)| (&a.created, *a_key).cmp(&(&b.created, *b_key)))
    }

    /// Publishes what changed for a Service, and withdraws the keys it no longer has.
    fn recompute(&mut self, service: &ObjectKey, changed_at: Instant) {
        let destinations = self.destinations(service, changed_at);
        let published = self.published.entry(service.clone()).or_default();
        published.retain(|key, _| {
            let kept = destinations.contains_key(key);
            if !kept {
                self.snapshots.remove(key);
            }
            kept
        });
        for (key, snapshot) in destinations {
            let Snapshot::Known { version, .. } = &*snapshot else {
                unreachable!("Snapshot::known is known")
            };
            if published.get(&key) == Some(version) {
                continue;
            }
            published.insert(key.clone(), version.clone());
            self.snapshots.publish(&key, snapshot);
        }
        if published.is_empty() {
            self.published.remove(service);
        }
    }

    /// Every key of a Service with its snapshot (one per port, whichever key names it), endpoints
    /// grouped by EndpointSlice so that a pod coming or going changes one group; none when the
    /// Service is unknown.
    fn destinations(
        &self,
        service: &ObjectKey,
        changed_at: Instant,
    ) -> BTreeMap<String, Arc<Snapshot>> {
        let Some(state) = self.services.get(service) else {
            return BTreeMap::new();
        };
        let policy = self.policy_for(service);
        // By name, so groups come in the same order whatever order the slices arrived in.
        let slices: Vec<(&str, &SliceState)> = self
            .slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key.name.as_str(), self.slices.get(key)?)))
            .collect();
        let mut destinations = BTreeMap::new();
        for port in &state.ports {
            // Endpoints by the EndpointSlice they come from, in the order of its name.
            let mut groups = Vec::new();
            let mut seen = HashSet::new();
            for (name, slice) in &slices {
                let Some(&target_port) = slice.ports.get(&port.name) else {
                    continue;
                };
                let endpoints: Vec<proto::Endpoint> = slice
                    .endpoints
                    .iter()
                    .map(|endpoint| (endpoint, SocketAddr::new(endpoint.ip, target_port)))
                    // The same endpoint may sit in two slices while they are rebalanced.
                    .filter(|(_, address)| seen.insert(*address))
                    .map(|(endpoint, address)| proto::Endpoint {
                        address: address.to_string(),
                        subsets: policy
                            .map(|(.., translated)| {
                                self.subsets_of(service, endpoint.pod.as_deref(), translated)
                            })
                            .unwrap_or_default(),
                        pod: endpoint.pod.clone().unwrap_or_default(),
                        h2c: port.h2c,
                    })
                    .collect();
                if !endpoints.is_empty() {
                    groups.push((name.to_string(), endpoints));
                }
            }
            let destination = proto::Destination {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                port: port.port.into(),
                policy: policy.map(|(key, ..)| key.to_string()).unwrap_or_default(),
                policy_generation: policy.map(|(_, state, _)| state.generation).unwrap_or(0),
                policy_spec: policy.map(|(.., translated)| translated.policy.clone()),
                routes: policy
                    .map(|(.., translated)| translated.routes.clone())
                    .unwrap_or_default(),
                subsets: policy
                    .map(|(.., translated)| {
                        translated
                            .subsets
                            .iter()
                            .map(|(name, _)| name.clone())
                            .collect()
                    })
                    .unwrap_or_default(),
                // Named by `Snapshot::known`, from the groups.
                endpoint_groups: Vec::new(),
            };
            let by_name = DestinationKey::Service {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                port: port.port,
            };
            let by_address = state
                .cluster_ips
                .iter()
                .map(|&ip| DestinationKey::Address(SocketAddr::new(ip, port.port)));
            let snapshot = Arc::new(Snapshot::known(destination, groups, changed_at));
            for key in std::iter::once(by_name).chain(by_address) {
                destinations.insert(key.to_string(), snapshot.clone());
            }
        }
        destinations
    }

    /// The policy's subsets whose labels the endpoint's pod carries.
    fn subsets_of(
        &self,
        service: &ObjectKey,
        pod: Option<&str>,
        translated: &Translated,
    ) -> Vec<String> {
        let no_labels = BTreeMap::new();
        let labels = pod
            .and_then(|pod| {
                self.pod_labels
                    .get(&ObjectKey::new(service.namespace.as_str(), pod))
            })
            .unwrap_or(&no_labels);
        translated
            .subsets
            .iter()
            .filter(|(_, selector)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// `stable=90,canary=10`, or `all` when the policy splits nothing.
fn split_summary(spec: &DestinationPolicySpec) -> String {
    match &spec.traffic_split {
        None => "all".to_string(),
        Some(split) => split
            .0
            .iter()
            .map(|weighted| format!("{}={}", weighted.subset, weighted.weight))
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn remove_from(
    index: &mut HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    service: &ObjectKey,
    key: &ObjectKey,
) {
    if let Some(keys) = index.get_mut(service) {
        keys.remove(key);
        if keys.is_empty() {
            index.remove(service);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribute::EndpointSet;
    use serde_json::{Value, json};

    const BY_NAME: &str = "reviews.shop.svc.cluster.local:9080";
    const BY_IP: &str = "10.96.0.10:9080";

    fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
        serde_json::from_value(value).expect("a valid object")
    }

    fn service(ports: Value) -> Change {
        Change::Applied(Object::Service(Box::new(object(json!({
            "metadata": {"namespace": "shop", "name": "reviews"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": ports},
        })))))
    }

    fn reviews() -> Change {
        service(json!([{"name": "http", "port": 9080}]))
    }

    /// A slice of `reviews` whose endpoints are (ip, pod, ready), listening on `port`.
    fn slice(name: &str, port: u16, endpoints: &[(&str, &str, bool)]) -> Change {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(ip, pod, ready)| {
                json!({
                    "addresses": [ip],
                    "conditions": {"ready": ready},
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"},
                })
            })
            .collect();
        Change::Applied(Object::EndpointSlice(Box::new(object(json!({
            "metadata": {
                "namespace": "shop", "name": name,
                "labels": {"kubernetes.io/service-name": "reviews"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port}],
            "endpoints": endpoints,
        })))))
    }

    fn pod(name: &str, version: &str) -> Change {
        Change::Applied(Object::Pod(Box::new(object(json!({
            "metadata": {"namespace": "shop", "name": name, "labels": {"version": version}},
        })))))
    }

    fn policy(name: &str, created: &str, spec: Value) -> Change {
        Change::Applied(Object::DestinationPolicy(Box::new(object(json!({
            "apiVersion": "outrigger.dev/v1alpha1",
            "kind": "DestinationPolicy",
            "metadata": {
                "namespace": "shop", "name": name, "generation": 3,
                "creationTimestamp": created,
            },
            "spec": spec,
        })))))
    }

    fn canary_policy() -> Value {
        json!({
            "host": "reviews",
            "subsets": [
                {"name": "stable", "labels": {"version": "v1"}},
                {"name": "canary", "labels": {"version": "v2"}},
            ],
            "trafficSplit": [{"subset": "stable", "weight": 90}, {"subset": "canary", "weight": 10}],
            "timeout": "10s",
        })
    }

    fn deleted(kind: Kind, name: &str) -> Change {
        Change::Deleted(ObjectRef {
            kind,
            key: ObjectKey::new("shop", name),
        })
    }

    fn index() -> (Index, Snapshots) {
        let snapshots = Snapshots::default();
        (Index::new(snapshots.clone(), Metrics::default()), snapshots)
    }

    #[derive(Debug, PartialEq)]
    enum Published {
        Nothing,
        Unknown,
        Known(Box<proto::Destination>, Vec<proto::Endpoint>),
    }

    fn published(snapshots: &Snapshots, key: &str) -> Published {
        match snapshots.watch(key).borrow().as_deref() {
            None => Published::Nothing,
            Some(Snapshot::Unknown { .. }) => Published::Unknown,
            Some(Snapshot::Known {
                destination,
                endpoints,
                ..
            }) => Published::Known(
                destination.clone(),
                endpoints.iter().flat_map(EndpointSet::decode).collect(),
            ),
        }
    }

    fn known(snapshots: &Snapshots, key: &str) -> proto::Destination {
        match published(snapshots, key) {
            Published::Known(destination, _) => *destination,
            other => panic!("{key}: {other:?}"),
        }
    }

    fn endpoint_list(snapshots: &Snapshots, key: &str) -> Vec<proto::Endpoint> {
        match published(snapshots, key) {
            Published::Known(_, endpoints) => endpoints,
            other => panic!("{key}: {other:?}"),
        }
    }

    /// (address, subsets) of every endpoint.
    fn endpoints(snapshots: &Snapshots, key: &str) -> Vec<(String, Vec<String>)> {
        endpoint_list(snapshots, key)
            .into_iter()
            .map(|e| (e.address, e.subsets))
            .collect()
    }

    #[test]
    fn a_service_port_is_published_by_name_and_by_cluster_ip() {
        let (mut index, snapshots) = index();
        index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
        assert_eq!(published(&snapshots, BY_NAME), Published::Nothing);
        index.apply(reviews());
        let destination = known(&snapshots, BY_NAME);
        assert_eq!(published(&snapshots, BY_NAME), published(&snapshots, BY_IP));
        assert_eq!(
            (
                destination.namespace.as_str(),
                destination.service.as_str(),
                destination.port
            ),
            ("shop", "reviews", 9080)
        );
        assert_eq!(
            endpoint_list(&snapshots, BY_NAME),
            [proto::Endpoint {
                address: "10.0.0.1:8080".into(),
                subsets: vec![],
                pod: "reviews-1".into(),
                h2c: false,
            }]
        );
        assert_eq!(destination.policy, "");
        assert_eq!(destination.policy_spec, None);
    }

    #[test]
    fn endpoints_are_the_ready_ones_on_the_named_port_once_each() {
        let (mut index, snapshots) = index();
        index.apply(service(json!([
            {"name": "http", "port": 9080},
            {"name": "grpc", "port": 9090, "appProtocol": "kubernetes.io/h2c"},
        ])));
        index.apply(slice(
            "reviews-a",
            8080,
            &[
                ("10.0.0.1", "reviews-1", true),
                ("10.0.0.2", "reviews-2", false),
            ],
        ));
        // The same endpoint in a second slice, as while slices are rebalanced.
        index.apply(slice("reviews-b", 8080, &[("10.0.0.1", "reviews-1", true)]));
        assert_eq!(
            endpoints(&snapshots, BY_NAME),
            [("10.0.0.1:8080".to_string(), vec![])]
        );
        // No slice has a `grpc` port: the destination exists, without endpoints.
        let grpc = known(&snapshots, "reviews.shop.svc.cluster.local:9090");
        assert_eq!(
            published(&snapshots, "10.96.0.10:9090"),
            Published::Known(Box::new(grpc), vec![])
        );

        index.apply(Change::Applied(Object::EndpointSlice(Box::new(object(
            json!({
                "metadata": {"namespace": "shop", "name": "reviews-grpc",
                    "labels": {"kubernetes.io/service-name": "reviews"}},
                "addressType": "IPv4",
                "ports": [{"name": "grpc", "port": 7070}],
                "endpoints": [{"addresses": ["10.0.0.3"]}],
            }),
        )))));
        let grpc = endpoint_list(&snapshots, "reviews.shop.svc.cluster.local:9090");
        assert_eq!(grpc.len(), 1);
        assert_eq!(grpc[0].address, "10.0.0.3:7070");
        assert!(grpc[0].h2c, "appProtocol kubernetes.io/h2c");
    }

    /// (slice, version, addresses) of every endpoint group.
    fn groups(snapshots: &Snapshots, key: &str) -> Vec<(String, String, Vec<String>)> {
        match snapshots.current(key).as_deref() {
            Some(Snapshot::Known { endpoints, .. }) => endpoints
                .iter()
                .map(|group| {
                    let addresses = group.decode().into_iter().map(|e| e.address).collect();
                    (group.name.clone(), group.version.clone(), addresses)
                })
                .collect(),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn endpoints_are_grouped_by_slice_so_churn_changes_one_group() {
        let (mut index, snapshots) = index();
        index.apply(reviews());
        index.apply(slice("reviews-b", 8080, &[("10.0.0.2", "reviews-2", true)]));
        index.apply(slice(
            "reviews-a",
            8080,
            &[
                ("10.0.0.1", "reviews-1", true),
                ("10.0.0.2", "reviews-2", true),
            ],
        ));
        let before = groups(&snapshots, BY_NAME);
        let layout = |groups: &[(String, String, Vec<String>)]| -> Vec<(String, Vec<String>)> {
            groups
                .iter()
                .map(|(name, _, addresses)| (name.clone(), addresses.clone()))
                .collect()
        };
        // By slice name; an endpoint in two slices counts once, in the first, and reviews-b is
        // left with none.
        assert_eq!(
            layout(&before),
            [(
                "reviews-a".to_string(),
                vec!["10.0.0.1:8080".to_string(), "10.0.0.2:8080".to_string()]
            )]
        );

        index.apply(slice("reviews-b", 8080, &[("10.0.0.3", "reviews-3", true)]));
        let after = groups(&snapshots, BY_NAME);
        assert_eq!(after[0], before[0], "an untouched slice keeps its version");
        assert_eq!(
            layout(&after[1..]),
            [("reviews-b".to_string(), vec!["10.0.0.3:8080".to_string()])]
        );
    }

    #[test]
    fn subsets_follow_pod_labels() {
        let (mut index, snapshots) = index();
        index.apply(pod("reviews-1", "v1"));
        index.apply(pod("reviews-2", "v2"));
        index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
        index.apply(slice(
            "reviews-a",
            8080,
            &[
                ("10.0.0.1", "reviews-1", true),
                ("10.0.0.2", "reviews-2", true),
                ("10.0.0.3", "reviews-3", true),
            ],
        ));
        index.apply(reviews());
        let subsets = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            endpoints(&snapshots, BY_NAME),
            [
                ("10.0.0.1:8080".into(), subsets(&["stable"])),
                ("10.0.0.2:8080".into(), subsets(&["canary"])),
                // A pod the index has not seen carries no labels.
                ("10.0.0.3:8080".into(), subsets(&[])),
            ]
        );
        assert_eq!(known(&snapshots, BY_NAME).subsets, ["stable", "canary"]);

        index.apply(pod("reviews-3", "v2"));
        index.apply(pod("reviews-1", "v2"));
        index.apply(deleted(Kind::Pod, "reviews-2"));
        assert_eq!(
            endpoints(&snapshots, BY_NAME),
            [
                ("10.0.0.1:8080".into(), subsets(&["canary"])),
                ("10.0.0.2:8080".into(), subsets(&[])),
                ("10.0.0.3:8080".into(), subsets(&["canary"])),
            ]
        );
    }

    #[test]
    fn the_policy_in_force_is_translated_into_the_destination() {
        let (mut index, snapshots) = index();
        index.apply(reviews());
        index.apply(policy(
            "reviews",
            "2026-01-01T00:00:00Z",
            json!({"host": "reviews.shop.svc.cluster.local", "timeout": "1m30s",
                   "routes": [{"name": "slow", "match": {"pathPrefix": "/slow"}, "timeout": "5m"}]}),
        ));
        let destination = known(&snapshots, BY_NAME);
        assert_eq!(destination.policy, "shop/reviews");
        assert_eq!(destination.policy_generation, 3);
        assert_eq!(destination.policy_spec.unwrap().timeout_ms, Some(90_000));
        assert_eq!(destination.routes[0].name, "slow");
        assert_eq!(destination.routes[0].timeout_ms, Some(300_000));

        // The oldest valid policy wins; an invalid one is not in force and counts as an error.
        index.apply(policy(
            "older-but-invalid",
            "2025-01-01T00:00:00Z",
            json!({"host": "reviews", "timeout": "1s", "retries": {"perTryTimeout": "2s"}}),
        ));
        assert_eq!(known(&snapshots, BY_NAME).policy, "shop/reviews");
        assert_eq!(index.metrics.reconcile_errors.get(), 1);
        index.apply(policy(
            "oldest",
            "2024-01-01T00:00:00Z",
            json!({"host": "reviews", "timeout": "3s"}),
        ));
        assert_eq!(known(&snapshots, BY_NAME).policy, "shop/oldest");
        index.apply(deleted(Kind::DestinationPolicy, "oldest"));
        assert_eq!(known(&snapshots, BY_NAME).policy, "shop/reviews");

        // A host in another namespace governs nothing here.
        index.apply(deleted(Kind::DestinationPolicy, "reviews"));
        index.apply(policy(
            "elsewhere",
            "2020-01-01T00:00:00Z",
            json!({"host": "reviews.books", "timeout": "3s"}),
        ));
        let destination = known(&snapshots, BY_NAME);
        assert_eq!(destination.policy, "");
        assert_eq!(destination.policy_spec, None);
    }

    #[test]
    fn churn_and_deletion_reach_every_key() {
        let (mut index, snapshots) = index();
        index.apply(reviews());
        index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
        index.apply(Change::Synced);
        for round in 2..20u8 {
            let ip = format!("10.0.0.{round}");
            index.apply(slice("reviews-a", 8080, &[(&ip, "reviews-x", true)]));
            assert_eq!(
                endpoints(&snapshots, BY_IP),
                [(format!("{ip}:8080"), vec![])]
            );
        }
        index.apply(deleted(Kind::EndpointSlice, "reviews-a"));
        assert!(endpoint_list(&snapshots, BY_NAME).is_empty());

        // A port taken away and a ClusterIP changed withdraw their keys.
        index.apply(service(json!([{"name": "http", "port": 9081}])));
        assert_eq!(published(&snapshots, BY_NAME), Published::Unknown);
        assert_eq!(published(&snapshots, BY_IP), Published::Unknown);
        assert!(matches!(
            published(&snapshots, "reviews.shop.svc.cluster.local:9081"),
            Published::Known(..)
        ));

        index.apply(deleted(Kind::Service, "reviews"));
        for key in ["reviews.shop.svc.cluster.local:9081", "10.96.0.10:9081"] {
            assert_eq!(published(&snapshots, key), Published::Unknown, "{key}");
        }
        // Deleting what is not there changes nothing.
        index.apply(deleted(Kind::Service, "reviews"));
        index.apply(deleted(Kind::Pod, "nobody"));
    }

    #[test]
    fn an_unchanged_recompute_publishes_nothing() {
        let (mut index, snapshots) = index();
        index.apply(pod("reviews-1", "v1"));
        index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
        index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
        index.apply(reviews());
        let mut by_name = snapshots.watch(BY_NAME);
        let mut by_ip = snapshots.watch(BY_IP);
        by_name.mark_unchanged();
        by_ip.mark_unchanged();

        index.apply(reviews());
        index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
        index.apply(pod("reviews-1", "v1"));
        index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
        // A not-ready endpoint and an unrelated pod change nothing either.
        index.apply(slice(
            "reviews-a",
            8080,
            &[
                ("10.0.0.1", "reviews-1", true),
                ("10.0.0.9", "reviews-9", false),
            ],
        ));
        index.apply(pod("unrelated", "v2"));
        assert!(!by_name.has_changed().unwrap());
        assert!(!by_ip.has_changed().unwrap());

        index.apply(pod("reviews-1", "v2"));
        assert!(by_name.has_changed().unwrap());
        assert!(by_ip.has_changed().unwrap());
    }

    #[test]
    fn synced_makes_the_rest_unknown_and_the_index_ready() {
        let (mut index, snapshots) = index();
        let ready = index.synced();
        let elsewhere = snapshots.watch("ratings.shop.svc.cluster.local:80");
        index.apply(reviews());
        assert!(elsewhere.borrow().is_none(), "may still appear");
        assert!(!*ready.borrow());
        index.apply(Change::Synced);
        assert!(matches!(
            elsewhere.borrow().as_deref(),
            Some(Snapshot::Unknown { .. })
        ));
        assert!(*ready.borrow());
        assert!(matches!(
            published(&snapshots, BY_NAME),
            Published::Known(..)
        ));
    }

    fn report(index: &Index, name: &str) -> PolicyReport {
        index.policy_reports().borrow()[&ObjectKey::new("shop", name)].clone()
    }

    fn problem(reason: &'static str, message: &str) -> Problem {
        Problem::new(reason, message)
    }

    #[test]
    fn reports_say_why_a_policy_is_not_in_force_or_not_resolved() {
        let (mut index, _) = index();
        index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
        let missing = problem("ServiceNotFound", "Service shop/reviews does not exist");
        let reviews_report = report(&index, "reviews");
        assert_eq!(reviews_report.split, "stable=90,canary=10");
        assert_eq!(reviews_report.generation, 3);
        assert_eq!(reviews_report.accepted, Ok(()));
        assert_eq!(reviews_report.resolved_refs, Err(missing.clone()));
        assert_eq!(reviews_report.destination_keys, Err(missing));

        // The Service, with endpoints of the stable pods only.
        index.apply(pod("reviews-1", "v1"));
        index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
        index.apply(reviews());
        let reviews_report = report(&index, "reviews");
        assert_eq!(
            reviews_report.resolved_refs,
            Err(problem(
                "SubsetsWithoutEndpoints",
                "no ready endpoints in subset canary: while another subset has some, it gets \
                 no traffic"
            ))
        );
        assert_eq!(
            reviews_report.destination_keys,
            Ok(vec![BY_IP.to_string(), BY_NAME.to_string()])
        );
        // A canary pod labelled later resolves it.
        index.apply(slice("reviews-b", 8080, &[("10.0.0.2", "reviews-2", true)]));
        index.apply(pod("reviews-2", "v2"));
        assert_eq!(report(&index, "reviews").resolved_refs, Ok(()));

        index.apply(policy(
            "newer",
            "2026-02-01T00:00:00Z",
            json!({"host": "reviews"}),
        ));
        let conflicted = problem(
            "Conflicted",
            "DestinationPolicy shop/reviews governs Service shop/reviews: of the policies for a \
             Service, the oldest is in force",
        );
        let newer = report(&index, "newer");
        assert_eq!(newer.accepted, Err(conflicted.clone()));
        assert_eq!(newer.destination_keys, Err(conflicted));
        assert_eq!(newer.split, "all");

        index.apply(policy(
            "invalid",
            "2025-01-01T00:00:00Z",
            json!({"host": "reviews", "timeout": "1s", "retries": {"perTryTimeout": "2s"}}),
        ));
        assert_eq!(
            report(&index, "invalid").accepted,
            Err(problem(
                "Invalid",
                "spec.retries.perTryTimeout: 2s exceeds the timeout 1s"
            ))
        );
        assert_eq!(
            report(&index, "reviews").accepted,
            Ok(()),
            "an invalid policy is never in force"
        );

        index.apply(policy(
            "elsewhere",
            "2020-01-01T00:00:00Z",
            json!({"host": "reviews.books"}),
        ));
        assert_eq!(
            report(&index, "elsewhere").resolved_refs,
            Err(problem(
                "ServiceNotFound",
                "host `reviews.books` names no Service in namespace shop, the only one a policy \
                 there applies to"
            ))
        );

        // The policy in force deleted: the next oldest takes over.
        index.apply(deleted(Kind::DestinationPolicy, "reviews"));
        assert!(
            !index
                .policy_reports()
                .borrow()
                .contains_key(&ObjectKey::new("shop", "reviews"))
        );
        assert_eq!(report(&index, "newer").accepted, Ok(()));
    }

    #[test]
    fn reports_change_only_when_their_content_does() {
        let (mut index, _) = index();
        index.apply(reviews());
        index.apply(policy("reviews", "2026-01-01T00:00:00Z", canary_policy()));
        let mut reports = index.policy_reports();
        reports.mark_unchanged();
        index.apply(pod("unrelated", "v1"));
        index.apply(reviews());
        assert!(!reports.has_changed().unwrap());
        index.apply(slice("reviews-a", 8080, &[("10.0.0.1", "reviews-1", true)]));
        index.apply(pod("reviews-1", "v2"));
        assert!(reports.has_changed().unwrap());
    }

    #[tokio::test]
    async fn run_applies_what_sources_send() {
        let (index, snapshots) = index();
        let ready = index.synced();
        let (changes, received) = mpsc::channel(8);
        let running = tokio::spawn(index.run(received));
        changes.send(reviews()).await.unwrap();
        changes.send(Change::Synced).await.unwrap();
        drop(changes);
        running.await.unwrap();
        assert!(*ready.borrow());
        assert!(matches!(
            published(&snapshots, BY_NAME),
            Published::Known(..)
        ));
    }
}
