//! `cargo xtask crds [--check]`: writes `crds/` and the chart's copy from the policy types, or
//! fails when either is stale. The controller binary does the generating, so xtask stays free of
//! kube. The chart holds files, not a link to `crds/`: `helm` warns about links, and `helm
//! package` does not keep them everywhere.

use anyhow::{Context, Result};

use crate::{cargo, workspace_root};

/// Where the CRDs are written: for `kubectl apply -f crds/`, and for the chart.
const DIRS: [&str; 2] = ["crds", "charts/outrigger/crds"];

pub fn run(check: bool) -> Result<()> {
    for dir in DIRS {
        let dir = workspace_root().join(dir);
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
        cargo(&args)?;
    }
    Ok(())
}
