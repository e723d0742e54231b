//! Mutual TLS between meshed proxies, and the identity it is made of.
//!
//! A client proxy calls a meshed endpoint over TLS 1.3, with its own certificate, and accepts
//! only the identity the control plane said the endpoint has (`verify`). The server name it sends
//! is made from that identity (`server_name`), under a domain of the mesh's own, so that the
//! server's proxy tells the mesh's TLS from the app's own by the ClientHello alone. The server's proxy requires a client
//! certificate leading to the same trust anchors and takes the caller's identity from it
//! (`SpiffeId::of_certificate`). Both configurations are built once per certificate, when it is certified.
//!
//! The controller is called the same way, as the proxy of the controller's identity would be
//! (`control_plane`).

mod control_plane;
mod hybrid;
#[cfg(test)]
mod tests;
mod verify;

use std::sync::Arc;

use anyhow::Context as _;
use outrigger_api::identity::SpiffeId;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;

use crate::metrics::Name;
pub use control_plane::{ControlPlaneTls, Present};
use verify::MeshServerVerifier;

/// Under this domain, `<service account>.<namespace>.` names a proxy serving mutual TLS: no
/// application's TLS uses it (`.internal` is reserved for private use).
const SERVER_NAME_SUFFIX: &str = ".serviceaccount.outrigger.internal";

/// The identity the proxy holds: its certificate chain with its key, the trust anchors a peer's
/// chain must lead to, and the rustls configurations made of them.
pub struct CertifiedIdentity {
    pub id: SpiffeId,
    /// The chain (leaf first) and the key, as a rustls certificate resolver presents them.
    pub certified_key: Arc<CertifiedKey>,
    pub trust_anchors: Arc<RootCertStore>,
    /// When the leaf expires, in seconds since the Unix epoch.
    pub valid_until: u64,
    /// For calls to meshed endpoints.
    pub client: Arc<ClientConfig>,
    /// For callers whose ClientHello names a mesh server name.
    pub server: Arc<ServerConfig>,
}

impl std::fmt::Debug for CertifiedIdentity {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedIdentity")
            .field("id", &self.id)
            .field("valid_until", &self.valid_until)
            .finish_non_exhaustive()
    }
}

/// The identity held, if any; `None` until the first certificate (or ever, without identity).
pub type Held = watch::Receiver<Option<Arc<CertifiedIdentity>>>;

/// For what never calls a meshed endpoint (the local app).
pub fn no_identity() -> Held {
    watch::channel(None).1
}

/// The one cryptography provider of the proxy's TLS: ring's, preferring the hybrid
/// post-quantum key exchange X25519MLKEM768 to its classical groups.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups.insert(0, hybrid::X25519MLKEM768);
    Arc::new(provider)
}

impl CertifiedIdentity {
    pub fn new(
        id: SpiffeId,
        certified_key: Arc<CertifiedKey>,
        trust_anchors: Arc<RootCertStore>,
        valid_until: u64,
    ) -> anyhow::Result<Self> {
        let provider = provider();
        let resolver = Arc::new(SingleCertAndKey::from(certified_key.clone()));
        let client = mesh_client(trust_anchors.clone(), id.trust_domain.clone())?
            .with_client_cert_resolver(resolver.clone());
        // Every caller must present a certificate leading to the anchors; its identity is read
        // from it once the handshake is done.
        let clients =
            WebPkiClientVerifier::builder_with_provider(trust_anchors.clone(), provider.clone())
                .build()
                .context("the trust anchors")?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .with_client_cert_verifier(clients)
            .with_cert_resolver(resolver);
        Ok(Self {
            id,
            certified_key,
            trust_anchors,
            valid_until,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// A client configuration, but for its own certificate, that accepts a server of exactly the
/// identity its server name stands for in `trust_domain`, leading to `trust_anchors`.
fn mesh_client(
    trust_anchors: Arc<RootCertStore>,
    trust_domain: String,
) -> anyhow::Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>> {
    let provider = provider();
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(
            trust_anchors,
            trust_domain,
            provider,
        ))))
}

/// The server name a client sends to the proxy of `id`: `<service account>.<namespace>` under
/// [`SERVER_NAME_SUFFIX`]. An error for an identity that makes no DNS name (over 253
/// characters, or characters DNS does not allow).
pub fn server_name(id: &SpiffeId) -> anyhow::Result<ServerName<'static>> {
    let name = format!(
        "{}.{}{SERVER_NAME_SUFFIX}",
        id.service_account, id.namespace
    );
    ServerName::try_from(name).map_err(|_| anyhow::anyhow!("{id} makes no TLS server name"))
}

/// Whether a ClientHello's server name is the mesh's: the caller is a proxy, which expects some
/// proxy's identity (this one's, or another it will refuse, learning who answered).
pub fn is_mesh_server_name(name: &str) -> bool {
    name.ends_with(SERVER_NAME_SUFFIX)
}

/// The identity `server_name` names in `trust_domain`, if it is a mesh server name. The namespace
/// is a single DNS label, so the name reads back one way only.
fn named(server_name: &str, trust_domain: &str) -> Option<SpiffeId> {
    let (service_account, namespace) = server_name
        .strip_suffix(SERVER_NAME_SUFFIX)?
        .rsplit_once('.')?;
    Some(SpiffeId {
        trust_domain: trust_domain.into(),
        namespace: namespace.into(),
        service_account: service_account.into(),
    })
}

/// How a peer's identity appears in metric labels (`client_id`, `server_id`): its namespaced
/// ServiceAccount, `namespace/name` as authorization policies name it; the trust domain is the
/// mesh's own, and repeating it in every series would only cost.
pub fn label(id: &SpiffeId) -> Name {
    Arc::new(format!("{}/{}", id.namespace, id.service_account))
}
