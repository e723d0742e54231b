//! The Kubernetes API as the source of cluster state: a watch of every kind in `kinds` (Pods as
//! metadata only: the index needs their labels), turned into the same [`Change`]s the manifests
//! source sends.
//!
//! kube-runtime's watcher lists each kind, then watches it from the list's resourceVersion; when a
//! watch breaks (an API server restart) it resumes from the last version seen, or lists again when
//! that version is too old, with client-go's backoff between failures. Objects a new list no
//! longer holds were deleted meanwhile and are sent as such. Until every kind has been listed once,
//! changes are held back, then sent in the order the index computes best followed by `Synced`, so
//! that no proxy is ever sent a partial view.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

use futures_util::StreamExt as _;
use kube::Client;
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc;
use tokio_stream::StreamMap;

use crate::kube_api::explain;
use crate::metrics::Metrics;
use crate::source::{Change, Kind, Object, ObjectKey, ObjectRef};

/// Watches every kind and sends what changes to the index, until the index is gone.
pub async fn run(client: Client, changes: mpsc::Sender<Change>, metrics: Metrics) {
    let mut events = StreamMap::new();
    for kind in Kind::ALL {
        events.insert(kind, kind.watch(client.clone()));
    }
    let mut mirror = Mirror::new();
    // Optional kinds found missing, and said so once.
    let mut absent = HashSet::new();
    while let Some((kind, event)) = events.next().await {
        let event = match event {
            Ok(event) => {
                if absent.remove(&kind) {
                    tracing::info!("the {} CRD is installed now: serving them", kind.plural());
                }
                event
            }
            // None of an optional kind while its CRD is not installed: an empty list, so that
            // the first sync does not wait for it; the watcher keeps trying, and lists them
            // once the CRD is there.
            Err(error) if kind.is_optional() && is_not_installed(&error) => {
                if absent.insert(kind) {
                    tracing::info!(
                        "no {} CRD installed; none are served until it is",
                        kind.plural()
                    );
                    for event in [Event::Init, Event::InitDone] {
                        for change in mirror.apply(kind, event) {
                            if changes.send(change).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                continue;
            }
            // The watch resumed from a version the API server no longer has: the watcher lists
            // again, as it should.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::info!(
                    "{} changed while the watch was down; listing them again",
                    kind.plural()
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
    let missing_crd = kind.is_custom() && is_not_installed(error);
    let hint = if missing_crd {
        format!(" (is the {kind:?} CRD installed? kubectl apply -f crds/)")
    } else {
        String::new()
    };
    format!("{doing} {} failed: {cause}{hint}", kind.plural())
}

/// Whether listing failed because the API server serves no such resource (its CRD is not
/// installed). Its 404 then has a plain-text body, `404 page not found`, not a Status: only the
/// code says it.
fn is_not_installed(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404)
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
    /// The uid and generation of each object sent whose status the controller writes: a change
    /// that leaves them alone changed only status or metadata, such as those status writes.
    generations: HashMap<ObjectRef, (Option<String>, Option<i64>)>,
}

impl Mirror {
    fn new() -> Self {
        Self {
            held: Some(Vec::new()),
            present: HashMap::new(),
            listing: HashMap::new(),
            listed: HashSet::new(),
            generations: HashMap::new(),
        }
    }

    /// The changes to send for an event.
    fn apply(&mut self, kind: Kind, event: Event<Object>) -> Vec<Change> {
        let mut changes = self.changes(kind, event);
        let Some(held) = &mut self.held else {
            return changes;
        };
        held.append(&mut changes);
        if !Kind::ALL.iter().all(|kind| self.listed.contains(kind)) {
            return Vec::new();
        }
        tracing::info!("listed every kind: serving");
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
        if reference.kind.status_is_ours() {
            let metadata = object.metadata();
            let generation = (metadata.uid.clone(), metadata.generation);
            if self.generations.get(&reference) == Some(&generation) {
                return None;
            }
            self.generations.insert(reference.clone(), generation);
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
        self.generations.remove(&reference);
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
        for kind in Kind::ALL {
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
        for kind in [Kind::AuthorizationPolicy, Kind::HttpRoute, Kind::GrpcRoute] {
            for event in [Event::Init, Event::InitDone] {
                assert!(mirror.apply(kind, event).is_empty());
            }
        }
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

    #[test]
    fn a_resource_the_api_server_does_not_serve_is_told_by_its_code_alone() {
        // What kube makes of the API server's plain-text 404 for a CRD that is not installed.
        let unserved = kube::Error::Api(Box::new(kube::core::Status {
            code: 404,
            message: "404 page not found".into(),
            reason: "Failed to parse error data".into(),
            ..Default::default()
        }));
        assert!(is_not_installed(&watcher::Error::InitialListFailed(
            unserved
        )));
        let forbidden = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            ..Default::default()
        }));
        assert!(!is_not_installed(&watcher::Error::InitialListFailed(
            forbidden
        )));
    }
}
