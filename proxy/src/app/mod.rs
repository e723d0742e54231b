//! The proxy as a process: its settings (flags) and its three servers (outbound, inbound,
//! admin) with the control-plane client beside them.

mod listeners;
mod settings;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use futures_util::future::join_all;
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use outrigger_api::identity::SpiffeId;
use tokio::sync::watch;
use tower::{Layer, ServiceExt};

use crate::admin::Admin;
use crate::control::{self, ControlPlane, Identity, InboundKey, LoopbackEndpoints};
use crate::http::body::{Body, boxed};
use crate::http::grpc::GrpcErrors;
use crate::identity::{self, ControlPlaneAuthority, IdentitySettings};
use crate::inbound::{Authorize, Authorizer, Inbound, InboundService, is_local};
use crate::listen::{ConnectionInfo, Handling, InboundTls, ServerLimits, Side, serve};
use crate::metrics::{Direction, Metrics, RequestLabels};
use crate::outbound::resolve::Resolver;
use crate::outbound::{Outbound, OutboundService};
use crate::telemetry::TelemetryLayer;
use crate::tls::{ControlPlaneTls, Held};
use listeners::Listeners;
pub use settings::{Settings, parse_duration};

/// A proxy with its listeners bound.
pub struct Proxy {
    settings: Settings,
    outbound: Listeners,
    inbound: Listeners,
    admin: Listeners,
    /// With `--identity-token-file`: how the proxy gets its certificate, and where it goes.
    identity: Option<(IdentitySettings, ControlPlaneAuthority, HeldSender)>,
    /// The identity held; None for ever without one to get (plaintext both ways).
    held: Held,
    /// With identity, the controller is called over TLS.
    control_plane_tls: Option<ControlPlaneTls>,
}

type HeldSender = watch::Sender<Option<Arc<identity::CertifiedIdentity>>>;

impl Proxy {
    pub async fn bind(settings: Settings) -> anyhow::Result<Self> {
        let outbound = settings.outbound_addr;
        if !outbound.ip().is_loopback() {
            bail!(
                "--outbound-addr {outbound} is not a loopback address: whoever reached it could \
                 call any Service as this pod"
            );
        }
        let (sender, held) = watch::channel(None);
        let mut identity = None;
        let mut control_plane_tls = None;
        if let (Some(token_file), Some(controller), Some(anchors)) = (
            &settings.identity_token_file,
            &settings.control_plane_identity,
            &settings.trust_anchors,
        ) {
            let tls = ControlPlaneTls::new(controller.clone(), anchors, held.clone())
                .context("--control-plane-identity and --trust-anchors")?;
            let authority = ControlPlaneAuthority::new(&settings.control_plane, &tls)?;
            let id = SpiffeId {
                trust_domain: settings.trust_domain.clone(),
                namespace: settings.namespace.clone(),
                service_account: settings.service_account.clone(),
            };
            let token_file = token_file.clone();
            identity = Some((IdentitySettings { id, token_file }, authority, sender));
            control_plane_tls = Some(tls);
        }
        let proxy = Self {
            identity,
            held,
            control_plane_tls,
            outbound: Listeners::bind(settings.outbound_addr, "outbound")?,
            inbound: Listeners::bind(settings.inbound_addr, "inbound")?,
            admin: Listeners::bind(settings.admin_addr, "admin")?,
            settings,
        };
        // What reaches the inbound listener directly goes there: the app, not a relay.
        let app = proxy.settings.app_addr;
        if proxy.own_ports().contains(&app.port()) {
            bail!("--app-addr {app} is one of the proxy's own ports");
        }
        if !is_local(app.ip()) {
            bail!("--app-addr {app} is not an address of this host");
        }
        Ok(proxy)
    }

    /// The ports the proxy listens on.
    fn own_ports(&self) -> Vec<u16> {
        [&self.outbound, &self.inbound, &self.admin]
            .iter()
            .map(|listeners| listeners.addr().port())
            .collect()
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound.addr()
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound.addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr()
    }

    /// Serves until `shutdown` turns true, then drains in-flight requests (up to the drain
    /// timeout) and returns.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let own_ports = self.own_ports();
        let Proxy {
            settings,
            outbound,
            inbound,
            admin,
            identity: identity_task,
            held: identity,
            control_plane_tls,
        } = self;
        let metrics = Metrics::new();
        let getting_identity = identity_task.is_some();
        if let Some((identity_settings, authority, held)) = identity_task {
            tokio::spawn(identity::run(
                identity_settings,
                authority,
                metrics.clone(),
                held,
                shutdown.clone(),
            ));
        }
        let (resolver, subscriptions) = Resolver::new(
            metrics.clone(),
            identity.clone(),
            settings.discovery_timeout,
        );
        let (ready_tx, ready) = watch::channel(false);
        let control_plane = control_plane(&settings, control_plane_tls);
        // Until the controller says otherwise, no policy: every caller is allowed, as before.
        let (authorization_tx, authorization) = watch::channel(Arc::default());
        let inbound_key = InboundKey::new(&control_plane.identity, authorization_tx);
        let control = tokio::spawn(control::run(
            control_plane,
            resolver.clone(),
            inbound_key,
            subscriptions,
            metrics.clone(),
            ready_tx,
            shutdown.clone(),
        ));
        let servers = Servers {
            settings: &settings,
            metrics: &metrics,
            shutdown: &shutdown,
        };
        let inbound_tls = InboundTls {
            identity: identity.clone(),
            mode: settings.inbound_mtls,
            probes: settings.inbound_probes.clone().into(),
            authorizer: Authorizer::new(authorization.clone(), metrics.clone()),
        };
        let admin_server = Admin {
            metrics: metrics.clone(),
            resolver: resolver.clone(),
            ready,
            // Not ready without an identity, when it has one to get.
            identity: getting_identity.then_some(identity),
            inbound: authorization,
        };
        tokio::join!(
            servers.outbound(outbound, resolver),
            servers.inbound(inbound, own_ports, inbound_tls),
            servers.admin(admin, admin_server),
        );
        let _ = control.await;
    }
}

fn control_plane(settings: &Settings, tls: Option<ControlPlaneTls>) -> ControlPlane {
    ControlPlane {
        url: settings.control_plane.clone(),
        tls,
        identity: Identity {
            namespace: settings.namespace.clone(),
            workload: settings.workload.clone(),
            service_account: settings.service_account.clone(),
        },
        idle_timeout: settings.discovery_idle_timeout,
        loopback_endpoints: if settings.allow_loopback_endpoints {
            LoopbackEndpoints::Allowed
        } else {
            LoopbackEndpoints::Refused
        },
        pod_ips: settings.pod_ips.clone(),
    }
}

/// What the three servers share.
struct Servers<'a> {
    settings: &'a Settings,
    metrics: &'a Metrics,
    shutdown: &'a watch::Receiver<bool>,
}

impl Servers<'_> {
    fn limits(&self) -> ServerLimits {
        ServerLimits {
            max_connections: self.settings.max_connections as usize,
            max_header_bytes: self.settings.max_header_bytes,
            header_read_timeout: self.settings.header_read_timeout,
            idle_timeout: self.settings.idle_timeout,
        }
    }

    /// Serves each of `listeners` alike, until shutdown and drained.
    async fn serve<S, F, H>(&self, listeners: Listeners, side: Side, handle: F)
    where
        F: Fn(ConnectionInfo) -> Option<H> + Clone,
        H: Future<Output = Handling<S>> + Send + 'static,
        S: hyper::service::Service<
                http::Request<Incoming>,
                Response = http::Response<Body>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        join_all(listeners.into_inner().into_iter().map(|listener| {
            serve(
                listener,
                side.clone(),
                self.limits(),
                self.metrics.clone(),
                self.shutdown.clone(),
                self.settings.drain_timeout,
                handle.clone(),
            )
        }))
        .await;
    }

    /// The app's outgoing requests, each to the destination it names or was redirected to.
    async fn outbound(&self, listeners: Listeners, resolver: Resolver) {
        let outbound = Arc::new(Outbound {
            resolver,
            namespace: self.settings.namespace.clone(),
        });
        let telemetry = TelemetryLayer::new(self.metrics.clone(), unlabelled(Direction::Outbound));
        self.serve(
            listeners,
            Side::Outbound(outbound.clone()),
            move |connection| {
                let outbound = outbound.clone();
                let service = telemetry
                    .layer(GrpcErrors::new(OutboundService::new(
                        outbound.clone(),
                        connection,
                    )))
                    .map_request(|r: http::Request<Incoming>| r.map(boxed));
                Some(async move {
                    match connection.original_dst {
                        // Outside the mesh: as if there were no proxy.
                        Some(original_dst) if outbound.is_outside_mesh(original_dst).await => {
                            Handling::Forward(original_dst)
                        }
                        _ => Handling::Serve(TowerToHyperService::new(service)),
                    }
                })
            },
        )
        .await
    }

    /// Other pods' requests to the local app, over mutual TLS from meshed ones.
    async fn inbound(&self, listeners: Listeners, own_ports: Vec<u16>, tls: InboundTls) {
        let mut labels = unlabelled(Direction::Inbound);
        labels.dst_namespace = Arc::new(self.settings.namespace.clone());
        let inbound = Arc::new(Inbound::new(self.settings.app_addr, own_ports));
        let telemetry = TelemetryLayer::new(self.metrics.clone(), labels);
        let authorizer = tls.authorizer.clone();
        let probes = tls.clone();
        self.serve(listeners, Side::Inbound(Box::new(tls)), move |connection| {
            let endpoint = inbound.endpoint(inbound.target(&connection)?);
            // Policies and probes name the pod port the caller addressed (the Service's
            // targetPort): where a redirected connection was going, else this listener's.
            let port = connection.original_dst.unwrap_or(connection.local).port();
            let authorized = Authorize::new(
                InboundService::new(endpoint),
                authorizer.clone(),
                port,
                probes.probes_of(port),
            );
            let service = telemetry
                .layer(GrpcErrors::new(authorized))
                .map_request(|r: http::Request<Incoming>| r.map(boxed));
            Some(std::future::ready(Handling::Serve(
                TowerToHyperService::new(service),
            )))
        })
        .await
    }

    async fn admin(&self, listeners: Listeners, admin: Admin) {
        self.serve(listeners, Side::Admin, move |connection| {
            let admin = admin.clone();
            Some(std::future::ready(Handling::Serve(
                hyper::service::service_fn(move |request| {
                    let response = admin.handle(request, connection.peer);
                    std::future::ready(Ok::<_, Infallible>(response))
                }),
            )))
        })
        .await
    }
}

/// Labels for responses no destination claimed.
fn unlabelled(direction: Direction) -> RequestLabels {
    RequestLabels {
        direction,
        dst_namespace: Arc::default(),
        dst_service: Arc::default(),
        dst_subset: Arc::default(),
        route: Arc::default(),
    }
}
