//! The Outrigger control plane: sources of cluster state feed an index, which publishes
//! per-destination snapshots on watch channels that the proxies' configuration streams subscribe
//! to.
//!
//! Modules are private; what the binary and the test suites use is re-exported here.

#![forbid(unsafe_code)]

mod admin;
mod app;
pub mod crds;
mod distribute;
mod identity;
mod index;
mod inject;
mod kube_api;
mod leader;
mod listen;
mod metrics;
mod source;
mod status;
mod translate;

pub use app::{Controller, STOP_BOUND, Settings};
pub use distribute::{DiscoveryService, ProxyEvent, Snapshot, Snapshots, serve_grpc};
pub use identity::{Authority as IdentityAuthority, IdentitySettings};
pub use index::Index;
pub use inject::patch::{InjectedIdentity, InjectorConfig};
pub use inject::webhook::{INJECT_NAMESPACED_PATH, INJECT_POD_PATH, WebhookSettings};
pub use leader::LEASE_NAME;
pub use metrics::Metrics;
pub use source::Change;
pub use source::manifests::{Manifests, parse};
pub use status::MIN_INTERVAL;
