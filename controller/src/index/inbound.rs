//! Each pod's inbound side: per port of the pod, the AuthorizationPolicies of the Services that
//! reach it on that port, published under the pod's own key for its proxy.
//!
//! A Service reaches the pods its selector matches, on its ports' targetPorts, from the moment
//! the pod is seen: its EndpointSlices list the pod only once it has an address, and drop it for a
//! moment when they are rewritten, and a pod is reachable all the while. A targetPort that names
//! a container port is resolved by the slices (pods are watched by their metadata alone), as are
//! the endpoints of a Service without a selector.
//!
//! Only pods with a policy get a key: a pod whose Services no policy targets costs nothing, and
//! its proxy, told the key is unknown, allows every caller. The key of a meshed pod names its
//! ServiceAccount, whose proxies alone are sent it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use outrigger_api::destination::DestinationKey;
use outrigger_api::proto;

use super::Index;
use crate::distribute::Snapshot;
use crate::source::ObjectKey;

/// What was published for pods' inbound sides.
#[derive(Default)]
pub(super) struct Published {
    /// Per pod, the version of its inbound key.
    versions: HashMap<ObjectKey, String>,
    /// Per Service, the pods whose inbound side it contributed to.
    pods_of_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
}

impl Index {
    /// Brings up to date the inbound side of every pod of these Services, as they are now and as
    /// they were.
    pub(super) fn recompute_inbound(
        &mut self,
        services: &BTreeSet<ObjectKey>,
        changed_at: Instant,
    ) {
        let mut pods = BTreeSet::new();
        for service in services {
            if let Some(previous) = self.inbound.pods_of_service.remove(service) {
                pods.extend(previous);
            }
            if self.authorizations.target(service) {
                pods.extend(self.slices.pods_of_service(service));
                if let Some(state) = self.services.get(service) {
                    let selected = self
                        .pods
                        .selected(&service.namespace, |labels| state.selects(labels));
                    pods.extend(selected.cloned());
                }
            }
        }
        for pod in pods {
            self.publish_inbound(pod, changed_at);
        }
    }

    fn publish_inbound(&mut self, pod: ObjectKey, changed_at: Instant) {
        let key = DestinationKey::Inbound {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
        }
        .to_string();
        let (inbound, services) = self.inbound_of(&pod);
        for service in services {
            self.inbound
                .pods_of_service
                .entry(service)
                .or_default()
                .insert(pod.clone());
        }
        if inbound.ports.is_empty() {
            if self.inbound.versions.remove(&pod).is_some() {
                self.snapshots.remove(&key);
            }
            return;
        }
        let destination = proto::Destination {
            namespace: pod.namespace.clone(),
            inbound: Some(inbound),
            ..Default::default()
        };
        let snapshot = Snapshot::of_groups(destination, Vec::new(), changed_at);
        let Snapshot::Known { version, .. } = &snapshot else {
            unreachable!("Snapshot::of_groups is known")
        };
        if self.inbound.versions.get(&pod) == Some(version) {
            return;
        }
        self.inbound.versions.insert(pod, version.clone());
        self.snapshots.publish(&key, Arc::new(snapshot));
    }

    /// The Services some policy targets that select the pod by its labels.
    pub(super) fn services_selecting(&self, pod: &ObjectKey) -> BTreeSet<ObjectKey> {
        let Some(labels) = self.pods.labels_of(pod) else {
            return BTreeSet::new();
        };
        self.authorizations
            .targets()
            .filter(|service| service.namespace == pod.namespace)
            .filter(|service| {
                self.services
                    .get(service)
                    .is_some_and(|state| state.selects(labels))
            })
            .cloned()
            .collect()
    }

    /// The pod's inbound side, for the proxies of its ServiceAccount, and the Services with a
    /// policy that reach it.
    fn inbound_of(&self, pod: &ObjectKey) -> (proto::Inbound, BTreeSet<ObjectKey>) {
        // (Service, Service port, pod port): by the Service's selector, and by its slices (which
        // may list the pod more than once while they are rebalanced).
        let mut reaches = BTreeSet::new();
        for service in self.services_selecting(pod) {
            for port in self
                .services
                .get(&service)
                .into_iter()
                .flat_map(|s| &s.ports)
            {
                if let Some(target_port) = port.target_port {
                    reaches.insert((service.clone(), port.port, target_port));
                }
            }
        }
        for (slice, service) in self.slices.on_pod(pod) {
            let (Some(state), Some(slice)) = (self.services.get(service), self.slices.get(slice))
            else {
                continue;
            };
            for port in &state.ports {
                if let Some(&target_port) = slice.ports.get(&port.name) {
                    reaches.insert((service.clone(), port.port, target_port));
                }
            }
        }
        let mut ports: BTreeMap<u16, BTreeMap<String, proto::Authorization>> = BTreeMap::new();
        let mut services = BTreeSet::new();
        for (service, port, target_port) in reaches {
            for (key, authorization) in self.authorizations.targeting(&service) {
                services.insert(service.clone());
                let cut = authorization.for_port(key.to_string(), port);
                // Two Service ports to one pod port: a call there may have come by either.
                match ports.entry(target_port).or_default().entry(key.to_string()) {
                    std::collections::btree_map::Entry::Vacant(entry) => {
                        entry.insert(cut);
                    }
                    std::collections::btree_map::Entry::Occupied(mut entry) => {
                        entry.get_mut().rules.extend(cut.rules);
                    }
                }
            }
        }
        let ports = ports
            .into_iter()
            .map(|(port, authorizations)| proto::InboundPort {
                port: port.into(),
                authorizations: authorizations.into_values().collect(),
            })
            .collect();
        let service_account = self
            .pods
            .service_account_of(pod)
            .unwrap_or_default()
            .to_string();
        let inbound = proto::Inbound {
            ports,
            service_account,
        };
        (inbound, services)
    }
}
