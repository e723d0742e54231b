//! What CI runs, and what a developer runs before pushing: formatting, lints, then every test.

use anyhow::Result;

use crate::cargo;

pub fn run() -> Result<()> {
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
    cargo(&["test", "--workspace", "--all-features", "--locked"])
}
