//! The proxy as a process: its settings (flags) and its three servers (outbound, inbound,
//! admin) with the control-plane client beside them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Layer, ServiceExt};

use crate::admin::Admin;
use crate::control::{self, ControlPlane, Identity};
use crate::inbound::{Inbound, InboundService};
use crate::listen::{Handling, ServerLimits, serve};
use crate::metrics::{Direction, DstLabels, Metrics};
use crate::outbound::resolve::Destinations;
use crate::outbound::{Outbound, OutboundService};
use crate::telemetry::TelemetryLayer;

/// Settings of a proxy; each flag can also come from `OUTRIGGER_<FLAG>` (the injector sets them).
#[derive(clap::Args, Clone, Debug)]
pub struct Settings {
    /// gRPC address of the controller.
    #[arg(
        long,
        env = "OUTRIGGER_CONTROL_PLANE",
        default_value = "http://outrigger-controller.outrigger-system.svc:8090"
    )]
    pub control_plane: String,
    /// The pod's namespace.
    #[arg(long, env = "OUTRIGGER_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The pod's name.
    #[arg(long, env = "OUTRIGGER_WORKLOAD", default_value = "")]
    pub workload: String,
    #[arg(long, env = "OUTRIGGER_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// Where the app's outgoing HTTP arrives.
    #[arg(
        long,
        env = "OUTRIGGER_OUTBOUND_ADDR",
        default_value = "127.0.0.1:4140"
    )]
    pub outbound_addr: SocketAddr,
    /// Where other pods' requests to this app arrive.
    #[arg(long, env = "OUTRIGGER_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,
    /// The local app, for inbound requests.
    #[arg(long, env = "OUTRIGGER_APP_ADDR", default_value = "127.0.0.1:8080")]
    pub app_addr: SocketAddr,
    /// `/metrics`, `/live`, `/ready`, `/config`, `/endpoints`.
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,
    /// Largest request head accepted; larger gets 431.
    #[arg(long, env = "OUTRIGGER_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// A client must send a request head within this time.
    #[arg(long, env = "OUTRIGGER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "OUTRIGGER_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How long a request to a new destination waits for the control plane.
    #[arg(long, env = "OUTRIGGER_DISCOVERY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub discovery_timeout: Duration,
    /// A destination that no connection or request has used for this long (up to twice this) is
    /// forgotten, and the control plane told, so that addresses called once are not kept forever.
    #[arg(long, env = "OUTRIGGER_DISCOVERY_IDLE_TIMEOUT", default_value = "1m", value_parser = parse_duration)]
    pub discovery_idle_timeout: Duration,
}

/// Durations in the Gateway API form used everywhere in Outrigger: `250ms`, `10s`, `1m`, `1h`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    outrigger_api::duration::parse(value).map_err(|e| e.to_string())
}

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
        let (destinations, subscriptions) = Destinations::new(metrics.clone());
        let (ready_tx, ready) = watch::channel(false);
        let limits = ServerLimits {
            max_header_bytes: settings.max_header_bytes,
            header_read_timeout: settings.header_read_timeout,
        };

        let control_plane = ControlPlane {
            url: settings.control_plane.clone(),
            identity: Identity {
                namespace: settings.namespace.clone(),
                workload: settings.workload.clone(),
                service_account: settings.service_account.clone(),
            },
            idle_timeout: settings.discovery_idle_timeout,
        };
        let control = tokio::spawn(control::run(
            control_plane,
            destinations.clone(),
            subscriptions,
            metrics.clone(),
            ready_tx,
            shutdown.clone(),
        ));

        let unlabelled = |direction| DstLabels {
            direction,
            dst_namespace: Arc::default(),
            dst_service: Arc::default(),
            dst_subset: Arc::default(),
            route: Arc::default(),
        };
        let outbound_ctx = Arc::new(Outbound {
            destinations: destinations.clone(),
            namespace: settings.namespace.clone(),
            discovery_wait: settings.discovery_timeout,
        });
        let outbound_telemetry =
            TelemetryLayer::new(metrics.clone(), unlabelled(Direction::Outbound));
        let outbound_server = serve(
            outbound,
            Some(Direction::Outbound),
            limits.clone(),
            metrics.clone(),
            shutdown.clone(),
            settings.drain_timeout,
            move |connection| {
                let outbound = outbound_ctx.clone();
                let service = outbound_telemetry
                    .layer(OutboundService::new(outbound.clone(), connection))
                    .map_request(|r: http::Request<hyper::body::Incoming>| {
                        r.map(crate::http::body::boxed)
                    });
                async move {
                    match connection.original_dst {
                        // Outside the mesh: as if there were no proxy.
                        Some(original_dst) if outbound.is_unknown(original_dst).await => {
                            Handling::Forward(original_dst)
                        }
                        _ => Handling::Serve(TowerToHyperService::new(service)),
                    }
                }
            },
        );

        let mut inbound_labels = unlabelled(Direction::Inbound);
        inbound_labels.dst_namespace = Arc::new(settings.namespace.clone());
        let inbound_ctx = Arc::new(Inbound::new(settings.app_addr));
        let inbound_telemetry = TelemetryLayer::new(metrics.clone(), inbound_labels);
        let inbound_server = serve(
            inbound,
            Some(Direction::Inbound),
            limits.clone(),
            metrics.clone(),
            shutdown.clone(),
            settings.drain_timeout,
            move |connection| {
                let service = inbound_telemetry
                    .layer(InboundService::new(&inbound_ctx, connection))
                    .map_request(|r: http::Request<hyper::body::Incoming>| {
                        r.map(crate::http::body::boxed)
                    });
                std::future::ready(Handling::Serve(TowerToHyperService::new(service)))
            },
        );

        let admin_ctx = Admin {
            metrics: metrics.clone(),
            destinations,
            ready,
        };
        let admin_server = serve(
            admin,
            None,
            limits,
            metrics,
            shutdown,
            settings.drain_timeout,
            move |_| {
                let admin = admin_ctx.clone();
                std::future::ready(Handling::Serve(hyper::service::service_fn(
                    move |request| {
                        std::future::ready(Ok::<_, std::convert::Infallible>(admin.handle(request)))
                    },
                )))
            },
        );
        tokio::join!(outbound_server, inbound_server, admin_server);
        let _ = control.await;
    }
}
