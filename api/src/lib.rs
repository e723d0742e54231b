//! Types shared by the Outrigger controller and proxy.

pub mod destination;
pub mod duration;

/// The configuration stream protocol (see `proto/outrigger/v1/discovery.proto`).
pub mod proto {
    tonic::include_proto!("outrigger.v1");
}
