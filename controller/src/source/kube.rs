//! The Kubernetes API as the source of cluster state: watches of Services, EndpointSlices, Pods
//! (metadata only: the index needs their labels) and DestinationPolicies, turned into the same
//! [`Change`]s the manifests source sends.
//!
//! kube-runtime's watcher lists each kind, then watches it from the list's resourceVersion; when a
//! watch breaks (an API server restart) it resumes from the last version seen, or lists again when
//! that version is too old, with client-go's backoff between failures. Objects a new list no
//! longer holds were deleted meanwhile and are sent as such. Until every kind has been listed once,
//! changes are held back, then sent in the order the index computes best followed by `Synced`, so
//! that no proxy is ever sent a partial view.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::path::Path;
use std::pin::Pin;

use anyhow::Context as _;
use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Config, Resource};
use outrigger_api::policy::DestinationPolicy;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::StreamMap;

use crate::metrics::Metrics;
use crate::source::{Change, Kind, Object, ObjectKey, ObjectRef};

const KINDS: [Kind; 4] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
    Kind::DestinationPolicy,
];

/// A client for the API server of `--kubeconfig`, else the one inferred as kubectl would (the
/// KUBECONFIG variable or ~/.kube/config), else the cluster this runs in.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading the kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "finding the Kubernetes API: not in a cluster and no kubeconfig \
             (give --kubeconfig PATH, or --manifests DIR to run without a cluster)",
        )?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

/// An API error as people read it: the server's message (which names the resource and, when
/// forbidden, the user and verb) rather than the client's debug dump.
pub fn explain(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.is_forbidden() => format!(
            "{} (the controller's RBAC lacks a permission the Outrigger chart grants)",
            status.message
        ),
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => {
            let mut message = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            message
        }
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<Event<Object>, watcher::Error>> + Send>>;

/// Watches the four kinds and sends what changes to the index, until the index is gone.
pub async fn run(client: Client, changes: mpsc::Sender<Change>, metrics: Metrics) {
    let mut events = StreamMap::new();
    events.insert(
        Kind::Service,
        watch_kind(Api::<Service>::all(client.clone()), |o| {
            Object::Service(Box::new(o))
        }),
    );
    events.insert(
        Kind::EndpointSlice,
        watch_kind(Api::<EndpointSlice>::all(client.clone()), |o| {
            Object::EndpointSlice(Box::new(o))
        }),
    );
    events.insert(
        Kind::Pod,
        watch_kind(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            pod_labels,
        ),
    );
    events.insert(
        Kind::DestinationPolicy,
        watch_kind(Api::<DestinationPolicy>::all(client), |o| {
            Object::DestinationPolicy(Box::new(o))
        }),
    );
    let mut mirror = Mirror::new();
    while let Some((kind, event)) = events.next().await {
        let event = match event {
            Ok(event) => event,
            // The watch resumed from a version the API server no longer has: the watcher lists
            // again, as it should.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::info!(
                    "{} changed while the watch was down; listing them again",
                    plural(kind)
                );
                continue;
            }
            Err(error) => {
                metrics.reconcile_errors.inc();
                tracing::error!("{}; retrying with backoff", describe(kind, &error));
                continue;
            }
        };
        for change in mirror.apply(kind, event) {
            if changes.send(change).await.is_err() {
                return; // The controller stopped.
            }
        }
    }
}

fn watch_kind<K>(api: Api<K>, into: fn(K) -> Object) -> Events
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    Box::pin(
        watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |event| event.map(|event| map_event(event, into))),
    )
}

fn map_event<K>(event: Event<K>, into: fn(K) -> Object) -> Event<Object> {
    match event {
        Event::Apply(object) => Event::Apply(into(object)),
        Event::Delete(object) => Event::Delete(into(object)),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(into(object)),
        Event::InitDone => Event::InitDone,
    }
}

/// Only what the index reads of a Pod.
fn pod_labels(pod: PartialObjectMeta<Pod>) -> Object {
    Object::Pod(Box::new(Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name,
            namespace: pod.metadata.namespace,
            labels: pod.metadata.labels,
            ..Default::default()
        },
        ..Default::default()
    }))
}

/// The kind a change is about; none for `Synced`.
fn kind_of(change: &Change) -> Option<Kind> {
    match change {
        Change::Applied(object) => Some(object.kind()),
        Change::Deleted(reference) => Some(reference.kind),
        Change::Synced => None,
    }
}

fn describe(kind: Kind, error: &watcher::Error) -> String {
    let (doing, cause) = match error {
        watcher::Error::InitialListFailed(cause) => ("listing", explain(cause)),
        watcher::Error::WatchStartFailed(cause) => ("watching", explain(cause)),
        watcher::Error::WatchFailed(cause) => ("watching", explain(cause)),
        watcher::Error::WatchError(status) => ("watching", status.message.clone()),
        watcher::Error::NoResourceVersion => ("listing", error.to_string()),
    };
    let missing_crd = kind == Kind::DestinationPolicy
        && matches!(error, watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.is_not_found());
    let hint = if missing_crd {
        " (is the DestinationPolicy CRD installed? kubectl apply -f crds/)"
    } else {
        ""
    };
    format!("{doing} {} failed: {cause}{hint}", plural(kind))
}

fn plural(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "Services",
        Kind::EndpointSlice => "EndpointSlices",
        Kind::Pod => "Pods",
        Kind::DestinationPolicy => "DestinationPolicies",
    }
}

/// What the index was told of each kind, to turn watch events into changes.
struct Mirror {
    /// Changes not sent yet, until every kind has been listed once.
    held: Option<Vec<Change>>,
    /// Per kind, the objects the index holds.
    present: HashMap<Kind, HashSet<ObjectKey>>,
    /// Per kind, the objects of a list in progress.
    listing: HashMap<Kind, Vec<Object>>,
    listed: HashSet<Kind>,
    /// The uid and generation of each policy sent: a change that leaves them alone changed only
    /// status or metadata, such as the controller's own status writes.
    policy_generations: HashMap<ObjectKey, (Option<String>, Option<i64>)>,
}

impl Mirror {
    fn new() -> Self {
        Self {
            held: Some(Vec::new()),
            present: HashMap::new(),
            listing: HashMap::new(),
            listed: HashSet::new(),
            policy_generations: HashMap::new(),
        }
    }

    /// The changes to send for an event.
    fn apply(&mut self, kind: Kind, event: Event<Object>) -> Vec<Change> {
        let mut changes = self.changes(kind, event);
        let Some(held) = &mut self.held else {
            return changes;
        };
        held.append(&mut changes);
        if !KINDS.iter().all(|kind| self.listed.contains(kind)) {
            return Vec::new();
        }
        tracing::info!("listed Services, EndpointSlices, Pods and DestinationPolicies");
        let mut changes = self.held.take().expect("held until now");
        // Stable, so that the changes of one object keep their order.
        changes.sort_by_key(|change| Reverse(kind_of(change)));
        changes.push(Change::Synced);
        changes
    }

    fn changes(&mut self, kind: Kind, event: Event<Object>) -> Vec<Change> {
        match event {
            Event::Init => {
                self.listing.insert(kind, Vec::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                self.listing.entry(kind).or_default().push(object);
                Vec::new()
            }
            Event::InitDone => {
                self.listed.insert(kind);
                let objects = self.listing.remove(&kind).unwrap_or_default();
                let listed: HashSet<ObjectKey> = objects
                    .iter()
                    .filter_map(|object| Some(object.reference()?.key))
                    .collect();
                let vanished: Vec<ObjectKey> = self
                    .present
                    .get(&kind)
                    .into_iter()
                    .flatten()
                    .filter(|key| !listed.contains(key))
                    .cloned()
                    .collect();
                let mut changes: Vec<Change> = vanished
                    .into_iter()
                    .filter_map(|key| self.deleted(ObjectRef { kind, key }))
                    .collect();
                changes.extend(
                    objects
                        .into_iter()
                        .filter_map(|object| self.applied(object)),
                );
                changes
            }
            Event::Apply(object) => self.applied(object).into_iter().collect(),
            Event::Delete(object) => object
                .reference()
                .and_then(|reference| self.deleted(reference))
                .into_iter()
                .collect(),
        }
    }

    fn applied(&mut self, object: Object) -> Option<Change> {
        let reference = object.reference()?;
        if let Object::DestinationPolicy(policy) = &object {
            let generation = (policy.metadata.uid.clone(), policy.metadata.generation);
            if self.policy_generations.get(&reference.key) == Some(&generation) {
                return None;
            }
            self.policy_generations
                .insert(reference.key.clone(), generation);
        }
        self.present
            .entry(reference.kind)
            .or_default()
            .insert(reference.key);
        Some(Change::Applied(object))
    }

    fn deleted(&mut self, reference: ObjectRef) -> Option<Change> {
        let present = self.present.get_mut(&reference.kind)?;
        if !present.remove(&reference.key) {
            return None;
        }
        if reference.kind == Kind::DestinationPolicy {
            self.policy_generations.remove(&reference.key);
        }
        Some(Change::Deleted(reference))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(name: &str) -> Object {
        Object::Service(Box::new(
            serde_json::from_value(json!({"metadata": {"namespace": "shop", "name": name}}))
                .unwrap(),
        ))
    }

    fn policy(uid: &str, generation: i64, timeout: &str) -> Object {
        Object::DestinationPolicy(Box::new(
            serde_json::from_value(json!({
                "apiVersion": "outrigger.dev/v1alpha1",
                "kind": "DestinationPolicy",
                "metadata": {"namespace": "shop", "name": "reviews", "uid": uid, "generation": generation},
                "spec": {"host": "reviews", "timeout": timeout},
            }))
            .unwrap(),
        ))
    }

    /// A mirror past its first full list, of nothing.
    fn synced() -> Mirror {
        let mut mirror = Mirror::new();
        for kind in KINDS {
            mirror.apply(kind, Event::Init);
            mirror.apply(kind, Event::InitDone);
        }
        mirror
    }

    /// (Applied|Deleted, kind, name) of each change; `Synced` as ("Synced", None, "").
    fn summary(changes: &[Change]) -> Vec<(&'static str, Option<Kind>, String)> {
        changes
            .iter()
            .map(|change| match change {
                Change::Applied(object) => (
                    "Applied",
                    Some(object.kind()),
                    object.reference().unwrap().key.name,
                ),
                Change::Deleted(reference) => {
                    ("Deleted", Some(reference.kind), reference.key.name.clone())
                }
                Change::Synced => ("Synced", None, String::new()),
            })
            .collect()
    }

    #[test]
    fn the_first_lists_are_held_then_sent_services_last_and_synced() {
        let mut mirror = Mirror::new();
        for kind in [Kind::Service, Kind::Pod, Kind::EndpointSlice] {
            assert!(mirror.apply(kind, Event::Init).is_empty());
        }
        assert!(
            mirror
                .apply(Kind::Service, Event::InitApply(service("reviews")))
                .is_empty()
        );
        assert!(mirror.apply(Kind::Service, Event::InitDone).is_empty());
        // A listed kind is watched while the others are still listing.
        assert!(
            mirror
                .apply(Kind::Service, Event::Apply(service("ratings")))
                .is_empty()
        );
        assert!(mirror.apply(Kind::Pod, Event::InitDone).is_empty());
        assert!(
            mirror
                .apply(Kind::EndpointSlice, Event::InitDone)
                .is_empty()
        );
        assert!(
            mirror
                .apply(Kind::DestinationPolicy, Event::Init)
                .is_empty()
        );
        assert!(
            mirror
                .apply(
                    Kind::DestinationPolicy,
                    Event::InitApply(policy("u1", 1, "1s"))
                )
                .is_empty()
        );
        let sent = mirror.apply(Kind::DestinationPolicy, Event::InitDone);
        assert_eq!(
            summary(&sent),
            [
                ("Applied", Some(Kind::DestinationPolicy), "reviews".into()),
                ("Applied", Some(Kind::Service), "reviews".into()),
                ("Applied", Some(Kind::Service), "ratings".into()),
                ("Synced", None, String::new()),
            ]
        );
        // From now on, each change goes at once.
        assert_eq!(
            summary(&mirror.apply(Kind::Service, Event::Delete(service("ratings")))),
            [("Deleted", Some(Kind::Service), "ratings".into())]
        );
    }

    #[test]
    fn a_new_list_deletes_what_vanished_meanwhile() {
        let mut mirror = synced();
        for name in ["a", "b"] {
            mirror.apply(Kind::Service, Event::Apply(service(name)));
        }
        // The watch broke and its version expired: the watcher lists again.
        mirror.apply(Kind::Service, Event::Init);
        mirror.apply(Kind::Service, Event::InitApply(service("a")));
        mirror.apply(Kind::Service, Event::InitApply(service("c")));
        assert_eq!(
            summary(&mirror.apply(Kind::Service, Event::InitDone)),
            [
                ("Deleted", Some(Kind::Service), "b".into()),
                ("Applied", Some(Kind::Service), "a".into()),
                ("Applied", Some(Kind::Service), "c".into()),
            ]
        );
        // Deleting what the index does not have sends nothing.
        assert!(
            mirror
                .apply(Kind::Service, Event::Delete(service("b")))
                .is_empty()
        );
    }

    #[test]
    fn a_policy_change_that_leaves_its_generation_alone_is_not_sent() {
        let mut mirror = synced();
        assert_eq!(
            mirror
                .apply(Kind::DestinationPolicy, Event::Apply(policy("u1", 1, "1s")))
                .len(),
            1
        );
        // Its status written: same uid and generation.
        assert!(
            mirror
                .apply(Kind::DestinationPolicy, Event::Apply(policy("u1", 1, "1s")))
                .is_empty()
        );
        assert_eq!(
            mirror
                .apply(Kind::DestinationPolicy, Event::Apply(policy("u1", 2, "2s")))
                .len(),
            1
        );
        // Deleted and created again under its name, unseen: a new uid.
        assert_eq!(
            mirror
                .apply(Kind::DestinationPolicy, Event::Apply(policy("u2", 2, "3s")))
                .len(),
            1
        );
        assert_eq!(
            mirror
                .apply(
                    Kind::DestinationPolicy,
                    Event::Delete(policy("u2", 2, "3s"))
                )
                .len(),
            1
        );
        assert_eq!(
            mirror
                .apply(Kind::DestinationPolicy, Event::Apply(policy("u3", 1, "1s")))
                .len(),
            1
        );
    }

    #[test]
    fn pods_keep_only_what_the_index_reads() {
        let pod: PartialObjectMeta<Pod> = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": {
                "namespace": "shop", "name": "reviews-1", "labels": {"version": "v1"},
                "annotations": {"big": "x".repeat(1000)}, "uid": "u",
            },
        }))
        .unwrap();
        let Object::Pod(pod) = pod_labels(pod) else {
            unreachable!("pod_labels makes Pods")
        };
        assert_eq!(
            serde_json::to_value(&pod.metadata).unwrap(),
            json!({"namespace": "shop", "name": "reviews-1", "labels": {"version": "v1"}})
        );
        assert!(pod.spec.is_none() && pod.status.is_none());
    }

    #[test]
    fn errors_say_what_failed_and_what_to_check() {
        let forbidden = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            message: "endpointslices.discovery.k8s.io is forbidden: User \"x\" cannot list".into(),
            reason: "Forbidden".into(),
            ..Default::default()
        }));
        assert_eq!(
            describe(
                Kind::EndpointSlice,
                &watcher::Error::InitialListFailed(forbidden)
            ),
            "listing EndpointSlices failed: endpointslices.discovery.k8s.io is forbidden: \
             User \"x\" cannot list (the controller's RBAC lacks a permission the Outrigger \
             chart grants)"
        );
        let missing = kube::Error::Api(Box::new(kube::core::Status {
            code: 404,
            message: "the server could not find the requested resource".into(),
            reason: "NotFound".into(),
            ..Default::default()
        }));
        assert!(
            describe(
                Kind::DestinationPolicy,
                &watcher::Error::InitialListFailed(missing)
            )
            .ends_with("(is the DestinationPolicy CRD installed? kubectl apply -f crds/)")
        );
    }
}
