//! The controller's side of an authenticated control plane: TLS on the gRPC listener with a
//! certificate for the controller's own SPIFFE ID, which it signs itself with the authority and
//! renews as a proxy renews its own, and client certificates checked against the trust anchors.
//! A client certificate is optional at the handshake (a proxy without one yet may only ask for
//! one, with its token); the discovery service refuses streams without one.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context as _;
use outrigger_api::identity::SpiffeId;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use super::authority::{Authority, ReloadingAuthority};

/// The controller's certificate is signed again once this share of its life has passed (and at
/// once when the issuer changes), as a proxy renews its own.
const RENEW_AT: f64 = 0.7;

/// The TLS configuration of the gRPC listener.
pub struct ServingTls {
    id: SpiffeId,
    authority: Arc<ReloadingAuthority>,
    current: Mutex<Serving>,
}

struct Serving {
    /// What signed the certificate: a new issuer or new trust anchors make a new configuration.
    signed_by: Arc<Authority>,
    renew_at: SystemTime,
    config: Arc<ServerConfig>,
}

impl ServingTls {
    /// Fails when the authority cannot sign for `id`: a controller does not start without the
    /// certificate it serves.
    pub fn new(id: SpiffeId, authority: Arc<ReloadingAuthority>) -> anyhow::Result<Self> {
        let serving = serving(&id, authority.current(), SystemTime::now())?;
        Ok(Self {
            id,
            authority,
            current: Mutex::new(serving),
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The trust anchors now, PEM: what a proxy checks the controller's certificate against
    /// before it has its own.
    pub fn trust_anchors_pem(&self) -> String {
        self.authority.current().trust_anchors_pem().to_string()
    }

    /// The configuration of the next handshake. When signing a new certificate fails, the last
    /// one is served while it lasts.
    pub fn config(&self) -> Arc<ServerConfig> {
        let authority = self.authority.current();
        let now = SystemTime::now();
        let mut current = self.current.lock().expect("not poisoned");
        if !Arc::ptr_eq(&current.signed_by, &authority) || now >= current.renew_at {
            match serving(&self.id, authority, now) {
                Ok(serving) => *current = serving,
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "keeping the controller's certificate"
                ),
            }
        }
        current.config.clone()
    }
}

fn serving(id: &SpiffeId, authority: Arc<Authority>, now: SystemTime) -> anyhow::Result<Serving> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a key")?;
    let certified = authority
        .sign(&key, id, now)
        .context("signing the controller's certificate")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut anchors = RootCertStore::empty();
    for anchor in certified.trust_anchors {
        anchors.add(anchor).context("reading a trust anchor")?;
    }
    let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(anchors), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("the trust anchors")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_client_cert_verifier(clients)
        .with_single_cert(certified.chain, key)
        .context("the controller's certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let life = certified
        .valid_until
        .duration_since(now)
        .unwrap_or_default();
    Ok(Serving {
        signed_by: authority,
        renew_at: now + life.mul_f64(RENEW_AT),
        config: Arc::new(config),
    })
}

/// The identity a connection's client certificate proves, if it presented one (the handshake
/// checked that it leads to the trust anchors).
pub fn peer_identity(connection: &rustls::ServerConnection) -> Option<SpiffeId> {
    connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| SpiffeId::of_certificate(leaf))
}
