//! Endpoint groups: per Service, one group per EndpointSlice and Service port, built once and
//! kept until what it is made of changes, so that a change to one slice of a Service with
//! thousands of endpoints translates that slice's endpoints only, and the other groups keep their
//! versions (and their encoding, shared).
//!
//! A group is made of its slice, the labels of that slice's pods, the slices named before it (an
//! address listed twice belongs to the first), and the Service's ports and policy subsets. The
//! first three are per slice: what changes them says which slices it touched, and their groups
//! are dropped ([`Groups::forget`]). The last is the Service's [`Basis`], compared on each
//! recompute: when it differs, every group of the Service is built anew.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use outrigger_api::proto;

use super::pod::Pods;
use super::service::ServiceState;
use super::slice::{SliceState, Slices};
use crate::distribute::EndpointSet;
use crate::source::ObjectKey;
use crate::translate::Translated;

/// The endpoint groups of every Service as last built.
#[derive(Default)]
pub(super) struct Groups {
    services: HashMap<ObjectKey, ServiceGroups>,
    /// Slices whose groups were built (their endpoints translated), for tests of what a change
    /// costs.
    #[cfg(test)]
    pub(super) slices_built: usize,
}

struct ServiceGroups {
    basis: Basis,
    /// Per slice, its group for each port of the Service, in the order of the ports (None where
    /// it has no endpoint on that port).
    slices: HashMap<ObjectKey, Vec<Option<Arc<EndpointSet>>>>,
}

/// What every group of a Service depends on.
#[derive(PartialEq)]
struct Basis {
    /// Each Service port's name (which slice ports match it) and whether it speaks h2c.
    ports: Vec<(String, bool)>,
    /// The subsets of the policy in force, if any.
    subsets: Option<Vec<(String, BTreeMap<String, String>)>>,
}

/// What a Service's groups are built from.
pub(super) struct Inputs<'a> {
    pub(super) service: &'a ObjectKey,
    pub(super) state: &'a ServiceState,
    pub(super) slices: &'a Slices,
    pub(super) pods: &'a Pods,
    pub(super) policy: Option<&'a Translated>,
    /// Of the identities meshed endpoints present.
    pub(super) trust_domain: &'a str,
}

impl Groups {
    /// Drops the groups of these slices of `service`: they are built anew when next needed.
    pub(super) fn forget<'a>(
        &mut self,
        service: &ObjectKey,
        slices: impl IntoIterator<Item = &'a ObjectKey>,
    ) {
        if let Some(groups) = self.services.get_mut(service) {
            for slice in slices {
                groups.slices.remove(slice);
            }
        }
    }

    /// The Service is gone.
    pub(super) fn remove(&mut self, service: &ObjectKey) {
        self.services.remove(service);
    }

    /// For each port of the Service, in order, its groups in the order of their slices' names,
    /// those without endpoints left out; built where not kept.
    pub(super) fn of_service(&mut self, inputs: &Inputs<'_>) -> Vec<Vec<Arc<EndpointSet>>> {
        let basis = Basis {
            ports: inputs
                .state
                .ports
                .iter()
                .map(|port| (port.name.clone(), port.h2c))
                .collect(),
            subsets: inputs.policy.map(|translated| translated.subsets.clone()),
        };
        let groups = match self.services.entry(inputs.service.clone()) {
            Entry::Occupied(kept) if kept.get().basis == basis => kept.into_mut(),
            entry => entry
                .insert_entry(ServiceGroups {
                    basis,
                    slices: HashMap::new(),
                })
                .into_mut(),
        };
        let mut by_port = vec![Vec::new(); inputs.state.ports.len()];
        for (key, slice) in inputs.slices.of_service(inputs.service) {
            let slice_groups = groups.slices.entry(key.clone()).or_insert_with(|| {
                #[cfg(test)]
                {
                    self.slices_built += 1;
                }
                build(inputs, key, slice)
            });
            for (port, group) in by_port.iter_mut().zip(slice_groups.iter()) {
                port.extend(group.clone());
            }
        }
        by_port
    }
}

/// The groups of one slice, one per port of the Service.
fn build(
    inputs: &Inputs<'_>,
    key: &ObjectKey,
    slice: &SliceState,
) -> Vec<Option<Arc<EndpointSet>>> {
    let namespace = &inputs.service.namespace;
    inputs
        .state
        .ports
        .iter()
        .map(|port| {
            let &target_port = slice.ports.get(&port.name)?;
            let mut seen = HashSet::new();
            let endpoints: Vec<proto::Endpoint> = slice
                .endpoints
                .iter()
                // The same endpoint may sit in two slices while they are rebalanced: it is
                // served from the first.
                .filter(|endpoint| seen.insert(endpoint.ip))
                .filter(|endpoint| {
                    !inputs.slices.listed_before(
                        inputs.service,
                        key,
                        endpoint.ip,
                        &port.name,
                        target_port,
                    )
                })
                .map(|endpoint| proto::Endpoint {
                    address: SocketAddr::new(endpoint.ip, target_port).to_string(),
                    subsets: inputs
                        .policy
                        .map(|translated| {
                            inputs
                                .pods
                                .subsets_of(namespace, endpoint.pod.as_deref(), translated)
                        })
                        .unwrap_or_default(),
                    pod: endpoint.pod.clone().unwrap_or_default(),
                    h2c: port.h2c,
                    identity: inputs
                        .pods
                        .identity_of(namespace, endpoint.pod.as_deref(), inputs.trust_domain)
                        .map(|id| id.to_string())
                        .unwrap_or_default(),
                })
                .collect();
            (!endpoints.is_empty()).then(|| Arc::new(EndpointSet::new(key.name.clone(), endpoints)))
        })
        .collect()
}
