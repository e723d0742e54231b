//! The Kubernetes API client the source, leader election and status share: how it is built, and
//! its errors as people read them.

use std::path::Path;

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// A client for the API server of `--kubeconfig`, else the one inferred as kubectl would (the
/// KUBECONFIG variable or ~/.kube/config), else the cluster this runs in.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading the kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "finding the Kubernetes API: not in a cluster and no kubeconfig \
             (give --kubeconfig PATH, or --manifests DIR to run without a cluster)",
        )?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

/// An API error as people read it: the server's message (which names the resource and, when
/// forbidden, the user and verb) rather than the client's debug dump.
pub fn explain(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.is_forbidden() => format!(
            "{} (the controller's RBAC lacks a permission the Outrigger chart grants)",
            status.message
        ),
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => {
            let mut message = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            message
        }
    }
}
