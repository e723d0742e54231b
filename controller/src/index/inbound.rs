//! Each pod's inbound side: per port of the pod, the AuthorizationPolicies of the Services that
//! reach it on that port (a Service port's targetPort, as its EndpointSlices resolve it against
//! the pod), published under the pod's own key for its proxy.
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

    /// The pod's inbound side, for the proxies of its ServiceAccount, and the Services with a
    /// policy that reach it.
    fn inbound_of(&self, pod: &ObjectKey) -> (proto::Inbound, BTreeSet<ObjectKey>) {
        let mut ports: BTreeMap<u16, BTreeMap<String, proto::Authorization>> = BTreeMap::new();
        let mut services = BTreeSet::new();
        for (slice, service) in self.slices.on_pod(pod) {
            let (Some(state), Some(slice)) = (self.services.get(service), self.slices.get(slice))
            else {
                continue;
            };
            let mut policies = self.authorizations.targeting(service).peekable();
            if policies.peek().is_none() {
                continue;
            }
            services.insert(service.clone());
            for (key, authorization) in policies {
                for port in &state.ports {
                    let Some(&target_port) = slice.ports.get(&port.name) else {
                        continue;
                    };
                    let cut = authorization.for_port(key.to_string(), port.port);
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
