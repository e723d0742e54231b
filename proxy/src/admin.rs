//! The admin server: `/metrics`, `/live`, `/ready`, `/config`, `/endpoints`. The injected proxy
//! serves it on every address, for kubelet probes and Prometheus; `/config` and `/endpoints` (every
//! destination's policy, pods and addresses, and the pod's AuthorizationPolicies) are for loopback
//! only (`kubectl port-forward`).

use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::watch;

use std::sync::Arc;

use crate::http::body::{Body, full};
use crate::identity::Held;
use crate::metrics::Metrics;
use crate::outbound::resolve::{Resolution, Resolver};
use crate::policy::InboundAuthorization;

#[derive(Clone)]
pub struct Admin {
    pub metrics: Metrics,
    pub resolver: Resolver,
    pub ready: watch::Receiver<bool>,
    /// The workload's identity, when the proxy is to have one: not ready until it does.
    pub identity: Option<Held>,
    /// What the inbound side enforces.
    pub inbound: watch::Receiver<Arc<InboundAuthorization>>,
}

impl Admin {
    /// Answers `request`, which came from `peer`.
    pub fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let path = request.uri().path();
        if matches!(path, "/config" | "/endpoints") && !peer.ip().to_canonical().is_loopback() {
            return text(
                StatusCode::FORBIDDEN,
                "served on loopback only: use kubectl port-forward\n",
            );
        }
        match (request.method(), path) {
            (&http::Method::GET, "/metrics") => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            (&http::Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&http::Method::GET, "/ready") => match self.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(waiting) => text(StatusCode::SERVICE_UNAVAILABLE, waiting),
            },
            (&http::Method::GET, "/config") => json_response(self.config()),
            (&http::Method::GET, "/endpoints") => json_response(self.endpoints()),
            (&http::Method::GET, _) => text(StatusCode::NOT_FOUND, "not found\n"),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"),
        }
    }

    /// Ready once the control plane has welcomed the proxy and answered for the pod's inbound
    /// side and, when the proxy is to have an identity, it has one; else what it waits for (with an identity to get, the configuration stream
    /// waits for it first).
    fn readiness(&self) -> Result<(), &'static str> {
        if let Some(identity) = &self.identity
            && identity.borrow().is_none()
        {
            return Err("waiting for a certificate from the control plane\n");
        }
        if !*self.ready.borrow() {
            return Err(
                "waiting for the control plane (its welcome, and the pod's inbound policies)\n",
            );
        }
        Ok(())
    }

    /// Every destination with the configuration applied to it and its version.
    fn config(&self) -> Value {
        let destinations: serde_json::Map<String, Value> = self
            .resolver
            .all()
            .into_iter()
            .map(|(key, resolution)| {
                let value = match resolution {
                    Resolution::Pending => json!({"state": "pending"}),
                    Resolution::Unknown(reason) => json!({"state": "unknown", "reason": &*reason}),
                    Resolution::Ready(destination) => json!({
                        "state": "ready",
                        "version": destination.config.version,
                        "config": &*destination.config,
                        "layers": destination
                            .layers()
                            .into_iter()
                            .collect::<serde_json::Map<String, Value>>(),
                    }),
                };
                (key, value)
            })
            .collect();
        json!({
            "ready": *self.ready.borrow(),
            "inbound": self.inbound.borrow().describe(),
            "destinations": destinations,
        })
    }

    /// Every endpoint of every destination with its state.
    fn endpoints(&self) -> Value {
        let destinations: serde_json::Map<String, Value> = self
            .resolver
            .all()
            .into_iter()
            .filter_map(|(key, resolution)| match resolution {
                Resolution::Ready(destination) => Some((key, destination)),
                _ => None,
            })
            .map(|(key, destination)| {
                let now = tokio::time::Instant::now();
                let endpoints: Vec<Value> = destination
                    .endpoints
                    .iter()
                    .map(|endpoint| {
                        json!({
                            "address": endpoint.addr.to_string(),
                            "pod": endpoint.pod,
                            "subsets": endpoint.subsets,
                            "state": destination.endpoint_state(endpoint, now).as_str(),
                            "inFlight": endpoint.load.in_flight(),
                        })
                    })
                    .collect();
                (key, Value::Array(endpoints))
            })
            .collect();
        Value::Object(destinations)
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.to_string())
}

fn json_response(value: Value) -> Response<Body> {
    let body = serde_json::to_string_pretty(&value).expect("JSON values serialize");
    respond(StatusCode::OK, "application/json", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::certified;

    #[tokio::test]
    async fn ready_waits_for_an_identity_when_the_proxy_is_to_have_one() {
        let metrics = Metrics::new();
        let (resolver, _subscriptions) = Resolver::new(
            metrics.clone(),
            crate::tls::no_identity(),
            std::time::Duration::from_secs(5),
        );
        let (configured, ready) = watch::channel(false);
        let (held, identity) = watch::channel(None);
        let admin = Admin {
            metrics,
            resolver,
            ready,
            identity: Some(identity),
            inbound: watch::channel(Arc::default()).1,
        };
        assert!(admin.readiness().unwrap_err().contains("control plane"));
        configured.send_replace(true);
        assert!(admin.readiness().unwrap_err().contains("certificate"));
        held.send_replace(Some(Arc::new(certified().await)));
        assert_eq!(admin.readiness(), Ok(()));

        let without_identity = Admin {
            identity: None,
            ..admin
        };
        assert_eq!(without_identity.readiness(), Ok(()));
    }
}
