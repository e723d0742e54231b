//! The authority's leaves and refusals, and the service with the API server's TokenReview faked.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outrigger_api::identity::SpiffeId;
use outrigger_api::proto::CertifyRequest;
use outrigger_api::proto::identity_server::Identity as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_rustls::rustls;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::authority::{
    Authority, CsrError, DEFAULT_LIFETIME, ISSUER_CERTIFICATE_FILE, ISSUER_KEY_FILE,
    ReloadingAuthority, TRUST_ANCHORS_FILE,
};
use super::review::{MAX_REVIEWS_IN_FLIGHT, Reviewer, TOKEN_AUDIENCE};
use super::service::IdentityService;
use crate::kube_api::fake;

fn reviews() -> SpiffeId {
    SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "shop".into(),
        service_account: "reviews".into(),
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A self-signed CA, anchor and issuer at once, as the chart generates it.
fn write_self_signed(dir: &Path) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let ca = ca_params("outrigger test root").self_signed(&key).unwrap();
    std::fs::write(dir.join(TRUST_ANCHORS_FILE), ca.pem()).unwrap();
    std::fs::write(dir.join(ISSUER_CERTIFICATE_FILE), ca.pem()).unwrap();
    std::fs::write(dir.join(ISSUER_KEY_FILE), key.serialize_pem()).unwrap();
    ca.der().clone()
}

/// A root (the anchor) and an intermediate issuer signed by it, as cert-manager would write them.
fn write_intermediate(dir: &Path) -> (CertificateDer<'static>, CertificateDer<'static>) {
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("outrigger test root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate().unwrap();
    let intermediate = ca_params("outrigger test issuer")
        .signed_by(&key, &root_issuer)
        .unwrap();
    std::fs::write(dir.join(TRUST_ANCHORS_FILE), root.pem()).unwrap();
    std::fs::write(dir.join(ISSUER_CERTIFICATE_FILE), intermediate.pem()).unwrap();
    std::fs::write(dir.join(ISSUER_KEY_FILE), key.serialize_pem()).unwrap();
    (root.der().clone(), intermediate.der().clone())
}

/// A CSR, as a proxy sends it, for `names`.
fn csr(names: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = names;
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn uri(id: &str) -> SanType {
    SanType::URI(id.try_into().unwrap())
}

/// Checks the chain as a peer would (webpki, through rustls): it leads to `anchor`, and the leaf
/// may authenticate a client.
fn assert_chains_to(chain: &[CertificateDer<'static>], anchor: &CertificateDer<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(anchor.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .expect("the chain leads to the trust anchor");
}

#[test]
fn a_leaf_names_exactly_the_identity_for_a_day_and_chains_to_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = write_self_signed(dir.path());
    let authority = Authority::load(dir.path()).unwrap();
    let now = SystemTime::now();
    let certified = authority
        .certify(&csr(vec![uri(&reviews().to_string())]), &reviews(), now)
        .unwrap();
    // The anchor is the issuer: it is not repeated in the chain.
    assert_eq!(certified.chain.len(), 1);
    assert_eq!(certified.trust_anchors, std::slice::from_ref(&anchor));
    assert_chains_to(&certified.chain, &anchor);

    let (_, leaf) = x509_parser::parse_x509_certificate(&certified.chain[0]).unwrap();
    let validity = leaf.validity();
    assert_eq!(
        validity.not_after.timestamp(),
        unix(now) + DEFAULT_LIFETIME.as_secs() as i64
    );
    assert!(validity.not_before.timestamp() <= unix(now));
    assert_eq!(validity.not_after.timestamp(), unix(certified.valid_until));
    assert!(!leaf.is_ca());
    let mut names = Vec::new();
    let mut extended = None;
    let mut usage = None;
    for extension in leaf.extensions() {
        match extension.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                names.extend(san.general_names.iter().map(|name| match name {
                    GeneralName::URI(uri) => uri.to_string(),
                    other => format!("{other:?}"),
                }))
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                extended = Some((eku.server_auth, eku.client_auth, eku.other.len()))
            }
            ParsedExtension::KeyUsage(ku) => usage = Some(ku.flags),
            _ => {}
        }
    }
    assert_eq!(names, ["spiffe://cluster.local/ns/shop/sa/reviews"]);
    assert_eq!(extended, Some((true, true, 0)));
    // digitalSignature alone (bit 0).
    assert_eq!(usage, Some(1));
}

fn unix(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn a_leaf_of_an_intermediate_issuer_carries_it_and_chains_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let (root, intermediate) = write_intermediate(dir.path());
    let authority = Authority::load(dir.path()).unwrap();
    let certified = authority
        .certify(
            &csr(vec![uri(&reviews().to_string())]),
            &reviews(),
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(certified.chain[1..], [intermediate]);
    assert_eq!(certified.trust_anchors, std::slice::from_ref(&root));
    assert_chains_to(&certified.chain, &root);
}

#[test]
fn an_rsa_issuer_in_pkcs1_as_helm_writes_it_signs_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let pem = include_str!("testdata/rsa-pkcs1.crt");
    std::fs::write(dir.path().join(TRUST_ANCHORS_FILE), pem).unwrap();
    std::fs::write(dir.path().join(ISSUER_CERTIFICATE_FILE), pem).unwrap();
    std::fs::write(
        dir.path().join(ISSUER_KEY_FILE),
        include_str!("testdata/rsa-pkcs1.key"),
    )
    .unwrap();
    let authority = Authority::load(dir.path()).unwrap();
    let certified = authority
        .certify(
            &csr(vec![uri(&reviews().to_string())]),
            &reviews(),
            SystemTime::now(),
        )
        .unwrap();
    assert_chains_to(&certified.chain, &certified.trust_anchors[0]);
}

#[test]
fn a_csr_for_any_other_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_self_signed(dir.path());
    let authority = Authority::load(dir.path()).unwrap();
    let others = [
        vec![uri("spiffe://cluster.local/ns/shop/sa/ratings")],
        vec![uri("spiffe://cluster.local/ns/other/sa/reviews")],
        vec![uri("spiffe://evil.example/ns/shop/sa/reviews")],
        vec![SanType::DnsName("reviews.shop".try_into().unwrap())],
        vec![
            uri("spiffe://cluster.local/ns/shop/sa/reviews"),
            uri("spiffe://cluster.local/ns/shop/sa/ratings"),
        ],
        vec![],
    ];
    for names in others {
        let refused = authority.certify(&csr(names.clone()), &reviews(), SystemTime::now());
        assert!(
            matches!(refused, Err(CsrError::OtherIdentity { .. })),
            "{names:?}: {refused:?}"
        );
    }
}

#[test]
fn a_csr_whose_signature_is_wrong_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_self_signed(dir.path());
    let authority = Authority::load(dir.path()).unwrap();
    let mut request = csr(vec![uri(&reviews().to_string())]);
    // The last byte is the signature's.
    *request.last_mut().unwrap() ^= 1;
    let refused = authority.certify(&request, &reviews(), SystemTime::now());
    assert!(matches!(refused, Err(CsrError::Invalid(_))), "{refused:?}");
    let refused = authority.certify(b"not a CSR", &reviews(), SystemTime::now());
    assert!(matches!(refused, Err(CsrError::Invalid(_))), "{refused:?}");
}

#[test]
fn an_issuer_that_does_not_lead_to_an_anchor_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    write_intermediate(dir.path());
    // Another root as the anchor.
    let other = ca_params("another root")
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(dir.path().join(TRUST_ANCHORS_FILE), other.pem()).unwrap();
    let error = Authority::load(dir.path()).err().unwrap();
    assert!(
        format!("{error:#}").contains("not signed by a trust anchor"),
        "{error:#}"
    );

    // A key that is not the issuer's.
    write_self_signed(dir.path());
    std::fs::write(
        dir.path().join(ISSUER_KEY_FILE),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let error = Authority::load(dir.path()).err().unwrap();
    assert!(format!("{error:#}").contains("is not the key"), "{error:#}");

    // A leaf as the issuer.
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["leaf".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    for file in [TRUST_ANCHORS_FILE, ISSUER_CERTIFICATE_FILE] {
        std::fs::write(dir.path().join(file), leaf.pem()).unwrap();
    }
    std::fs::write(dir.path().join(ISSUER_KEY_FILE), key.serialize_pem()).unwrap();
    let error = Authority::load(dir.path()).err().unwrap();
    assert!(format!("{error:#}").contains("not a CA"), "{error:#}");

    std::fs::remove_file(dir.path().join(ISSUER_KEY_FILE)).unwrap();
    let error = Authority::load(dir.path()).err().unwrap();
    assert!(format!("{error:#}").contains("tls.key"), "{error:#}");
}

/// An API server whose TokenReview knows three tokens: one of `shop/reviews` for our audience,
/// one of it for another audience, and one of a user. It checks that every review asks for our
/// audience.
fn token_reviews() -> kube::Client {
    fake::client(|call| {
        assert_eq!(call.method, http::Method::POST);
        assert!(
            call.path
                .starts_with("/apis/authentication.k8s.io/v1/tokenreviews"),
            "{}",
            call.path
        );
        let review: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(
            review["spec"]["audiences"],
            serde_json::json!([TOKEN_AUDIENCE])
        );
        let status = match review["spec"]["token"].as_str().unwrap() {
            "reviews-token" => serde_json::json!({
                "authenticated": true,
                "audiences": [TOKEN_AUDIENCE],
                "user": {"username": "system:serviceaccount:shop:reviews"},
            }),
            "user-token" => serde_json::json!({
                "authenticated": true,
                "audiences": [TOKEN_AUDIENCE],
                "user": {"username": "alice"},
            }),
            _ => serde_json::json!({
                "authenticated": false,
                "error": "[invalid bearer token, token audiences [\"api\"] is invalid for the target audiences [\"outrigger\"]]",
            }),
        };
        let mut answer = review;
        answer["status"] = status;
        Box::pin(std::future::ready(fake::json(201, &answer)))
    })
}

fn service(client: kube::Client) -> (IdentityService, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_self_signed(dir.path());
    let authority = Arc::new(ReloadingAuthority::load(dir.path(), DEFAULT_LIFETIME).unwrap());
    let service = IdentityService::new(Reviewer::new(client), authority, "cluster.local".into());
    (service, dir)
}

async fn certify(
    service: &IdentityService,
    token: &str,
    names: Vec<SanType>,
) -> Result<outrigger_api::proto::CertifyResponse, tonic::Status> {
    service
        .certify(tonic::Request::new(CertifyRequest {
            token: token.into(),
            csr_der: csr(names),
        }))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_token_of_a_service_account_gets_a_certificate_for_exactly_its_identity() {
    let (service, _dir) = service(token_reviews());
    let id = "spiffe://cluster.local/ns/shop/sa/reviews";
    let certified = certify(&service, "reviews-token", vec![uri(id)])
        .await
        .unwrap();
    assert_eq!(certified.chain_der.len(), 1);
    assert_eq!(certified.trust_anchors_der.len(), 1);
    let chain: Vec<_> = certified
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    assert_chains_to(
        &chain,
        &CertificateDer::from(certified.trust_anchors_der[0].clone()),
    );
    let now = unix(SystemTime::now());
    let day = DEFAULT_LIFETIME.as_secs() as i64;
    assert!((now + day - 120..=now + day).contains(&certified.valid_until_unix_seconds));

    let refused = certify(
        &service,
        "reviews-token",
        vec![uri("spiffe://cluster.local/ns/shop/sa/ratings")],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(id), "{}", refused.message());
}

#[tokio::test]
async fn a_token_for_another_audience_or_of_a_user_is_refused() {
    let (service, _dir) = service(token_reviews());
    let id = "spiffe://cluster.local/ns/shop/sa/reviews";
    for token in ["api-audience-token", "user-token", ""] {
        let refused = certify(&service, token, vec![uri(id)]).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "{token}: {refused:?}"
        );
    }
}

#[tokio::test]
async fn an_authenticated_review_without_our_audience_is_refused() {
    // An API server that authenticates the token but does not say it is for our audience.
    let client = fake::client(|call| {
        let mut review: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        review["status"] = serde_json::json!({
            "authenticated": true,
            "audiences": ["api"],
            "user": {"username": "system:serviceaccount:shop:reviews"},
        });
        Box::pin(std::future::ready(fake::json(201, &review)))
    });
    let (service, _dir) = service(client);
    let refused = certify(
        &service,
        "reviews-token",
        vec![uri("spiffe://cluster.local/ns/shop/sa/reviews")],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}

#[tokio::test(start_paused = true)]
async fn a_review_the_api_server_does_not_answer_fails_unavailable_after_its_deadline() {
    let client = fake::client(|_| Box::pin(std::future::pending()));
    let (service, _dir) = service(client);
    let started = tokio::time::Instant::now();
    let refused = certify(
        &service,
        "reviews-token",
        vec![uri("spiffe://cluster.local/ns/shop/sa/reviews")],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test]
async fn a_renewed_issuer_signs_without_a_restart_and_a_broken_one_is_not_taken() {
    let (service, dir) = service(token_reviews());
    let id = "spiffe://cluster.local/ns/shop/sa/reviews";
    let before = certify(&service, "reviews-token", vec![uri(id)])
        .await
        .unwrap();
    // The kubelet updates the mounted Secret: a new CA.
    let anchor = write_self_signed(dir.path());
    let after = certify(&service, "reviews-token", vec![uri(id)])
        .await
        .unwrap();
    assert_ne!(before.trust_anchors_der, after.trust_anchors_der);
    assert_eq!(after.trust_anchors_der, [anchor.to_vec()]);
    // A key that does not go with the certificate: the last good issuer goes on signing.
    std::fs::write(
        dir.path().join(ISSUER_KEY_FILE),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let kept = certify(&service, "reviews-token", vec![uri(id)])
        .await
        .unwrap();
    assert_eq!(kept.trust_anchors_der, [anchor.to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn at_most_so_many_reviews_are_in_flight_at_once() {
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (counting, highest) = (in_flight.clone(), most.clone());
    // An API server that takes a second to answer each review.
    let client = fake::client(move |call| {
        let (counting, highest) = (counting.clone(), highest.clone());
        Box::pin(async move {
            let now = counting.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            highest.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            counting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let mut review: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
            review["status"] = serde_json::json!({"authenticated": false});
            fake::json(201, &review)
        })
    });
    let reviewer = Reviewer::new(client);
    let reviews = (0..MAX_REVIEWS_IN_FLIGHT * 2).map(|_| {
        let reviewer = reviewer.clone();
        tokio::spawn(async move { reviewer.review("a-token").await })
    });
    for review in futures_util::future::join_all(reviews).await {
        // Every one answered, the second half after the first.
        assert!(matches!(
            review.unwrap(),
            Err(super::review::ReviewError::Unauthenticated(_))
        ));
    }
    assert_eq!(
        most.load(std::sync::atomic::Ordering::SeqCst),
        MAX_REVIEWS_IN_FLIGHT
    );
}

/// Accepts any server certificate, keeping it: the test checks it as a proxy would, by its chain
/// and its SPIFFE ID (which webpki's server check, for DNS names, does not read).
#[derive(Debug, Default)]
struct KeepServerCertificate(std::sync::Mutex<Vec<CertificateDer<'static>>>);

impl rustls::client::danger::ServerCertVerifier for KeepServerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut kept = self.0.lock().unwrap();
        kept.push(end_entity.clone().into_owned());
        kept.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a handshake with `serving` tells each side: the server's chain as the client got it,
/// and the client's identity as the server proved it (or the handshake's failure).
async fn handshake(
    serving: &super::ServingTls,
    client_key: Option<(Vec<CertificateDer<'static>>, KeyPair)>,
) -> (
    Vec<CertificateDer<'static>>,
    Result<Option<SpiffeId>, String>,
) {
    let kept = Arc::new(KeepServerCertificate::default());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(kept.clone());
    let client = match client_key {
        Some((chain, key)) => {
            let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(serving.config());
    let server = tokio::spawn(async move {
        let stream = acceptor
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        Ok(super::peer_identity(stream.get_ref().1))
    });
    let name = rustls_pki_types::ServerName::try_from("controller.invalid").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    // TLS 1.3: the client is done before the server has checked its certificate; the server's
    // side says whether it took it. The client's end stays open until the server is done.
    let _client = connector.connect(name, client_io).await;
    let proven = server.await.unwrap();
    let chain = kept.0.lock().unwrap().clone();
    (chain, proven)
}

#[tokio::test]
async fn the_controller_serves_a_certificate_for_its_own_identity_and_reads_its_callers() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = write_self_signed(dir.path());
    let authority = Arc::new(ReloadingAuthority::load(dir.path(), DEFAULT_LIFETIME).unwrap());
    let controller = SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "outrigger".into(),
        service_account: "outrigger-controller".into(),
    };
    let serving = super::ServingTls::new(controller.clone(), authority.clone()).unwrap();
    assert!(serving.trust_anchors_pem().contains("BEGIN CERTIFICATE"));

    // A proxy without a certificate yet gets through the handshake (to ask for one), proving
    // no one; the controller's certificate is for its own identity and leads to the anchor.
    let (chain, proven) = handshake(&serving, None).await;
    assert_eq!(proven, Ok(None));
    assert_chains_to(&chain, &anchor);
    assert_eq!(
        SpiffeId::of_certificate(&chain[0]),
        Some(controller.clone())
    );

    // A proxy with its certificate is known by it.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = authority
        .current()
        .sign(&key, &reviews(), SystemTime::now())
        .unwrap();
    let (_, proven) = handshake(&serving, Some((leaf.chain, key))).await;
    assert_eq!(proven, Ok(Some(reviews())));

    // A certificate of another authority is refused.
    let elsewhere = tempfile::tempdir().unwrap();
    write_self_signed(elsewhere.path());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = Authority::load(elsewhere.path())
        .unwrap()
        .sign(&key, &reviews(), SystemTime::now())
        .unwrap();
    let (_, proven) = handshake(&serving, Some((forged.chain, key))).await;
    assert!(proven.is_err(), "{proven:?}");

    // New trust anchors and issuer (a rotation's last step): the next handshake serves a
    // certificate from them, without a restart.
    let anchor = write_self_signed(dir.path());
    let (chain, _) = handshake(&serving, None).await;
    assert_chains_to(&chain, &anchor);
}

#[test]
fn a_certificate_lifetime_under_ten_seconds_is_refused_naming_the_flag() {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        settings: crate::app::Settings,
    }
    let parse = |lifetime: &str| {
        <Flags as clap::Parser>::try_parse_from([
            "outrigger-controller",
            "--certificate-lifetime",
            lifetime,
        ])
    };
    let refused = parse("9s").err().expect("9s is refused").to_string();
    assert!(
        refused.contains("--certificate-lifetime") && refused.contains("at least 10s"),
        "{refused}"
    );
    let taken = parse("10s").expect("10s is taken");
    assert_eq!(
        taken.settings.identity.certificate_lifetime,
        Duration::from_secs(10)
    );
}
