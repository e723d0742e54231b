//! The workload's identity: a certificate for its SPIFFE ID from the controller, the mesh's
//! certificate authority. The proxy proves who it is with the projected ServiceAccount token,
//! generates a key that never leaves its memory (a new one each time), and sends a certificate
//! signing request for `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. What comes
//! back is checked (the chain is for this key and leads to the trust anchors) and published on a
//! watch channel with the rustls configurations of mutual TLS made of it (`tls`); it is renewed
//! at about 70% of its life, and retried with backoff when that fails.

mod authority;
#[cfg(test)]
pub(crate) mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use outrigger_api::identity::SpiffeId;
use outrigger_api::proto::{CertifyRequest, CertifyResponse};
use rand::Rng as _;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, crypto::CryptoProvider};
use tokio::sync::watch;

use crate::metrics::{Metrics, RenewalResult};
use crate::shutdown::stopped;
pub use crate::tls::{CertifiedIdentity, Held};
pub use authority::{CertificateAuthority, ControlPlaneAuthority};

/// A certificate is renewed when this share of its remaining life has passed.
const RENEW_AT: f64 = 0.7;
/// A failed certification is retried after this long at first, doubling up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How this proxy gets its identity.
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    pub id: SpiffeId,
    /// The projected ServiceAccount token, read again for each certification (the kubelet
    /// rotates it).
    pub token_file: PathBuf,
}

/// Certifies, then renews, until `shutdown`; each certificate goes to `held`.
pub async fn run<A: CertificateAuthority>(
    settings: IdentitySettings,
    authority: A,
    metrics: Metrics,
    held: watch::Sender<Option<Arc<CertifiedIdentity>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let wait = match certify(&settings, &authority).await {
            Ok(identity) => {
                metrics.renewed(RenewalResult::Success);
                metrics
                    .identity_cert_expiry
                    .set(i64::try_from(identity.valid_until).unwrap_or(i64::MAX));
                let remaining = Duration::from_secs(identity.valid_until)
                    .saturating_sub(wall_clock_since_epoch());
                tracing::info!(id = %identity.id, expires_in = ?remaining, "certified");
                held.send_replace(Some(Arc::new(identity)));
                backoff = BACKOFF_MIN;
                // Never at once: a controller whose clock is far behind ours would otherwise
                // be asked again and again.
                remaining.mul_f64(RENEW_AT).max(BACKOFF_MIN)
            }
            Err(error) => {
                metrics.renewed(RenewalResult::Failure);
                let wait = rand::rng().random_range(backoff / 2..=backoff);
                tracing::warn!(id = %settings.id, error = format!("{error:#}"), retry_in = ?wait, "certification failed");
                backoff = (backoff * 2).min(BACKOFF_MAX);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// One certification: a fresh key, a CSR for our SPIFFE ID with the current token, and the
/// answer checked.
async fn certify<A: CertificateAuthority>(
    settings: &IdentitySettings,
    authority: &A,
) -> anyhow::Result<CertifiedIdentity> {
    let token = tokio::fs::read_to_string(&settings.token_file)
        .await
        .with_context(|| format!("reading the token {}", settings.token_file.display()))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a key")?;
    let csr = csr(&settings.id, &key)?;
    let response = authority
        .certify(CertifyRequest {
            token: token.trim().to_string(),
            csr_der: csr,
        })
        .await
        .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))
        .context("asking the control plane for a certificate")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    accept(settings.id.clone(), key, response).context("checking the certificate")
}

/// A certificate signing request for `id` alone, signed by `key`.
fn csr(id: &SpiffeId, key: &KeyPair) -> anyhow::Result<Vec<u8>> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .context("the SPIFFE ID as a URI")?,
    )];
    Ok(params
        .serialize_request(key)
        .context("signing the certificate request")?
        .der()
        .to_vec())
}

/// The identity in `response`, if its chain is for `key` and leads to its trust anchors as a
/// peer would check it.
fn accept(
    id: SpiffeId,
    key: PrivateKeyDer<'static>,
    response: CertifyResponse,
) -> anyhow::Result<CertifiedIdentity> {
    let chain: Vec<CertificateDer<'static>> = response
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    if chain.is_empty() {
        bail!("the answer holds no certificate");
    }
    let mut trust_anchors = RootCertStore::empty();
    for anchor in response.trust_anchors_der {
        trust_anchors
            .add(CertificateDer::from(anchor))
            .context("reading a trust anchor")?;
    }
    let trust_anchors = Arc::new(trust_anchors);
    let provider = crate::tls::provider();
    let certified_key = certified_key(chain, key, &provider)?;
    // The leaf must do for the peers that will check it: within its validity, leading to the
    // anchors, for client authentication (the authority gives server authentication with it).
    WebPkiClientVerifier::builder_with_provider(trust_anchors.clone(), provider)
        .build()
        .context("the trust anchors")?
        .verify_client_cert(
            &certified_key.cert[0],
            &certified_key.cert[1..],
            UnixTime::since_unix_epoch(wall_clock_since_epoch()),
        )
        .context("the chain does not lead to the trust anchors")?;
    let valid_until =
        u64::try_from(response.valid_until_unix_seconds).context("the expiry is before 1970")?;
    CertifiedIdentity::new(id, Arc::new(certified_key), trust_anchors, valid_until)
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .context("loading the key")?;
    let certified_key = CertifiedKey::new(chain, signing_key);
    certified_key
        .keys_match()
        .context("the certificate is not for this proxy's key")?;
    Ok(certified_key)
}

/// Now by the wall clock. Certificates are valid between wall-clock times, which tokio's clock
/// (the proxy's one clock otherwise) does not tell; nothing here waits on it.
#[expect(
    clippy::disallowed_types,
    reason = "certificate validity is wall-clock time; waits use tokio's clock"
)]
fn wall_clock_since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}
