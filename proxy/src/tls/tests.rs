//! Handshakes between identities of test authorities, over loopback sockets.

use std::sync::Arc;

use outrigger_api::identity::SpiffeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::tests::{TestAuthority, certified_by, productpage, reviews};

/// The identity the server presented, as its client saw it, and the client's as the server did.
struct Handshake {
    client: Result<(), String>,
    server: Result<Option<SpiffeId>, String>,
}

/// `client` calls `server`, expecting the server to be `expected`; one byte each way.
async fn handshake(
    client: &CertifiedIdentity,
    server: &CertifiedIdentity,
    expected: &SpiffeId,
) -> Handshake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server.clone());
    let served = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| SpiffeId::of_certificate(leaf));
        let mut byte = [0];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(&byte).await.map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())?;
        Ok(peer)
    });
    let connector = TlsConnector::from(client.client.clone());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let called = async {
        let mut stream = connector
            .connect(server_name(expected).unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    let client = called.await;
    Handshake {
        client,
        server: served.await.unwrap(),
    }
}

#[tokio::test]
async fn proxies_of_one_mesh_authenticate_each_other() {
    let authority = TestAuthority::new(&[]);
    let client = certified_by(&authority, productpage()).await;
    let server = certified_by(&authority, reviews()).await;
    let done = handshake(&client, &server, &reviews()).await;
    assert_eq!(done.client, Ok(()));
    assert_eq!(
        done.server,
        Ok(Some(productpage())),
        "the server knows its caller"
    );
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let authority = TestAuthority::new(&[]);
    let client = certified_by(&authority, productpage()).await;
    let server = certified_by(&authority, reviews()).await;
    let ratings = SpiffeId {
        service_account: "ratings".into(),
        ..reviews()
    };
    let done = handshake(&client, &server, &ratings).await;
    let error = done.client.unwrap_err();
    assert!(
        error.contains(
            "the server is spiffe://cluster.local/ns/shop/sa/reviews, not \
             spiffe://cluster.local/ns/shop/sa/ratings"
        ),
        "{error}"
    );
    assert!(done.server.is_err(), "the client gave up in the handshake");
}

#[tokio::test]
async fn a_chain_to_other_anchors_is_refused_either_way() {
    let ours = TestAuthority::new(&[]);
    let theirs = TestAuthority::new(&[]);
    let client = certified_by(&ours, productpage()).await;
    let stranger = certified_by(&theirs, reviews()).await;
    // The test authorities share a name: the chain finds the other anchor and fails on its
    // signature.
    let done = handshake(&client, &stranger, &reviews()).await;
    let error = done.client.unwrap_err();
    assert!(error.contains("invalid peer certificate"), "{error}");

    // A caller of the other mesh that trusts ours, so that the server is the one to refuse.
    let server = certified_by(&ours, reviews()).await;
    let mut stranger = certified_by(&theirs, productpage()).await;
    let trusting = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verify::MeshServerVerifier::new(
            server.trust_anchors.clone(),
            "cluster.local".into(),
            provider(),
        )))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(
            stranger.certified_key.clone(),
        )));
    stranger.client = Arc::new(trusting);
    let done = handshake(&stranger, &server, &reviews()).await;
    let error = done.server.unwrap_err();
    assert!(error.contains("invalid peer certificate"), "{error}");
}

#[test]
fn a_server_name_reads_back_as_the_identity_it_was_made_from() {
    let id = SpiffeId {
        service_account: "reviews.v1".into(),
        ..reviews()
    };
    let name = server_name(&id).unwrap().to_str().into_owned();
    assert_eq!(name, "reviews.v1.shop.serviceaccount.outrigger.internal");
    assert_eq!(named(&name, "cluster.local"), Some(id));
    assert_eq!(
        named("reviews.shop.svc.cluster.local", "cluster.local"),
        None
    );
    let label_too_long = SpiffeId {
        service_account: "a".repeat(64),
        ..reviews()
    };
    assert!(server_name(&label_too_long).is_err());
}

#[tokio::test]
async fn a_certificate_is_known_by_its_spiffe_id_and_labelled_by_namespace_and_account() {
    let identity = certified_by(&TestAuthority::new(&[]), reviews()).await;
    let id = SpiffeId::of_certificate(&identity.certified_key.cert[0]).unwrap();
    assert_eq!(id, reviews());
    assert_eq!(*label(&id), "shop/reviews");
    assert_eq!(SpiffeId::of_certificate(&[0x30, 0x00]), None);
}

fn controller() -> SpiffeId {
    SpiffeId {
        trust_domain: "cluster.local".into(),
        namespace: "outrigger".into(),
        service_account: "outrigger-controller".into(),
    }
}

/// A controller's listener: TLS with `identity`'s certificate, a client certificate optional;
/// each handshake's outcome on the server's side (the client's identity, if it gave one) comes
/// back on the channel.
async fn controller_listening(
    identity: &CertifiedIdentity,
) -> (
    http::Uri,
    tokio::sync::mpsc::UnboundedReceiver<Result<Option<SpiffeId>, String>>,
) {
    let provider = provider();
    let clients = WebPkiClientVerifier::builder_with_provider(
        identity.trust_anchors.clone(),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(clients)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(
            identity.certified_key.clone(),
        )));
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let (outcomes, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let outcome = match acceptor.accept(stream).await {
                Ok(mut stream) => {
                    let peer = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| SpiffeId::of_certificate(leaf));
                    let _ = stream.write_all(b"x").await;
                    Ok(peer)
                }
                Err(error) => Err(error.to_string()),
            };
            let _ = outcomes.send(outcome);
        }
    });
    (uri, received)
}

/// Connects with `tls`, presenting `present`, and reads the controller's first byte.
async fn call(tls: &ControlPlaneTls, present: Present, uri: &http::Uri) -> Result<(), String> {
    use tower::ServiceExt as _;
    let io = tls
        .connector(present)
        .oneshot(uri.clone())
        .await
        .map_err(|e| format!("{e:#}"))?;
    let mut stream = io.into_inner();
    let mut byte = [0];
    stream
        .read_exact(&mut byte)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test]
async fn the_controller_is_called_only_if_it_proves_the_controller_s_identity() {
    let authority = TestAuthority::new(&[]);
    let (held_tx, held) = tokio::sync::watch::channel(None);
    let tls = ControlPlaneTls::new(controller(), &authority.anchor_pem, held).unwrap();

    // Before the proxy has a certificate, it asks for one presenting none, trusting the
    // anchors it was started with; the stream, which needs one, is not opened.
    let (uri, mut outcomes) =
        controller_listening(&certified_by(&authority, controller()).await).await;
    assert_eq!(call(&tls, Present::Nothing, &uri).await, Ok(()));
    assert_eq!(outcomes.recv().await.unwrap(), Ok(None));
    let error = call(&tls, Present::Certificate, &uri).await.unwrap_err();
    assert!(error.contains("no certificate yet"), "{error}");

    // Whoever else answers at the controller's address is refused, though the mesh's CA
    // certified it.
    let (impostor, _) = controller_listening(&certified_by(&authority, reviews()).await).await;
    let error = call(&tls, Present::Nothing, &impostor).await.unwrap_err();
    assert!(
        error.contains("not spiffe://cluster.local/ns/outrigger/sa/outrigger-controller"),
        "{error}"
    );

    // Certified, the proxy presents its certificate on the stream, and checks the controller by
    // the anchors that came with it: after a rotation to new anchors, the controller's new
    // certificate is taken, which the anchors it started with would refuse.
    let rotated = TestAuthority::new(&[]);
    held_tx.send_replace(Some(Arc::new(certified_by(&rotated, reviews()).await)));
    let (uri, mut outcomes) =
        controller_listening(&certified_by(&rotated, controller()).await).await;
    assert_eq!(call(&tls, Present::Certificate, &uri).await, Ok(()));
    assert_eq!(outcomes.recv().await.unwrap(), Ok(Some(reviews())));
    assert_eq!(call(&tls, Present::Nothing, &uri).await, Ok(()));
    assert_eq!(outcomes.recv().await.unwrap(), Ok(None));
}
