//! The files of `crds/` (and the chart's copy), generated from the api types: written by
//! `cargo xtask crds`, compared by `cargo xtask crds --check` so that CI fails when they are
//! stale. Never edited by hand.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Each file's first line, naming the source file it is generated from.
fn header(source: &str) -> String {
    format!("# Generated from api/src/{source} by `cargo xtask crds`. Do not edit.\n")
}

pub struct CrdFile {
    /// `<plural>.<group>.yaml`, as the CRD's own name.
    pub name: String,
    pub yaml: String,
}

pub fn files() -> anyhow::Result<Vec<CrdFile>> {
    [
        ("policy.rs", outrigger_api::policy::crd()),
        ("authz.rs", outrigger_api::authz::crd()),
    ]
    .into_iter()
    .map(|(source, crd)| {
        let name = crd
            .metadata
            .name
            .clone()
            .context("a generated CRD has no name")?;
        let yaml = serde_norway::to_string(&crd)
            .with_context(|| format!("writing the CRD {name} as YAML"))?;
        Ok(CrdFile {
            name: format!("{name}.yaml"),
            yaml: format!("{}{yaml}", header(source)),
        })
    })
    .collect()
}

pub fn write(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in files()? {
        let path = dir.join(&file.name);
        std::fs::write(&path, &file.yaml).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Fails, naming the files, when `dir` does not hold exactly what `write` would put there.
pub fn check(dir: &Path) -> anyhow::Result<()> {
    let files = files()?;
    let mut stale: Vec<PathBuf> = Vec::new();
    for file in &files {
        let path = dir.join(&file.name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(file.yaml.as_str()) {
            stale.push(path);
        }
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let generated = files
            .iter()
            .any(|f| path.file_name() == Some(f.name.as_ref()));
        if !generated {
            stale.push(path);
        }
    }
    if !stale.is_empty() {
        let list: Vec<String> = stale.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "CRD manifests are stale (run `cargo xtask crds`): {}",
            list.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_crds_are_current() {
        // Where cargo runs the test from, not where it was built.
        let root = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("..");
        // `crds/` and the chart's copy, a directory of its own (see `cargo xtask crds`).
        for dir in ["crds", "charts/outrigger/crds"] {
            let dir = root.join(dir);
            assert!(!dir.is_symlink(), "{} is a link", dir.display());
            check(&dir).unwrap();
        }
    }

    #[test]
    fn check_names_stale_missing_and_extra_files() {
        let dir = tempfile::tempdir().unwrap();
        let error = check(dir.path()).unwrap_err().to_string();
        for missing in [
            "destinationpolicies.outrigger.dev.yaml",
            "authorizationpolicies.outrigger.dev.yaml",
        ] {
            assert!(error.contains(missing), "missing: {error}");
        }
        write(dir.path()).unwrap();
        check(dir.path()).unwrap();

        let crd = dir.path().join("destinationpolicies.outrigger.dev.yaml");
        let edited = std::fs::read_to_string(&crd).unwrap().replace("dp", "xx");
        std::fs::write(&crd, edited).unwrap();
        let error = check(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("destinationpolicies.outrigger.dev.yaml"),
            "{error}"
        );

        write(dir.path()).unwrap();
        std::fs::write(dir.path().join("old.outrigger.dev.yaml"), "").unwrap();
        let error = check(dir.path()).unwrap_err().to_string();
        assert!(error.contains("old.outrigger.dev.yaml"), "{error}");
        assert!(!error.contains("destinationpolicies"), "{error}");
    }
}
