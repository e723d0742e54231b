//! The proxy's Prometheus metrics (names and labels fixed by SPEC.md).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// An enum whose variants are label values, written as Prometheus expects them.
macro_rules! label_values {
    ($(#[$meta:meta])* $name:ident { $($(#[$variant_meta:meta])* $variant:ident => $value:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $value,)+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_values! {
    Direction {
        Inbound => "inbound",
        Outbound => "outbound",
    }
}

/// A shared, cheaply cloned label value.
pub type Name = Arc<String>;

/// Who a request was for. Built once per destination and route, cloned per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub dst_namespace: Name,
    pub dst_service: Name,
    pub dst_subset: Name,
    pub route: Name,
}

label_values! {
    Classification {
        Success => "success",
        Failure => "failure",
    }
}

label_values! {
    /// Whether a connection is the mesh's mutual TLS (an app's own TLS is not).
    Tls {
        True => "true",
        False => "false",
    }
}

/// Who was at the other end of a request's connection, as mutual TLS tells: `client_id` on
/// inbound requests, `server_id` on outbound ones (see `tls::label`); empty in plaintext and for
/// the other direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub tls: Tls,
    pub client_id: Name,
    pub server_id: Name,
}

impl PeerLabels {
    pub fn plaintext() -> Self {
        Self {
            tls: Tls::False,
            client_id: Name::default(),
            server_id: Name::default(),
        }
    }
}

/// The labels of a request's duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    #[prometheus(flatten)]
    pub dst: RequestLabels,
    #[prometheus(flatten)]
    pub peer: PeerLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    #[prometheus(flatten)]
    pub dst: RequestLabels,
    #[prometheus(flatten)]
    pub peer: PeerLabels,
    pub status_code: u16,
    pub classification: Classification,
}

label_values! {
    /// Why a request was retried.
    RetryReason {
        ConnectFailure => "connect-failure",
        Reset => "reset",
        PerTryTimeout => "per-try-timeout",
        /// gRPC `UNAVAILABLE`.
        Unavailable => "unavailable",
        RetriableStatusCode => "retriable-status-code",
        GatewayError => "gateway-error",
        ServerError => "5xx",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    #[prometheus(flatten)]
    pub dst: RequestLabels,
    pub reason: RetryReason,
}

label_values! {
    TimeoutKind {
        Request => "request",
        PerTry => "per_try",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    #[prometheus(flatten)]
    pub dst: RequestLabels,
    pub kind: TimeoutKind,
}

/// Labels of per-destination (not per-request) series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub dst_namespace: Name,
    pub dst_service: Name,
}

label_values! {
    EndpointState {
        Healthy => "healthy",
        Ejected => "ejected",
        Probation => "probation",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    #[prometheus(flatten)]
    pub dst: ServiceLabels,
    pub state: EndpointState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

label_values! {
    UpdateResult {
        Applied => "applied",
        Rejected => "rejected",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    pub result: UpdateResult,
}

label_values! {
    RenewalResult {
        Success => "success",
        Failure => "failure",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenewalLabels {
    pub result: RenewalResult,
}

label_values! {
    /// What became of an inbound connection.
    InboundResult {
        /// Served (forwarded to the app, or answered).
        Accepted => "accepted",
        /// Plaintext, or TLS not meant for this proxy, while `--inbound-mtls strict`.
        Refused => "refused",
        /// Mutual TLS that failed: an untrusted or missing client certificate, a handshake cut
        /// short or too slow.
        Failed => "failed",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    pub tls: Tls,
    pub result: InboundResult,
}

label_values! {
    /// What an AuthorizationPolicy made of a call to the app.
    AuthzDecision {
        /// Let through by the ALLOW policy that matched it.
        Allow => "allow",
        /// Denied by this policy: 403, or the connection closed.
        Deny => "deny",
        /// This Audit policy would have denied it; it went on.
        AuditDeny => "audit_deny",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `namespace/name` of the AuthorizationPolicy.
    pub policy: Name,
    pub decision: AuthzDecision,
}

#[derive(Clone)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        // 100 µs to about 6.5 s, doubling: proxy overhead and slow backends both resolve.
        Histogram::new(exponential_buckets(0.0001, 2.0, 17))
    }
}

/// The Service a series is about, so that its series can go when the proxy forgets it.
pub trait OfService {
    fn service(&self) -> ServiceLabels;
}

impl OfService for RequestLabels {
    fn service(&self) -> ServiceLabels {
        ServiceLabels {
            dst_namespace: self.dst_namespace.clone(),
            dst_service: self.dst_service.clone(),
        }
    }
}

impl OfService for ServiceLabels {
    fn service(&self) -> ServiceLabels {
        self.clone()
    }
}

macro_rules! of_service_through_dst {
    ($($labels:ty),+) => {
        $(impl OfService for $labels {
            fn service(&self) -> ServiceLabels {
                self.dst.service()
            }
        })+
    };
}

of_service_through_dst!(
    ResponseLabels,
    DurationLabels,
    RetryLabels,
    TimeoutLabels,
    EndpointLabels
);

/// A family of per-Service series that remembers which label sets it made for each Service, so
/// that they can be removed together (prometheus-client's `Family` cannot list them).
#[derive(Clone)]
pub struct ServiceFamily<S, M, C = fn() -> M> {
    family: Family<S, M, C>,
    made: Arc<Mutex<HashMap<ServiceLabels, HashSet<S>>>>,
}

impl<S, M, C> ServiceFamily<S, M, C>
where
    S: Clone + Hash + Eq + OfService,
    M: Clone,
    C: MetricConstructor<M>,
{
    fn new(family: Family<S, M, C>) -> Self {
        Self {
            family,
            made: Arc::default(),
        }
    }

    /// Applies `f` to the series of `labels`, made if need be.
    pub fn with<R>(&self, labels: &S, f: impl FnOnce(&M) -> R) -> R {
        // The usual case is one lookup, as in `Family::get_or_create`.
        if let Some(metric) = self.family.get(labels) {
            return f(&metric);
        }
        self.note(labels);
        f(&self.family.get_or_create(labels))
    }

    pub fn get_or_create_owned(&self, labels: &S) -> M {
        self.note(labels);
        self.family.get_or_create_owned(labels)
    }

    fn note(&self, labels: &S) {
        self.made
            .lock()
            .expect("series lock")
            .entry(labels.service())
            .or_default()
            .insert(labels.clone());
    }

    fn forget(&self, service: &ServiceLabels) {
        let made = self.made.lock().expect("series lock").remove(service);
        for labels in made.into_iter().flatten() {
            self.family.remove(&labels);
        }
    }
}

/// Every metric the proxy exposes. Cloning shares the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: ServiceFamily<ResponseLabels, Counter>,
    pub request_duration: ServiceFamily<DurationLabels, Histogram, LatencyBuckets>,
    pub retries: ServiceFamily<RetryLabels, Counter>,
    pub retry_budget_exhausted: ServiceFamily<RequestLabels, Counter>,
    pub timeouts: ServiceFamily<TimeoutLabels, Counter>,
    pub outlier_ejections: ServiceFamily<ServiceLabels, Counter>,
    pub endpoints: ServiceFamily<EndpointLabels, Gauge>,
    pub rate_limited: ServiceFamily<RequestLabels, Counter>,
    pub connections_open: Family<DirectionLabels, Gauge>,
    pub inbound_connections: Family<InboundLabels, Counter>,
    pub config_updates: Family<UpdateLabels, Counter>,
    pub control_plane_connected: Gauge,
    /// 0 while the proxy holds no certificate.
    pub identity_cert_expiry: Gauge,
    pub identity_renewals: Family<RenewalLabels, Counter>,
    pub authz_decisions: Family<AuthzLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outrigger");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests by outcome, as the application saw them",
            requests.clone(),
        );
        let request_duration = Family::new_with_constructor(LatencyBuckets);
        registry.register(
            "request_duration_seconds",
            "Whole request duration as the application saw it, response body included",
            request_duration.clone(),
        );
        let retries = Family::default();
        registry.register("retries", "Retries sent, by reason", retries.clone());
        let retry_budget_exhausted = Family::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let timeouts = Family::default();
        registry.register(
            "timeouts",
            "Requests or attempts that timed out",
            timeouts.clone(),
        );
        let outlier_ejections = Family::default();
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            outlier_ejections.clone(),
        );
        let endpoints = Family::default();
        registry.register("endpoints", "Endpoints by state", endpoints.clone());
        let rate_limited = Family::default();
        registry.register(
            "rate_limited",
            "Requests refused by the local rate limit",
            rate_limited.clone(),
        );
        let connections_open = Family::default();
        registry.register(
            "connections_open",
            "Downstream connections open",
            connections_open.clone(),
        );
        let inbound_connections = Family::<InboundLabels, Counter>::default();
        // Every outcome that can happen from the start, so that a share of TLS reads 0 rather
        // than nothing.
        for (tls, result) in [
            (Tls::True, InboundResult::Accepted),
            (Tls::True, InboundResult::Failed),
            (Tls::False, InboundResult::Accepted),
            (Tls::False, InboundResult::Refused),
        ] {
            let _ = inbound_connections.get_or_create(&InboundLabels { tls, result });
        }
        registry.register(
            "inbound_connections",
            "Inbound connections by whether they were mutual TLS, and what became of them",
            inbound_connections.clone(),
        );
        let config_updates = Family::default();
        registry.register(
            "config_updates",
            "Destination configurations received from the control plane",
            config_updates.clone(),
        );
        let control_plane_connected = Gauge::default();
        registry.register(
            "control_plane_connected",
            "1 while the configuration stream to the control plane is up",
            control_plane_connected.clone(),
        );
        let identity_cert_expiry = Gauge::default();
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "When the workload certificate expires (Unix seconds); 0 while there is none",
            identity_cert_expiry.clone(),
        );
        let identity_renewals = Family::<RenewalLabels, Counter>::default();
        // Both series from the start, so that a failure rate reads 0 rather than nothing.
        for result in [RenewalResult::Success, RenewalResult::Failure] {
            let _ = identity_renewals.get_or_create(&RenewalLabels { result });
        }
        registry.register(
            "identity_renewals",
            "Workload certificates asked for (the first included), by result",
            identity_renewals.clone(),
        );
        let authz_decisions = Family::default();
        registry.register(
            "authz_decisions",
            "Calls to the app an AuthorizationPolicy decided, by policy and decision",
            authz_decisions.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests: ServiceFamily::new(requests),
            request_duration: ServiceFamily::new(request_duration),
            retries: ServiceFamily::new(retries),
            retry_budget_exhausted: ServiceFamily::new(retry_budget_exhausted),
            timeouts: ServiceFamily::new(timeouts),
            outlier_ejections: ServiceFamily::new(outlier_ejections),
            endpoints: ServiceFamily::new(endpoints),
            rate_limited: ServiceFamily::new(rate_limited),
            connections_open,
            inbound_connections,
            config_updates,
            control_plane_connected,
            identity_cert_expiry,
            identity_renewals,
            authz_decisions,
        }
    }

    pub fn authz_decided(&self, policy: &Name, decision: AuthzDecision) {
        self.authz_decisions
            .get_or_create(&AuthzLabels {
                policy: policy.clone(),
                decision,
            })
            .inc();
    }

    pub fn inbound_connection(&self, tls: Tls, result: InboundResult) {
        self.inbound_connections
            .get_or_create(&InboundLabels { tls, result })
            .inc();
    }

    pub fn renewed(&self, result: RenewalResult) {
        self.identity_renewals
            .get_or_create(&RenewalLabels { result })
            .inc();
    }

    /// Removes every series about `service`, which the proxy no longer calls.
    pub fn forget_service(&self, service: &ServiceLabels) {
        self.requests.forget(service);
        self.request_duration.forget(service);
        self.retries.forget(service);
        self.retry_budget_exhausted.forget(service);
        self.timeouts.forget(service);
        self.outlier_ejections.forget(service);
        self.endpoints.forget(service);
        self.rate_limited.forget(service);
    }

    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Counts a downstream connection in `outrigger_connections_open` for as long as it lives.
pub struct ConnectionGuard(Gauge);

impl ConnectionGuard {
    pub fn open(metrics: &Metrics, direction: Direction) -> Self {
        let gauge = metrics
            .connections_open
            .get_or_create_owned(&DirectionLabels { direction });
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
