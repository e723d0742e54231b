//! The Outrigger control plane: sources of cluster state feed an index, which publishes
//! per-destination snapshots on watch channels that the proxies' configuration streams subscribe
//! to.

pub mod admin;
mod app;
pub mod crds;
pub mod distribute;
pub mod index;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod source;
pub mod status;
pub mod translate;

pub use app::{Controller, Settings};
pub use distribute::serve_grpc;
