//! The proxy's flags; each can also come from `OUTRIGGER_<FLAG>` (the injector sets them).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use outrigger_api::identity::SpiffeId;

use crate::listen::{InboundMtls, InboundProbe};

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
    /// Where the app's outgoing HTTP arrives; a loopback address, as whoever reaches it can call
    /// any Service as this pod.
    #[arg(
        long,
        env = "OUTRIGGER_OUTBOUND_ADDR",
        default_value = "127.0.0.1:4140"
    )]
    pub outbound_addr: SocketAddr,
    /// Where other pods' requests to this app arrive.
    #[arg(long, env = "OUTRIGGER_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,
    /// The local app, for connections made to the inbound listener itself (redirected ones go
    /// where they were sent): an address of this host, none of the proxy's ports. When it is a
    /// loopback address, only loopback peers are forwarded there.
    #[arg(long, env = "OUTRIGGER_APP_ADDR", default_value = "127.0.0.1:8080")]
    pub app_addr: SocketAddr,
    /// `/metrics`, `/live`, `/ready`, `/config`, `/endpoints`.
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,
    /// Largest request head accepted; larger gets 431.
    #[arg(long, env = "OUTRIGGER_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Connections each listener serves at once; more wait in the kernel's accept queue until one
    /// closes, so a flood of connections costs the proxy no more than this many.
    #[arg(long, env = "OUTRIGGER_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// A client must send a request head within this time of starting it.
    #[arg(long, env = "OUTRIGGER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// An HTTP/1 connection with no request in flight is closed after this long; it outlasts the
    /// pools of the clients that keep connections to the proxy (as Envoy's default does).
    #[arg(long, env = "OUTRIGGER_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: Duration,
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
    /// Accept endpoints at loopback addresses: only where the controller, the endpoints and the
    /// proxy share one host (tests, the demo). In a pod, loopback is the caller's own pod, so
    /// such endpoints are refused by default.
    #[arg(long, env = "OUTRIGGER_ALLOW_LOOPBACK_ENDPOINTS")]
    pub allow_loopback_endpoints: bool,
    /// This pod's addresses (comma-separated; the injector sets them from `status.podIPs`): an
    /// endpoint at one of them is this pod, which the proxy calls in plaintext, as the traffic
    /// stays in the pod and the proxy's own connections do not pass its inbound listener.
    #[arg(long, env = "OUTRIGGER_POD_IPS", value_delimiter = ',')]
    pub pod_ips: Vec<IpAddr>,
    /// The projected ServiceAccount token (audience `outrigger`) that proves who this workload
    /// is: with it, the proxy gets a certificate for its SPIFFE ID from the control plane, renews
    /// it, and is not ready until it has one. Without it, the proxy has no identity.
    #[arg(
        long,
        env = "OUTRIGGER_IDENTITY_TOKEN_FILE",
        requires_all = ["control_plane_identity", "trust_anchors"]
    )]
    pub identity_token_file: Option<PathBuf>,
    /// With identity, the controller is called over TLS and must prove this identity,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (the injector sets the
    /// controller's): anyone else answering at the control plane's address is refused.
    #[arg(
        long,
        env = "OUTRIGGER_CONTROL_PLANE_IDENTITY",
        requires = "identity_token_file"
    )]
    pub control_plane_identity: Option<SpiffeId>,
    /// The trust anchors (PEM) the controller's certificate must lead to until the proxy holds
    /// its own certificate, whose anchors it uses from then on (the injector sets those of the
    /// moment).
    #[arg(
        long,
        env = "OUTRIGGER_TRUST_ANCHORS",
        requires = "identity_token_file",
        // PEM begins with dashes.
        allow_hyphen_values = true
    )]
    pub trust_anchors: Option<String>,
    /// The trust domain of this workload's SPIFFE ID,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    #[arg(long, env = "OUTRIGGER_TRUST_DOMAIN", default_value = outrigger_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Inbound connections that are not the mesh's mutual TLS: `permissive` serves them (callers
    /// outside the mesh), `strict` closes them unread. Mutual TLS needs an identity
    /// (`--identity-token-file`).
    #[arg(long, env = "OUTRIGGER_INBOUND_MTLS", value_enum, default_value_t = InboundMtls::Permissive)]
    pub inbound_mtls: InboundMtls,
    /// The app's HTTP probes, `port:path` (comma-separated), each `GET` of exactly that path to
    /// that port (the kubelet is not meshed): with `--inbound-mtls strict` the only plaintext
    /// requests served, and never refused by an AuthorizationPolicy. The injector lists the
    /// pod's.
    #[arg(long, env = "OUTRIGGER_INBOUND_PROBES", value_delimiter = ',')]
    pub inbound_probes: Vec<InboundProbe>,
}

/// Durations in the Gateway API form used everywhere in Outrigger: `250ms`, `10s`, `1m`, `1h`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    outrigger_api::duration::parse(value).map_err(|e| e.to_string())
}
