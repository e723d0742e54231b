//! The Outrigger sidecar proxy.
//!
//! Folders by subsystem, imports pointing down this list only:
//!
//! - `app`: the process: settings, binding, one task per server.
//! - `admin`, `init`: the admin server; the iptables redirection `outrigger-proxy init` installs.
//! - `identity`: the workload's certificate for its SPIFFE ID, from the controller, renewed.
//! - `control`: the configuration stream to the controller, and decoding what it sends into
//!   `policy` types.
//! - `listen`: accepting connections, their limits, protocol detection, opaque forwarding.
//! - `inbound`: requests from other pods to the local app.
//! - `outbound`: requests from the app: which destination (`resolve`), then the destination's stack
//!   (`destination`): its layers (`layers`), `route`, `split` and `balance`.
//! - `telemetry`: the layer that records every request's metrics.
//! - `client`: one upstream address: connections, HTTP/1 and HTTP/2 clients, load.
//! - `tls`: mutual TLS between meshed proxies: the rustls configurations of the identity held,
//!   the check of a server's identity, the server names and peer identities.
//! - `ctx`, `http`, `io`, `policy`, `metrics`, `shutdown`: per-request values, bodies and errors,
//!   connections that write through, the validated configuration types, the metrics registry.

#![forbid(unsafe_code)]

mod admin;
mod app;
mod client;
mod control;
mod ctx;
mod http;
mod identity;
mod inbound;
mod init;
mod io;
mod listen;
mod metrics;
mod outbound;
mod policy;
mod shutdown;
mod telemetry;
mod tls;

pub use app::{Proxy, Settings, parse_duration};
pub use identity::CertifiedIdentity;
pub use init::{RedirectSettings, install as install_redirect};
pub use listen::InboundMtls;
