//! Sources of cluster state: a directory of manifests (`manifests`) or the Kubernetes API
//! (`kube`). Both tell the index the same [`Change`]s, about the same [`Object`]s.

use std::fmt;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use outrigger_api::policy::DestinationPolicy;

pub mod kube;
pub mod manifests;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Ordered as a source best removes objects (a Service first, withdrawing its keys at once);
/// additions go best in the reverse order (a Service last, computed once with everything in
/// place).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    DestinationPolicy,
}

/// One object, by kind and namespaced name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub key: ObjectKey,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.kind, self.key)
    }
}

/// An object of a kind the index reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(Box<Pod>),
    DestinationPolicy(Box<DestinationPolicy>),
}

impl Object {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::DestinationPolicy(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Service(o) => &mut o.metadata,
            Self::EndpointSlice(o) => &mut o.metadata,
            Self::Pod(o) => &mut o.metadata,
            Self::DestinationPolicy(o) => &mut o.metadata,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Pod(_) => Kind::Pod,
            Self::DestinationPolicy(_) => Kind::DestinationPolicy,
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
}

/// What a source tells the index.
#[derive(Clone, Debug)]
pub enum Change {
    /// The object was created or updated.
    Applied(Object),
    Deleted(ObjectRef),
    /// The source has delivered its full initial state: keys not published by now are unknown.
    Synced,
}
