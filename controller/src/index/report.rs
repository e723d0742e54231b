//! Reports: what the index knows of each DestinationPolicy that its status needs.

use std::collections::{BTreeMap, BTreeSet};

use outrigger_api::policy::DestinationPolicyStatus;

use super::Index;
use super::policy::PolicyState;
use super::route::RoutedBy;
use crate::source::ObjectKey;
use crate::translate::Translated;

/// Why a condition is False: a CamelCase reason and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    pub(crate) fn new(reason: &'static str, message: impl Into<String>) -> Self {
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
    /// The routes attached to its Service, which serve the calls to it from their callers.
    pub routed_by: Vec<RoutedBy>,
    /// The status the object carried when the index last read its spec.
    pub status: Option<DestinationPolicyStatus>,
}

/// Every DestinationPolicy the index knows, by namespaced name.
pub type PolicyReports = BTreeMap<ObjectKey, PolicyReport>;

impl Index {
    /// Brings the reports of these policies up to date.
    pub(super) fn report(&self, policies: BTreeSet<ObjectKey>) {
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
            let (governing, ..) = self.policies.in_force(service)?;
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
            Some(service) if !self.services.contains(service) => Err(Problem::new(
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
            routed_by: state
                .service
                .as_ref()
                .map(|service| self.routes.serving(service, &self.services))
                .unwrap_or_default(),
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
            .slices
            .of_service(service)
            .flat_map(|(_, slice)| &slice.endpoints);
        for endpoint in endpoints {
            let subsets =
                self.pods
                    .subsets_of(&service.namespace, endpoint.pod.as_deref(), translated);
            unserved.retain(|name| !subsets.iter().any(|subset| subset == name));
            if unserved.is_empty() {
                break;
            }
        }
        unserved.into_iter().map(String::from).collect()
    }
}
