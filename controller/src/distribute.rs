//! Distribution: per-destination snapshots, published by the index on watch channels, streamed to
//! the proxies that subscribed to them.
//!
//! A watch channel keeps only its latest value, so a burst of changes to one destination reaches a
//! slow proxy as one update, and a proxy is only ever sent the destinations it asked for.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::Stream;
use outrigger_api::proto::{
    self, ControllerMessage, DestinationUnknown, DestinationUpdate, ProxyMessage, Welcome,
    controller_message, discovery_server::Discovery, proxy_message,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;

/// What the index knows about one destination key.
#[derive(Debug)]
pub enum Snapshot {
    Known {
        version: String,
        destination: Box<proto::Destination>,
        /// When the index saw the change that produced this version (for push latency).
        changed_at: Instant,
    },
    Unknown {
        reason: String,
    },
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
    pub fn publish(&self, key: &str, snapshot: Snapshot) {
        let mut inner = self.inner.lock().expect("snapshots lock");
        let snapshot = Some(Arc::new(snapshot));
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
    /// A snapshot whose version is derived from its content: a restarted controller, or another
    /// replica, gives the same version to the same configuration, so proxies that reconnect are
    /// not sent what they already have, and never miss a change behind a reused number.
    pub fn known(destination: proto::Destination, changed_at: Instant) -> Self {
        use prost::Message as _;
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        destination.encode_to_vec().hash(&mut hasher);
        Self::Known {
            version: format!("{:016x}", hasher.finish()),
            destination: Box::new(destination),
            changed_at,
        }
    }
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

/// What proxies report, for status and tests.
#[derive(Clone, Debug)]
pub enum ProxyEvent {
    Connected(ProxyId),
    Disconnected(ProxyId),
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
            metrics,
            controller,
            next_stream: Default::default(),
        }
    }

    pub fn events(&self) -> broadcast::Receiver<ProxyEvent> {
        self.events.subscribe()
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
    /// When the version just sent was produced, until the proxy acknowledges it.
    pending_since: Option<(String, Instant)>,
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
                        Snapshot::Known { version, destination, changed_at } => {
                            if *version == state.sent_version {
                                continue;
                            }
                            state.sent_version = version.clone();
                            state.pending_since = Some((version.clone(), *changed_at));
                            controller_message::Message::Update(DestinationUpdate {
                                key,
                                version: version.clone(),
                                destination: Some(destination.as_ref().clone()),
                            })
                        }
                        Snapshot::Unknown { reason } => {
                            state.sent_version.clear();
                            state.pending_since = None;
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
                    watches.insert(destination.key.clone(), WatchStream::new(receiver));
                    subscribed.insert(
                        destination.key,
                        Subscribed {
                            sent_version: destination.known_version,
                            pending_since: None,
                        },
                    );
                }
            }
            Some(proxy_message::Message::Unsubscribe(unsubscribe)) => {
                for key in unsubscribe.keys {
                    watches.remove(&key);
                    subscribed.remove(&key);
                }
            }
            Some(proxy_message::Message::Ack(ack)) => {
                if let Some(state) = subscribed.get_mut(&ack.key)
                    && let Some((_, since)) = state
                        .pending_since
                        .take_if(|(version, _)| *version == ack.version)
                {
                    self.metrics
                        .push_seconds
                        .observe(since.elapsed().as_secs_f64());
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
