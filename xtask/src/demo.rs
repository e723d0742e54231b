//! `cargo xtask demo`: builds the binaries in release mode and runs the demo (see
//! `tests/src/bin/outrigger-demo.rs`), passing on any arguments.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, target_dir, workspace_root};

pub fn run(args: Vec<String>) -> Result<()> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "outrigger-controller",
        "-p",
        "outrigger-proxy",
        "-p",
        "outrigger-tests",
        "--bin",
        "outrigger-controller",
        "--bin",
        "outrigger-proxy",
        "--bin",
        "outrigger-demo",
    ])?;
    let demo = target_dir()?.join("release").join("outrigger-demo");
    let status = Command::new(&demo)
        .args(&args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {}", demo.display()))?;
    if !status.success() {
        bail!("the demo failed: {status}");
    }
    Ok(())
}
