//! The controller as a process: its settings, its listeners, and the tasks that connect the
//! sources, the index, distribution, status, leader election, the admin server and the webhook.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use outrigger_api::identity::SpiffeId;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::distribute::{Authenticated, DRAIN_BOUND, DiscoveryService, Snapshots, serve_grpc};
use crate::identity::{
    IdentityService, IdentitySettings, ReloadingAuthority, Reviewer, ServingTls,
};
use crate::index::Index;
use crate::inject::webhook;
use crate::leader::{Elector, LeaderSettings};
use crate::metrics::Metrics;
use crate::source;
use crate::source::manifests::Manifests;
use crate::{admin, kube_api, status};

/// Settings of a controller; each flag can also come from `OUTRIGGER_<FLAG>` (the leader
/// namespace from `POD_NAMESPACE`, as the chart sets it).
#[derive(clap::Args, Clone, Debug)]
pub struct Settings {
    /// Serve the cluster state in this directory of YAML manifests (Services, EndpointSlices,
    /// Pods, DestinationPolicies) instead of the Kubernetes API's; watched, so edits apply within
    /// milliseconds (seconds on filesystems that send no change events). Nothing is written back.
    #[arg(long, env = "OUTRIGGER_MANIFESTS", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// The Kubernetes API to watch and write status to (the default source). Without this flag:
    /// the KUBECONFIG variable or ~/.kube/config, else the cluster the controller runs in.
    #[arg(long, env = "OUTRIGGER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub leader: LeaderSettings,
    /// Configuration stream to proxies.
    #[arg(long, env = "OUTRIGGER_GRPC_ADDR", default_value = "0.0.0.0:8090")]
    pub grpc_addr: SocketAddr,
    /// `/metrics`, `/live`, `/ready`.
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    pub admin_addr: SocketAddr,
    #[command(flatten)]
    pub webhook: webhook::WebhookSettings,
    #[command(flatten)]
    pub identity: IdentitySettings,
}

/// Where cluster state comes from.
enum Source {
    Manifests(Manifests),
    /// The API server, which every replica writes its proxies' status to, and the leader the
    /// rest.
    Kubernetes {
        clients: kube_api::Clients,
        leader: LeaderSettings,
    },
}

/// How long a stopping replica may still take, once its streams are drained, to hand its Lease
/// back and remove its heartbeat (begun at the signal).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a stop takes, from the signal to the exit: the streams' drain, then the Lease.
/// Under the 30 s the chart gives a pod to stop (`terminationGracePeriodSeconds`, Kubernetes'
/// default), after which it would be killed, its Lease held to the end of its term.
pub const STOP_BOUND: Duration = match DRAIN_BOUND.checked_add(RELEASE_TIMEOUT) {
    Some(bound) => bound,
    None => panic!("the bound overflows a Duration"),
};
const _: () = assert!(STOP_BOUND.as_secs() < 30);

/// A controller with its listeners bound and its source opened.
pub struct Controller {
    source: Source,
    metrics: Metrics,
    grpc: TcpListener,
    admin: TcpListener,
    webhook: Option<webhook::Webhook>,
    /// The certificate authority and the gRPC listener's TLS, when `--identity-dir` is given.
    identity: Option<Authenticated>,
    /// Of the identities meshed endpoints present.
    trust_domain: String,
}

impl Controller {
    pub async fn bind(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Metrics::default();
        let source = match settings.manifests {
            Some(dir) => Source::Manifests(Manifests::new(dir, metrics.clone())?),
            None => Source::Kubernetes {
                clients: kube_api::clients(settings.kubeconfig.as_deref()).await?,
                leader: settings.leader,
            },
        };
        let identity = match (&settings.identity.identity_dir, &source) {
            (Some(dir), Source::Kubernetes { clients, leader }) => {
                let lifetime = settings.identity.certificate_lifetime;
                let authority =
                    Arc::new(ReloadingAuthority::load(dir, lifetime).with_context(|| {
                        format!("loading the identity issuer from {}", dir.display())
                    })?);
                let own = SpiffeId {
                    trust_domain: settings.identity.trust_domain.clone(),
                    namespace: leader.namespace(&clients.call),
                    service_account: settings.identity.service_account.clone(),
                };
                let tls = ServingTls::new(own, authority.clone())
                    .context("certifying the controller's own identity")?;
                Some(Authenticated {
                    identity: IdentityService::new(
                        Reviewer::new(clients.call.clone()),
                        authority,
                        settings.identity.trust_domain.clone(),
                    ),
                    tls: Arc::new(tls),
                })
            }
            _ => None,
        };
        let client = match &source {
            Source::Kubernetes { clients, .. } => Some(clients.call.clone()),
            Source::Manifests(_) => None,
        };
        let webhook = webhook::Webhook::bind(
            &settings.webhook,
            identity.as_ref().map(|identity| identity.tls.clone()),
            client,
        )
        .await?;
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the {what} listener on {addr}"))
        };
        Ok(Self {
            source,
            grpc: bind(settings.grpc_addr, "gRPC").await?,
            admin: bind(settings.admin_addr, "admin").await?,
            webhook,
            metrics,
            identity,
            trust_domain: settings.identity.trust_domain,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }

    /// Serves until `shutdown` turns true, then fails `/ready`, drains the configuration streams
    /// and hands over what it holds, returning within [`STOP_BOUND`].
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let snapshots = Snapshots::default();
        let index = Index::new(
            snapshots.clone(),
            self.metrics.clone(),
            self.trust_domain.clone(),
        );
        let ready = index.synced();
        let name = std::env::var("HOSTNAME").unwrap_or_else(|_| "outrigger-controller".into());
        let mut discovery = DiscoveryService::new(snapshots, self.metrics.clone(), name);
        if self.identity.is_some() {
            discovery = discovery.requiring_identity(self.trust_domain.clone());
        }
        let (changes, received) = mpsc::channel(1024);
        // Dropping the set on return stops the index, the Kubernetes watches, status and the
        // admin server; the manifests thread then finds its channel closed.
        let mut tasks = JoinSet::new();
        // What hands things over when the controller stops: the leader Lease and this replica's
        // heartbeat.
        let mut leaving = JoinSet::new();
        match self.source {
            Source::Manifests(manifests) => manifests.spawn(changes)?,
            Source::Kubernetes { clients, leader } => {
                tasks.spawn(source::kube::run(
                    clients.watch.clone(),
                    changes,
                    self.metrics.clone(),
                ));
                let (leading, leading_changes) = watch::channel(false);
                let elector = Elector::new(&clients.call, &leader, self.metrics.clone());
                let identity = elector.identity().to_string();
                let heartbeat = status::Heartbeat::new(
                    &clients.call,
                    &leader.namespace(&clients.call),
                    &identity,
                    leader.lease_duration,
                    self.metrics.clone(),
                );
                let (liveness, liveness_changes) = watch::channel(status::Liveness::default());
                leaving.spawn(heartbeat.run(liveness, leading_changes.clone(), shutdown.clone()));
                leaving.spawn(elector.run(leading, shutdown.clone()));
                let (observed, observed_changes) = watch::channel(status::Observed::default());
                tasks.spawn(status::watch_statuses(clients.watch, observed));
                let inputs = status::Inputs {
                    reports: index.policy_reports(),
                    subscribers: discovery.subscribers(),
                    leading: leading_changes,
                    synced: ready.clone(),
                    observed: observed_changes,
                    liveness: liveness_changes,
                    identity,
                    lease_duration: leader.lease_duration,
                };
                tasks.spawn(status::write_authorization_policies(
                    clients.call.clone(),
                    index.authorization_reports(),
                    inputs.leading.clone(),
                    ready.clone(),
                    self.metrics.clone(),
                ));
                tasks.spawn(status::write_routes(
                    clients.call.clone(),
                    index.route_reports(),
                    inputs.leading.clone(),
                    ready.clone(),
                    self.metrics.clone(),
                ));
                tasks.spawn(status::run(clients.call, inputs, self.metrics.clone()));
            }
        }
        tasks.spawn(index.run(received));
        tasks.spawn(admin::serve(
            self.admin,
            self.metrics,
            ready,
            shutdown.clone(),
        ));
        if let Some(webhook) = self.webhook {
            tasks.spawn(webhook.serve(shutdown.clone()));
        }
        tracing::info!(grpc = %self.grpc.local_addr()?, "controller serving");
        serve_grpc(self.grpc, discovery, self.identity, shutdown).await;
        // Hands the Lease back, so that another replica writes status at once, and removes the
        // heartbeat, so that the leader stops counting this replica's proxies at once.
        let _ = tokio::time::timeout(RELEASE_TIMEOUT, leaving.join_all()).await;
        Ok(())
    }
}
