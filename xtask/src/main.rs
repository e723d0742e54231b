//! Developer and CI tasks, run as `cargo xtask <task>`.
//!
//! This crate stays light (clap, anyhow and std) so that `cargo xtask` starts quickly; tasks that
//! need the async stack build and run a binary of their own.

mod bench;
mod ci;
mod cluster;
mod conformance;
mod crds;
mod demo;
mod images;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Outrigger developer and CI tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Runs a benchmark and records its results in docs/benchmarks.md.
    Bench {
        #[command(subcommand)]
        target: bench::Target,
    },
    /// Formatting, lints and every test: what CI runs (the README's test command).
    Ci,
    /// The e2e tests' cluster for trying things by hand: a single node whose pods run, or a real
    /// etcd + kube-apiserver on 127.0.0.1.
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
    /// Runs Outrigger end to end on this machine (no cluster): controller, proxy, backends, load.
    Demo {
        /// Passed to the demo (`cargo xtask demo -- --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The Gateway API conformance suite's mesh tests: builds it (`build`), runs it (`run`).
    Conformance {
        #[command(subcommand)]
        action: conformance::Action,
    },
    /// Builds the images (controller, proxy, proxy-init, and the test apps') from the release
    /// binaries without Docker, into <target>/images/ for the test cluster to import.
    Images,
    /// Writes crds/ from the DestinationPolicy types (`cargo test` fails while crds/ is stale).
    Crds {
        /// Only compare: fail, naming the files, when crds/ is not what would be written.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Bench { target } => bench::run(target),
        Task::Ci => ci::run(),
        Task::Cluster { action } => cluster::run(action),
        Task::Conformance { action } => conformance::run(action),
        Task::Crds { check } => crds::run(check),
        Task::Demo { args } => demo::run(args),
        Task::Images => images::run(),
    }
}

/// The workspace root: xtask lives one level below it. Read when run, not when built: a build
/// cached from another checkout of the workspace would otherwise work on that checkout.
fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    manifest_dir
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Where cargo puts build outputs: `CARGO_TARGET_DIR` (relative to the current directory, as cargo
/// reads it), else `<workspace>/target`.
fn target_dir() -> Result<PathBuf> {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => Ok(std::env::current_dir()
            .context("reading the current directory")?
            .join(dir)),
        _ => Ok(workspace_root().join("target")),
    }
}

/// Runs cargo (the one that runs us, when known) with `args` in the workspace root.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {} {}", cargo.to_string_lossy(), args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// This invocation as a user would type it, for records of how results were produced.
fn invocation() -> String {
    let args = std::env::args().skip(1).map(|arg| {
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
            format!("'{}'", arg.replace('\'', r"'\''"))
        } else {
            arg
        }
    });
    std::iter::once("cargo xtask".to_string())
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}
