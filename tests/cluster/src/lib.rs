//! A real Kubernetes API server on loopback, for Outrigger's end-to-end tests and for
//! `cargo xtask cluster up|down|env`.
//!
//! [`Cluster::start`] builds the pinned versions (`tests/cluster/versions.env`) on first use into
//! `~/.cache/outrigger/cluster/<kubernetes version>/bin` (about 10 minutes on 2 cores, once), then
//! starts etcd and kube-apiserver (and optionally kube-controller-manager) on free 127.0.0.1 ports
//! with freshly generated certificates, writes an admin kubeconfig and waits for `/readyz`
//! (about 4 s). Dropping the [`Cluster`] stops every process it started; a watchdog does the same
//! if the test process dies without unwinding.
//!
//! ```no_run
//! let cluster = outrigger_cluster::Cluster::start()?;
//! cluster.kubectl(&["apply", "-f", "crds/"])?;
//! let tables = cluster.kubectl(&["get", "dp", "-A"])?;
//! # Ok::<(), outrigger_cluster::Error>(())
//! ```
//!
//! There is no kubelet: Pods stay Pending unless a test sets their status through the status
//! subresource, and EndpointSlices are created by the test (or by kube-controller-manager's
//! EndpointSlice controller from Pods marked Ready, with [`ClusterBuilder::controller_manager`]).
//! Std-only on purpose: xtask depends on it and must stay light.

mod binaries;
mod certs;
mod cluster;
mod error;
mod image;
mod machine;
mod node;
mod process;
mod versions;

use std::io::Write;
use std::path::Path;

pub use binaries::{Binaries, cache_dir};
pub use certs::{Certificates, ClientCertificate};
pub use cluster::{
    Cluster, ClusterBuilder, StoppedProcess, dev_state_dir, helm_environment, is_running_in,
    kubeconfig_in, stop_in, stop_node, stop_node_under,
};
pub use error::{Error, Result};
pub use image::Image;
pub use machine::MachineSnapshot;
pub use node::{NodeLock, PAUSE_IMAGE, node_runtime_endpoint, node_state_dir};
pub use process::{Lifetime, is_alive};
pub use versions::Versions;

/// Prints a progress line to stderr, bypassing the test harness's output capture (which only
/// intercepts `print!`/`eprint!`), so that a slow first build shows up in CI logs.
pub(crate) fn progress(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "outrigger-cluster: {message}");
}

/// `value` as a JSON string, which is also a YAML double-quoted scalar and a TOML basic string:
/// safe for any path in any of the configuration files the cluster writes.
pub(crate) fn json_string(value: &str) -> String {
    let mut quoted = String::from('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if (c as u32) < 0x20 => quoted.push_str(&format!("\\u{:04x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn tail_of_file(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}
