//! What CI runs, and what a developer runs before pushing: formatting, lints, then every test.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, cluster, conformance, images};

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
    // The test cluster's binaries (about 16 minutes the first time on a new machine) and the
    // images the suite in pods runs (a release build), as steps of their own, so the tests' time
    // is the tests'.
    cluster::run(cluster::Action::Build)?;
    images::run()?;
    cargo(&["test", "--workspace", "--all-features", "--locked"])?;
    // The Gateway API mesh conformance suite, in real pods (about a minute once built); the
    // report in docs/conformance/ is `cargo xtask conformance run`'s to write.
    conformance::run_on_the_test_cluster(&conformance::RunOptions {
        channel: conformance::Channel::Standard,
        chart_values: vec![],
        run_tests: vec![],
        keep: false,
        record: false,
    })
}

/// Debian packages the tests use, by a program (or file) each provides: iptables and iproute2 for
/// the traffic-redirection tests, which run in network namespaces of their own; Prometheus for
/// the dashboards tests, which scrape the binaries with it; for the test cluster's node, runc
/// (which runs its containers), nftables (whose tables the node's teardown removes) and netbase
/// (`/etc/protocols`, which the init image's iptables reads).
const SYSTEM_TOOLS: [(&str, &str); 6] = [
    ("iptables-restore", "iptables"),
    ("ip", "iproute2"),
    ("prometheus", "prometheus"),
    ("runc", "runc"),
    ("nft", "nftables"),
    ("/etc/protocols", "netbase"),
];

fn install_system_tools() -> Result<()> {
    let missing: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|(provided, _)| {
            if provided.starts_with('/') {
                !std::path::Path::new(provided).exists()
            } else {
                !on_path(provided)
            }
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    apt(&["update", "-qq"])?;
    // Only what is listed: runc would otherwise bring criu, prometheus its exporters.
    apt(&[
        &["install", "-y", "-qq", "--no-install-recommends"][..],
        &missing,
    ]
    .concat())
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
