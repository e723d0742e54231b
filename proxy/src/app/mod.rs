//! The proxy as a process: its settings (flags) and its three servers (outbound, inbound,
//! admin) with the control-plane client beside them.

mod settings;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Layer, ServiceExt};

use crate::admin::Admin;
use crate::control::{self, ControlPlane, Identity};
use crate::http::body::boxed;
use crate::inbound::{Inbound, InboundService};
use crate::listen::{Handling, ServerLimits, serve};
use crate::metrics::{Direction, Metrics, RequestLabels};
use crate::outbound::resolve::Resolver;
use crate::outbound::{Outbound, OutboundService};
use crate::telemetry::TelemetryLayer;
pub use settings::{Settings, parse_duration};

/// A proxy with its listeners bound.
pub struct Proxy {
    settings: Settings,
    outbound: TcpListener,
    inbound: TcpListener,
    admin: TcpListener,
}

impl Proxy {
    pub async fn bind(settings: Settings) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the {what} listener on {addr}"))
        };
        Ok(Self {
            outbound: bind(settings.outbound_addr, "outbound").await?,
            inbound: bind(settings.inbound_addr, "inbound").await?,
            admin: bind(settings.admin_addr, "admin").await?,
            settings,
        })
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound.local_addr().expect("bound")
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound.local_addr().expect("bound")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }

    /// Serves until `shutdown` turns true, then drains in-flight requests (up to the drain
    /// timeout) and returns.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let Proxy {
            settings,
            outbound,
            inbound,
            admin,
        } = self;
        let metrics = Metrics::new();
        let (resolver, subscriptions) = Resolver::new(metrics.clone());
        let (ready_tx, ready) = watch::channel(false);
        let control = tokio::spawn(control::run(
            control_plane(&settings),
            resolver.clone(),
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
        tokio::join!(
            servers.outbound(outbound, resolver.clone()),
            servers.inbound(inbound),
            servers.admin(admin, resolver, ready),
        );
        let _ = control.await;
    }
}

fn control_plane(settings: &Settings) -> ControlPlane {
    ControlPlane {
        url: settings.control_plane.clone(),
        identity: Identity {
            namespace: settings.namespace.clone(),
            workload: settings.workload.clone(),
            service_account: settings.service_account.clone(),
        },
        idle_timeout: settings.discovery_idle_timeout,
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
            max_header_bytes: self.settings.max_header_bytes,
            header_read_timeout: self.settings.header_read_timeout,
            idle_timeout: self.settings.idle_timeout,
        }
    }

    /// The app's outgoing requests, each to the destination it names or was redirected to.
    async fn outbound(&self, listener: TcpListener, resolver: Resolver) {
        let outbound = Arc::new(Outbound {
            resolver,
            namespace: self.settings.namespace.clone(),
            discovery_wait: self.settings.discovery_timeout,
        });
        let telemetry = TelemetryLayer::new(self.metrics.clone(), unlabelled(Direction::Outbound));
        serve(
            listener,
            Some(Direction::Outbound),
            self.limits(),
            self.metrics.clone(),
            self.shutdown.clone(),
            self.settings.drain_timeout,
            move |connection| {
                let outbound = outbound.clone();
                let service = telemetry
                    .layer(OutboundService::new(outbound.clone(), connection))
                    .map_request(|r: http::Request<Incoming>| r.map(boxed));
                async move {
                    match connection.original_dst {
                        // Outside the mesh: as if there were no proxy.
                        Some(original_dst) if outbound.is_outside_mesh(original_dst).await => {
                            Handling::Forward(original_dst)
                        }
                        _ => Handling::Serve(TowerToHyperService::new(service)),
                    }
                }
            },
        )
        .await
    }

    /// Other pods' requests to the local app.
    async fn inbound(&self, listener: TcpListener) {
        let mut labels = unlabelled(Direction::Inbound);
        labels.dst_namespace = Arc::new(self.settings.namespace.clone());
        let inbound = Arc::new(Inbound::new(self.settings.app_addr));
        let telemetry = TelemetryLayer::new(self.metrics.clone(), labels);
        serve(
            listener,
            Some(Direction::Inbound),
            self.limits(),
            self.metrics.clone(),
            self.shutdown.clone(),
            self.settings.drain_timeout,
            move |connection| {
                let service = telemetry
                    .layer(InboundService::new(&inbound, connection))
                    .map_request(|r: http::Request<Incoming>| r.map(boxed));
                std::future::ready(Handling::Serve(TowerToHyperService::new(service)))
            },
        )
        .await
    }

    async fn admin(&self, listener: TcpListener, resolver: Resolver, ready: watch::Receiver<bool>) {
        let admin = Admin {
            metrics: self.metrics.clone(),
            resolver,
            ready,
        };
        serve(
            listener,
            None,
            self.limits(),
            self.metrics.clone(),
            self.shutdown.clone(),
            self.settings.drain_timeout,
            move |_| {
                let admin = admin.clone();
                std::future::ready(Handling::Serve(hyper::service::service_fn(
                    move |request| {
                        std::future::ready(Ok::<_, std::convert::Infallible>(admin.handle(request)))
                    },
                )))
            },
        )
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
