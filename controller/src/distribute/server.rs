//! The gRPC server: the configuration streams, each subscribed to the destinations its proxy asked
//! for, and the `Endpoints` call that proxies fetch endpoint groups with.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
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
}

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
                            self.subscribers.hold(&proxy, &key, |holding| *holding = Holding::default());
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
        self.subscribers.forget(&proxy, subscribed.into_keys());
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
                    self.subscribers.subscribe(proxy, &destination.key, holding);
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
                self.subscribers.forget(proxy, unsubscribe.keys.clone());
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
                    self.subscribers.hold(proxy, &ack.key, |holding| {
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
                    self.subscribers.hold(proxy, &nack.key, |holding| {
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
