//! The hybrid post-quantum key exchange X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem): ML-KEM-768
//! (FIPS 203) and X25519 at once, so that traffic recorded today stays secret unless both are
//! broken. ring, our provider, has X25519 but no ML-KEM; RustCrypto's `ml-kem` supplies it. (The
//! aws-lc-rs provider has both, but building aws-lc's C takes minutes per profile on the 2-core
//! machines we build on.)
//!
//! On the wire: the client's share is its ML-KEM encapsulation key, then its X25519 public key;
//! the server's is the ML-KEM ciphertext, then its own X25519 public key; the secret is the
//! ML-KEM shared key, then the X25519 one.

use ml_kem::{Decapsulate, Encapsulate, EncapsulationKey, Kem, KeyExport, MlKem768};
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};

/// X25519MLKEM768, for a provider's `kx_groups`.
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

/// ring's, as rustls's ring provider uses it.
static X25519: &dyn SupportedKxGroup = rustls::crypto::ring::kx_group::X25519;

const ENCAPSULATION_KEY_LEN: usize = 1184;
const CIPHERTEXT_LEN: usize = 1088;
const X25519_LEN: usize = 32;

const INVALID_SHARE: Error = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);

#[derive(Debug)]
struct X25519MlKem768;

impl SupportedKxGroup for X25519MlKem768 {
    /// The client's side: a fresh key pair of each.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let (decapsulation, encapsulation) = MlKem768::generate_keypair();
        let classical = X25519.start()?;
        let share = [encapsulation.to_bytes().as_slice(), classical.pub_key()].concat();
        Ok(Box::new(ClientExchange {
            decapsulation,
            classical,
            share,
        }))
    }

    /// The server's side: a secret encapsulated to the client's key, and X25519 with its share.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != ENCAPSULATION_KEY_LEN + X25519_LEN {
            return Err(INVALID_SHARE);
        }
        let (encapsulation, classical_share) = client_share.split_at(ENCAPSULATION_KEY_LEN);
        let encapsulation = encapsulation.try_into().map_err(|_| INVALID_SHARE)?;
        let encapsulation =
            EncapsulationKey::<MlKem768>::new(&encapsulation).map_err(|_| INVALID_SHARE)?;
        let (ciphertext, post_quantum) = encapsulation.encapsulate();
        let classical = X25519.start_and_complete(classical_share)?;
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key: [ciphertext.as_slice(), &classical.pub_key].concat(),
            secret: SharedSecret::from(
                [post_quantum.as_slice(), classical.secret.secret_bytes()].concat(),
            ),
        })
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

struct ClientExchange {
    decapsulation: <MlKem768 as Kem>::DecapsulationKey,
    classical: Box<dyn ActiveKeyExchange>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for ClientExchange {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != CIPHERTEXT_LEN + X25519_LEN {
            return Err(INVALID_SHARE);
        }
        let (ciphertext, classical_share) = server_share.split_at(CIPHERTEXT_LEN);
        let ciphertext = ciphertext.try_into().map_err(|_| INVALID_SHARE)?;
        let post_quantum = self.decapsulation.decapsulate(&ciphertext);
        let classical = self.classical.complete(classical_share)?;
        Ok(SharedSecret::from(
            [post_quantum.as_slice(), classical.secret_bytes()].concat(),
        ))
    }

    /// The X25519 part goes in the ClientHello as a share of its own too, so a server without
    /// the hybrid (the controller, another mesh's) answers without a second round trip.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((NamedGroup::X25519, self.classical.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        server_share: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.classical.complete(server_share)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::Arc;

    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, HandshakeKind, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// A certificate for `localhost`: (its DER, its key's, and both as PEM).
    struct Localhost {
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        cert_pem: String,
        key_pem: String,
    }

    fn localhost() -> Localhost {
        let certified = rcgen::generate_simple_self_signed(["localhost".to_string()]).unwrap();
        Localhost {
            cert: certified.cert.der().clone(),
            key: PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap(),
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
        }
    }

    fn ring() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn server(provider: Arc<CryptoProvider>, identity: &Localhost) -> Arc<ServerConfig> {
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
            .unwrap();
        Arc::new(config)
    }

    fn client(provider: Arc<CryptoProvider>, trusted: &Localhost) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(trusted.cert.clone()).unwrap();
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// One connection from `client` to a server of `server` on `addr` (or a fresh one), four
    /// bytes echoed: the group the client saw used, and whether it took a second round trip.
    async fn handshake(
        client: Arc<ClientConfig>,
        server: Option<Arc<ServerConfig>>,
        addr: Option<std::net::SocketAddr>,
    ) -> (NamedGroup, HandshakeKind) {
        let addr = match (server, addr) {
            (Some(server), None) => {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                tokio::spawn(async move {
                    let (stream, _) = listener.accept().await.unwrap();
                    let mut stream = TlsAcceptor::from(server).accept(stream).await.unwrap();
                    let mut received = [0; 4];
                    stream.read_exact(&mut received).await.unwrap();
                    stream.write_all(&received).await.unwrap();
                    stream.shutdown().await.unwrap();
                });
                addr
            }
            (None, Some(addr)) => addr,
            _ => unreachable!("a server to start or one to call"),
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut stream = TlsConnector::from(client).connect(name, tcp).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        let connection = stream.get_ref().1;
        (
            connection.negotiated_key_exchange_group().unwrap().name(),
            connection.handshake_kind().unwrap(),
        )
    }

    #[tokio::test]
    async fn proxies_use_the_hybrid_and_others_x25519_in_one_round_trip() {
        let identity = localhost();
        let ours = super::super::provider();
        let both_ours = handshake(
            client(ours.clone(), &identity),
            Some(server(ours.clone(), &identity)),
            None,
        );
        assert_eq!(
            both_ours.await,
            (NamedGroup::X25519MLKEM768, HandshakeKind::Full)
        );
        // A server without the hybrid takes the X25519 share sent beside it.
        let classical_server = handshake(
            client(ours.clone(), &identity),
            Some(server(ring(), &identity)),
            None,
        );
        assert_eq!(
            classical_server.await,
            (NamedGroup::X25519, HandshakeKind::Full)
        );
        let classical_client = handshake(
            client(ring(), &identity),
            Some(server(ours, &identity)),
            None,
        );
        assert_eq!(
            classical_client.await,
            (NamedGroup::X25519, HandshakeKind::Full)
        );
    }

    #[test]
    fn shares_of_the_wrong_size_are_refused() {
        for client_share in [&[0; ENCAPSULATION_KEY_LEN][..], &[0; 2000], &[]] {
            let refused = X25519MLKEM768.start_and_complete(client_share).err();
            assert_eq!(refused, Some(INVALID_SHARE));
        }
        let client = X25519MLKEM768.start().unwrap();
        assert_eq!(client.pub_key().len(), ENCAPSULATION_KEY_LEN + X25519_LEN);
        let refused = client.complete(&[0; CIPHERTEXT_LEN]).err();
        assert_eq!(refused, Some(INVALID_SHARE));
    }

    /// Go's crypto/tls, offering or accepting X25519MLKEM768 and nothing else: the program,
    /// built into `dir`.
    fn go_peer(dir: &Path) -> std::path::PathBuf {
        let binary = dir.join("pq-interop");
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pq-interop/main.go");
        let built = Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(source)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "")
            .status()
            .expect("go, which Go's crypto/tls comes with, is installed");
        assert!(built.success(), "go build {source}");
        binary
    }

    #[tokio::test]
    async fn go_s_crypto_tls_and_ours_agree_on_x25519mlkem768_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let identity = localhost();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &identity.cert_pem).unwrap();
        std::fs::write(&key, &identity.key_pem).unwrap();
        let ours = super::super::provider();
        let go = go_peer(dir.path());

        // Go serves, we call.
        let mut go_server = Command::new(&go)
            .args(["-mode=server", "-cert"])
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(go_server.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        let addr = line.trim().parse().expect("the Go server's address");
        let called = handshake(client(ours.clone(), &identity), None, Some(addr)).await;
        assert_eq!(called, (NamedGroup::X25519MLKEM768, HandshakeKind::Full));
        let mut served = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut served).unwrap();
        assert!(go_server.wait().unwrap().success());
        assert_eq!(served.trim(), "X25519MLKEM768 ping");

        // We serve, Go calls.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server(ours, &identity));
        let serving = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = acceptor.accept(stream).await.unwrap();
            let mut received = [0; 4];
            stream.read_exact(&mut received).await.unwrap();
            stream.write_all(&received).await.unwrap();
            stream.shutdown().await.unwrap();
            stream
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .unwrap()
                .name()
        });
        let go_client = tokio::task::spawn_blocking(move || {
            Command::new(go)
                .args(["-mode=client", &format!("-addr={addr}"), "-ca"])
                .arg(&cert)
                .output()
                .unwrap()
        });
        let go_client = go_client.await.unwrap();
        assert!(go_client.status.success(), "{go_client:?}");
        assert_eq!(
            String::from_utf8_lossy(&go_client.stdout).trim(),
            "X25519MLKEM768 ping"
        );
        assert_eq!(serving.await.unwrap(), NamedGroup::X25519MLKEM768);
    }
}
