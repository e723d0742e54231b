//! Who signs the proxy's certificates: the controller's `Identity` service.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use outrigger_api::proto::identity_client::IdentityClient;
use outrigger_api::proto::{CertifyRequest, CertifyResponse};
use tonic::transport::Endpoint;

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

/// The controller's `Identity` service, over a new connection for each certification: one comes
/// once in hours, long after the controller closed the last connection as idle, and each
/// handshake checks the controller against the anchors the proxy holds at that moment.
#[derive(Clone)]
pub struct ControlPlaneAuthority {
    endpoint: Endpoint,
    tls: ControlPlaneTls,
}

impl ControlPlaneAuthority {
    /// Over TLS, checking the controller by `tls`, presenting no certificate.
    pub fn new(url: &str, tls: &ControlPlaneTls) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .context("reading the control plane URL")?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        Ok(Self {
            endpoint,
            tls: tls.clone(),
        })
    }
}

impl CertificateAuthority for ControlPlaneAuthority {
    async fn certify(&self, request: CertifyRequest) -> Result<CertifyResponse, tonic::Status> {
        let channel = self
            .endpoint
            .connect_with_connector(self.tls.connector(Present::Nothing))
            .await
            .map_err(|error| {
                let error = anyhow::Error::new(error);
                tonic::Status::unavailable(format!("connecting to the control plane: {error:#}"))
            })?;
        IdentityClient::new(channel)
            .certify(request)
            .await
            .map(tonic::Response::into_inner)
    }
}
