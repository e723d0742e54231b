//! The inbound side: requests from other pods to the local app, and their authorization
//! (`authz`).

mod authz;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response};

use crate::client::{Dial, Endpoint};
use crate::http::body::Body;
use crate::http::mesh_protocol;
use crate::listen::ConnectionInfo;
use crate::policy::EndpointConfig;
use crate::tls;
pub use authz::{Authorize, Authorizer};

/// The local app, one endpoint per port it is reached on.
pub struct Inbound {
    app_addr: SocketAddr,
    /// The proxy's listening ports: never forwarded to, or anyone reaching the inbound port
    /// would reach the outbound one as this pod (and through it, any Service).
    own_ports: Vec<u16>,
    ports: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
}

impl Inbound {
    pub fn new(app_addr: SocketAddr, own_ports: Vec<u16>) -> Self {
        Self {
            app_addr,
            own_ports,
            ports: Mutex::default(),
        }
    }

    /// Where a connection's requests go; None when it must be closed, as it asks for more than
    /// its peer could reach without the proxy. Redirected connections go where they were sent
    /// (the pod's address, not loopback: what the app bound to loopback only stays its own), if
    /// that is this pod and not the proxy itself; connections made to the inbound listener
    /// itself go to `--app-addr`, and when that is loopback, only for peers on loopback (anyone
    /// else could not have reached it).
    pub fn target(&self, connection: &ConnectionInfo) -> Option<SocketAddr> {
        let target = match connection.original_dst {
            Some(dst) => {
                // REDIRECT delivers to the primary address of the interface a connection came in
                // on, so that is the original destination but in pods with several addresses.
                let local = dst.ip() == connection.local.ip() || is_local(dst.ip());
                if self.own_ports.contains(&dst.port()) || !local {
                    None
                } else {
                    Some(dst)
                }
            }
            None if is_loopback(self.app_addr.ip()) && !is_loopback(connection.peer.ip()) => None,
            None => Some(self.app_addr),
        };
        if target.is_none() {
            tracing::debug!(peer = %connection.peer, original_dst = ?connection.original_dst, "inbound connection refused");
        }
        target
    }

    pub fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        self.ports
            .lock()
            .expect("inbound lock")
            .entry(addr)
            .or_insert_with(|| {
                let dial = Dial::new(tls::no_identity());
                Arc::new(Endpoint::new(&EndpointConfig::at(addr), &dial))
            })
            .clone()
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether `ip` is an address of this host: the kernel binds only its own.
pub fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[derive(Clone)]
pub struct InboundService {
    endpoint: Arc<Endpoint>,
}

impl InboundService {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        Self { endpoint }
    }
}

impl tower::Service<Request<Body>> for InboundService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let endpoint = self.endpoint.clone();
        let version = request.version();
        mesh_protocol::restore(&mut request);
        Box::pin(async move {
            let mut response = match endpoint.send(request).await {
                Ok(response) => response,
                Err(error) => error.into_response(),
            };
            // Answered in the version the connection speaks, whatever the app spoke.
            *response.version_mut() = version;
            Ok(response)
        })
    }
}
