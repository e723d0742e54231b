//! Redirected connections that are not HTTP, to a Service the mesh knows: relayed to one of its
//! endpoints, picked here rather than by kube-proxy, so that a meshed endpoint is called over
//! mutual TLS with the identity the control plane gave it (a strict server refuses plaintext).
//! Any endpoint outlier detection has not ejected will do: routes, splits and retries are HTTP's,
//! and a byte stream has no requests to balance.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use rand::seq::IndexedRandom as _;
use tokio::time::Instant;

use crate::client::Endpoint;
use crate::io::Io;
use crate::listen::OpaqueUpstream;
use crate::metrics::EndpointState;
use crate::outbound::Outbound;
use crate::outbound::destination::Destination;
use crate::outbound::resolve::Resolution;

impl OpaqueUpstream for Outbound {
    fn open(
        &self,
        original_dst: SocketAddr,
    ) -> BoxFuture<'_, Option<std::io::Result<Box<dyn Io>>>> {
        Box::pin(async move {
            let Resolution::Ready(destination) = self.resolve_address(original_dst).await else {
                return None;
            };
            let Some(endpoint) = pick(&destination, Instant::now()) else {
                return Some(Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{original_dst} has no endpoints"),
                )));
            };
            Some(
                endpoint
                    .open()
                    .await
                    .map(|stream| Box::new(stream) as Box<dyn Io>),
            )
        })
    }
}

/// An endpoint outlier detection has not ejected, at random; any endpoint when all are.
fn pick(destination: &Destination, now: Instant) -> Option<Arc<Endpoint>> {
    let available: Vec<&Arc<Endpoint>> = destination
        .endpoints
        .iter()
        .filter(|endpoint| destination.endpoint_state(endpoint, now) != EndpointState::Ejected)
        .collect();
    let mut rng = rand::rng();
    match available.choose(&mut rng) {
        Some(endpoint) => Some(Arc::clone(endpoint)),
        None => destination.endpoints.choose(&mut rng).cloned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use outrigger_api::destination::DestinationKey;
    use outrigger_api::identity::SpiffeId;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::identity::tests::{TestAuthority, certified_by, productpage, reviews};
    use crate::metrics::Metrics;
    use crate::outbound::resolve::Resolver;
    use crate::outbound::resolve::tests::web;
    use crate::policy::EndpointConfig;

    #[tokio::test]
    async fn bytes_to_a_meshed_service_go_over_mutual_tls_to_an_endpoint_it_picks() {
        let authority = TestAuthority::new(&[]);
        let client = Arc::new(certified_by(&authority, productpage()).await);
        let server = certified_by(&authority, reviews()).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server.server.clone());
        // The endpoint's proxy: who called, and what came over the connection.
        let served = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = acceptor.accept(stream).await.unwrap();
            let caller = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| SpiffeId::of_certificate(chain.first()?));
            let mut received = [0; 5];
            stream.read_exact(&mut received).await.unwrap();
            stream.write_all(b"pong!").await.unwrap();
            stream.shutdown().await.unwrap();
            (caller, received)
        });

        let (_held, identity) = watch::channel(Some(client));
        let (resolver, _subscriptions) =
            Resolver::new(Metrics::new(), identity, Duration::from_secs(5));
        let service: SocketAddr = "10.96.0.7:7000".parse().unwrap();
        let key = DestinationKey::Address(service).to_string();
        resolver.lookup(&key);
        let mut config = web("1");
        config.endpoints = vec![EndpointConfig {
            identity: Some(reviews()),
            ..EndpointConfig::at(endpoint)
        }];
        resolver.apply(&key, config);
        let outbound = Outbound {
            resolver,
            namespace: "default".into(),
        };

        let mut upstream = outbound.open(service).await.unwrap().unwrap();
        upstream.write_all(b"ping!").await.unwrap();
        let mut answer = Vec::new();
        upstream.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong!");
        let (caller, received) = served.await.unwrap();
        assert_eq!(caller, Some(productpage()));
        assert_eq!(&received, b"ping!");

        // An address no Service owns is not the mesh's: forwarded as it is.
        let elsewhere: SocketAddr = "10.96.0.8:7000".parse().unwrap();
        let key = DestinationKey::Address(elsewhere).to_string();
        outbound.resolver.lookup(&key);
        outbound.resolver.set_unknown(&key, "no Service".into());
        assert!(outbound.open(elsewhere).await.is_none());

        // A Service without endpoints: the connection has nowhere to go.
        let empty: SocketAddr = "10.96.0.9:7000".parse().unwrap();
        let key = DestinationKey::Address(empty).to_string();
        outbound.resolver.lookup(&key);
        outbound.resolver.apply(&key, web("1"));
        let refused = outbound.open(empty).await.unwrap().err().unwrap();
        assert_eq!(refused.kind(), std::io::ErrorKind::NotFound);
    }
}
