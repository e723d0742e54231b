//! What CI runs, and what a developer runs before pushing: formatting, lints, then every test.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, cluster};

pub fn run() -> Result<()> {
    install_system_tools()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--locked",
        "--",
        "-D",
        "warnings",
    ])?;
    // The test cluster's binaries (about 10 minutes the first time on a new machine) as a step of
    // their own, so the tests' time is the tests'.
    cluster::run(cluster::Action::Build)?;
    cargo(&["test", "--workspace", "--all-features", "--locked"])
}

/// Debian packages the tests use: iptables and iproute2 for the traffic-redirection tests, which
/// run in network namespaces of their own; Prometheus for the dashboards test, which scrapes the
/// binaries with it.
const SYSTEM_TOOLS: [(&str, &str); 3] = [
    ("iptables-restore", "iptables"),
    ("ip", "iproute2"),
    ("prometheus", "prometheus"),
];

fn install_system_tools() -> Result<()> {
    let missing: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    apt(&["update", "-qq"])?;
    apt(&[&["install", "-y", "-qq"][..], &missing].concat())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get (the tests need root and Debian's packages)")?;
    if !status.success() {
        bail!("apt-get {} failed: {status}", args.join(" "));
    }
    Ok(())
}
