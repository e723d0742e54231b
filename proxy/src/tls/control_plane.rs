//! The proxy's side of an authenticated control plane: it calls the controller over TLS and
//! accepts only the controller's identity. Before it holds a certificate it checks the controller
//! against the trust anchors it was started with (the injector gives it those of the moment);
//! once it holds one, against the anchors that came with it, which follow a rotation. The
//! configuration stream presents the proxy's certificate, which is who the controller takes the
//! proxy for; certification itself presents none (the token proves who asks).

use std::sync::Arc;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use outrigger_api::identity::SpiffeId;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{Held, server_name};

/// How to reach the controller.
#[derive(Clone)]
pub struct ControlPlaneTls {
    controller: SpiffeId,
    server_name: ServerName<'static>,
    bootstrap_anchors: Arc<RootCertStore>,
    held: Held,
}

/// Whether a connection presents the proxy's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Present {
    /// The configuration stream: who the proxy is.
    Certificate,
    /// Asking for a certificate, with the token.
    Nothing,
}

impl ControlPlaneTls {
    /// `controller` is the identity the controller must prove, `trust_anchors_pem` the anchors
    /// it must lead to until the proxy holds its own, `held` the proxy's identity.
    pub fn new(controller: SpiffeId, trust_anchors_pem: &str, held: Held) -> anyhow::Result<Self> {
        let mut bootstrap_anchors = RootCertStore::empty();
        for anchor in CertificateDer::pem_slice_iter(trust_anchors_pem.as_bytes()) {
            bootstrap_anchors
                .add(anchor.context("reading the trust anchors")?)
                .context("reading a trust anchor")?;
        }
        if bootstrap_anchors.is_empty() {
            anyhow::bail!("the trust anchors hold no certificate");
        }
        Ok(Self {
            server_name: server_name(&controller)?,
            controller,
            bootstrap_anchors: Arc::new(bootstrap_anchors),
            held,
        })
    }

    /// The identity held, once there is one.
    pub async fn certified(&self) {
        let mut held = self.held.clone();
        let _ = held.wait_for(Option::is_some).await;
    }

    fn config(&self, present: Present) -> anyhow::Result<Arc<ClientConfig>> {
        let held = self.held.borrow().clone();
        match (present, held) {
            (Present::Certificate, Some(identity)) => Ok(identity.client.clone()),
            (Present::Certificate, None) => anyhow::bail!("the proxy holds no certificate yet"),
            (Present::Nothing, held) => {
                let anchors = held.map_or_else(
                    || self.bootstrap_anchors.clone(),
                    |identity| identity.trust_anchors.clone(),
                );
                let config = super::mesh_client(anchors, self.controller.trust_domain.clone())?
                    .with_no_client_auth();
                Ok(Arc::new(config))
            }
        }
    }

    /// Connects tonic's channels to the controller: TCP to the URL's host and port, then TLS.
    pub fn connector(
        &self,
        present: Present,
    ) -> impl tower::Service<
        http::Uri,
        Response = TokioIo<TlsStream<TcpStream>>,
        Error = anyhow::Error,
        Future = impl Future<Output = anyhow::Result<TokioIo<TlsStream<TcpStream>>>> + Send,
    > + Clone
    + Send
    + 'static {
        let tls = self.clone();
        tower::service_fn(move |uri: http::Uri| {
            let config = tls.config(present);
            let server_name = tls.server_name.clone();
            async move {
                let host = uri.host().context("the control plane URL names no host")?;
                // An IPv6 address, without the brackets of its URL form.
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port = uri.port_u16().unwrap_or(80);
                let tcp = TcpStream::connect((host, port))
                    .await
                    .with_context(|| format!("connecting to {host}:{port}"))?;
                let _ = tcp.set_nodelay(true);
                let tls = TlsConnector::from(config?)
                    .connect(server_name, tcp)
                    .await
                    .context("the TLS handshake with the controller")?;
                Ok(TokioIo::new(tls))
            }
        })
    }
}
