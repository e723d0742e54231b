//! `cargo xtask crds [--check]`: writes `crds/` from the policy types, or fails when `crds/` is
//! stale. The controller binary does the generating, so xtask stays free of kube.

use anyhow::{Context, Result};

use crate::{cargo, workspace_root};

pub fn run(check: bool) -> Result<()> {
    let dir = workspace_root().join("crds");
    let dir = dir
        .to_str()
        .with_context(|| format!("{} is not UTF-8", dir.display()))?;
    let mut args = vec![
        "run",
        "--quiet",
        "--package",
        "outrigger-controller",
        "--",
        "crds",
        "--dir",
        dir,
    ];
    if check {
        args.push("--check");
    }
    cargo(&args)
}
