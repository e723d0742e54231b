//! The pinned component versions, read from `tests/cluster/versions.env` (the one place they are
//! pinned; the Go modules that build them are generated from it).

use crate::error::{Context, Result, bail};

/// The contents of `versions.env`, compiled in so that a change to it rebuilds this crate and,
/// through the build stamps, the binaries.
const VERSIONS_ENV: &str = include_str!("../versions.env");

/// Versions of the test cluster's components, as Go module versions (`v1.36.3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions {
    /// `k8s.io/kubernetes`: kube-apiserver, kube-controller-manager and kubectl.
    pub kubernetes: String,
    /// `go.etcd.io/etcd/server/v3`.
    pub etcd: String,
    /// `helm.sh/helm/v3`.
    pub helm: String,
    /// `github.com/containerd/containerd/v2`: containerd, ctr and the runc shim.
    pub containerd: String,
    /// `github.com/containernetworking/plugins`: bridge, host-local, loopback, portmap.
    pub cni_plugins: String,
    /// `github.com/coredns/coredns`.
    pub coredns: String,
    /// `sigs.k8s.io/cri-tools`: crictl.
    pub crictl: String,
    /// `github.com/prometheus/prometheus`, whose module versions are v0.3yy.z for 3.yy.z.
    pub prometheus: String,
}

impl Versions {
    /// The versions pinned in `versions.env`.
    pub fn pinned() -> Versions {
        Versions::parse(VERSIONS_ENV).expect("tests/cluster/versions.env is valid (unit-tested)")
    }

    fn parse(text: &str) -> Result<Versions> {
        let mut kubernetes = None;
        let mut etcd = None;
        let mut helm = None;
        let mut containerd = None;
        let mut cni_plugins = None;
        let mut coredns = None;
        let mut crictl = None;
        let mut prometheus = None;
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .context(|| format!("versions.env line {}: expected KEY=VALUE", index + 1))?;
            let value = value.trim();
            if !is_module_version(value) {
                bail!(
                    "versions.env line {}: {value:?} is not a Go module version like v1.2.3",
                    index + 1
                );
            }
            let slot = match key.trim() {
                "KUBERNETES" => &mut kubernetes,
                "ETCD" => &mut etcd,
                "HELM" => &mut helm,
                "CONTAINERD" => &mut containerd,
                "CNI_PLUGINS" => &mut cni_plugins,
                "COREDNS" => &mut coredns,
                "CRICTL" => &mut crictl,
                "PROMETHEUS" => &mut prometheus,
                other => bail!("versions.env line {}: unknown key {other}", index + 1),
            };
            *slot = Some(value.to_string());
        }
        let required = |value: Option<String>, key: &str| {
            value.context(|| format!("versions.env: {key} is missing"))
        };
        let kubernetes = required(kubernetes, "KUBERNETES")?;
        if !kubernetes.starts_with("v1.") {
            bail!("versions.env: KUBERNETES={kubernetes} is not a v1.x.y release");
        }
        Ok(Versions {
            kubernetes,
            etcd: required(etcd, "ETCD")?,
            helm: required(helm, "HELM")?,
            containerd: required(containerd, "CONTAINERD")?,
            cni_plugins: required(cni_plugins, "CNI_PLUGINS")?,
            coredns: required(coredns, "COREDNS")?,
            crictl: required(crictl, "CRICTL")?,
            prometheus: required(prometheus, "PROMETHEUS")?,
        })
    }

    /// The version of the `k8s.io/<staging>` modules released with `k8s.io/kubernetes`:
    /// v1.36.3 goes with v0.36.3.
    pub fn kubernetes_staging(&self) -> String {
        format!("v0.{}", self.kubernetes_minor_patch())
    }

    /// The Kubernetes minor version, `36` for v1.36.3.
    pub fn kubernetes_minor(&self) -> &str {
        self.kubernetes_minor_patch()
            .split('.')
            .next()
            .expect("split yields at least one part")
    }

    /// Prometheus' own version, `3.16.0` for the module version v0.316.0.
    pub fn prometheus_release(&self) -> String {
        let numbers = self.prometheus.trim_start_matches('v');
        let mut parts = numbers.split('.');
        let (_, minor, patch) = (parts.next(), parts.next(), parts.next());
        let minor = minor.unwrap_or_default();
        let (major, minor) = minor.split_at(minor.len().min(1));
        format!(
            "{major}.{}.{}",
            minor.trim_start_matches('0').parse::<u32>().unwrap_or(0),
            patch.unwrap_or("0")
        )
    }

    fn kubernetes_minor_patch(&self) -> &str {
        self.kubernetes
            .strip_prefix("v1.")
            .expect("KUBERNETES is a v1.x.y version (checked when parsed)")
    }
}

fn is_module_version(value: &str) -> bool {
    let Some(numbers) = value.strip_prefix('v') else {
        return false;
    };
    let parts: Vec<&str> = numbers.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_versions_parse_and_map_to_staging_modules() {
        let versions = Versions::pinned();
        assert!(versions.kubernetes.starts_with("v1."), "{versions:?}");
        assert!(versions.etcd.starts_with("v3."), "{versions:?}");
        assert!(versions.helm.starts_with("v3."), "{versions:?}");
        assert!(versions.containerd.starts_with("v2."), "{versions:?}");
        assert!(versions.prometheus.starts_with("v0.3"), "{versions:?}");
        let minor_patch = versions.kubernetes.strip_prefix("v1.").unwrap();
        assert_eq!(versions.kubernetes_staging(), format!("v0.{minor_patch}"));
        assert!(minor_patch.starts_with(versions.kubernetes_minor()));
    }

    #[test]
    fn prometheus_module_versions_map_to_releases() {
        let mut versions = Versions::pinned();
        versions.prometheus = "v0.316.0".into();
        assert_eq!(versions.prometheus_release(), "3.16.0");
        versions.prometheus = "v0.305.2".into();
        assert_eq!(versions.prometheus_release(), "3.5.2");
    }

    #[test]
    fn rejects_malformed_lines() {
        let err = Versions::parse("KUBERNETES=1.36\nETCD=v3.6.8\nHELM=v3.21.4\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = Versions::parse("KUBERNETES=v1.36.3\nHELM=v3.21.4\n").unwrap_err();
        assert!(err.to_string().contains("ETCD is missing"), "{err}");
        let err = Versions::parse("KUBE=v1.36.3\n").unwrap_err();
        assert!(err.to_string().contains("unknown key KUBE"), "{err}");
    }
}
