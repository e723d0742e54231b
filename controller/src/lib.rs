//! The Outrigger control plane: sources of cluster state feed an index, which publishes
//! per-destination snapshots on watch channels that the proxies' configuration streams subscribe
//! to.

pub mod admin;
pub mod crds;
pub mod distribute;
pub mod index;
pub mod inject;
pub mod manifests;
pub mod metrics;
pub mod translate;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::distribute::{DiscoveryService, Snapshots};
use crate::index::Index;
use crate::manifests::Manifests;
use crate::metrics::Metrics;

/// Settings of a controller; each flag can also come from `OUTRIGGER_<FLAG>`.
#[derive(clap::Args, Clone, Debug)]
pub struct Settings {
    /// A directory of YAML manifests (Services, EndpointSlices, Pods, DestinationPolicies) to
    /// serve instead of a cluster's; watched, so edits apply within a second.
    #[arg(long, env = "OUTRIGGER_MANIFESTS", required = true)]
    pub manifests: Option<PathBuf>,
    /// Configuration stream to proxies.
    #[arg(long, env = "OUTRIGGER_GRPC_ADDR", default_value = "0.0.0.0:8090")]
    pub grpc_addr: SocketAddr,
    /// `/metrics`, `/live`, `/ready`.
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    pub admin_addr: SocketAddr,
    #[command(flatten)]
    pub webhook: webhook::WebhookSettings,
}

/// Proxies that vanish without closing their connection are noticed within about this long.
const GRPC_KEEPALIVE: Duration = Duration::from_secs(20);

/// A controller with its listeners bound and its source opened.
pub struct Controller {
    manifests: Manifests,
    metrics: Metrics,
    grpc: TcpListener,
    admin: TcpListener,
    webhook: Option<webhook::Webhook>,
}

impl Controller {
    pub async fn bind(settings: Settings) -> anyhow::Result<Self> {
        let dir = settings
            .manifests
            .context("--manifests DIR is required: a manifests directory is the only source of cluster state so far")?;
        let metrics = Metrics::default();
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the {what} listener on {addr}"))
        };
        Ok(Self {
            manifests: Manifests::new(dir, metrics.clone())?,
            grpc: bind(settings.grpc_addr, "gRPC").await?,
            admin: bind(settings.admin_addr, "admin").await?,
            webhook: webhook::Webhook::bind(&settings.webhook).await?,
            metrics,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }

    /// Serves until `shutdown` turns true.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let snapshots = Snapshots::default();
        let index = Index::new(snapshots.clone(), self.metrics.clone());
        let ready = index.synced();
        let (changes, received) = mpsc::channel(1024);
        self.manifests.spawn(changes)?;
        // Dropping the set on return stops the index and the admin server; the manifests thread
        // then finds its channel closed.
        let mut tasks = JoinSet::new();
        tasks.spawn(index.run(received));
        tasks.spawn(admin::serve(self.admin, self.metrics.clone(), ready));
        if let Some(webhook) = self.webhook {
            tasks.spawn(webhook.serve());
        }
        let name = std::env::var("HOSTNAME").unwrap_or_else(|_| "outrigger-controller".into());
        let discovery = DiscoveryService::new(snapshots, self.metrics, name);
        tracing::info!(grpc = %self.grpc.local_addr()?, "controller serving");
        serve_grpc(self.grpc, discovery, shutdown).await;
        Ok(())
    }
}

/// Serves the configuration streams until `shutdown`. Streams have no natural end to drain to,
/// so stopping drops them all at once and the proxies reconnect, to another replica or to this
/// one restarted, keeping their configuration meanwhile.
async fn serve_grpc(
    listener: TcpListener,
    discovery: DiscoveryService,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = TowerToHyperService::new(discovery.into_server());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = service.clone();
                connections.spawn(async move {
                    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder
                        .http2()
                        .timer(TokioTimer::new())
                        .keep_alive_interval(GRPC_KEEPALIVE);
                    let _ = builder
                        .http2_only()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
}
