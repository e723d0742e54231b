//! DestinationPolicies: each translated once when it changes, and the one in force for each
//! Service.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use outrigger_api::destination::DestinationKey;
use outrigger_api::policy::{DestinationPolicy, DestinationPolicySpec, DestinationPolicyStatus};

use crate::metrics::Metrics;
use crate::source::ObjectKey;
use crate::translate::{PolicyError, Translated, translate};

pub(super) struct PolicyState {
    pub(super) uid: Option<String>,
    pub(super) host: String,
    /// The Service its host names, when the host names one in the policy's namespace.
    pub(super) service: Option<ObjectKey>,
    created: Option<Time>,
    pub(super) generation: i64,
    /// An invalid policy is not in force; the error is kept for status.
    pub(super) translated: Result<Arc<Translated>, PolicyError>,
    pub(super) split: String,
    pub(super) status: Option<DestinationPolicyStatus>,
}

/// The policy in force for a Service, with its name and translation.
pub(super) type InForce<'a> = (&'a ObjectKey, &'a PolicyState, &'a Translated);

/// Every DestinationPolicy, and the policies naming each Service.
#[derive(Default)]
pub(super) struct Policies {
    policies: HashMap<ObjectKey, PolicyState>,
    by_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
}

impl Policies {
    pub(super) fn get(&self, key: &ObjectKey) -> Option<&PolicyState> {
        self.policies.get(key)
    }

    /// The policies naming a Service.
    pub(super) fn of_service<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a ObjectKey> + 'a {
        self.by_service.get(service).into_iter().flatten()
    }

    /// The policy in force for a Service: of the valid ones naming it, the oldest (then by name),
    /// as Istio resolves competing DestinationRules.
    pub(super) fn in_force(&self, service: &ObjectKey) -> Option<InForce<'_>> {
        self.of_service(service)
            .filter_map(|key| {
                let state = self.policies.get(key)?;
                let translated = state.translated.as_ref().ok()?;
                Some((key, state, translated.as_ref()))
            })
            .min_by(|(a_key, a, _), (b_key, b, _)| (&a.created, *a_key).cmp(&(&b.created, *b_key)))
    }

    /// Records a policy, translated; returns the Service it names.
    pub(super) fn insert(
        &mut self,
        key: ObjectKey,
        policy: &DestinationPolicy,
        metrics: &Metrics,
    ) -> Option<ObjectKey> {
        let state = PolicyState::new(&key, policy, metrics);
        let service = state.service.clone();
        self.policies.insert(key.clone(), state);
        let service = service?;
        self.by_service
            .entry(service.clone())
            .or_default()
            .insert(key);
        Some(service)
    }

    /// Forgets a policy; returns the Service it named.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<ObjectKey> {
        let service = self.policies.remove(key)?.service?;
        super::remove_from(&mut self.by_service, &service, key);
        Some(service)
    }
}

impl PolicyState {
    fn new(key: &ObjectKey, policy: &DestinationPolicy, metrics: &Metrics) -> Self {
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
            metrics.reconcile_errors.inc();
            tracing::warn!(policy = %key, %error, "DestinationPolicy is invalid and not in force");
        }
        Self {
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
