//! Distribution: per-destination snapshots, published by the index on watch channels, streamed to
//! the proxies that subscribed to them.
//!
//! A watch channel keeps only its latest value, so a burst of changes to one destination reaches a
//! slow proxy as one update, and a proxy is only ever sent the destinations it asked for.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use outrigger_api::proto::{
    self, ControllerMessage, DestinationUnknown, DestinationUpdate, EndpointGroupContent,
    EndpointsReply, EndpointsRequest, ProxyMessage, Welcome, controller_message,
    discovery_server::Discovery, proxy_message,
};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;

/// What the index knows about one destination key.
#[derive(Debug)]
pub enum Snapshot {
    Known {
        /// Of the whole configuration, endpoints included.
        version: String,
        /// Everything but the endpoints.
        destination: Box<proto::Destination>,
        /// `destination`, encoded once for every stream that sends it.
        encoded: bytes::Bytes,
        /// The endpoints, in groups (one per EndpointSlice).
        endpoints: Vec<EndpointSet>,
        /// When the index saw the change that produced this version (for push latency).
        changed_at: Instant,
    },
    Unknown {
        reason: String,
    },
}

/// A group of a destination's endpoints, encoded once, under a version of its own: updates name
/// the group and version, and proxies that do not hold that version fetch it.
#[derive(Debug)]
pub struct EndpointSet {
    pub name: String,
    pub version: String,
    /// An encoded `proto::Endpoints`.
    pub encoded: bytes::Bytes,
}

impl EndpointSet {
    /// The endpoints, decoded (only the encoding is kept).
    pub fn decode(&self) -> Vec<proto::Endpoint> {
        use prost::Message as _;
        proto::Endpoints::decode(self.encoded.clone())
            .expect("encoded by Snapshot::known")
            .endpoints
    }
}

pub type Slot = Option<Arc<Snapshot>>;

/// The per-destination watch channels, keyed by canonical destination key.
#[derive(Clone)]
pub struct Snapshots {
    inner: Arc<Mutex<SnapshotsInner>>,
}

struct SnapshotsInner {
    channels: HashMap<String, watch::Sender<Slot>>,
    /// Until the index has its first full view, a key it has not published may still appear, so
    /// subscribers wait; afterwards such a key is unknown.
    synced: bool,
}

const UNKNOWN_REASON: &str = "no Service matches this destination";

impl Default for Snapshots {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(SnapshotsInner {
                channels: HashMap::new(),
                synced: false,
            })),
        }
    }
}

impl Snapshots {
    /// Publishes `snapshot` for `key`; one snapshot may serve several keys.
    pub fn publish(&self, key: &str, snapshot: Arc<Snapshot>) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        let snapshot = Some(snapshot);
        match inner.channels.get(key) {
            Some(channel) => {
                channel.send_replace(snapshot);
            }
            None => {
                inner
                    .channels
                    .insert(key.to_string(), watch::Sender::new(snapshot));
            }
        }
    }

    /// Marks every key not published so far (and every key removed later) as unknown.
    pub fn mark_synced(&self) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        inner.synced = true;
        for channel in inner.channels.values() {
            channel.send_if_modified(|slot| {
                let unset = slot.is_none();
                if unset {
                    *slot = Some(unknown());
                }
                unset
            });
        }
    }

    /// The destination is gone: subscribers learn it is unknown.
    pub fn remove(&self, key: &str) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        if let Some(channel) = inner.channels.get(key) {
            if channel.receiver_count() == 0 {
                inner.channels.remove(key);
            } else {
                channel.send_replace(Some(unknown()));
            }
        }
    }

    /// A stream let go of `key`: when no stream watches it any more and the index never published
    /// it (an address no Service owns), its channel goes too, so keys asked about once do not
    /// pile up.
    pub fn release(&self, key: &str) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        if let Some(channel) = inner.channels.get(key)
            && channel.receiver_count() == 0
            && !matches!(channel.borrow().as_deref(), Some(Snapshot::Known { .. }))
        {
            inner.channels.remove(key);
        }
    }

    /// The current snapshot of one key, without subscribing to it.
    pub fn current(&self, key: &str) -> Slot {
        let inner = self.inner.lock().expect("snapshots lock");
        inner
            .channels
            .get(key)
            .and_then(|channel| channel.borrow().clone())
    }

    /// The channel of one key: its current snapshot (None until published or synced) and changes.
    pub fn watch(&self, key: &str) -> watch::Receiver<Slot> {
        let mut inner = self.inner.lock().expect("snapshots lock");
        let initial = (inner.synced).then(unknown);
        inner
            .channels
            .entry(key.to_string())
            .or_insert_with(|| watch::Sender::new(initial))
            .subscribe()
    }
}

impl Snapshot {
    /// A snapshot whose versions are derived from its content: a restarted controller, or another
    /// replica, gives the same version to the same configuration, so proxies that reconnect are
    /// not sent what they already have, and never miss a change behind a reused number.
    pub fn known(
        mut destination: proto::Destination,
        groups: Vec<(String, Vec<proto::Endpoint>)>,
        changed_at: Instant,
    ) -> Self {
        use prost::Message as _;
        let endpoints: Vec<EndpointSet> = groups
            .into_iter()
            .map(|(name, endpoints)| {
                let encoded = bytes::Bytes::from(proto::Endpoints { endpoints }.encode_to_vec());
                EndpointSet {
                    version: content_version(&[&encoded]),
                    name,
                    encoded,
                }
            })
            .collect();
        destination.endpoint_groups = endpoints
            .iter()
            .map(|set| proto::EndpointGroup {
                name: set.name.clone(),
                version: set.version.clone(),
            })
            .collect();
        let encoded = bytes::Bytes::from(destination.encode_to_vec());
        Self::Known {
            version: content_version(&[&encoded]),
            destination: Box::new(destination),
            encoded,
            endpoints,
            changed_at,
        }
    }
}

fn content_version(parts: &[&[u8]]) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

fn unknown() -> Arc<Snapshot> {
    Arc::new(Snapshot::Unknown {
        reason: UNKNOWN_REASON.to_string(),
    })
}

/// Who a connected proxy is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProxyId {
    pub namespace: String,
    pub workload: String,
    /// Distinguishes two streams from the same workload (a reconnect racing the old stream).
    pub stream: u64,
}

/// The policy a destination's configuration carries, as status compares it with the policy's
/// current generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVersion {
    /// `namespace/name` of the DestinationPolicy in force; empty when none is.
    pub policy: String,
    pub generation: i64,
}

impl PolicyVersion {
    fn of(destination: &proto::Destination) -> Self {
        Self {
            policy: destination.policy.clone(),
            generation: destination.policy_generation,
        }
    }
}

/// What one proxy holds of one destination it subscribed to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Holding {
    /// What the configuration it applied last carries; None until it has one.
    pub applied: Option<PolicyVersion>,
    /// Set when it rejected the latest configuration sent: what that carried, and the proxy's
    /// reason. It keeps its previous configuration meanwhile.
    pub rejected: Option<(PolicyVersion, String)>,
}

/// Per destination key, every connected proxy subscribed to it and what it holds. Kept by the
/// configuration streams, read by status; a watch channel, so a burst of acknowledgements wakes
/// its reader once.
pub type Subscribers = HashMap<String, HashMap<ProxyId, Holding>>;

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
    subscribers: watch::Sender<Subscribers>,
    metrics: Metrics,
    controller: String,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
}

impl DiscoveryService {
    pub fn new(snapshots: Snapshots, metrics: Metrics, controller: String) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            snapshots,
            events,
            subscribers: watch::Sender::new(Subscribers::new()),
            metrics,
            controller,
            next_stream: Default::default(),
        }
    }

    pub fn events(&self) -> broadcast::Receiver<ProxyEvent> {
        self.events.subscribe()
    }

    pub fn subscribers(&self) -> watch::Receiver<Subscribers> {
        self.subscribers.subscribe()
    }

    /// Updates what `proxy` holds of `key`, when it is subscribed to it.
    fn hold(&self, proxy: &ProxyId, key: &str, update: impl FnOnce(&mut Holding)) {
        self.subscribers.send_if_modified(|subscribers| {
            match subscribers
                .get_mut(key)
                .and_then(|proxies| proxies.get_mut(proxy))
            {
                Some(holding) => {
                    update(holding);
                    true
                }
                None => false,
            }
        });
    }

    fn forget(&self, proxy: &ProxyId, keys: impl IntoIterator<Item = String>) {
        self.subscribers.send_modify(|subscribers| {
            for key in keys {
                if let Some(proxies) = subscribers.get_mut(&key) {
                    proxies.remove(proxy);
                    if proxies.is_empty() {
                        subscribers.remove(&key);
                    }
                }
            }
        });
    }

    pub fn into_server(self) -> proto::discovery_server::DiscoveryServer<Self> {
        proto::discovery_server::DiscoveryServer::new(self)
            .max_decoding_message_size(64 * 1024 * 1024)
    }
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = MessageStream;

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut incoming = request.into_inner();
        let hello = match incoming.message().await? {
            Some(ProxyMessage {
                message: Some(proxy_message::Message::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
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
        tokio::spawn(self.clone().session(proxy, incoming, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn endpoints(
        &self,
        request: Request<EndpointsRequest>,
    ) -> Result<Response<EndpointsReply>, Status> {
        let EndpointsRequest { key, groups } = request.into_inner();
        match self.snapshots.current(&key).as_deref() {
            Some(Snapshot::Known { endpoints, .. }) => Ok(Response::new(EndpointsReply {
                groups: endpoints
                    .iter()
                    .filter(|set| groups.contains(&set.name))
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

/// The version awaiting an answer for `key`, taken when `version` answers it.
fn answered(
    subscribed: &mut HashMap<String, Subscribed>,
    key: &str,
    version: &str,
) -> Option<Awaiting> {
    subscribed
        .get_mut(key)?
        .awaiting
        .take_if(|awaiting| awaiting.version == version)
}

fn message(message: controller_message::Message) -> ControllerMessage {
    ControllerMessage {
        message: Some(message),
    }
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

impl DiscoveryService {
    async fn session(
        self,
        proxy: ProxyId,
        mut incoming: Streaming<ProxyMessage>,
        tx: mpsc::Sender<Result<ControllerMessage, Status>>,
    ) {
        let _ = self.events.send(ProxyEvent::Connected(proxy.clone()));
        self.metrics.proxies_connected.inc();
        let mut watches: StreamMap<String, WatchStream<Slot>> = StreamMap::new();
        let mut subscribed: HashMap<String, Subscribed> = HashMap::new();
        loop {
            tokio::select! {
                received = incoming.message() => {
                    let Ok(Some(received)) = received else { break };
                    self.handle(&proxy, received, &mut watches, &mut subscribed);
                }
                Some((key, Some(snapshot))) = watches.next() => {
                    let Some(state) = subscribed.get_mut(&key) else { continue };
                    let reply = match &*snapshot {
                        Snapshot::Known { version, destination, encoded, changed_at, .. } => {
                            if *version == state.sent_version {
                                continue;
                            }
                            state.sent_version = version.clone();
                            state.awaiting = Some(Awaiting {
                                version: version.clone(),
                                changed_at: *changed_at,
                                policy: PolicyVersion::of(destination),
                            });
                            controller_message::Message::Update(DestinationUpdate {
                                key,
                                version: version.clone(),
                                destination: encoded.clone(),
                            })
                        }
                        Snapshot::Unknown { reason } => {
                            state.sent_version.clear();
                            state.awaiting = None;
                            self.hold(&proxy, &key, |holding| *holding = Holding::default());
                            controller_message::Message::Unknown(DestinationUnknown {
                                key,
                                reason: reason.clone(),
                            })
                        }
                    };
                    if tx.send(Ok(message(reply))).await.is_err() {
                        break;
                    }
                }
                _ = tx.closed() => break,
            }
        }
        self.metrics.proxies_connected.dec();
        drop(watches);
        for key in subscribed.keys() {
            self.snapshots.release(key);
        }
        self.forget(&proxy, subscribed.into_keys());
        let _ = self.events.send(ProxyEvent::Disconnected(proxy));
    }

    fn handle(
        &self,
        proxy: &ProxyId,
        received: ProxyMessage,
        watches: &mut StreamMap<String, WatchStream<Slot>>,
        subscribed: &mut HashMap<String, Subscribed>,
    ) {
        match received.message {
            Some(proxy_message::Message::Subscribe(subscribe)) => {
                for destination in subscribe.destinations {
                    if subscribed.contains_key(&destination.key) {
                        continue;
                    }
                    let receiver = self.snapshots.watch(&destination.key);
                    // A proxy that reconnects with the current version is not sent it again,
                    // so it will not acknowledge it either: it holds it already.
                    let holding = Holding {
                        applied: match receiver.borrow().as_deref() {
                            Some(Snapshot::Known {
                                version,
                                destination: current,
                                ..
                            }) if *version == destination.known_version => {
                                Some(PolicyVersion::of(current))
                            }
                            _ => None,
                        },
                        rejected: None,
                    };
                    self.subscribers.send_modify(|subscribers| {
                        subscribers
                            .entry(destination.key.clone())
                            .or_default()
                            .insert(proxy.clone(), holding);
                    });
                    watches.insert(destination.key.clone(), WatchStream::new(receiver));
                    subscribed.insert(
                        destination.key,
                        Subscribed {
                            sent_version: destination.known_version,
                            awaiting: None,
                        },
                    );
                }
            }
            Some(proxy_message::Message::Unsubscribe(unsubscribe)) => {
                for key in &unsubscribe.keys {
                    watches.remove(key);
                    subscribed.remove(key);
                    self.snapshots.release(key);
                }
                self.forget(proxy, unsubscribe.keys.clone());
                let _ = self.events.send(ProxyEvent::Unsubscribed {
                    proxy: proxy.clone(),
                    keys: unsubscribe.keys,
                });
            }
            Some(proxy_message::Message::Ack(ack)) => {
                if let Some(awaiting) = answered(subscribed, &ack.key, &ack.version) {
                    self.metrics
                        .push_seconds
                        .observe(awaiting.changed_at.elapsed().as_secs_f64());
                    self.hold(proxy, &ack.key, |holding| {
                        holding.applied = Some(awaiting.policy);
                        holding.rejected = None;
                    });
                }
                let _ = self.events.send(ProxyEvent::Acked {
                    proxy: proxy.clone(),
                    key: ack.key,
                    version: ack.version,
                });
            }
            Some(proxy_message::Message::Nack(nack)) => {
                tracing::warn!(
                    proxy = %format!("{}/{}", proxy.namespace, proxy.workload),
                    key = %nack.key, version = %nack.version, reason = %nack.reason,
                    "proxy rejected a configuration"
                );
                if let Some(awaiting) = answered(subscribed, &nack.key, &nack.version) {
                    self.hold(proxy, &nack.key, |holding| {
                        holding.rejected = Some((awaiting.policy, nack.reason.clone()));
                    });
                }
                let _ = self.events.send(ProxyEvent::Rejected {
                    proxy: proxy.clone(),
                    key: nack.key,
                    version: nack.version,
                    reason: nack.reason,
                });
            }
            Some(proxy_message::Message::Hello(_)) | None => {}
        }
    }
}

/// Proxies that vanish without closing their connection are noticed within about this long.
const GRPC_KEEPALIVE: Duration = Duration::from_secs(20);

/// Serves the configuration streams until `shutdown`. Streams have no natural end to drain to,
/// so stopping drops them all at once and the proxies reconnect, to another replica or to this
/// one restarted, keeping their configuration meanwhile.
pub async fn serve_grpc(
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
                // A reply's frames go out as separate small writes: without this, Nagle holds the
                // later ones until the proxy's delayed ACK, some 40 ms.
                let _ = stream.set_nodelay(true);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use outrigger_api::proto::{
        Ack, Hello, Nack, Subscribe, Subscription, discovery_client::DiscoveryClient,
    };
    use prost::Message as _;

    use super::*;

    const KEY: &str = "reviews.shop.svc.cluster.local:9080";

    /// A destination carrying generation `generation` of policy shop/reviews.
    fn publish(snapshots: &Snapshots, generation: i64) -> String {
        publish_with(snapshots, generation, &[])
    }

    /// The same, with endpoint groups of the given addresses.
    fn publish_with(snapshots: &Snapshots, generation: i64, groups: &[(&str, &[&str])]) -> String {
        let groups = groups
            .iter()
            .map(|(name, addresses)| {
                let endpoints = addresses
                    .iter()
                    .map(|address| proto::Endpoint {
                        address: address.to_string(),
                        ..Default::default()
                    })
                    .collect();
                (name.to_string(), endpoints)
            })
            .collect();
        let destination = proto::Destination {
            namespace: "shop".into(),
            service: "reviews".into(),
            port: 9080,
            policy: "shop/reviews".into(),
            policy_generation: generation,
            ..Default::default()
        };
        let snapshot = Snapshot::known(destination, groups, Instant::now());
        let Snapshot::Known { version, .. } = &snapshot else {
            unreachable!("Snapshot::known is known")
        };
        let version = version.clone();
        snapshots.publish(KEY, Arc::new(snapshot));
        version
    }

    /// A proxy's stream, driven by hand.
    struct Stream {
        send: mpsc::Sender<ProxyMessage>,
        received: Streaming<ControllerMessage>,
    }

    impl Stream {
        async fn open(addr: std::net::SocketAddr, workload: &str, known_version: &str) -> Self {
            let mut client = DiscoveryClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let (send, outgoing) = mpsc::channel(8);
            let hello = proxy_message::Message::Hello(Hello {
                namespace: "shop".into(),
                workload: workload.into(),
                ..Default::default()
            });
            let subscribe = proxy_message::Message::Subscribe(Subscribe {
                destinations: vec![Subscription {
                    key: KEY.into(),
                    known_version: known_version.into(),
                }],
            });
            for message in [hello, subscribe] {
                send.send(ProxyMessage {
                    message: Some(message),
                })
                .await
                .unwrap();
            }
            let received = client
                .stream(ReceiverStream::new(outgoing))
                .await
                .unwrap()
                .into_inner();
            Self { send, received }
        }

        /// The version of the next update.
        async fn update(&mut self) -> String {
            self.next_update().await.version
        }

        async fn next_update(&mut self) -> DestinationUpdate {
            loop {
                let message = self
                    .received
                    .message()
                    .await
                    .unwrap()
                    .expect("the stream goes on");
                if let Some(controller_message::Message::Update(update)) = message.message {
                    return update;
                }
            }
        }

        async fn answer(&self, message: proxy_message::Message) {
            self.send
                .send(ProxyMessage {
                    message: Some(message),
                })
                .await
                .unwrap();
        }
    }

    /// Waits until the holdings of `KEY` are `expected`, by workload.
    async fn until_held(
        subscribers: &mut watch::Receiver<Subscribers>,
        expected: &[(&str, Holding)],
    ) {
        let expected: HashMap<String, Holding> = expected
            .iter()
            .map(|(w, h)| (w.to_string(), h.clone()))
            .collect();
        let held = |subscribers: &Subscribers| -> HashMap<String, Holding> {
            subscribers
                .get(KEY)
                .into_iter()
                .flatten()
                .map(|(proxy, holding)| (proxy.workload.clone(), holding.clone()))
                .collect()
        };
        let reached = tokio::time::timeout(
            Duration::from_secs(10),
            subscribers.wait_for(|subscribers| held(subscribers) == expected),
        )
        .await
        .is_ok();
        assert!(
            reached,
            "expected {expected:?}, have {:?}",
            held(&subscribers.borrow())
        );
    }

    fn holds(generation: i64, rejected: Option<(i64, &str)>) -> Holding {
        let version = |generation| PolicyVersion {
            policy: "shop/reviews".into(),
            generation,
        };
        Holding {
            applied: Some(version(generation)),
            rejected: rejected
                .map(|(generation, reason)| (version(generation), reason.to_string())),
        }
    }

    /// The discovery service on a loopback port, over snapshots that are synced and empty; it
    /// serves until `_stop` is dropped.
    struct Served {
        snapshots: Snapshots,
        service: DiscoveryService,
        addr: std::net::SocketAddr,
        _stop: watch::Sender<bool>,
    }

    impl Served {
        async fn start() -> Self {
            let snapshots = Snapshots::default();
            snapshots.mark_synced();
            let service =
                DiscoveryService::new(snapshots.clone(), Metrics::default(), "test".into());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (_stop, shutdown) = watch::channel(false);
            tokio::spawn(serve_grpc(listener, service.clone(), shutdown));
            Self {
                snapshots,
                service,
                addr,
                _stop,
            }
        }
    }

    #[tokio::test]
    async fn subscribers_follow_what_each_proxy_applied_or_rejected() {
        let Served {
            snapshots,
            service,
            addr,
            _stop,
        } = Served::start().await;
        let mut subscribers = service.subscribers();

        let first = publish(&snapshots, 3);
        let mut a = Stream::open(addr, "a", "").await;
        assert_eq!(a.update().await, first);
        until_held(&mut subscribers, &[("a", Holding::default())]).await;
        a.answer(proxy_message::Message::Ack(Ack {
            key: KEY.into(),
            version: first.clone(),
        }))
        .await;
        until_held(&mut subscribers, &[("a", holds(3, None))]).await;

        // A proxy that reconnects with the current version holds it without answering.
        let b = Stream::open(addr, "b", &first).await;
        until_held(
            &mut subscribers,
            &[("a", holds(3, None)), ("b", holds(3, None))],
        )
        .await;

        // Generation 4 rejected by one proxy: it keeps generation 3 meanwhile.
        let second = publish(&snapshots, 4);
        assert_eq!(a.update().await, second);
        a.answer(proxy_message::Message::Nack(Nack {
            key: KEY.into(),
            version: second,
            reason: "no".into(),
        }))
        .await;
        until_held(
            &mut subscribers,
            &[("a", holds(3, Some((4, "no")))), ("b", holds(3, None))],
        )
        .await;

        // Gone proxies are forgotten.
        drop(a);
        drop(b);
        until_held(&mut subscribers, &[]).await;
    }

    #[tokio::test]
    async fn updates_name_endpoint_groups_which_are_fetched_apart() {
        let Served {
            snapshots,
            addr,
            _stop,
            ..
        } = Served::start().await;
        let mut client = DiscoveryClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut fetch = async |key: &str, groups: &[&str]| {
            client
                .endpoints(EndpointsRequest {
                    key: key.into(),
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                })
                .await
                .map(|reply| reply.into_inner().groups)
        };
        let versions = |update: &DestinationUpdate| -> Vec<(String, String)> {
            proto::Destination::decode(update.destination.clone())
                .unwrap()
                .endpoint_groups
                .into_iter()
                .map(|group| (group.name, group.version))
                .collect()
        };

        publish_with(
            &snapshots,
            3,
            &[("a", &["10.0.0.1:80"]), ("b", &["10.0.0.2:80"])],
        );
        let mut stream = Stream::open(addr, "a", "").await;
        let first = versions(&stream.next_update().await);
        assert_eq!(first.len(), 2);
        let fetched = fetch(KEY, &["b", "gone"]).await.unwrap();
        assert_eq!(fetched.len(), 1, "a group that is not there is left out");
        assert_eq!(
            (&fetched[0].name, &fetched[0].version),
            (&first[1].0, &first[1].1)
        );
        let endpoints = proto::Endpoints::decode(fetched[0].endpoints.clone()).unwrap();
        assert_eq!(endpoints.endpoints[0].address, "10.0.0.2:80");

        // A policy edit names the same groups.
        publish_with(
            &snapshots,
            4,
            &[("a", &["10.0.0.1:80"]), ("b", &["10.0.0.2:80"])],
        );
        assert_eq!(versions(&stream.next_update().await), first);

        // A change in one group names a new version of that group only.
        publish_with(
            &snapshots,
            4,
            &[("a", &["10.0.0.1:80"]), ("b", &["10.0.0.3:80"])],
        );
        let churned = versions(&stream.next_update().await);
        assert_eq!(churned[0], first[0]);
        assert_ne!(churned[1], first[1]);
        assert_eq!(fetch(KEY, &["b"]).await.unwrap()[0].version, churned[1].1);

        let unknown = fetch("nothing.shop.svc.cluster.local:80", &["a"])
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn keys_no_service_owns_are_let_go_when_no_stream_watches_them() {
        let Served {
            snapshots,
            service,
            addr,
            _stop,
        } = Served::start().await;
        let mut events = service.events();
        let mut until = async |wanted: fn(&ProxyEvent) -> bool| {
            while !wanted(&events.recv().await.unwrap()) {}
        };

        // Unsubscribed.
        let a = Stream::open(addr, "a", "").await;
        until(|e| matches!(e, ProxyEvent::Connected(_))).await;
        eventually_unknown(&snapshots).await;
        a.answer(proxy_message::Message::Unsubscribe(proto::Unsubscribe {
            keys: vec![KEY.into()],
        }))
        .await;
        until(|e| matches!(e, ProxyEvent::Unsubscribed { .. })).await;
        assert!(snapshots.current(KEY).is_none());

        // Disconnected.
        let b = Stream::open(addr, "b", "").await;
        until(|e| matches!(e, ProxyEvent::Connected(_))).await;
        eventually_unknown(&snapshots).await;
        drop(b);
        until(|e| matches!(e, ProxyEvent::Disconnected(_))).await;
        assert!(snapshots.current(KEY).is_none());

        // A key the index published stays, watched or not.
        let version = publish(&snapshots, 1);
        let mut c = Stream::open(addr, "c", "").await;
        assert_eq!(c.update().await, version);
        drop(c);
        until(|e| matches!(e, ProxyEvent::Disconnected(_))).await;
        assert!(snapshots.current(KEY).is_some());
    }

    /// The subscription of a stream just opened lands after its Connected event.
    async fn eventually_unknown(snapshots: &Snapshots) {
        for _ in 0..200 {
            if matches!(
                snapshots.current(KEY).as_deref(),
                Some(Snapshot::Unknown { .. })
            ) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{KEY} was never watched");
    }
}
