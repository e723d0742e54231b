//! The Outrigger control plane: an index of cluster state feeding per-destination watch channels
//! that the proxies' configuration streams subscribe to.

pub mod admin;
pub mod distribute;
pub mod metrics;
