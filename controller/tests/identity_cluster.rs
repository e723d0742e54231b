//! The certificate authority against a real API server (etcd and kube-apiserver on loopback, the
//! outrigger-cluster library): the controller binary with `--identity-dir` checks a real
//! ServiceAccount token (made with the TokenRequest API, for our audience) with TokenReview and
//! certifies exactly that ServiceAccount's SPIFFE ID; the same token asking for another identity,
//! and a token for another audience, are refused.
//!
//! Needs the cluster binaries (`cargo xtask cluster build`, or built on first use).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use outrigger_api::proto::identity_client::IdentityClient;
use outrigger_api::proto::{CertifyRequest, CertifyResponse};
use outrigger_cluster::Cluster;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use tokio::time::Instant;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use common::free_port;

const NAMESPACE: &str = "identity";
const ACCOUNT: &str = "reviews";
const DEADLINE: Duration = Duration::from_secs(60);

/// The controller binary; killed when dropped.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A self-signed CA as the identity Secret holds it; returns the anchor's DER.
fn write_authority(dir: &Path) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("tls.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    ca.der().to_vec()
}

async fn client(cluster: &Cluster) -> Client {
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// A token of the ServiceAccount for `audience`, from the TokenRequest API.
async fn token(accounts: &Api<ServiceAccount>, audience: &str) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts
        .create_token_request(ACCOUNT, &PostParams::default(), &request)
        .await
        .expect("a token")
        .status
        .expect("a token in the status")
        .token
}

fn csr(id: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    params.serialize_request(&key).unwrap().der().to_vec()
}

async fn certify(
    grpc: SocketAddr,
    token: &str,
    id: &str,
) -> Result<CertifyResponse, tonic::Status> {
    // Retried while the controller is still starting: it loads the authority before it listens,
    // and listens before it has a connection to the API server.
    let until = Instant::now() + DEADLINE;
    loop {
        let answer = match IdentityClient::connect(format!("http://{grpc}")).await {
            Ok(mut client) => client
                .certify(CertifyRequest {
                    token: token.into(),
                    csr_der: csr(id),
                })
                .await
                .map(tonic::Response::into_inner),
            Err(error) => Err(tonic::Status::unavailable(error.to_string())),
        };
        match answer {
            Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return answer,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_service_account_token_gets_a_certificate_for_exactly_its_identity() {
    let cluster = Cluster::start().expect("starting the test cluster");
    cluster
        .kubectl(&["create", "namespace", NAMESPACE])
        .unwrap();
    cluster
        .kubectl(&["create", "serviceaccount", ACCOUNT, "-n", NAMESPACE])
        .unwrap();

    let secret = tempfile::tempdir().unwrap();
    let anchor = write_authority(secret.path());
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("controller.log");
    let output = std::fs::File::create(&log).unwrap();
    let grpc = free_port();
    let _controller = Controller(
        Command::new(env!("CARGO_BIN_EXE_outrigger-controller"))
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--admin-addr", &free_port().to_string()])
            .args(["--leader-namespace", "default"])
            .arg("--identity-dir")
            .arg(secret.path())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap(),
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(client(&cluster).await, NAMESPACE);
    let ours = token(&accounts, "outrigger").await;
    let id = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{ACCOUNT}");

    let certified = certify(grpc, &ours, &id).await.unwrap_or_else(|status| {
        panic!(
            "{status:?}; the controller's log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert_eq!(certified.trust_anchors_der, std::slice::from_ref(&anchor));
    let (_, leaf) = x509_parser::parse_x509_certificate(&certified.chain_der[0]).unwrap();
    let names: Vec<String> = leaf
        .extensions()
        .iter()
        .filter_map(|extension| match extension.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .map(|name| match name {
            GeneralName::URI(uri) => uri.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, std::slice::from_ref(&id));
    let (_, anchor) = x509_parser::parse_x509_certificate(&anchor).unwrap();
    leaf.verify_signature(Some(anchor.public_key()))
        .expect("signed by the anchor");
    assert_eq!(
        leaf.validity().not_after.timestamp(),
        certified.valid_until_unix_seconds
    );

    let other_identity = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/ratings");
    let refused = certify(grpc, &ours, &other_identity).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    let for_another_audience = token(&accounts, "someone-else").await;
    let refused = certify(grpc, &for_another_audience, &id).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}
