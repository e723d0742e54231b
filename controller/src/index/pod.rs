//! Pods, by their labels only: they put endpoints into a policy's subsets.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Pod;

use crate::source::ObjectKey;
use crate::translate::Translated;

/// Every pod's labels, by namespaced name.
#[derive(Default)]
pub(super) struct Pods(HashMap<ObjectKey, BTreeMap<String, String>>);

impl Pods {
    /// Whether the pod is known with these labels already: pods change often (status) and matter
    /// only by their labels.
    pub(super) fn unchanged(&self, key: &ObjectKey, pod: &Pod) -> bool {
        self.0.get(key) == Some(pod.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
    }

    pub(super) fn insert(&mut self, key: ObjectKey, pod: Pod) {
        self.0.insert(key, pod.metadata.labels.unwrap_or_default());
    }

    /// Whether there was one.
    pub(super) fn remove(&mut self, key: &ObjectKey) -> bool {
        self.0.remove(key).is_some()
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
            .unwrap_or(&no_labels);
        translated
            .subsets
            .iter()
            .filter(|(_, selector)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(name, _)| name.clone())
            .collect()
    }
}
