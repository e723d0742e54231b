//! Types shared by the Outrigger controller and proxy.

#[cfg(feature = "crd")]
pub mod authz;
pub mod codec;
pub mod defaults;
pub mod destination;
pub mod duration;
#[cfg(feature = "crd")]
pub mod gateway;
pub mod identity;
#[cfg(feature = "logging")]
pub mod logging;
#[cfg(feature = "crd")]
pub mod policy;
pub mod rules;

/// The configuration stream protocol (see `proto/outrigger/v1/discovery.proto`) and the identity
/// service (`proto/outrigger/v1/identity.proto`).
// Generated code: a message oneof is as large as its largest variant, by prost's design.
#[allow(clippy::large_enum_variant)]
pub mod proto {
    tonic::include_proto!("outrigger.v1");
}
