//! Distribution: per-destination snapshots, published by the index on watch channels, streamed to
//! the proxies that subscribed to them.
//!
//! A watch channel keeps only its latest value, so a burst of changes to one destination reaches a
//! slow proxy as one update, and a proxy is only ever sent the destinations it asked for.
//!
//! `snapshot` is the store the index publishes into; `server` the gRPC service proxies connect to,
//! over the connections `listener` accepts; `subscribers` what each connected proxy holds of each
//! destination, which status reads.

mod listener;
mod server;
mod snapshot;
mod subscribers;
#[cfg(test)]
mod tests;

pub use self::listener::{Authenticated, DRAIN_BOUND, serve_grpc};
pub use self::server::{DiscoveryService, ProxyEvent};
pub use self::snapshot::{EndpointSet, Snapshot, Snapshots};
#[cfg(test)]
pub use self::subscribers::Holding;
pub use self::subscribers::{Holders, PolicyVersion, ProxyId, Subscribers};
