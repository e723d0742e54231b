//! The inbound side: requests from other pods to the local app.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response};

use crate::client::{Dial, Endpoint};
use crate::http::body::Body;
use crate::listen::ConnectionInfo;
use crate::policy::EndpointConfig;

/// The local app, one endpoint per port it is reached on.
pub struct Inbound {
    app_addr: SocketAddr,
    ports: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
}

impl Inbound {
    pub fn new(app_addr: SocketAddr) -> Self {
        Self {
            app_addr,
            ports: Mutex::default(),
        }
    }

    /// Redirected connections go to the app on the port they were meant for; connections made to
    /// the inbound listener itself go to `--app-addr`.
    fn endpoint(&self, connection: &ConnectionInfo) -> Arc<Endpoint> {
        let addr = match connection.original_dst {
            Some(dst) => SocketAddr::new(self.app_addr.ip(), dst.port()),
            None => self.app_addr,
        };
        self.ports
            .lock()
            .expect("inbound lock")
            .entry(addr)
            .or_insert_with(|| Arc::new(Endpoint::new(&EndpointConfig::at(addr), &Dial::default())))
            .clone()
    }
}

#[derive(Clone)]
pub struct InboundService {
    endpoint: Arc<Endpoint>,
}

impl InboundService {
    pub fn new(inbound: &Inbound, connection: ConnectionInfo) -> Self {
        Self {
            endpoint: inbound.endpoint(&connection),
        }
    }
}

impl tower::Service<Request<Body>> for InboundService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            Ok(match endpoint.send(request).await {
                Ok(response) => response,
                Err(error) => error.into_response(),
            })
        })
    }
}
