//! Workload identity end to end against a real API server (etcd and kube-apiserver on loopback):
//! a real controller with `--identity-dir` and real proxies, started from their flags, each with
//! a ServiceAccount token in a file as the kubelet projects it. A proxy whose token is for the
//! audience `outrigger` gets its certificate and only then is ready; one whose token is for
//! another audience stays unready, its failures counted and retried. The controller serves TLS
//! alone, proving its own identity, and takes a client for who its certificate proves: no
//! configuration without one, a Hello for anyone else refused, a CSR for another identity or with
//! a token for another audience too; the certificate it signs names exactly the token's identity.
//!
//! Needs the cluster binaries (`cargo xtask cluster build`, or built on first use) and `openssl`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outrigger_api::identity::SpiffeId;
use outrigger_api::proto;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_stream::wrappers::ReceiverStream;

use outrigger_cluster::Cluster;
use outrigger_tests::dashboards::http_get;
use outrigger_tests::identity::{certified_proxy_flags, start_certifying_controller};
use outrigger_tests::live;

const NAMESPACE: &str = "shop";
const ACCOUNT: &str = "reviews";
const PATIENCE: Duration = Duration::from_secs(60);

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    cluster
        .kubectl(args)
        .unwrap_or_else(|error| panic!("kubectl {args:?}: {error}"))
}

/// A proxy of `reviews` whose token (for `audience`) is in a file of `dir`.
async fn proxy(
    cluster: &Cluster,
    control_plane: &str,
    dir: &Path,
    audience: &str,
) -> live::LiveProxy {
    let token = kubectl(
        cluster,
        &[
            "create",
            "token",
            ACCOUNT,
            "-n",
            NAMESPACE,
            "--audience",
            audience,
        ],
    );
    // The app is never called here.
    let app: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let name = format!("token-{audience}");
    let flags = certified_proxy_flags(dir, NAMESPACE, ACCOUNT, (&name, &token));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    live::start_proxy(control_plane, app, &flags).await
}

/// The value of the sample `name` (with its labels, as exposed) at `/metrics`.
async fn sample(admin: SocketAddr, name: &str) -> Option<f64> {
    let (_, metrics) = http_get(admin, "admin", "/metrics").await.ok()?;
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_ready_once_certified_for_its_service_account_and_not_with_another_audience() {
    let cluster = Cluster::start().expect("starting the test cluster");
    let crds = outrigger_tests::workspace().join("crds");
    kubectl(&cluster, &["apply", "-f", crds.to_str().unwrap()]);
    kubectl(&cluster, &["create", "namespace", NAMESPACE]);
    kubectl(
        &cluster,
        &["create", "serviceaccount", ACCOUNT, "-n", NAMESPACE],
    );

    let dir = tempfile::tempdir().unwrap();
    let controller = start_certifying_controller(cluster.kubeconfig(), dir.path(), &[]).await;
    let url = controller.url.clone();

    let certified = proxy(&cluster, &url, dir.path(), "outrigger").await;
    let refused = proxy(&cluster, &url, dir.path(), "someone-else").await;

    let until = Instant::now() + PATIENCE;
    loop {
        match http_get(certified.admin, "admin", "/ready").await {
            Ok((200, _)) => break,
            answer => assert!(
                Instant::now() < until,
                "the proxy was not ready within {PATIENCE:?}: {answer:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let success = r#"outrigger_identity_renewals_total{result="success"}"#;
    let failure = r#"outrigger_identity_renewals_total{result="failure"}"#;
    assert_eq!(sample(certified.admin, success).await, Some(1.0));
    assert_eq!(sample(certified.admin, failure).await, Some(0.0));
    let expiry = sample(
        certified.admin,
        "outrigger_identity_cert_expiry_timestamp_seconds",
    )
    .await
    .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let day = 24.0 * 3600.0;
    assert!(
        (now + day - 600.0..=now + day).contains(&expiry),
        "a certificate for a day: expires at {expiry}, now {now}"
    );

    // Refused, counted, and asked again with backoff (1 s, then 2 s).
    let until = Instant::now() + PATIENCE;
    while sample(refused.admin, failure).await.unwrap_or(0.0) < 2.0 {
        assert!(
            Instant::now() < until,
            "no second failure within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sample(refused.admin, success).await, Some(0.0));
    let (status, body) = http_get(refused.admin, "admin", "/ready").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("certificate"), "{body}");
}

/// Accepts any server certificate: the test reads the controller's identity off the connection
/// itself, and checks what the controller does with what the client sends.
#[derive(Debug)]
struct AnyServer;

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: tokio_rustls::rustls::pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::client::danger::ServerCertVerified, tokio_rustls::rustls::Error>
    {
        Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        Ok(tokio_rustls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        Ok(tokio_rustls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        tokio_rustls::rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A gRPC channel to the controller over TLS, presenting `certificate` if given; the identity
/// the controller proved comes back beside it.
async fn tls_channel(
    grpc: &str,
    certificate: Option<(Vec<CertificateDer<'static>>, rcgen::KeyPair)>,
) -> (tonic::transport::Channel, Arc<Mutex<Option<SpiffeId>>>) {
    use tokio_rustls::rustls;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match certificate {
        Some((chain, key)) => {
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let controller = Arc::new(Mutex::new(None));
    let proven = controller.clone();
    let channel = tonic::transport::Endpoint::from_shared(grpc.to_string())
        .unwrap()
        .connect_with_connector(tower::service_fn(move |uri: http::Uri| {
            let (connector, proven) = (connector.clone(), proven.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(uri.authority().unwrap().as_str()).await?;
                let name = ServerName::try_from("controller.invalid").unwrap();
                let tls = connector.connect(name, tcp).await?;
                *proven.lock().unwrap() = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| SpiffeId::of_certificate(leaf));
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    (channel, controller)
}

/// A key and a CSR whose one name is `id`.
fn csr(id: &str) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

/// The status a configuration stream opened with `hello` ends with, or `Ok` once welcomed.
async fn open_stream(
    channel: tonic::transport::Channel,
    hello: proto::Hello,
) -> Result<(), tonic::Status> {
    let mut client = proto::discovery_client::DiscoveryClient::new(channel);
    let first = proto::ProxyMessage {
        message: Some(proto::proxy_message::Message::Hello(hello)),
    };
    // The stream stays open (its sender kept) until the controller answers.
    let (_send, rest) = tokio::sync::mpsc::channel::<proto::ProxyMessage>(1);
    let outgoing =
        tokio_stream::StreamExt::chain(tokio_stream::iter([first]), ReceiverStream::new(rest));
    let mut incoming = client.stream(outgoing).await?.into_inner();
    match incoming.message().await? {
        Some(proto::ControllerMessage {
            message: Some(proto::controller_message::Message::Welcome(_)),
        }) => Ok(()),
        other => panic!("not a Welcome: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_speaks_only_tls_and_takes_a_proxy_for_who_its_certificate_proves() {
    let cluster = Cluster::start().expect("starting the test cluster");
    kubectl(&cluster, &["create", "namespace", NAMESPACE]);
    kubectl(
        &cluster,
        &["create", "serviceaccount", ACCOUNT, "-n", NAMESPACE],
    );
    let dir = tempfile::tempdir().unwrap();
    let controller = start_certifying_controller(cluster.kubeconfig(), dir.path(), &[]).await;
    let secret = dir.path().join("identity");
    let reviews = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{ACCOUNT}");
    let hello = |service_account: &str| proto::Hello {
        namespace: NAMESPACE.into(),
        workload: "reviews-0".into(),
        service_account: service_account.into(),
        proxy_version: "test".into(),
    };

    // No plaintext: what h2c sends is no TLS ClientHello.
    let plaintext = tonic::transport::Endpoint::from_shared(controller.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert!(open_stream(plaintext, hello(ACCOUNT)).await.is_err());

    // Over TLS the controller proves its own identity; without a certificate a client gets no
    // configuration, but may ask for a certificate, for its token's identity alone.
    let (anonymous, proven) = tls_channel(&controller.url, None).await;
    let refused = open_stream(anonymous.clone(), hello(ACCOUNT))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(
        proven.lock().unwrap().as_ref().map(ToString::to_string),
        Some("spiffe://cluster.local/ns/default/sa/outrigger-controller".to_string())
    );
    let token = kubectl(
        &cluster,
        &[
            "create",
            "token",
            ACCOUNT,
            "-n",
            NAMESPACE,
            "--audience",
            "outrigger",
        ],
    );
    let mut identity = proto::identity_client::IdentityClient::new(anonymous);
    let (_, other) = csr(&format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/ratings"));
    let refused = identity
        .certify(proto::CertifyRequest {
            token: token.trim().into(),
            csr_der: other,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let (key, own) = csr(&reviews);
    let certified = identity
        .certify(proto::CertifyRequest {
            token: token.trim().into(),
            csr_der: own,
        })
        .await
        .unwrap()
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = certified
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    // For exactly the token's identity, leading to the trust anchor.
    assert_eq!(
        SpiffeId::of_certificate(&chain[0]).map(|id| id.to_string()),
        Some(reviews.clone())
    );
    let anchor = std::fs::read(secret.join("ca.crt")).unwrap();
    let mut anchors = tokio_rustls::rustls::RootCertStore::empty();
    anchors
        .add(CertificateDer::from_pem_slice(&anchor).unwrap())
        .unwrap();
    tokio_rustls::rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(anchors),
        Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap()
    .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
    .expect("the leaf leads to the trust anchor");
    // A token for another audience proves nothing here.
    let elsewhere = kubectl(
        &cluster,
        &[
            "create",
            "token",
            ACCOUNT,
            "-n",
            NAMESPACE,
            "--audience",
            "someone-else",
        ],
    );
    let (_, csr_der) = csr(&reviews);
    let refused = identity
        .certify(proto::CertifyRequest {
            token: elsewhere.trim().into(),
            csr_der,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // With its certificate, a proxy is who it proves: a Hello for another ServiceAccount is
    // refused, its own welcomed.
    let (authenticated, _) = tls_channel(&controller.url, Some((chain, key))).await;
    let forged = open_stream(authenticated.clone(), hello("ratings"))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::PermissionDenied, "{forged:?}");
    assert!(forged.message().contains(&reviews), "{forged:?}");
    open_stream(authenticated, hello(ACCOUNT)).await.unwrap();
}
