//! AuthorizationPolicies: each translated once when it changes, and the valid ones targeting
//! each Service.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use outrigger_api::authz::{AuthorizationPolicy, AuthorizationPolicyStatus};

use super::{Index, Problem};
use crate::metrics::Metrics;
use crate::source::ObjectKey;
use crate::translate::{Authorization, PolicyError, translate_authorization};

pub(super) struct AuthorizationState {
    pub(super) uid: Option<String>,
    pub(super) generation: i64,
    /// The Services it names, whether it is valid or not (for ResolvedRefs).
    pub(super) targets: BTreeSet<ObjectKey>,
    /// An invalid policy is not in force; the error is kept for status.
    pub(super) translated: Result<Arc<Authorization>, PolicyError>,
    /// The status the object carried when its spec was last read.
    pub(super) status: Option<AuthorizationPolicyStatus>,
}

/// What status needs of one AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationReport {
    /// Tells a policy from one deleted and created again under its name.
    pub uid: Option<String>,
    pub generation: i64,
    /// Err when it is invalid, and so not in force.
    pub accepted: Result<(), Problem>,
    /// Err when a Service it targets does not exist.
    pub resolved_refs: Result<(), Problem>,
    /// The status the object carried when the index last read its spec.
    pub status: Option<AuthorizationPolicyStatus>,
}

/// Every AuthorizationPolicy the index knows, by namespaced name.
pub type AuthorizationReports = BTreeMap<ObjectKey, AuthorizationReport>;

/// Every AuthorizationPolicy, and the policies targeting each Service.
#[derive(Default)]
pub(super) struct Authorizations {
    policies: HashMap<ObjectKey, AuthorizationState>,
    by_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
}

impl Authorizations {
    /// The policies, valid or not, that target a Service.
    pub(super) fn of_service<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a ObjectKey> + 'a {
        self.by_service.get(service).into_iter().flatten()
    }

    /// The valid policies targeting a Service, by name.
    pub(super) fn targeting<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a Authorization)> + 'a {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key, self.policies.get(key)?.translated.as_deref().ok()?)))
    }

    /// The Services some policy, valid or not, targets.
    pub(super) fn targets(&self) -> impl Iterator<Item = &ObjectKey> {
        self.by_service.keys()
    }

    /// Whether some policy, valid or not, targets the Service.
    pub(super) fn target(&self, service: &ObjectKey) -> bool {
        self.by_service.contains_key(service)
    }

    /// Records a policy, translated; returns the Services it targets.
    pub(super) fn insert(
        &mut self,
        key: ObjectKey,
        policy: &AuthorizationPolicy,
        metrics: &Metrics,
    ) -> BTreeSet<ObjectKey> {
        let translated = translate_authorization(&policy.spec).map(Arc::new);
        if let Err(error) = &translated {
            metrics.reconcile_errors.inc();
            tracing::warn!(policy = %key, %error, "AuthorizationPolicy is invalid and not in force");
        }
        // A policy targets Services of its own namespace, as its RBAC allows.
        let targets: BTreeSet<ObjectKey> = policy
            .spec
            .target_refs
            .iter()
            .map(|target| ObjectKey::new(key.namespace.clone(), target.name.clone()))
            .collect();
        for service in &targets {
            self.by_service
                .entry(service.clone())
                .or_default()
                .insert(key.clone());
        }
        let state = AuthorizationState {
            uid: policy.metadata.uid.clone(),
            generation: policy.metadata.generation.unwrap_or_default(),
            targets: targets.clone(),
            translated,
            status: policy.status.clone(),
        };
        self.policies.insert(key, state);
        targets
    }

    /// Forgets a policy; returns the Services it targeted.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> BTreeSet<ObjectKey> {
        let Some(state) = self.policies.remove(key) else {
            return BTreeSet::new();
        };
        for service in &state.targets {
            super::remove_from(&mut self.by_service, service, key);
        }
        state.targets
    }
}

impl Index {
    /// Brings the reports of these AuthorizationPolicies up to date.
    pub(super) fn report_authorizations(&self, policies: BTreeSet<ObjectKey>) {
        self.authorization_reports.send_if_modified(|reports| {
            let mut modified = false;
            for key in policies {
                match self.authorizations.policies.get(&key) {
                    Some(state) => {
                        let report = self.authorization_report(state);
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

    fn authorization_report(&self, state: &AuthorizationState) -> AuthorizationReport {
        let missing: Vec<String> = state
            .targets
            .iter()
            .filter(|service| !self.services.contains(service))
            .map(ToString::to_string)
            .collect();
        AuthorizationReport {
            uid: state.uid.clone(),
            generation: state.generation,
            accepted: match &state.translated {
                Ok(_) => Ok(()),
                Err(error) => Err(Problem::new("Invalid", error.to_string())),
            },
            resolved_refs: if missing.is_empty() {
                Ok(())
            } else {
                Err(Problem::new(
                    "ServiceNotFound",
                    format!("Service {} does not exist", missing.join(", ")),
                ))
            },
            status: state.status.clone(),
        }
    }
}
