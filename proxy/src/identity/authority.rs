//! Who signs the proxy's certificates: the controller's `Identity` service.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use outrigger_api::proto::identity_client::IdentityClient;
use outrigger_api::proto::{CertifyRequest, CertifyResponse};
use tonic::transport::{Channel, Endpoint};

use crate::tls::{ControlPlaneTls, Present};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The controller checks the token with the API server before it signs: a second or so.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Signs certificate signing requests (the controller; a test's own CA in tests).
pub trait CertificateAuthority: Send + Sync + 'static {
    fn certify(
        &self,
        request: CertifyRequest,
    ) -> impl Future<Output = Result<CertifyResponse, tonic::Status>> + Send;
}

/// The controller's `Identity` service, over a connection of its own made when first needed
/// (a renewal comes once in hours; the controller closes an idle connection, and tonic makes a
/// new one).
#[derive(Clone)]
pub struct ControlPlaneAuthority {
    client: IdentityClient<Channel>,
}

impl ControlPlaneAuthority {
    /// Over TLS, checking the controller by `tls`, presenting no certificate.
    pub fn new(url: &str, tls: &ControlPlaneTls) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(url.to_string())
            .context("reading the control plane URL")?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector_lazy(tls.connector(Present::Nothing));
        Ok(Self {
            client: IdentityClient::new(channel),
        })
    }
}

impl CertificateAuthority for ControlPlaneAuthority {
    async fn certify(&self, request: CertifyRequest) -> Result<CertifyResponse, tonic::Status> {
        let mut client = self.client.clone();
        client
            .certify(request)
            .await
            .map(tonic::Response::into_inner)
    }
}
