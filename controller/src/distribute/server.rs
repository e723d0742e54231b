//! The gRPC server: the configuration streams, each subscribed to the destinations its proxy asked
//! for, and the `Endpoints` call that proxies fetch endpoint groups with.
//!
//! Everything a proxy sends is bounded, since anything in the cluster can connect: messages
//! (`MAX_MESSAGE_BYTES`), the time to say Hello, the names it gives, the destinations one stream
//! subscribes to (`MAX_KEYS_PER_STREAM`, each a valid destination key), the length of a rejection
//! reason kept for status, connections, streams per connection, and connections with no stream
//! open.
//!
//! With identity, a proxy is who its client certificate proves, not what it says: a call without
//! one is refused, and Hello must name the certificate's namespace and ServiceAccount. A stream
//! reports (ACK, NACK) only on the versions it was sent of what it subscribed to, so a proxy
//! speaks for itself alone.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use outrigger_api::destination::DestinationKey;
use outrigger_api::identity::SpiffeId;
use outrigger_api::proto::{
    self, ControllerMessage, DestinationUnknown, DestinationUpdate, EndpointGroupContent,
    EndpointsReply, EndpointsRequest, ProxyMessage, Welcome, controller_message,
    discovery_server::Discovery, proxy_message,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::{Request, Response, Status, Streaming};

use super::snapshot::{Slot, Snapshot, Snapshots, UNKNOWN_REASON};
use super::subscribers::{Holding, PolicyVersion, ProxyId, SubscriberTable, Subscribers};
use crate::metrics::Metrics;

/// What proxies report, for tests.
#[derive(Clone, Debug)]
pub enum ProxyEvent {
    Connected(ProxyId),
    Disconnected(ProxyId),
    Unsubscribed {
        proxy: ProxyId,
        keys: Vec<String>,
    },
    Acked {
        proxy: ProxyId,
        key: String,
        version: String,
    },
    Rejected {
        proxy: ProxyId,
        key: String,
        version: String,
        reason: String,
    },
}

/// The gRPC service every proxy connects to.
#[derive(Clone)]
pub struct DiscoveryService {
    snapshots: Snapshots,
    events: broadcast::Sender<ProxyEvent>,
    subscribers: SubscriberTable,
    metrics: Metrics,
    controller: String,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
    /// The trust domain callers must prove an identity in; without one (no identity: the
    /// manifests source, the demo) a proxy is taken at its word.
    required_trust_domain: Option<String>,
}

/// The identity the client certificate of a request's connection proves; the listener hands it
/// to each request in its extensions.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub SpiffeId);

/// The largest message a proxy may send: a resubscription of [`MAX_KEYS_PER_STREAM`] keys (each at
/// most about 150 bytes) fits with room to spare.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The destinations one stream may subscribe to at once.
pub(super) const MAX_KEYS_PER_STREAM: usize =
    outrigger_api::destination::MAX_DESTINATIONS_PER_PROXY;
/// How long a stream may take to say Hello.
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest rejection reason kept (for status); longer ones are cut on a character boundary.
pub(super) const MAX_REASON_BYTES: usize = 1024;
/// Names in Hello: a namespace is a DNS label, a pod name a DNS subdomain.
const MAX_NAMESPACE_BYTES: usize = 63;
const MAX_WORKLOAD_BYTES: usize = 253;

impl DiscoveryService {
    pub fn new(snapshots: Snapshots, metrics: Metrics, controller: String) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            snapshots,
            events,
            subscribers: SubscriberTable::default(),
            metrics,
            controller,
            next_stream: Default::default(),
            required_trust_domain: None,
        }
    }

    /// Refuses calls that prove no identity in `trust_domain`.
    pub fn requiring_identity(mut self, trust_domain: String) -> Self {
        self.required_trust_domain = Some(trust_domain);
        self
    }

    /// Who calls, when identities are required: refused when the call proves none.
    fn proven(&self, extensions: &http::Extensions) -> Result<Option<SpiffeId>, Status> {
        let Some(trust_domain) = &self.required_trust_domain else {
            return Ok(None);
        };
        match extensions.get::<PeerIdentity>() {
            Some(PeerIdentity(id)) if id.trust_domain == *trust_domain => Ok(Some(id.clone())),
            Some(PeerIdentity(id)) => Err(Status::permission_denied(format!(
                "{id} is not of the trust domain {trust_domain}"
            ))),
            None => Err(Status::unauthenticated(
                "the configuration is served to meshed proxies alone: present the proxy's \
                 certificate",
            )),
        }
    }

    pub fn events(&self) -> broadcast::Receiver<ProxyEvent> {
        self.events.subscribe()
    }

    pub fn subscribers(&self) -> watch::Receiver<Subscribers> {
        self.subscribers.watch()
    }

    pub fn into_server(self) -> proto::discovery_server::DiscoveryServer<Self> {
        proto::discovery_server::DiscoveryServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

/// Turns true when a stream's connection is being closed (GOAWAY sent): its configuration stream
/// then ends with UNAVAILABLE, which a proxy answers by reconnecting, to this replica's
/// successor or another. The listener hands it to each request in its extensions.
#[derive(Clone)]
pub(super) struct Closing(watch::Receiver<bool>);

impl Closing {
    pub(super) fn new(closing: watch::Receiver<bool>) -> Self {
        Self(closing)
    }

    /// For a request served by other means than the listener: its connection is not ours to
    /// close.
    fn never() -> Self {
        Self(watch::channel(false).1)
    }

    /// Returns once the connection is being closed; never if it is not.
    async fn closed(&mut self) {
        if self.0.wait_for(|closing| *closing).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

type Outgoing = mpsc::Sender<Result<ControllerMessage, Status>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = MessageStream;

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let proven = self.proven(request.extensions())?;
        let closing = request
            .extensions()
            .get::<Closing>()
            .cloned()
            .unwrap_or_else(Closing::never);
        let mut incoming = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, incoming.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("no Hello within {HELLO_TIMEOUT:?}"))
            })??;
        let hello = match first {
            Some(ProxyMessage {
                message: Some(proxy_message::Message::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        check_name("namespace", &hello.namespace, MAX_NAMESPACE_BYTES)?;
        check_name("workload", &hello.workload, MAX_WORKLOAD_BYTES)?;
        if let Some(id) = proven
            && (hello.namespace != id.namespace || hello.service_account != id.service_account)
        {
            return Err(Status::permission_denied(format!(
                "Hello names namespace `{}` and ServiceAccount `{}`; the certificate proves {id}",
                hello.namespace, hello.service_account
            )));
        }
        let proxy = ProxyId {
            namespace: hello.namespace,
            workload: hello.workload,
            stream: self
                .next_stream
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let (tx, rx) = mpsc::channel(256);
        let welcome = message(controller_message::Message::Welcome(Welcome {
            controller: self.controller.clone(),
        }));
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("proxy went away"))?;
        let session = Session::new(self.clone(), proxy, hello.service_account);
        tokio::spawn(session.run(incoming, tx, closing));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn endpoints(
        &self,
        request: Request<EndpointsRequest>,
    ) -> Result<Response<EndpointsReply>, Status> {
        self.proven(request.extensions())?;
        let EndpointsRequest { key, groups } = request.into_inner();
        let wanted: HashSet<String> = groups.into_iter().collect();
        match self.snapshots.current(&key).as_deref() {
            Some(Snapshot::Known { endpoints, .. }) => Ok(Response::new(EndpointsReply {
                groups: endpoints
                    .iter()
                    .filter(|set| wanted.contains(&set.name))
                    .map(|set| EndpointGroupContent {
                        name: set.name.clone(),
                        version: set.version.clone(),
                        endpoints: set.encoded.clone(),
                    })
                    .collect(),
            })),
            _ => Err(Status::not_found(format!("{key}: {UNKNOWN_REASON}"))),
        }
    }
}

/// A name a proxy gives in Hello: it ends up in logs and in status.
fn check_name(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "Hello.{field} must be at most {max} bytes without control characters"
        )));
    }
    Ok(())
}

/// `reason`, cut to at most [`MAX_REASON_BYTES`] on a character boundary, with an ellipsis when
/// cut.
pub(super) fn bounded_reason(mut reason: String) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let ellipsis = '…';
    let mut end = MAX_REASON_BYTES - ellipsis.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.truncate(end);
    reason.push(ellipsis);
    reason
}

fn message(message: controller_message::Message) -> ControllerMessage {
    ControllerMessage {
        message: Some(message),
    }
}

fn unknown(key: String, reason: String) -> ControllerMessage {
    message(controller_message::Message::Unknown(DestinationUnknown {
        key,
        reason,
    }))
}

/// Per-key state of one proxy's subscription.
struct Subscribed {
    /// The version this proxy has (applied or at least been sent), so it is not sent twice.
    sent_version: String,
    /// The version just sent, until the proxy answers it.
    awaiting: Option<Awaiting>,
}

struct Awaiting {
    version: String,
    /// When the index saw the change that produced it (for push latency).
    changed_at: Instant,
    policy: PolicyVersion,
}

/// One proxy's configuration stream.
struct Session {
    service: DiscoveryService,
    proxy: ProxyId,
    /// The proxy's ServiceAccount: proven by its certificate, or as its Hello names it.
    service_account: String,
    watches: StreamMap<String, WatchStream<Slot>>,
    subscribed: HashMap<String, Subscribed>,
}

impl Session {
    fn new(service: DiscoveryService, proxy: ProxyId, service_account: String) -> Self {
        Self {
            service,
            proxy,
            service_account,
            watches: StreamMap::new(),
            subscribed: HashMap::new(),
        }
    }

    /// Answers the proxy and sends what changes until either side goes away, or its connection
    /// is being closed.
    async fn run(
        mut self,
        mut incoming: Streaming<ProxyMessage>,
        tx: Outgoing,
        mut closing: Closing,
    ) {
        let _ = self
            .service
            .events
            .send(ProxyEvent::Connected(self.proxy.clone()));
        self.service.metrics.proxies_connected.inc();
        loop {
            let replies = tokio::select! {
                received = incoming.message() => match received {
                    Ok(Some(received)) => self.received(received),
                    Ok(None) => break,
                    // Too large, or not a message: the proxy is told why.
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                },
                // A key not published yet (before the index is synced) yields nothing to send,
                // but must not disable this branch: a pattern that fails to match would leave
                // its publication unseen until the proxy next sent something.
                Some((key, slot)) = self.watches.next() => match slot {
                    Some(snapshot) => self.changed(key, &snapshot).into_iter().collect(),
                    None => Vec::new(),
                },
                _ = tx.closed() => break,
                () = closing.closed() => {
                    let status = Status::unavailable("the controller is shutting down; reconnect");
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            };
            for reply in replies {
                if tx.send(Ok(reply)).await.is_err() {
                    return self.close();
                }
            }
        }
        self.close();
    }

    /// What to send for a new snapshot of a subscribed key, if anything.
    fn changed(&mut self, key: String, snapshot: &Snapshot) -> Option<ControllerMessage> {
        let state = self.subscribed.get_mut(&key)?;
        match snapshot {
            // A meshed pod's inbound side is its own ServiceAccount's proxies' alone: withheld
            // from any other (not answered unknown, which reads as "no policy").
            Snapshot::Known { destination, .. }
                if destination.inbound.as_ref().is_some_and(|inbound| {
                    !inbound.service_account.is_empty()
                        && inbound.service_account != self.service_account
                }) =>
            {
                None
            }
            Snapshot::Known {
                version,
                destination,
                encoded,
                changed_at,
                ..
            } => {
                if *version == state.sent_version {
                    return None;
                }
                state.sent_version = version.clone();
                state.awaiting = Some(Awaiting {
                    version: version.clone(),
                    changed_at: *changed_at,
                    policy: PolicyVersion::of(destination),
                });
                Some(message(controller_message::Message::Update(
                    DestinationUpdate {
                        key,
                        version: version.clone(),
                        destination: encoded.clone(),
                    },
                )))
            }
            Snapshot::Unknown { reason } => {
                state.sent_version.clear();
                state.awaiting = None;
                self.service
                    .subscribers
                    .hold(&self.proxy, &key, |holding| *holding = Holding::default());
                Some(unknown(key, reason.clone()))
            }
        }
    }

    /// Takes in one message from the proxy; returns the replies to send at once.
    fn received(&mut self, received: ProxyMessage) -> Vec<ControllerMessage> {
        match received.message {
            Some(proxy_message::Message::Subscribe(subscribe)) => self.subscribe(subscribe),
            Some(proxy_message::Message::Unsubscribe(unsubscribe)) => {
                self.unsubscribe(unsubscribe.keys);
                Vec::new()
            }
            Some(proxy_message::Message::Ack(ack)) => {
                self.ack(ack);
                Vec::new()
            }
            Some(proxy_message::Message::Nack(nack)) => {
                self.nack(nack);
                Vec::new()
            }
            Some(proxy_message::Message::Hello(_)) | None => Vec::new(),
        }
    }

    /// Watches the keys asked for, up to [`MAX_KEYS_PER_STREAM`]; those that are not destination
    /// keys, or beyond the limit, are answered unknown at once. One lock of the snapshots and one
    /// update of the subscribers for the whole message, however many keys it has.
    fn subscribe(&mut self, subscribe: proto::Subscribe) -> Vec<ControllerMessage> {
        let mut refused = Vec::new();
        let mut accepted = Vec::new();
        let mut seen = HashSet::new();
        for subscription in subscribe.destinations {
            if self.subscribed.contains_key(&subscription.key)
                || !seen.insert(subscription.key.clone())
            {
                continue;
            }
            let key = subscription.key.parse::<DestinationKey>();
            if let Err(error) = key {
                refused.push(unknown(
                    subscription.key,
                    format!("not a destination key: {error}"),
                ));
            } else if let Ok(DestinationKey::Inbound { namespace, .. }) = key
                && namespace != self.proxy.namespace
            {
                // Which callers a pod lets in is its own namespace's business (with identity,
                // the namespace is the certificate's).
                refused.push(unknown(
                    subscription.key,
                    format!(
                        "a proxy of namespace {} follows the inbound side of its namespace's pods \
                         alone",
                        self.proxy.namespace
                    ),
                ));
            } else if self.subscribed.len() + accepted.len() >= MAX_KEYS_PER_STREAM {
                refused.push(unknown(
                    subscription.key,
                    format!(
                        "this stream subscribes to {MAX_KEYS_PER_STREAM} destinations, the most \
                         one stream may"
                    ),
                ));
            } else {
                accepted.push(subscription);
            }
        }
        let receivers = self
            .service
            .snapshots
            .watch_all(accepted.iter().map(|s| s.key.as_str()));
        let holdings = accepted
            .iter()
            .zip(&receivers)
            .map(|(subscription, receiver)| {
                // A proxy that reconnects with the current version is not sent it again, so it will
                // not acknowledge it either: it holds it already.
                let applied = match receiver.borrow().as_deref() {
                    Some(Snapshot::Known {
                        version,
                        destination,
                        ..
                    }) if *version == subscription.known_version => {
                        Some(PolicyVersion::of(destination))
                    }
                    _ => None,
                };
                let holding = Holding {
                    applied,
                    rejected: None,
                };
                (subscription.key.clone(), holding)
            });
        self.service
            .subscribers
            .subscribe_all(&self.proxy, holdings.collect());
        for (subscription, receiver) in accepted.into_iter().zip(receivers) {
            self.watches
                .insert(subscription.key.clone(), WatchStream::new(receiver));
            self.subscribed.insert(
                subscription.key,
                Subscribed {
                    sent_version: subscription.known_version,
                    awaiting: None,
                },
            );
        }
        refused
    }

    fn unsubscribe(&mut self, keys: Vec<String>) {
        let keys: Vec<String> = keys
            .into_iter()
            .filter(|key| self.subscribed.remove(key).is_some())
            .collect();
        for key in &keys {
            self.watches.remove(key);
        }
        self.service.snapshots.release_all(&keys);
        self.service.subscribers.forget(&self.proxy, &keys);
        let _ = self.service.events.send(ProxyEvent::Unsubscribed {
            proxy: self.proxy.clone(),
            keys,
        });
    }

    /// The version awaiting an answer for `key`, taken when `version` answers it.
    fn answered(&mut self, key: &str, version: &str) -> Option<Awaiting> {
        self.subscribed
            .get_mut(key)?
            .awaiting
            .take_if(|awaiting| awaiting.version == version)
    }

    fn ack(&mut self, ack: proto::Ack) {
        if let Some(awaiting) = self.answered(&ack.key, &ack.version) {
            self.service
                .metrics
                .push_seconds
                .observe(awaiting.changed_at.elapsed().as_secs_f64());
            self.service
                .subscribers
                .hold(&self.proxy, &ack.key, |holding| {
                    holding.applied = Some(awaiting.policy);
                    holding.rejected = None;
                });
        }
        let _ = self.service.events.send(ProxyEvent::Acked {
            proxy: self.proxy.clone(),
            key: ack.key,
            version: ack.version,
        });
    }

    fn nack(&mut self, nack: proto::Nack) {
        let reason = bounded_reason(nack.reason);
        tracing::warn!(
            proxy = %format!("{}/{}", self.proxy.namespace, self.proxy.workload),
            key = %nack.key, version = %nack.version, %reason,
            "proxy rejected a configuration"
        );
        if let Some(awaiting) = self.answered(&nack.key, &nack.version) {
            self.service
                .subscribers
                .hold(&self.proxy, &nack.key, |holding| {
                    holding.rejected = Some((awaiting.policy, reason.clone()));
                });
        }
        let _ = self.service.events.send(ProxyEvent::Rejected {
            proxy: self.proxy.clone(),
            key: nack.key,
            version: nack.version,
            reason,
        });
    }

    /// The stream is over: its keys are let go of.
    fn close(self) {
        let Self {
            service,
            proxy,
            watches,
            subscribed,
            service_account: _,
        } = self;
        service.metrics.proxies_connected.dec();
        drop(watches);
        let keys: Vec<String> = subscribed.into_keys().collect();
        service.snapshots.release_all(&keys);
        service.subscribers.forget(&proxy, &keys);
        let _ = service.events.send(ProxyEvent::Disconnected(proxy));
    }
}
