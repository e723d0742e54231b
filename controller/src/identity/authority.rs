//! The certificate authority: the trust anchors and the issuer (certificate and key) read from
//! the mounted Secret, and the leaf certificates it signs for certificate signing requests.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use outrigger_api::identity::SpiffeId;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm, SigningKey,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;

/// The files of the identity Secret, named as cert-manager names them (so that a Certificate's
/// Secret can be mounted as it is): the trust anchors, the issuer's certificate (and any
/// intermediates above it), the issuer's key.
pub const TRUST_ANCHORS_FILE: &str = "ca.crt";
pub const ISSUER_CERTIFICATE_FILE: &str = "tls.crt";
pub const ISSUER_KEY_FILE: &str = "tls.key";

/// How long a leaf certificate is valid, unless `--certificate-lifetime` says otherwise.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// A leaf is valid from this long before it is signed, so that a peer whose clock is a little
/// behind accepts it at once.
const BACKDATE: Duration = Duration::from_secs(60);

/// A signed leaf certificate with what a proxy needs besides.
#[derive(Clone, Debug)]
pub struct Certified {
    /// The leaf first, then the issuer's certificates that are not trust anchors.
    pub chain: Vec<CertificateDer<'static>>,
    pub trust_anchors: Vec<CertificateDer<'static>>,
    pub valid_until: SystemTime,
}

/// Why a certificate signing request was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the certificate signing request does not read or its signature is wrong: {0}")]
    Invalid(rcgen::Error),
    #[error(
        "the certificate signing request asks for {asked}; the token proves {proven}, the only \
         identity it may ask for"
    )]
    OtherIdentity { asked: String, proven: String },
    #[error("signing the certificate: {0}")]
    Signing(rcgen::Error),
}

pub struct Authority {
    issuer: Issuer<'static, IssuerKey>,
    /// The issuer's certificates that go into every chain.
    intermediates: Vec<CertificateDer<'static>>,
    trust_anchors: Vec<CertificateDer<'static>>,
    /// The trust anchors as the Secret holds them, for proxies to start with.
    trust_anchors_pem: String,
    /// How long the leaves it signs are valid.
    lifetime: Duration,
    random: SystemRandom,
}

impl Authority {
    /// Reads the Secret mounted at `dir`; fails, saying which file, when it does not make an
    /// issuer that chains to one of the trust anchors.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        Self::from_files(&SecretFiles::read(dir)?, DEFAULT_LIFETIME)
    }

    fn from_files(files: &SecretFiles, lifetime: Duration) -> anyhow::Result<Self> {
        let certificates =
            |pem: &[u8], name: &str| -> anyhow::Result<Vec<CertificateDer<'static>>> {
                let certificates = CertificateDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("reading the certificates of {name}"))?;
                if certificates.is_empty() {
                    bail!("{name} holds no certificate");
                }
                Ok(certificates)
            };
        let trust_anchors = certificates(&files.trust_anchors, TRUST_ANCHORS_FILE)?;
        let issuer_chain = certificates(&files.issuer_certificate, ISSUER_CERTIFICATE_FILE)?;
        let key = PrivateKeyDer::from_pem_slice(&files.issuer_key)
            .with_context(|| format!("reading the key of {ISSUER_KEY_FILE}"))?;
        let key = IssuerKey::new(&key).with_context(|| format!("loading {ISSUER_KEY_FILE}"))?;
        let issuer = Issuer::from_ca_cert_der(&issuer_chain[0], key).with_context(|| {
            format!("reading the issuer certificate of {ISSUER_CERTIFICATE_FILE}")
        })?;
        check_issuer(&issuer_chain, &trust_anchors, issuer.key())?;
        let intermediates = issuer_chain
            .into_iter()
            .filter(|certificate| !trust_anchors.contains(certificate))
            .collect();
        Ok(Self {
            issuer,
            intermediates,
            trust_anchors,
            trust_anchors_pem: String::from_utf8_lossy(&files.trust_anchors).into_owned(),
            lifetime,
            random: SystemRandom::new(),
        })
    }

    /// A leaf certificate for `identity`, valid for the authority's lifetime from `now`, for the key
    /// of `csr` if the request asks for exactly `identity` and is signed by that key.
    pub fn certify(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        now: SystemTime,
    ) -> Result<Certified, CsrError> {
        let request =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
                .map_err(CsrError::Invalid)?;
        let uri = identity.to_string();
        let asked: Vec<String> = request
            .params
            .subject_alt_names
            .iter()
            .map(|name| match name {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [uri.as_str()] {
            return Err(CsrError::OtherIdentity {
                asked: if asked.is_empty() {
                    "no name".into()
                } else {
                    asked.join(", ")
                },
                proven: uri,
            });
        }
        // Nothing else of the request is taken: what a leaf may do is the authority's choice.
        self.sign(&request.public_key, identity, now)
    }

    /// A leaf certificate for `identity` and the key of `public_key`, valid for the authority's
    /// lifetime from `now` (and a little before): what a proxy asks for, and the controller's own.
    pub fn sign(
        &self,
        public_key: &impl PublicKeyData,
        identity: &SpiffeId,
        now: SystemTime,
    ) -> Result<Certified, CsrError> {
        let not_before = now - BACKDATE;
        let valid_until = now + self.lifetime;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(CsrError::Signing)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = valid_until.into();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(self.serial_number()?);
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(CsrError::Signing)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(Certified {
            chain,
            trust_anchors: self.trust_anchors.clone(),
            valid_until,
        })
    }

    /// The trust anchors, PEM, as `ca.crt` holds them.
    pub fn trust_anchors_pem(&self) -> &str {
        &self.trust_anchors_pem
    }

    /// A random serial number: a renewal must not repeat one.
    fn serial_number(&self) -> Result<SerialNumber, CsrError> {
        let mut serial = [0u8; 16];
        self.random
            .fill(&mut serial)
            .map_err(|_| CsrError::Signing(rcgen::Error::RingUnspecified))?;
        // Positive, as a DER INTEGER must be.
        serial[0] &= 0x7f;
        Ok(SerialNumber::from_slice(&serial))
    }
}

/// The files of the identity Secret, as last read.
#[derive(PartialEq, Eq)]
struct SecretFiles {
    trust_anchors: Vec<u8>,
    issuer_certificate: Vec<u8>,
    issuer_key: Vec<u8>,
}

impl SecretFiles {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(Self {
            trust_anchors: read(TRUST_ANCHORS_FILE)?,
            issuer_certificate: read(ISSUER_CERTIFICATE_FILE)?,
            issuer_key: read(ISSUER_KEY_FILE)?,
        })
    }
}

/// The authority of the mounted Secret, read again for each certification and taken when it
/// changed: the kubelet updates a mounted Secret in place, so an issuer cert-manager renewed (or
/// a rotation's new anchors) needs no restart. Files that do not make an authority leave the last
/// good one signing.
pub struct ReloadingAuthority {
    dir: PathBuf,
    lifetime: Duration,
    current: Mutex<(SecretFiles, Arc<Authority>)>,
}

impl ReloadingAuthority {
    /// Fails as [`Authority::load`] does: a controller does not start without an authority.
    /// Its leaves are valid for `lifetime`.
    pub fn load(dir: &Path, lifetime: Duration) -> anyhow::Result<Self> {
        let files = SecretFiles::read(dir)?;
        let authority = Arc::new(Authority::from_files(&files, lifetime)?);
        Ok(Self {
            dir: dir.to_owned(),
            lifetime,
            current: Mutex::new((files, authority)),
        })
    }

    pub fn current(&self) -> Arc<Authority> {
        let mut current = self.current.lock().expect("not poisoned");
        let reloaded = SecretFiles::read(&self.dir).and_then(|files| {
            if files != current.0 {
                let authority = Authority::from_files(&files, self.lifetime)?;
                *current = (files, Arc::new(authority));
                tracing::info!(dir = %self.dir.display(), "identity issuer reloaded");
            }
            Ok(())
        });
        if let Err(error) = reloaded {
            tracing::warn!(error = format!("{error:#}"), "keeping the identity issuer");
        }
        current.1.clone()
    }
}

/// The issuer is a CA for `key`, and the top of its chain is a trust anchor or is signed by one.
fn check_issuer(
    chain: &[CertificateDer<'static>],
    trust_anchors: &[CertificateDer<'static>],
    key: &IssuerKey,
) -> anyhow::Result<()> {
    let issuer = parse(&chain[0], ISSUER_CERTIFICATE_FILE)?;
    if !issuer.is_ca() {
        bail!("the issuer certificate of {ISSUER_CERTIFICATE_FILE} is not a CA certificate");
    }
    if issuer.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        bail!("{ISSUER_KEY_FILE} is not the key of the certificate in {ISSUER_CERTIFICATE_FILE}");
    }
    let top = chain.last().expect("not empty");
    if trust_anchors.contains(top) {
        return Ok(());
    }
    let top = parse(top, ISSUER_CERTIFICATE_FILE)?;
    for anchor in trust_anchors {
        let anchor = parse(anchor, TRUST_ANCHORS_FILE)?;
        if top.verify_signature(Some(anchor.public_key())).is_ok() {
            return Ok(());
        }
    }
    bail!(
        "the issuer of {ISSUER_CERTIFICATE_FILE} is not signed by a trust anchor of {TRUST_ANCHORS_FILE}"
    )
}

fn parse<'a>(
    certificate: &'a CertificateDer<'static>,
    file: &str,
) -> anyhow::Result<X509Certificate<'a>> {
    x509_parser::parse_x509_certificate(certificate)
        .map(|(_, parsed)| parsed)
        .map_err(|e| anyhow::anyhow!("reading a certificate of {file}: {e}"))
}

/// The issuer's key: PKCS#8 (any algorithm rcgen signs with), or an RSA key in PKCS#1, as Helm's
/// `genCA` and cert-manager (by default, for RSA) write it.
enum IssuerKey {
    Pkcs8(KeyPair),
    RsaPkcs1(ring::signature::RsaKeyPair),
}

impl IssuerKey {
    fn new(key: &PrivateKeyDer<'_>) -> anyhow::Result<Self> {
        match key {
            PrivateKeyDer::Pkcs8(_) => Ok(Self::Pkcs8(
                KeyPair::try_from(key).context("reading a PKCS#8 key")?,
            )),
            PrivateKeyDer::Pkcs1(key) => Ok(Self::RsaPkcs1(
                ring::signature::RsaKeyPair::from_der(key.secret_pkcs1_der())
                    .map_err(|e| anyhow::anyhow!("reading an RSA key: {e}"))?,
            )),
            _ => bail!(
                "an EC key in SEC1 form is not supported: give it in PKCS#8 \
                 (cert-manager: privateKey.encoding: PKCS8)"
            ),
        }
    }
}

impl PublicKeyData for IssuerKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            Self::Pkcs8(key) => key.der_bytes(),
            Self::RsaPkcs1(key) => key.public().as_ref(),
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            Self::Pkcs8(key) => key.algorithm(),
            Self::RsaPkcs1(_) => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl SigningKey for IssuerKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            Self::Pkcs8(key) => key.sign(message),
            Self::RsaPkcs1(key) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    message,
                    &mut signature,
                )
                .map_err(|_| rcgen::Error::RingUnspecified)?;
                Ok(signature)
            }
        }
    }
}
