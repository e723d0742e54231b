//! Inbound mutual TLS. A connection that starts with a TLS ClientHello for a mesh server name is
//! a meshed caller: the handshake is completed with this proxy's certificate (a caller that
//! expected another identity refuses it, knowing why), the caller must present one leading to the
//! trust anchors, and its identity is read from it. Any other connection (plaintext, or TLS meant
//! for the app, whose server name is the app's) gets back what was read of it, to be served as
//! without mTLS, or refused in strict mode.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use bytes::BytesMut;
use outrigger_api::identity::SpiffeId;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Instant;
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;

use crate::inbound::Authorizer;
use crate::listen::io::Prefixed;
use crate::tls::{self, Held};

/// Whether inbound plaintext is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundMtls {
    /// Mutual TLS from meshed callers, plaintext from the others.
    Permissive,
    /// Mutual TLS only: any other connection is closed unread.
    Strict,
}

/// The inbound listener's mutual TLS.
#[derive(Clone, Debug)]
pub struct InboundTls {
    pub identity: Held,
    pub mode: InboundMtls,
    /// In strict mode, the plaintext requests still served: the kubelet's HTTP probes.
    pub probes: Arc<[InboundProbe]>,
    /// Who may open a connection that is forwarded as it is (not HTTP); the inbound service
    /// authorizes HTTP requests itself.
    pub authorizer: Authorizer,
}

/// An HTTP probe of the app: `GET` of exactly `path` on `port` (the port the kubelet probes,
/// which the connection was addressed to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundProbe {
    pub port: u16,
    pub path: String,
}

impl std::str::FromStr for InboundProbe {
    type Err = String;

    /// `port:path`, as the injector writes it.
    fn from_str(probe: &str) -> Result<Self, String> {
        let (port, path) = probe
            .split_once(':')
            .filter(|(_, path)| path.starts_with('/'))
            .ok_or_else(|| format!("`{probe}` is not port:/path"))?;
        let port = port
            .parse()
            .map_err(|_| format!("`{port}` in `{probe}` is not a port"))?;
        Ok(Self {
            port,
            path: path.into(),
        })
    }
}

/// Whether `request` is one of the kubelet's probes: `GET` of exactly one of `paths`.
pub fn is_probe<B>(request: &http::Request<B>, paths: &[String]) -> bool {
    request.method() == http::Method::GET
        && request
            .uri()
            .path_and_query()
            .is_some_and(|path| paths.iter().any(|probe| probe == path.as_str()))
}

impl InboundTls {
    /// The probe paths of `port`, if it has any.
    pub fn probes_of(&self, port: u16) -> Option<Arc<[String]>> {
        let paths: Arc<[String]> = self
            .probes
            .iter()
            .filter(|probe| probe.port == port)
            .map(|probe| probe.path.clone())
            .collect();
        (!paths.is_empty()).then_some(paths)
    }
}

/// A caller has this long to say hello and finish the handshake, as it would for a request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A ClientHello is a few hundred bytes (a couple of kilobytes with post-quantum key shares).
const MAX_HELLO_BYTES: usize = 64 * 1024;

pub enum Accepted<T> {
    /// Mutual TLS from a caller of this mesh, with its identity.
    Mesh(Box<TlsStream<T>>, SpiffeId),
    /// Not mutual TLS for this proxy; what was read of it comes first.
    Other(Prefixed<T>),
    /// Mutual TLS for this proxy that did not succeed.
    Failed(anyhow::Error),
}

/// Reads a ClientHello from `stream` (whose first bytes look like TLS), and completes mutual TLS
/// when it is a mesh server name's while this proxy holds a certificate.
pub async fn accept<T: AsyncRead + AsyncWrite + Unpin>(
    stream: Prefixed<T>,
    identity: &Held,
) -> Accepted<T> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let (seen, accepted, io) = match client_hello(stream, deadline).await {
        Ok(hello) => hello,
        Err(other) => return Accepted::Other(other),
    };
    let meshed = accepted
        .client_hello()
        .server_name()
        .is_some_and(tls::is_mesh_server_name);
    let held = identity.borrow().clone();
    let Some(held) = held.filter(|_| meshed) else {
        return Accepted::Other(Prefixed::new(seen.freeze(), io));
    };
    // Every byte read is in the hello rustls holds: the handshake goes on from the socket.
    let handshake = StartHandshake::from_parts(accepted, io).into_stream(held.server.clone());
    let stream = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Accepted::Failed(anyhow!(error).context("the TLS handshake")),
        Err(_) => {
            return Accepted::Failed(anyhow!("the TLS handshake took over {HANDSHAKE_TIMEOUT:?}"));
        }
    };
    let peer = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| SpiffeId::of_certificate(leaf))
        .filter(|peer| peer.trust_domain == held.id.trust_domain)
        .context("the client certificate names no SPIFFE ID of this trust domain");
    match peer {
        Ok(peer) => Accepted::Mesh(Box::new(stream), peer),
        Err(error) => Accepted::Failed(error),
    }
}

type Hello<T> = (BytesMut, rustls::server::Accepted, T);

/// The ClientHello at the start of `stream`, with every byte read for it; the stream with those
/// bytes in front when it is not one (or not all of one before the deadline).
async fn client_hello<T: AsyncRead + Unpin>(
    stream: Prefixed<T>,
    deadline: Instant,
) -> Result<Hello<T>, Prefixed<T>> {
    let (prefix, mut io) = stream.into_parts();
    let mut seen = BytesMut::from(&prefix[..]);
    let mut acceptor = Acceptor::default();
    let mut fed = 0;
    loop {
        while fed < seen.len() {
            match acceptor.read_tls(&mut &seen[fed..]) {
                Ok(n) if n > 0 => fed += n,
                _ => return Err(Prefixed::new(seen.freeze(), io)),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok((seen, accepted, io)),
            Ok(None) if seen.len() < MAX_HELLO_BYTES => {}
            // Not TLS rustls reads: not for this proxy.
            _ => return Err(Prefixed::new(seen.freeze(), io)),
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut seen)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(Prefixed::new(seen.freeze(), io)),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::tests::{TestAuthority, certified_by, productpage, reviews};
    use crate::tls::{CertifiedIdentity, server_name};

    fn holding(identity: CertifiedIdentity) -> Held {
        watch::channel(Some(Arc::new(identity))).1
    }

    /// A client connected to a fresh listener with `config` for `name`, and the server's side of
    /// the connection, its first bytes read as `listen` reads them.
    async fn connected(
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> (
        tokio::task::JoinHandle<std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>>,
        Prefixed<TcpStream>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let client = tokio::spawn(TlsConnector::from(config).connect(name, tcp));
        let (server, _) = listener.accept().await.unwrap();
        (client, Prefixed::new(Bytes::new(), server))
    }

    #[tokio::test]
    async fn a_hello_for_this_proxy_is_answered_and_the_caller_identified() {
        let authority = TestAuthority::new(&[]);
        let client = certified_by(&authority, productpage()).await;
        let server = holding(certified_by(&authority, reviews()).await);
        let (called, stream) =
            connected(client.client.clone(), server_name(&reviews()).unwrap()).await;
        let Accepted::Mesh(mut stream, peer) = accept(stream, &server).await else {
            panic!("not accepted as mutual TLS");
        };
        assert_eq!(peer, productpage());
        let mut client = called.await.unwrap().unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut read = [0; 16];
        stream.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_hello_for_the_proxy_is_not_answered_while_it_holds_no_certificate() {
        let authority = TestAuthority::new(&[]);
        let client = certified_by(&authority, productpage()).await;
        let (_called, stream) =
            connected(client.client.clone(), server_name(&reviews()).unwrap()).await;
        let Accepted::Other(stream) = accept(stream, &tls::no_identity()).await else {
            panic!("answered without a certificate");
        };
        let (hello, _) = stream.into_parts();
        assert_eq!(&hello[..2], b"\x16\x03");
    }

    #[tokio::test]
    async fn tls_meant_for_the_app_is_given_back_whole_and_goes_through() {
        // The app's own TLS: a certificate for its own name, which its client trusts.
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["app.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certificate.der().clone()).unwrap();
        let app_client = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let app_server = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(certificate.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();

        let proxy = holding(certified_by(&TestAuthority::new(&[]), reviews()).await);
        let name = ServerName::try_from("app.example").unwrap();
        let (called, stream) = connected(Arc::new(app_client), name).await;
        let Accepted::Other(stream) = accept(stream, &proxy).await else {
            panic!("taken for the mesh's");
        };
        // What the proxy read of it comes first: the app completes its own handshake.
        let mut app = TlsAcceptor::from(Arc::new(app_server))
            .accept(stream)
            .await
            .unwrap();
        let mut client = called.await.unwrap().unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut read = [0; 4];
        app.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"ping");
    }

    #[tokio::test]
    async fn a_caller_expecting_another_proxy_learns_who_answered_and_gives_up() {
        let authority = TestAuthority::new(&[]);
        let client = certified_by(&authority, productpage()).await;
        let server = holding(certified_by(&authority, reviews()).await);
        let ratings = SpiffeId {
            service_account: "ratings".into(),
            ..reviews()
        };
        let (called, stream) =
            connected(client.client.clone(), server_name(&ratings).unwrap()).await;
        let Accepted::Failed(_) = accept(stream, &server).await else {
            panic!("not failed");
        };
        let error = called.await.unwrap().unwrap_err().to_string();
        assert!(
            error.contains(
                "the server is spiffe://cluster.local/ns/shop/sa/reviews, not \
                 spiffe://cluster.local/ns/shop/sa/ratings"
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_caller_of_another_mesh_fails() {
        let client = certified_by(&TestAuthority::new(&[]), productpage()).await;
        let server = holding(certified_by(&TestAuthority::new(&[]), reviews()).await);
        let (_called, stream) =
            connected(client.client.clone(), server_name(&reviews()).unwrap()).await;
        let Accepted::Failed(error) = accept(stream, &server).await else {
            panic!("not failed");
        };
        assert!(
            format!("{error:#}").contains("the TLS handshake"),
            "{error:#}"
        );
    }

    #[test]
    fn a_probe_reads_as_the_injector_writes_it() {
        assert_eq!(
            "8080:/ready?full=1".parse(),
            Ok(InboundProbe {
                port: 8080,
                path: "/ready?full=1".into()
            })
        );
        for wrong in ["8080", "8080:ready", "http:/ready", "70000:/"] {
            assert!(wrong.parse::<InboundProbe>().is_err(), "{wrong}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hello_cut_short_is_given_back_at_the_deadline() {
        let (mut client, server) = tokio::io::duplex(1024);
        // A handshake record announcing 512 bytes, of which 4 come.
        let partial = b"\x16\x03\x01\x02\x00\x01\x00\x01";
        client.write_all(partial).await.unwrap();
        let started = Instant::now();
        let proxy = holding(certified_by(&TestAuthority::new(&[]), reviews()).await);
        let Accepted::Other(stream) = accept(Prefixed::new(Bytes::new(), server), &proxy).await
        else {
            panic!("not given back");
        };
        assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
        let (read, _) = stream.into_parts();
        assert_eq!(&read[..], partial);
    }
}
