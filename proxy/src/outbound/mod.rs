//! The outbound side: requests the app sends to other services. Each request's destination comes
//! from the connection's original destination (iptables REDIRECT) or, for connections addressed to
//! the proxy itself, from the request's authority.

pub mod balance;
pub mod destination;
mod http_route;
pub mod layers;
mod opaque;
pub mod resolve;
pub mod route;
pub mod split;
pub mod stack;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use outrigger_api::destination::DestinationKey;

use crate::ctx::Labels;
use crate::http::body::{Body, proxy_error};
use crate::listen::ConnectionInfo;
use crate::outbound::resolve::{ControlPlaneState, Lookup, Resolution, Resolver};

pub struct Outbound {
    pub resolver: Resolver,
    /// The app's namespace: short names (`reviews`) are Services in it.
    pub namespace: String,
}

impl Outbound {
    /// Whether a redirected connection to `addr` is outside the mesh, and so forwarded as it is:
    /// no Service owns it, or the control plane has not said (it is unreachable, or did not answer
    /// in time): then the connection goes where it was going, as plain Kubernetes networking would
    /// take it, rather than failing.
    pub async fn is_outside_mesh(&self, addr: SocketAddr) -> bool {
        !matches!(self.resolve_address(addr).await, Resolution::Ready(_))
    }

    /// The destination the control plane says owns `addr`, waiting for its first answer up to
    /// the discovery wait.
    async fn resolve_address(&self, addr: SocketAddr) -> Resolution {
        let lookup = self
            .resolver
            .lookup(&DestinationKey::Address(addr).to_string());
        self.resolver.resolve(&lookup).await
    }
}

/// A request's destination: its key, and its lookup among those asked about.
#[derive(Clone)]
struct Target {
    key: Arc<str>,
    lookup: Arc<Lookup>,
}

/// The destination a connection used last, by the authority as the app wrote it (empty for a
/// redirected connection, whose destination never changes).
struct LastTarget {
    authority: String,
    target: Target,
}

/// Routes the requests of one downstream connection.
#[derive(Clone)]
pub struct OutboundService {
    outbound: Arc<Outbound>,
    connection: ConnectionInfo,
    /// Keep-alive connections mostly call one destination: resolve its name once.
    last: Arc<Mutex<Option<LastTarget>>>,
}

impl OutboundService {
    pub fn new(outbound: Arc<Outbound>, connection: ConnectionInfo) -> Self {
        Self {
            outbound,
            connection,
            last: Arc::default(),
        }
    }

    /// The destination of a request, or the response that explains why it has none.
    fn target(&self, request: &Request<Body>) -> Result<Target, Box<Response<Body>>> {
        let authority = match self.connection.original_dst {
            Some(_) => "",
            None => request
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| {
                    request
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .ok_or_else(|| {
                    Box::new(proxy_error(
                        StatusCode::BAD_REQUEST,
                        "request has no Host or authority",
                    ))
                })?,
        };
        let mut last = self.last.lock().expect("connection cache lock");
        if let Some(last) = &*last
            && last.authority == authority
        {
            return Ok(last.target.clone());
        }
        let key = match self.connection.original_dst {
            Some(original_dst) => DestinationKey::Address(original_dst),
            None => DestinationKey::from_authority(authority, 80, &self.outbound.namespace)
                .map_err(|error| {
                    Box::new(proxy_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("unknown destination: {error}"),
                    ))
                })?,
        };
        let key: Arc<str> = key.to_string().into();
        let target = Target {
            lookup: self.outbound.resolver.lookup(&key),
            key,
        };
        *last = Some(LastTarget {
            authority: authority.to_string(),
            target: target.clone(),
        });
        Ok(target)
    }
}

impl tower::Service<Request<Body>> for OutboundService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Target { key, lookup } = match self.target(&request) {
            Ok(target) => target,
            Err(response) => return Box::pin(async move { Ok(*response) }),
        };
        let outbound = self.outbound.clone();
        Box::pin(async move {
            let resolution = outbound.resolver.resolve(&lookup).await;
            let destination = match resolution {
                Resolution::Ready(destination) => destination,
                Resolution::Unknown(reason) => {
                    return Ok(proxy_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("unknown destination {key}: {reason}"),
                    ));
                }
                Resolution::Pending => {
                    let why = match outbound.resolver.control_plane() {
                        ControlPlaneState::Unreachable => "the control plane is unreachable",
                        _ => "the control plane has not answered",
                    };
                    return Ok(proxy_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("no configuration for {key} yet: {why}"),
                    ));
                }
            };
            let mut response = match destination.service().call(request).await {
                Ok(response) => response,
                Err(error) => error.into_response(),
            };
            // Responses made before a route was chosen (rate limit, faults) count for the
            // destination.
            if response.extensions().get::<Labels>().is_none() {
                response
                    .extensions_mut()
                    .insert(Labels(destination.labels.clone()));
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;

    fn new_outbound() -> Outbound {
        let (resolver, _subscriptions) = Resolver::new(
            Metrics::new(),
            crate::tls::no_identity(),
            Duration::from_secs(5),
        );
        Outbound {
            resolver,
            namespace: "default".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn redirected_connections_the_mesh_cannot_place_go_where_they_were_going() {
        let addr: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let key = DestinationKey::Address(addr).to_string();

        // Unanswered, even by a control plane that is up: as if there were no proxy (after the
        // wait, which paused time skips).
        let outbound = new_outbound();
        outbound
            .resolver
            .set_control_plane(ControlPlaneState::Connected);
        assert!(outbound.is_outside_mesh(addr).await);

        // No Service owns it.
        outbound.resolver.set_unknown(&key, "no Service".into());
        assert!(outbound.is_outside_mesh(addr).await);

        // The control plane is gone: no wait at all for what it cannot answer.
        let outbound = new_outbound();
        outbound
            .resolver
            .set_control_plane(ControlPlaneState::Unreachable);
        let started = tokio::time::Instant::now();
        assert!(outbound.is_outside_mesh(addr).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
