//! Workload identity: the controller as the mesh's certificate authority. A proxy sends a
//! projected ServiceAccount token and a certificate signing request; the token is checked with the
//! API server (`review`), the request must ask for exactly the SPIFFE ID of that ServiceAccount,
//! and the authority (`authority`) signs a leaf certificate for it. Served on the gRPC listener
//! beside discovery (`service`), over TLS with the controller's own certificate (`serving`).

mod authority;
mod review;
mod service;
mod serving;

use std::path::PathBuf;
use std::time::Duration;

pub use authority::{Authority, DEFAULT_LIFETIME, ReloadingAuthority};
pub use review::{Reviewer, TOKEN_AUDIENCE};
pub use service::IdentityService;
pub use serving::{ServingTls, peer_identity};

/// Flags of the certificate authority; without `--identity-dir` it is off.
#[derive(clap::Args, Clone, Debug)]
pub struct IdentitySettings {
    /// Serve certificates to proxies, signed by the issuer in this directory (the identity
    /// Secret, mounted: `ca.crt` the trust anchors, `tls.crt` the issuer's certificate, `tls.key`
    /// its key). Needs the Kubernetes API, which checks the proxies' tokens.
    #[arg(long, env = "OUTRIGGER_IDENTITY_DIR", conflicts_with = "manifests")]
    pub identity_dir: Option<PathBuf>,
    /// The trust domain of the SPIFFE IDs certified: `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    #[arg(long, env = "OUTRIGGER_TRUST_DOMAIN", default_value = outrigger_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The controller's own ServiceAccount (in the namespace of its Lease): with
    /// `--identity-dir`, the gRPC listener serves TLS with a certificate for
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<this>`, the identity proxies check.
    #[arg(
        long,
        env = "OUTRIGGER_SERVICE_ACCOUNT",
        default_value = "outrigger-controller"
    )]
    pub service_account: String,
    /// How long the certificates signed are valid (proxies renew theirs at about 70% of it):
    /// shorter is less time for a stolen key, at one TokenReview per renewal. At least 10s.
    #[arg(long, env = "OUTRIGGER_CERTIFICATE_LIFETIME", default_value = "24h", value_parser = parse_lifetime)]
    pub certificate_lifetime: Duration,
}

fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = outrigger_api::duration::parse(text).map_err(|e| e.to_string())?;
    if lifetime < Duration::from_secs(10) {
        return Err("a certificate must last at least 10s".into());
    }
    Ok(lifetime)
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            identity_dir: None,
            trust_domain: outrigger_api::identity::DEFAULT_TRUST_DOMAIN.into(),
            service_account: "outrigger-controller".into(),
            certificate_lifetime: DEFAULT_LIFETIME,
        }
    }
}

#[cfg(test)]
mod tests;
