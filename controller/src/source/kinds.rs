//! Every kind of object the sources read, and for each: how it is named, read from a manifest,
//! checked, and watched on the Kubernetes API. A new kind is a variant here, and nothing else in
//! `source` changes.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::pin::Pin;

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource};
use outrigger_api::authz::AuthorizationPolicy;
use outrigger_api::gateway::{GRPCRoute, HTTPRoute};
use outrigger_api::policy::DestinationPolicy;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{ObjectKey, ObjectRef};
use crate::inject::patch::IDENTITY_ANNOTATION;
use crate::translate::{translate, translate_authorization};

/// Ordered as a source best removes objects (a Service first, withdrawing its keys at once);
/// additions go best in the reverse order (a Service last, computed once with everything in
/// place).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    DestinationPolicy,
    AuthorizationPolicy,
    HttpRoute,
    GrpcRoute,
}

/// An object of a kind the index reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(Box<Pod>),
    DestinationPolicy(Box<DestinationPolicy>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    HttpRoute(Box<HTTPRoute>),
    GrpcRoute(Box<GRPCRoute>),
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::DestinationPolicy,
        Kind::AuthorizationPolicy,
        Kind::HttpRoute,
        Kind::GrpcRoute,
    ];

    /// The kind's name in messages: `Services`.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Service => "Services",
            Self::EndpointSlice => "EndpointSlices",
            Self::Pod => "Pods",
            Self::DestinationPolicy => "DestinationPolicies",
            Self::AuthorizationPolicy => "AuthorizationPolicies",
            Self::HttpRoute => "HTTPRoutes",
            Self::GrpcRoute => "GRPCRoutes",
        }
    }

    /// `apiVersion` and `kind`, as a manifest names it.
    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Self::Service => ("v1", "Service"),
            Self::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
            Self::Pod => ("v1", "Pod"),
            Self::DestinationPolicy => ("outrigger.dev/v1alpha1", "DestinationPolicy"),
            Self::AuthorizationPolicy => ("outrigger.dev/v1alpha1", "AuthorizationPolicy"),
            Self::HttpRoute => ("gateway.networking.k8s.io/v1", "HTTPRoute"),
            Self::GrpcRoute => ("gateway.networking.k8s.io/v1", "GRPCRoute"),
        }
    }

    /// The kind a manifest's `kind` names, whatever its `apiVersion`.
    pub fn named(kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|candidate| candidate.type_meta().1 == kind)
    }

    pub fn api_version(self) -> &'static str {
        self.type_meta().0
    }

    /// Whether the kind is one of Outrigger's own, which exists only once its CRD is installed.
    pub fn is_custom(self) -> bool {
        matches!(self, Self::DestinationPolicy | Self::AuthorizationPolicy)
    }

    /// Whether the cluster may well not have the kind: the Gateway API's CRDs are the user's to
    /// install, before or after Outrigger. Until they are, there are none of it.
    pub fn is_optional(self) -> bool {
        matches!(self, Self::HttpRoute | Self::GrpcRoute)
    }

    /// Whether the controller writes the status of objects of this kind: changes that leave their
    /// generation alone are its own writes (or metadata) and need no recompute.
    pub fn status_is_ours(self) -> bool {
        matches!(
            self,
            Self::DestinationPolicy | Self::AuthorizationPolicy | Self::HttpRoute | Self::GrpcRoute
        )
    }

    /// Reads one manifest document of this kind.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        self,
        document: D,
    ) -> Result<Object, D::Error> {
        Ok(match self {
            Self::Service => Object::Service(Box::new(Service::deserialize(document)?)),
            Self::EndpointSlice => {
                Object::EndpointSlice(Box::new(EndpointSlice::deserialize(document)?))
            }
            Self::Pod => Object::Pod(Box::new(Pod::deserialize(document)?)),
            Self::DestinationPolicy => {
                Object::DestinationPolicy(Box::new(DestinationPolicy::deserialize(document)?))
            }
            Self::AuthorizationPolicy => {
                Object::AuthorizationPolicy(Box::new(AuthorizationPolicy::deserialize(document)?))
            }
            Self::HttpRoute => Object::HttpRoute(Box::new(HTTPRoute::deserialize(document)?)),
            Self::GrpcRoute => Object::GrpcRoute(Box::new(GRPCRoute::deserialize(document)?)),
        })
    }

    /// Every object of this kind in the cluster: listed, then watched.
    pub fn watch(self, client: Client) -> Events {
        match self {
            Self::Service => watch_api(Api::<Service>::all(client), |o| {
                Object::Service(Box::new(o))
            }),
            Self::EndpointSlice => watch_api(Api::<EndpointSlice>::all(client), |o| {
                Object::EndpointSlice(Box::new(o))
            }),
            // Metadata only: the index needs their labels and identity annotation.
            Self::Pod => watch_api(Api::<PartialObjectMeta<Pod>>::all(client), pod_labels),
            Self::DestinationPolicy => watch_api(Api::<DestinationPolicy>::all(client), |o| {
                Object::DestinationPolicy(Box::new(o))
            }),
            Self::AuthorizationPolicy => watch_api(Api::<AuthorizationPolicy>::all(client), |o| {
                Object::AuthorizationPolicy(Box::new(o))
            }),
            Self::HttpRoute => watch_api(Api::<HTTPRoute>::all(client), |o| {
                Object::HttpRoute(Box::new(o))
            }),
            Self::GrpcRoute => watch_api(Api::<GRPCRoute>::all(client), |o| {
                Object::GrpcRoute(Box::new(o))
            }),
        }
    }
}

impl Object {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::DestinationPolicy(o) => &o.metadata,
            Self::AuthorizationPolicy(o) => &o.metadata,
            Self::HttpRoute(o) => &o.metadata,
            Self::GrpcRoute(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Service(o) => &mut o.metadata,
            Self::EndpointSlice(o) => &mut o.metadata,
            Self::Pod(o) => &mut o.metadata,
            Self::DestinationPolicy(o) => &mut o.metadata,
            Self::AuthorizationPolicy(o) => &mut o.metadata,
            Self::HttpRoute(o) => &mut o.metadata,
            Self::GrpcRoute(o) => &mut o.metadata,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Pod(_) => Kind::Pod,
            Self::DestinationPolicy(_) => Kind::DestinationPolicy,
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Self::HttpRoute(_) => Kind::HttpRoute,
            Self::GrpcRoute(_) => Kind::GrpcRoute,
        }
    }

    /// None when the object lacks a name or a namespace (sources fill the namespace in).
    pub fn reference(&self) -> Option<ObjectRef> {
        let metadata = self.metadata();
        Some(ObjectRef {
            kind: self.kind(),
            key: ObjectKey::new(metadata.namespace.clone()?, metadata.name.clone()?),
        })
    }

    /// Why the API server would refuse the object, for sources that have none in front of them.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::DestinationPolicy(policy) => translate(&policy.spec)
                .map(drop)
                .map_err(|problem| problem.to_string()),
            Self::AuthorizationPolicy(policy) => translate_authorization(&policy.spec)
                .map(drop)
                .map_err(|problem| problem.to_string()),
            // What a route cannot serve is said in its status; nothing in one is refused.
            Self::Service(_)
            | Self::EndpointSlice(_)
            | Self::Pod(_)
            | Self::HttpRoute(_)
            | Self::GrpcRoute(_) => Ok(()),
        }
    }
}

pub type Events = Pin<Box<dyn Stream<Item = Result<Event<Object>, watcher::Error>> + Send>>;

fn watch_api<K>(api: Api<K>, into: fn(K) -> Object) -> Events
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
    let annotations = pod.metadata.annotations.and_then(|mut annotations| {
        let identity = annotations.remove_entry(IDENTITY_ANNOTATION)?;
        Some(BTreeMap::from([identity]))
    });
    Object::Pod(Box::new(Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name,
            namespace: pod.metadata.namespace,
            labels: pod.metadata.labels,
            annotations,
            ..Default::default()
        },
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pods_keep_only_what_the_index_reads() {
        let pod: PartialObjectMeta<Pod> = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": {
                "namespace": "shop", "name": "reviews-1", "labels": {"version": "v1"},
                "annotations": {"big": "x".repeat(1000), "outrigger.dev/identity": "reviews"},
                "uid": "u",
            },
        }))
        .unwrap();
        let Object::Pod(pod) = pod_labels(pod) else {
            unreachable!("pod_labels makes Pods")
        };
        assert_eq!(
            serde_json::to_value(&pod.metadata).unwrap(),
            json!({
                "namespace": "shop", "name": "reviews-1", "labels": {"version": "v1"},
                "annotations": {"outrigger.dev/identity": "reviews"},
            })
        );
        assert!(pod.spec.is_none() && pod.status.is_none());
    }

    #[test]
    fn every_kind_is_named_by_its_manifest_kind() {
        for kind in Kind::ALL {
            assert_eq!(Kind::named(kind.type_meta().1), Some(kind));
        }
        assert_eq!(Kind::named("ConfigMap"), None);
    }
}
