//! How a client proxy checks the server it called: the chain leads to the mesh's trust anchors,
//! and the certificate is for exactly the identity the server name was made from. The web's
//! check (a DNS name among the certificate's names) does not apply: workload certificates name a
//! SPIFFE ID only.

use std::sync::Arc;

use outrigger_api::identity::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use super::named;

#[derive(Debug)]
pub struct MeshServerVerifier {
    trust_anchors: Arc<RootCertStore>,
    /// This proxy's: a server name stands for an identity in it.
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl MeshServerVerifier {
    pub fn new(
        trust_anchors: Arc<RootCertStore>,
        trust_domain: String,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            trust_anchors,
            trust_domain,
            provider,
        }
    }

    /// The identity the server must have.
    fn expected(&self, server_name: &ServerName<'_>) -> Result<SpiffeId, Error> {
        let ServerName::DnsName(name) = server_name else {
            return Err(Error::General(format!(
                "{server_name:?} is no mesh server name"
            )));
        };
        named(name.as_ref(), &self.trust_domain)
            .ok_or_else(|| Error::General(format!("{} is no mesh server name", name.as_ref())))
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let expected = self.expected(server_name)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.trust_anchors,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match SpiffeId::of_certificate(end_entity) {
            Some(presented) if presented == expected => Ok(ServerCertVerified::assertion()),
            Some(presented) => Err(Error::General(format!(
                "the server is {presented}, not {expected}"
            ))),
            None => Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NoWorkloadId)),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the certificate names no single SPIFFE ID")]
struct NoWorkloadId;
