//! The values that travel with a request or its response in their `http::Extensions`, between
//! layers that do not call each other directly. Every such value is declared here:
//!
//! | value            | carried on        | written by                          | read by                        |
//! |------------------|-------------------|-------------------------------------|--------------------------------|
//! | [`Tried`]        | each attempt      | `retry` (one per request)           | `balance` (avoids, then adds)  |
//! | [`ChosenSubset`] | response          | `split`                             | the route table (labels)       |
//! | [`Labels`]       | response          | the route table; `outbound` for responses made before a route was chosen | `telemetry` |
//! | [`ClientId`]     | inbound request   | `listen`, on a mutual TLS connection | `telemetry` |
//! | [`ServerId`]     | outbound response | `client`, from a mutual TLS connection (hyper copies it from the connection) | `telemetry` |

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::metrics::{Name, RequestLabels};

/// Endpoints a request has been sent to; the balancer avoids them for its retries.
#[derive(Clone, Default)]
pub struct Tried(Arc<Mutex<Vec<SocketAddr>>>);

impl Tried {
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.0.lock().expect("tried lock").clone()
    }

    pub fn push(&self, addr: SocketAddr) {
        self.0.lock().expect("tried lock").push(addr);
    }
}

/// The subset a response came from, for the `dst_subset` label.
#[derive(Clone, Debug)]
pub struct ChosenSubset(pub Name);

/// Whom a response was for, for its metrics.
#[derive(Clone, Debug)]
pub struct Labels(pub RequestLabels);

/// The caller's identity on a mutual TLS connection, as its label reads (`tls::label`).
#[derive(Clone, Debug)]
pub struct ClientId(pub Name);

/// The identity of the server that answered over mutual TLS, as its label reads.
#[derive(Clone, Debug)]
pub struct ServerId(pub Name);
