//! The configuration stream: subscribe to destinations, apply what the controller sends, and
//! acknowledge or reject every version. The stream is re-established with jittered exponential
//! backoff; meanwhile the proxy serves on what it last applied.

mod decode;
mod held;
mod inbound;

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use outrigger_api::proto::{
    self, Ack, EndpointsRequest, Hello, Nack, ProxyMessage, Subscribe, Subscription, Unsubscribe,
    controller_message, discovery_client::DiscoveryClient, proxy_message,
};
use prost::Message as _;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::metrics::{Metrics, UpdateLabels, UpdateResult};
use crate::outbound::resolve::{ControlPlaneState, Resolver};
use crate::shutdown::stopped;
use crate::tls::{ControlPlaneTls, Present};
pub use decode::{Caller, LoopbackEndpoints};
use decode::{ConfigError, invalid};
use held::HeldEndpoints;
pub use inbound::InboundKey;

#[derive(Clone, Debug)]
pub struct Identity {
    pub namespace: String,
    pub workload: String,
    pub service_account: String,
}

/// The control plane, and how this proxy uses it.
#[derive(Clone)]
pub struct ControlPlane {
    pub url: String,
    /// With identity: TLS, and the proxy's certificate presented.
    pub tls: Option<ControlPlaneTls>,
    pub identity: Identity,
    /// Destinations unused this long are unsubscribed from.
    pub idle_timeout: Duration,
    pub loopback_endpoints: LoopbackEndpoints,
    /// This pod's addresses (see [`Caller::pod_ips`]).
    pub pod_ips: Vec<IpAddr>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A destination with thousands of endpoints is a large snapshot.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// After a stream that was up is lost, the next attempt comes within this long, at random: every
/// proxy of a controller that went away loses its stream at once, and they must not all come back
/// at once (they serve on what they hold meanwhile).
const RECONNECT_SPREAD: Duration = Duration::from_secs(3);
/// An `Endpoints` call that fails is retried alone, up to this many attempts in all, before the
/// stream is given up: one failed fetch need not cost every destination its stream.
const FETCH_ATTEMPTS: u32 = 4;
/// Each `Endpoints` call gets this long; a call that hangs would otherwise stall the stream.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until `shutdown`. `ready` turns true once a stream has been welcomed and has had its
/// answer for the pod's inbound key, and stays true: the app, which the injector starts only
/// then, is never served before the pod's AuthorizationPolicies are known. What is applied under
/// the pod's own key goes to `inbound`.
pub async fn run(
    control_plane: ControlPlane,
    resolver: Resolver,
    inbound: InboundKey,
    mut subscriptions: mpsc::UnboundedReceiver<String>,
    metrics: Metrics,
    ready: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Kept across sessions: after a reconnect, what is held need not be fetched again.
    let mut held = HeldEndpoints::default();
    let mut backoff = BACKOFF_MIN;
    loop {
        let session = session(
            &control_plane,
            &resolver,
            &inbound,
            &mut held,
            &mut subscriptions,
            &metrics,
            &ready,
        );
        let welcomed = tokio::select! {
            result = session => match result {
                Ok(()) => true,
                Err(SessionError { welcomed, error }) => {
                    tracing::warn!(url = %control_plane.url, error = %error, "control plane stream lost");
                    welcomed
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        metrics.control_plane_connected.set(0);
        if resolver.control_plane() == ControlPlaneState::Connected {
            resolver.set_control_plane(ControlPlaneState::Unreachable);
        }
        if welcomed {
            backoff = RECONNECT_SPREAD;
        }
        // Full jitter: proxies that lost the same controller do not come back in lockstep.
        let delay = jittered(backoff);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn jittered(backoff: Duration) -> Duration {
    rand::rng().random_range(Duration::ZERO..=backoff)
}

struct SessionError {
    welcomed: bool,
    error: anyhow::Error,
}

/// One configuration stream, from connecting until it fails.
async fn session(
    control_plane: &ControlPlane,
    resolver: &Resolver,
    inbound: &InboundKey,
    held: &mut HeldEndpoints,
    subscriptions: &mut mpsc::UnboundedReceiver<String>,
    metrics: &Metrics,
    ready: &watch::Sender<bool>,
) -> Result<(), SessionError> {
    let fail = |welcomed, error: anyhow::Error| SessionError { welcomed, error };
    let channel = connect(control_plane)
        .await
        .map_err(|error| fail(false, error))?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (outgoing, rx) = mpsc::channel(256);
    // Keys queued while disconnected are in the resubscription.
    while subscriptions.try_recv().is_ok() {}
    for message in greeting(&control_plane.identity, resolver, inbound) {
        outgoing
            .try_send(message)
            .expect("a fresh channel has room");
    }
    let mut incoming = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|e| fail(false, anyhow::Error::new(e).context("opening stream")))?
        .into_inner();
    let mut stream = Stream {
        client,
        outgoing,
        resolver,
        inbound,
        held,
        metrics,
        caller: Caller {
            namespace: &control_plane.identity.namespace,
            pod_ips: &control_plane.pod_ips,
            loopback: control_plane.loopback_endpoints,
        },
        welcomed: false,
        inbound_answered: false,
    };
    let first_sweep = tokio::time::Instant::now() + control_plane.idle_timeout;
    let mut sweeps = tokio::time::interval_at(first_sweep, control_plane.idle_timeout);
    loop {
        let handled = tokio::select! {
            message = incoming.message() => match message {
                Ok(Some(message)) => stream.receive(message, ready).await,
                Ok(None) => Err(anyhow::anyhow!("controller ended the stream")),
                Err(status) => Err(status.into()),
            },
            Some(key) = subscriptions.recv() => stream.subscribe(key).await,
            _ = sweeps.tick() => stream.sweep().await,
        };
        handled.map_err(|error| fail(stream.welcomed, error))?;
    }
}

async fn connect(control_plane: &ControlPlane) -> anyhow::Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(control_plane.url.clone())
        .map_err(|e| anyhow::Error::new(e).context("reading the control plane URL"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // A controller that vanished without closing the connection (a partition, a dead node)
        // is noticed by missing pings, not after the kernel gives up.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let channel = match &control_plane.tls {
        None => endpoint.connect().await,
        Some(tls) => {
            // Who this proxy is, the controller takes from its certificate alone.
            tls.certified().await;
            endpoint
                .connect_with_connector(tls.connector(Present::Certificate))
                .await
        }
    };
    channel.map_err(|e| anyhow::Error::new(e).context("connecting"))
}

/// Who this proxy is, then everything subscribed so far (the pod's inbound key first) with what
/// is applied, so that only changes come back.
fn greeting(identity: &Identity, resolver: &Resolver, inbound: &InboundKey) -> [ProxyMessage; 2] {
    let hello = proxy_message::Message::Hello(Hello {
        namespace: identity.namespace.clone(),
        workload: identity.workload.clone(),
        service_account: identity.service_account.clone(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    let resubscribe = proxy_message::Message::Subscribe(Subscribe {
        destinations: std::iter::once(inbound.subscription())
            .chain(resolver.subscriptions())
            .collect(),
    });
    [hello, resubscribe].map(|message| ProxyMessage {
        message: Some(message),
    })
}

/// An open configuration stream.
struct Stream<'a> {
    client: DiscoveryClient<Channel>,
    outgoing: mpsc::Sender<ProxyMessage>,
    resolver: &'a Resolver,
    inbound: &'a InboundKey,
    held: &'a mut HeldEndpoints,
    metrics: &'a Metrics,
    caller: Caller<'a>,
    /// The controller has said Welcome on this stream.
    welcomed: bool,
    /// It has answered for the pod's inbound key: a policy, or that none applies.
    inbound_answered: bool,
}

impl Stream<'_> {
    async fn send(&self, message: proxy_message::Message) -> anyhow::Result<()> {
        let message = ProxyMessage {
            message: Some(message),
        };
        self.outgoing
            .send(message)
            .await
            .map_err(|_| anyhow::anyhow!("stream closed"))
    }

    async fn subscribe(&self, key: String) -> anyhow::Result<()> {
        self.send(proxy_message::Message::Subscribe(Subscribe {
            destinations: vec![Subscription {
                key,
                ..Default::default()
            }],
        }))
        .await
    }

    /// Unsubscribes from the destinations unused since the last sweep.
    async fn sweep(&mut self) -> anyhow::Result<()> {
        let keys = self.resolver.sweep();
        if keys.is_empty() {
            return Ok(());
        }
        for key in &keys {
            self.held.forget(key);
        }
        self.send(proxy_message::Message::Unsubscribe(Unsubscribe { keys }))
            .await
    }

    fn report_ready(&self, ready: &watch::Sender<bool>) {
        if self.welcomed && self.inbound_answered {
            ready.send_replace(true);
        }
    }

    async fn receive(
        &mut self,
        message: proto::ControllerMessage,
        ready: &watch::Sender<bool>,
    ) -> anyhow::Result<()> {
        match message.message {
            Some(controller_message::Message::Welcome(welcome)) => {
                tracing::info!(controller = %welcome.controller, "control plane stream up");
                self.welcomed = true;
                self.metrics.control_plane_connected.set(1);
                self.resolver
                    .set_control_plane(ControlPlaneState::Connected);
                self.report_ready(ready);
                Ok(())
            }
            Some(controller_message::Message::Update(update)) => {
                let inbound = self.inbound.is(&update.key);
                let reply = self.update(update).await.context("fetching endpoints")?;
                if inbound {
                    self.inbound_answered = true;
                    self.report_ready(ready);
                }
                match reply {
                    Some(reply) => self.send(reply).await,
                    None => Ok(()),
                }
            }
            Some(controller_message::Message::Unknown(unknown))
                if self.inbound.is(&unknown.key) =>
            {
                self.inbound.clear();
                self.inbound_answered = true;
                self.report_ready(ready);
                Ok(())
            }
            Some(controller_message::Message::Unknown(unknown)) => {
                self.held.forget(&unknown.key);
                self.resolver.set_unknown(&unknown.key, unknown.reason);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Applies an update, fetching the endpoint groups it names that are not held: the Ack or
    /// Nack to send, or none when a newer update follows (a group fetched at a newer version, or
    /// gone).
    async fn update(
        &mut self,
        update: proto::DestinationUpdate,
    ) -> Result<Option<proxy_message::Message>, tonic::Status> {
        let proto::DestinationUpdate {
            key,
            version,
            destination,
        } = update;
        let destination = match decode_destination(destination) {
            Ok(destination) => destination,
            Err(error) => return Ok(Some(answer(self.metrics, key, version, Err(error)))),
        };
        if self.inbound.is(&key) {
            let applied = self.inbound.apply(version.clone(), destination);
            return Ok(Some(answer(self.metrics, key, version, applied)));
        }
        // No longer subscribed: nothing to fetch or apply.
        if !self.resolver.is_subscribed(&key) {
            return Ok(Some(answer(self.metrics, key, version, Ok(()))));
        }
        let missing = self.held.missing(&key, &destination.endpoint_groups);
        let fetched = if missing.is_empty() {
            Fetched::Named
        } else {
            fetch_endpoints(&mut self.client, self.held, &key, missing).await?
        };
        Ok(match fetched {
            Fetched::Named => {
                let applied = apply(
                    self.resolver,
                    self.held,
                    &key,
                    version.clone(),
                    destination,
                    self.caller,
                );
                Some(answer(self.metrics, key, version, applied))
            }
            Fetched::Refused(error) => Some(answer(self.metrics, key, version, Err(error))),
            // A DestinationUnknown follows for a key gone unknown.
            Fetched::Newer | Fetched::Gone => None,
        })
    }
}

/// Validates a version with the endpoint groups it names and puts it in force; on error the
/// previous version stays.
fn apply(
    resolver: &Resolver,
    held: &mut HeldEndpoints,
    key: &str,
    version: String,
    destination: proto::Destination,
    caller: Caller<'_>,
) -> Result<(), ConfigError> {
    let endpoints = held.endpoints(key, &destination.endpoint_groups)?;
    let config = decode::destination(version, destination, endpoints, caller)?;
    resolver.apply(key, config);
    Ok(())
}

fn decode_destination(encoded: bytes::Bytes) -> Result<proto::Destination, ConfigError> {
    proto::Destination::decode(encoded)
        .map_err(|error| invalid("destination", format!("does not decode: {error}")))
}

/// What fetching the endpoint groups a destination names gave, the first that holds of: one
/// refused, one gone, one newer than named, all as named.
#[derive(Debug)]
enum Fetched {
    Refused(ConfigError),
    /// The key is no longer known, or a group is gone.
    Gone,
    /// A newer version of a group, now held.
    Newer,
    /// The versions named, now held.
    Named,
}

/// Fetches `groups` of `key` in one call and holds every one that decodes.
async fn fetch_endpoints(
    client: &mut DiscoveryClient<Channel>,
    held: &mut HeldEndpoints,
    key: &str,
    groups: Vec<proto::EndpointGroup>,
) -> Result<Fetched, tonic::Status> {
    let request = EndpointsRequest {
        key: key.to_string(),
        groups: groups.iter().map(|group| group.name.clone()).collect(),
    };
    let call = || {
        let mut client = client.clone();
        let request = request.clone();
        async move {
            client
                .endpoints(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let reply = match with_retries(call).await {
        Ok(reply) => reply,
        Err(status) if status.code() == tonic::Code::NotFound => return Ok(Fetched::Gone),
        Err(status) => return Err(status),
    };
    let (mut refused, mut gone, mut newer) = (None, false, false);
    for group in groups {
        let Some(content) = reply.groups.iter().find(|c| c.name == group.name) else {
            gone = true;
            continue;
        };
        newer |= content.version != group.version;
        let fetched = proto::EndpointGroup {
            name: group.name,
            version: content.version.clone(),
        };
        if let Err(error) = held.hold(key, fetched, &content.endpoints) {
            refused.get_or_insert(error);
        }
    }
    Ok(match refused {
        Some(error) => Fetched::Refused(error),
        None if gone => Fetched::Gone,
        None if newer => Fetched::Newer,
        None => Fetched::Named,
    })
}

/// `call` until it answers, with [`FETCH_TIMEOUT`] each time and jittered backoff between, up to
/// [`FETCH_ATTEMPTS`]; `NotFound` is an answer.
async fn with_retries<F, Fut, T>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut backoff = BACKOFF_MIN;
    let mut attempt = 1;
    loop {
        let status = match tokio::time::timeout(FETCH_TIMEOUT, call()).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => return Err(status),
            Ok(Err(status)) => status,
            Err(_) => {
                tonic::Status::deadline_exceeded(format!("no answer within {FETCH_TIMEOUT:?}"))
            }
        };
        if attempt == FETCH_ATTEMPTS {
            return Err(status);
        }
        tracing::warn!(%status, attempt, "fetching endpoints failed; trying again");
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        attempt += 1;
    }
}

/// Counts the outcome of applying a version and says it to the controller.
fn answer(
    metrics: &Metrics,
    key: String,
    version: String,
    result: Result<(), ConfigError>,
) -> proto::proxy_message::Message {
    let outcome = if result.is_ok() {
        UpdateResult::Applied
    } else {
        UpdateResult::Rejected
    };
    metrics
        .config_updates
        .get_or_create(&UpdateLabels { result: outcome })
        .inc();
    match result {
        Ok(()) => proxy_message::Message::Ack(Ack { key, version }),
        Err(error) => {
            tracing::warn!(%key, %version, %error, "rejected configuration; keeping the previous one");
            proxy_message::Message::Nack(Nack {
                key,
                version,
                reason: error.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "web.default.svc.cluster.local:80";
    /// A proxy in the shop namespace.
    const SHOP_PROXY: Caller<'static> = Caller {
        namespace: "shop",
        pod_ips: &[],
        loopback: LoopbackEndpoints::Refused,
    };

    type Call = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, tonic::Status>>>>;

    /// A call that answers `outcomes` in turn (then hangs), and how often it was made.
    fn scripted(
        outcomes: Vec<Result<u32, tonic::Code>>,
    ) -> (impl FnMut() -> Call, std::rc::Rc<std::cell::Cell<usize>>) {
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let counted = calls.clone();
        let mut outcomes = outcomes.into_iter();
        let call = move || {
            counted.set(counted.get() + 1);
            let outcome = outcomes.next();
            Box::pin(async move {
                match outcome {
                    Some(outcome) => outcome.map_err(|code| tonic::Status::new(code, "scripted")),
                    None => std::future::pending().await,
                }
            }) as Call
        };
        (call, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoints_call_is_retried_alone() {
        use tonic::Code::{NotFound, Unavailable};
        let (call, calls) = scripted(vec![Err(Unavailable), Err(Unavailable), Ok(7)]);
        assert_eq!(with_retries(call).await.unwrap(), 7);
        assert_eq!(calls.get(), 3);

        // A call that hangs is cut, and counts as a failed attempt.
        let (call, calls) = scripted(vec![Err(Unavailable)]);
        let started = tokio::time::Instant::now();
        let error = with_retries(call).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(calls.get(), FETCH_ATTEMPTS as usize);
        assert!(started.elapsed() >= FETCH_TIMEOUT * (FETCH_ATTEMPTS - 1));

        // NotFound is an answer, not a failure.
        let (call, calls) = scripted(vec![Err(NotFound), Ok(7)]);
        assert_eq!(with_retries(call).await.unwrap_err().code(), NotFound);
        assert_eq!(calls.get(), 1);
    }

    fn message(message: controller_message::Message) -> proto::ControllerMessage {
        proto::ControllerMessage {
            message: Some(message),
        }
    }

    fn unknown(key: &str) -> proto::ControllerMessage {
        message(controller_message::Message::Unknown(
            proto::DestinationUnknown {
                key: key.into(),
                reason: "no such thing".into(),
            },
        ))
    }

    #[tokio::test]
    async fn ready_only_once_welcomed_and_told_the_pod_s_inbound_policies() {
        let identity = Identity {
            namespace: "shop".into(),
            workload: "reviews-0".into(),
            service_account: "reviews".into(),
        };
        let inbound_key = "inbound:shop/reviews-0";
        let welcome = || {
            message(controller_message::Message::Welcome(proto::Welcome {
                controller: "test".into(),
            }))
        };
        let policy = message(controller_message::Message::Update(
            proto::DestinationUpdate {
                key: inbound_key.into(),
                version: "1".into(),
                destination: proto::Destination {
                    namespace: "shop".into(),
                    inbound: Some(proto::Inbound::default()),
                    ..Default::default()
                }
                .encode_to_vec()
                .into(),
            },
        ));
        // The inbound key's answer may be a policy or that none applies, before or after Welcome.
        for answers in [
            vec![welcome(), unknown(KEY), unknown(inbound_key)],
            vec![policy, welcome()],
        ] {
            let channel =
                tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
            let (outgoing, _sent) = mpsc::channel(8);
            let (resolver, _subscriptions) = Resolver::new(
                Metrics::new(),
                crate::tls::no_identity(),
                Duration::from_secs(5),
            );
            let (applied, _authorization) = watch::channel(std::sync::Arc::default());
            let inbound = InboundKey::new(&identity, applied);
            let (mut held, metrics) = (HeldEndpoints::default(), Metrics::new());
            let mut stream = Stream {
                client: DiscoveryClient::new(channel),
                outgoing,
                resolver: &resolver,
                inbound: &inbound,
                held: &mut held,
                metrics: &metrics,
                caller: SHOP_PROXY,
                welcomed: false,
                inbound_answered: false,
            };
            let (ready, readiness) = watch::channel(false);
            let last = answers.len() - 1;
            for (i, answer) in answers.into_iter().enumerate() {
                stream.receive(answer, &ready).await.unwrap();
                assert_eq!(*readiness.borrow(), i == last, "after answer {i}");
            }
        }
    }

    #[test]
    fn reconnects_after_a_lost_stream_are_spread_over_seconds() {
        let delays: Vec<Duration> = (0..1000).map(|_| jittered(RECONNECT_SPREAD)).collect();
        assert!(delays.iter().all(|delay| *delay <= RECONNECT_SPREAD));
        // Uniform over 3 s: about two in three after the first second, a tenth in any 300 ms.
        let late = delays
            .iter()
            .filter(|d| **d > Duration::from_secs(1))
            .count();
        assert!(late > 500, "{late} of 1000 after 1 s");
        let first = delays
            .iter()
            .filter(|d| **d < Duration::from_millis(300))
            .count();
        assert!(first < 200, "{first} of 1000 within 300 ms");
    }

    /// Endpoint groups by (name, version).
    fn groups(named: &[(&str, &str)]) -> Vec<proto::EndpointGroup> {
        named
            .iter()
            .map(|(name, version)| proto::EndpointGroup {
                name: name.to_string(),
                version: version.to_string(),
            })
            .collect()
    }

    fn web(subsets: &[&str], groups: &[proto::EndpointGroup]) -> proto::Destination {
        proto::Destination {
            namespace: "default".into(),
            service: "web".into(),
            port: 80,
            subsets: subsets.iter().map(|s| s.to_string()).collect(),
            endpoint_groups: groups.to_vec(),
            ..Default::default()
        }
    }

    fn endpoints(addresses: &[&str]) -> Vec<u8> {
        proto::Endpoints {
            endpoints: addresses
                .iter()
                .map(|address| proto::Endpoint {
                    address: address.to_string(),
                    subsets: vec!["stable".into()],
                    ..Default::default()
                })
                .collect(),
        }
        .encode_to_vec()
    }

    fn applied(resolver: &Resolver) -> (String, Vec<std::net::SocketAddr>) {
        match resolver.lookup(KEY).current() {
            crate::outbound::resolve::Resolution::Ready(d) => (
                d.config.version.clone(),
                d.config.endpoints.iter().map(|e| e.address).collect(),
            ),
            _ => panic!("nothing applied"),
        }
    }

    #[test]
    fn updates_apply_with_the_endpoint_groups_held_at_the_versions_they_name() {
        let (resolver, _subscriptions) = Resolver::new(
            Metrics::new(),
            crate::tls::no_identity(),
            Duration::from_secs(5),
        );
        resolver.lookup(KEY);
        let mut held = HeldEndpoints::default();
        let addr = |s: &str| -> std::net::SocketAddr { s.parse().unwrap() };
        let hold = |held: &mut HeldEndpoints, name: &str, version: &str, addresses: &[&str]| {
            held.hold(
                KEY,
                groups(&[(name, version)]).remove(0),
                &endpoints(addresses),
            )
        };
        let both = groups(&[("a", "1"), ("b", "1")]);

        // Not held: refused, nothing applied.
        assert_eq!(held.missing(KEY, &both), both);
        assert_eq!(
            apply(
                &resolver,
                &mut held,
                KEY,
                "0".into(),
                web(&["stable"], &both),
                SHOP_PROXY,
            ),
            Err(invalid("endpoints[a]", "version `1` is not held"))
        );

        hold(&mut held, "a", "1", &["10.0.0.1:80"]).unwrap();
        hold(&mut held, "b", "1", &["10.0.0.2:80"]).unwrap();
        assert!(held.missing(KEY, &both).is_empty());
        apply(
            &resolver,
            &mut held,
            KEY,
            "1".into(),
            web(&["stable"], &both),
            SHOP_PROXY,
        )
        .unwrap();
        assert_eq!(
            applied(&resolver),
            ("1".into(), vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")])
        );

        // A policy that cannot apply to them (their subset is not declared) is refused.
        let refused = apply(
            &resolver,
            &mut held,
            KEY,
            "2".into(),
            web(&[], &both),
            SHOP_PROXY,
        )
        .unwrap_err();
        assert_eq!(refused.field, "endpoints[0].subsets");
        assert_eq!(applied(&resolver).0, "1");

        // A group that does not decode is refused and the held one stays.
        let broken = held.hold(KEY, groups(&[("b", "2")]).remove(0), b"\xff\xff");
        assert_eq!(broken.unwrap_err().field, "endpoints[b]");
        assert!(held.missing(KEY, &both).is_empty());

        // Churn in one group: only it is missing; a group no longer named is let go.
        let churned = groups(&[("a", "1"), ("b", "3")]);
        assert_eq!(held.missing(KEY, &churned), churned[1..]);
        hold(&mut held, "b", "3", &["10.0.0.3:80"]).unwrap();
        apply(
            &resolver,
            &mut held,
            KEY,
            "3".into(),
            web(&["stable"], &churned[1..]),
            SHOP_PROXY,
        )
        .unwrap();
        assert_eq!(applied(&resolver), ("3".into(), vec![addr("10.0.0.3:80")]));
        assert_eq!(held.missing(KEY, &churned), churned[..1]);

        // Forgotten (unknown, unsubscribed): nothing is held any more.
        held.forget(KEY);
        assert_eq!(held.missing(KEY, &churned), churned);
    }

    #[test]
    fn a_destination_that_does_not_decode_is_rejected_with_the_reason() {
        let metrics = Metrics::new();
        let result = decode_destination(bytes::Bytes::from_static(b"\xff\xff\xff")).map(|_| ());
        match answer(
            &metrics,
            "web.default.svc.cluster.local:80".into(),
            "1".into(),
            result,
        ) {
            proxy_message::Message::Nack(nack) => {
                assert_eq!(nack.version, "1");
                assert!(
                    nack.reason.starts_with("destination: does not decode"),
                    "{}",
                    nack.reason
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// A controller whose `Endpoints` always answers `reply` (or NOT_FOUND).
    struct FixedEndpoints(Option<proto::EndpointsReply>);

    #[tonic::async_trait]
    impl proto::discovery_server::Discovery for FixedEndpoints {
        type StreamStream = tokio_stream::Empty<Result<proto::ControllerMessage, tonic::Status>>;

        async fn stream(
            &self,
            _: tonic::Request<tonic::Streaming<ProxyMessage>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        async fn endpoints(
            &self,
            _: tonic::Request<EndpointsRequest>,
        ) -> Result<tonic::Response<proto::EndpointsReply>, tonic::Status> {
            self.0
                .clone()
                .map(tonic::Response::new)
                .ok_or_else(|| tonic::Status::not_found("no such Service"))
        }
    }

    /// Fetches group `a` at version `named` from a controller answering `reply`: what came of
    /// it, and whether version e2 of the group is now held.
    async fn fetch_from(reply: Option<proto::EndpointsReply>, named: &str) -> (Fetched, bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(proto::discovery_server::DiscoveryServer::new(
                FixedEndpoints(reply),
            ))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(server);
        let mut client = DiscoveryClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut held = HeldEndpoints::default();
        let key = "web.default.svc.cluster.local:80";
        let group = |version: &str| proto::EndpointGroup {
            name: "a".into(),
            version: version.into(),
        };
        let fetched = fetch_endpoints(&mut client, &mut held, key, vec![group(named)])
            .await
            .unwrap();
        let e2_held = held.missing(key, &[group("e2")]).is_empty();
        (fetched, e2_held)
    }

    #[tokio::test]
    async fn fetched_endpoints_are_held_whichever_version_they_are() {
        let reply = |endpoints: bytes::Bytes| proto::EndpointsReply {
            groups: vec![proto::EndpointGroupContent {
                name: "a".into(),
                version: "e2".into(),
                endpoints,
            }],
        };
        let e2 = Some(reply(proto::Endpoints::default().encode_to_vec().into()));
        assert!(matches!(
            fetch_from(e2.clone(), "e2").await,
            (Fetched::Named, true)
        ));
        // The update named an older version: the one fetched waits for the update naming it.
        assert!(matches!(fetch_from(e2, "e1").await, (Fetched::Newer, true)));
        // The key is gone, or the group.
        assert!(matches!(
            fetch_from(None, "e2").await,
            (Fetched::Gone, false)
        ));
        let no_groups = Some(proto::EndpointsReply::default());
        assert!(matches!(
            fetch_from(no_groups, "e2").await,
            (Fetched::Gone, false)
        ));
        let garbage = Some(reply(bytes::Bytes::from_static(b"\xff\xff")));
        match fetch_from(garbage, "e2").await {
            (Fetched::Refused(error), false) => assert_eq!(error.field, "endpoints[a]"),
            _ => panic!("endpoints that do not decode are refused, and not held"),
        }
    }
}
