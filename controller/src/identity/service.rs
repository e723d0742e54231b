//! The `Identity` gRPC service: a token and a certificate signing request in, a certificate for
//! the token's ServiceAccount out.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use outrigger_api::identity::SpiffeId;
use outrigger_api::proto::identity_server::{Identity, IdentityServer};
use outrigger_api::proto::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use super::authority::{CsrError, ReloadingAuthority};
use super::review::{MAX_TOKEN_BYTES, ReviewError, Reviewer};

/// A token and a CSR for a P-256 or RSA key, with room to spare.
const MAX_MESSAGE_BYTES: usize = MAX_TOKEN_BYTES + 16 * 1024;

pub struct IdentityService {
    reviewer: Reviewer,
    authority: Arc<ReloadingAuthority>,
    trust_domain: String,
}

impl IdentityService {
    pub fn new(
        reviewer: Reviewer,
        authority: Arc<ReloadingAuthority>,
        trust_domain: String,
    ) -> Self {
        Self {
            reviewer,
            authority,
            trust_domain,
        }
    }

    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let request = request.into_inner();
        let account = self
            .reviewer
            .review(&request.token)
            .await
            .map_err(|error| match error {
                ReviewError::Unauthenticated(reason) => Status::unauthenticated(reason),
                ReviewError::Unavailable(_) => Status::unavailable(error.to_string()),
            })?;
        let identity = SpiffeId {
            trust_domain: self.trust_domain.clone(),
            namespace: account.namespace,
            service_account: account.name,
        };
        // Certificates are dated by the wall clock, as their peers read them.
        let certified = self
            .authority
            .current()
            .certify(&request.csr_der, &identity, SystemTime::now())
            .map_err(|error| {
                tracing::info!(%identity, %error, "certificate signing request refused");
                match error {
                    CsrError::Invalid(_) => Status::invalid_argument(error.to_string()),
                    CsrError::OtherIdentity { .. } => Status::permission_denied(error.to_string()),
                    CsrError::Signing(_) => Status::internal(error.to_string()),
                }
            })?;
        tracing::debug!(%identity, "certified");
        let valid_until = certified
            .valid_until
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() as i64);
        Ok(Response::new(CertifyResponse {
            chain_der: certified.chain.into_iter().map(|c| c.to_vec()).collect(),
            trust_anchors_der: certified
                .trust_anchors
                .into_iter()
                .map(|c| c.to_vec())
                .collect(),
            valid_until_unix_seconds: valid_until,
        }))
    }
}
