//! `cargo xtask bench <target>`: builds the release binaries and runs `outrigger-bench`, which does
//! the measuring. Options left out take `outrigger-bench`'s defaults, so they live in one place.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum Target {
    /// Latency, throughput and cost that the proxy adds to requests, against a direct path.
    Proxy(ProxyArgs),
    /// Time from a policy edit to every proxy's acknowledgement, and the controller's memory.
    ControlPlane(ControlPlaneArgs),
}

#[derive(Args)]
pub struct ControlPlaneArgs {
    /// Simulated proxies, each with its own configuration stream (default: the bench's).
    #[arg(long)]
    proxies: Option<String>,
    /// Endpoints of the Service they all subscribe to (default: the bench's).
    #[arg(long)]
    endpoints: Option<String>,
    /// Policy edits to time (default: the bench's).
    #[arg(long)]
    edits: Option<String>,
    /// Endpoint changes to time (default: the bench's).
    #[arg(long)]
    endpoint_changes: Option<String>,
    /// Markdown file whose `## Control plane, <proxies> proxies` section receives the results,
    /// relative to the workspace root.
    #[arg(long, default_value = "docs/benchmarks.md")]
    write: PathBuf,
    /// Only print the results.
    #[arg(long, conflicts_with = "write")]
    no_write: bool,
}

#[derive(Args)]
pub struct ProxyArgs {
    /// Request rates to measure, in requests per second, comma-separated (default: the bench's).
    #[arg(long)]
    rates: Option<String>,
    /// How long each rate is measured on each path, e.g. `5s` (default: the bench's).
    #[arg(long)]
    duration: Option<String>,
    /// Unrecorded load before each measurement, e.g. `1s` (default: the bench's).
    #[arg(long)]
    warmup: Option<String>,
    /// Keep-alive connections per path (default: the bench's).
    #[arg(long)]
    connections: Option<String>,
    /// Callers opening mutual TLS connections to the server proxy at once (default: the bench's).
    #[arg(long)]
    handshake_callers: Option<String>,
    /// Leave out the two-proxy path (mutual TLS), which starts the test cluster's API server and
    /// the controller.
    #[arg(long)]
    no_mesh: bool,
    /// Markdown file whose `## Proxy` section receives the results, relative to the workspace root.
    #[arg(long, default_value = "docs/benchmarks.md")]
    write: PathBuf,
    /// Only print the results.
    #[arg(long, conflicts_with = "write")]
    no_write: bool,
}

pub fn run(target: Target) -> Result<()> {
    match target {
        Target::Proxy(args) => proxy(args),
        Target::ControlPlane(args) => control_plane(args),
    }
}

fn control_plane(args: ControlPlaneArgs) -> Result<()> {
    crate::cargo(&[
        "build",
        "--release",
        "-p",
        "outrigger-controller",
        "-p",
        "outrigger-tests",
        "--bin",
        "outrigger-controller",
        "--bin",
        "outrigger-bench",
    ])?;
    let release = crate::target_dir()?.join("release");
    let mut bench = Command::new(release.join("outrigger-bench"));
    bench
        .arg("control-plane")
        .arg("--controller-bin")
        .arg(release.join("outrigger-controller"))
        .arg("--command")
        .arg(crate::invocation());
    let forwarded = [
        ("--proxies", &args.proxies),
        ("--endpoints", &args.endpoints),
        ("--edits", &args.edits),
        ("--endpoint-changes", &args.endpoint_changes),
    ];
    run_bench(bench, &forwarded, args.no_write, &args.write)
}

/// Runs the bench with the options given, writing the results unless told not to.
fn run_bench(
    mut bench: Command,
    forwarded: &[(&str, &Option<String>)],
    no_write: bool,
    write: &std::path::Path,
) -> Result<()> {
    for (flag, value) in forwarded {
        if let Some(value) = value {
            bench.arg(flag).arg(value);
        }
    }
    if !no_write {
        bench
            .arg("--write")
            .arg(crate::workspace_root().join(write));
    }
    let status = bench
        .status()
        .with_context(|| format!("running {:?}", bench.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", bench.get_program());
    }
    Ok(())
}

fn proxy(args: ProxyArgs) -> Result<()> {
    crate::cargo(&[
        "build",
        "--release",
        "-p",
        "outrigger-proxy",
        "-p",
        "outrigger-controller",
        "-p",
        "outrigger-tests",
        "--bin",
        "outrigger-proxy",
        "--bin",
        "outrigger-controller",
        "--bin",
        "outrigger-bench",
    ])?;
    let release = crate::target_dir()?.join("release");
    let proxy_bin = release.join("outrigger-proxy");
    let mut bench = Command::new(release.join("outrigger-bench"));
    bench
        .arg("proxy")
        .arg("--proxy-bin")
        .arg(&proxy_bin)
        .arg("--command")
        .arg(crate::invocation());
    if !args.no_mesh {
        bench
            .arg("--controller-bin")
            .arg(release.join("outrigger-controller"));
    }
    let forwarded = [
        ("--rates", &args.rates),
        ("--duration", &args.duration),
        ("--warmup", &args.warmup),
        ("--connections", &args.connections),
        ("--handshake-callers", &args.handshake_callers),
    ];
    run_bench(bench, &forwarded, args.no_write, &args.write)
}
