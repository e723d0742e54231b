//! Sources of cluster state: a directory of manifests (`manifests`) or the Kubernetes API
//! (`kube`). Both tell the index the same [`Change`]s, about the same [`Object`]s.

//!
//! `kinds` lists the kinds they read; a new kind is added there alone.

use std::fmt;

mod kinds;
pub mod kube;
pub mod manifests;

pub use self::kinds::{Kind, Object};

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

/// What a source tells the index.
#[derive(Clone, Debug)]
pub enum Change {
    /// The object was created or updated.
    Applied(Object),
    Deleted(ObjectRef),
    /// The source has delivered its full initial state: keys not published by now are unknown.
    Synced,
}
