//! Pods, by what endpoints need of them: their labels (which put endpoints into a policy's
//! subsets) and, for a meshed pod, the identity its proxy presents (whose proxies alone may read
//! its inbound side).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Pod;
use outrigger_api::identity::SpiffeId;

use crate::inject::patch::IDENTITY_ANNOTATION;
use crate::source::ObjectKey;
use crate::translate::Translated;

#[derive(Debug, PartialEq)]
struct PodState {
    labels: BTreeMap<String, String>,
    /// The ServiceAccount of a meshed pod.
    service_account: Option<String>,
}

impl PodState {
    fn of(pod: &Pod) -> Self {
        Self {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(IDENTITY_ANNOTATION))
                .filter(|account| !account.is_empty())
                .cloned(),
        }
    }
}

/// Every pod, by namespaced name.
#[derive(Default)]
pub(super) struct Pods(HashMap<ObjectKey, PodState>);

impl Pods {
    /// Whether the pod is known as it is already: pods change often (status) and matter only by
    /// their labels and identity.
    pub(super) fn unchanged(&self, key: &ObjectKey, pod: &Pod) -> bool {
        self.0.get(key) == Some(&PodState::of(pod))
    }

    pub(super) fn insert(&mut self, key: ObjectKey, pod: Pod) {
        self.0.insert(key, PodState::of(&pod));
    }

    /// Whether there was one.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> bool {
        self.0.remove(key).is_some()
    }

    /// The identity of a meshed pod, in `trust_domain`; none for a pod not meshed or not seen yet.
    pub(super) fn identity_of(
        &self,
        namespace: &str,
        pod: Option<&str>,
        trust_domain: &str,
    ) -> Option<SpiffeId> {
        let state = self.0.get(&ObjectKey::new(namespace, pod?))?;
        Some(SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: state.service_account.clone()?,
        })
    }

    /// The ServiceAccount of a meshed pod, as the injector annotated it from the pod's own
    /// (Pods are watched by their metadata alone); none for a pod not meshed or not seen yet.
    pub(super) fn service_account_of(&self, pod: &ObjectKey) -> Option<&str> {
        self.0.get(pod)?.service_account.as_deref()
    }

    /// The labels of a pod seen.
    pub(super) fn labels_of(&self, pod: &ObjectKey) -> Option<&BTreeMap<String, String>> {
        Some(&self.0.get(pod)?.labels)
    }

    /// The pods of `namespace` whose labels `selects`.
    pub(super) fn selected<'a>(
        &'a self,
        namespace: &'a str,
        selects: impl Fn(&BTreeMap<String, String>) -> bool + 'a,
    ) -> impl Iterator<Item = &'a ObjectKey> + 'a {
        self.0
            .iter()
            .filter(move |(key, state)| key.namespace == namespace && selects(&state.labels))
            .map(|(key, _)| key)
    }

    /// The policy's subsets whose labels the pod carries; a pod not seen yet carries none.
    pub(super) fn subsets_of(
        &self,
        namespace: &str,
        pod: Option<&str>,
        translated: &Translated,
    ) -> Vec<String> {
        let no_labels = BTreeMap::new();
        let labels = pod
            .and_then(|pod| self.0.get(&ObjectKey::new(namespace, pod)))
            .map_or(&no_labels, |state| &state.labels);
        translated
            .subsets
            .iter()
            .filter(|(_, selector)| carries(labels, selector))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// Whether `labels` include every label of `selector`.
pub(super) fn carries(
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
