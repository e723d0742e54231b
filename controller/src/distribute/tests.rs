//! The discovery service through real sockets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outrigger_api::proto::{
    self, Ack, ControllerMessage, DestinationUpdate, EndpointsRequest, Hello, Nack, ProxyMessage,
    Subscribe, Subscription, controller_message, discovery_client::DiscoveryClient, proxy_message,
};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::listener::{
    DRAIN_BOUND, DRAIN_WINDOW, IDLE_TIMEOUT, MAX_HEADER_LIST_BYTES, MAX_STREAMS_PER_CONNECTION,
    drain_turn, serve_connection,
};
use super::server::{MAX_KEYS_PER_STREAM, MAX_REASON_BYTES, PeerIdentity, bounded_reason};
use super::*;
use crate::metrics::Metrics;

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
        let subscribe = proxy_message::Message::Subscribe(Subscribe {
            destinations: vec![Subscription {
                key: KEY.into(),
                known_version: known_version.into(),
            }],
        });
        Self::open_with(addr, vec![hello("shop", workload), subscribe])
            .await
            .unwrap()
    }

    /// A stream that first sends `messages`, or the status it was refused with.
    async fn open_with(
        addr: std::net::SocketAddr,
        messages: Vec<proxy_message::Message>,
    ) -> Result<Self, tonic::Status> {
        let client = DiscoveryClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self::open_on(client, messages).await
    }

    /// The same, over a connection of the test's own.
    async fn open_on(
        mut client: DiscoveryClient<tonic::transport::Channel>,
        messages: Vec<proxy_message::Message>,
    ) -> Result<Self, tonic::Status> {
        let (send, outgoing) = mpsc::channel(8);
        for message in messages {
            send.send(ProxyMessage {
                message: Some(message),
            })
            .await
            .unwrap();
        }
        let received = client
            .stream(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        Ok(Self { send, received })
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

fn hello(namespace: &str, workload: &str) -> proxy_message::Message {
    proxy_message::Message::Hello(Hello {
        namespace: namespace.into(),
        workload: workload.into(),
        ..Default::default()
    })
}

/// Waits until the holdings of `KEY` are `expected`, by workload.
async fn until_held(subscribers: &mut watch::Receiver<Subscribers>, expected: &[(&str, Holding)]) {
    let expected: HashMap<String, Holding> = expected
        .iter()
        .map(|(w, h)| (w.to_string(), h.clone()))
        .collect();
    let held = |subscribers: &Subscribers| -> HashMap<String, Holding> {
        subscribers
            .get(KEY)
            .into_iter()
            .flat_map(|proxies| proxies.iter())
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
        rejected: rejected.map(|(generation, reason)| (version(generation), reason.to_string())),
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
        let served = Self::before_sync().await;
        served.snapshots.mark_synced();
        served
    }

    /// Before the index has its first full view: keys not published yet wait.
    async fn before_sync() -> Self {
        let snapshots = Snapshots::default();
        let service = DiscoveryService::new(snapshots.clone(), Metrics::default(), "test".into());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve_grpc(listener, service.clone(), None, shutdown));
        Self {
            snapshots,
            service,
            addr,
            _stop,
        }
    }
}

#[tokio::test]
async fn a_key_subscribed_before_the_index_is_synced_is_sent_when_published() {
    let Served {
        snapshots,
        service,
        addr,
        _stop,
    } = Served::before_sync().await;
    let mut subscribers = service.subscribers();
    let mut proxy = Stream::open(addr, "a", "").await;
    // Subscribed while nothing is published; the proxy sends nothing more: the publication alone
    // must reach it.
    until_held(&mut subscribers, &[("a", Holding::default())]).await;
    let version = publish(&snapshots, 1);
    let update = tokio::time::timeout(std::time::Duration::from_secs(30), proxy.update());
    assert_eq!(update.await.expect("the update is sent"), version);
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

#[tokio::test(start_paused = true)]
async fn a_stream_that_says_nothing_is_ended_after_the_hello_deadline() {
    let Served { addr, _stop, .. } = Served::start().await;
    let opened = tokio::time::timeout(
        Duration::from_secs(3600),
        Stream::open_with(addr, Vec::new()),
    )
    .await
    .expect("answered before the test's own deadline");
    let status = opened.err().expect("refused");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
}

#[tokio::test]
async fn names_in_hello_are_bounded() {
    let Served { addr, _stop, .. } = Served::start().await;
    for (namespace, workload) in [
        ("n".repeat(64), "a".to_string()),
        ("shop".into(), "w".repeat(254)),
        ("shop".into(), "a\nb".into()),
    ] {
        let status = Stream::open_with(addr, vec![hello(&namespace, &workload)])
            .await
            .err()
            .expect("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    }
    assert!(
        Stream::open_with(addr, vec![hello(&"n".repeat(63), &"w".repeat(253))])
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_message_over_the_size_limit_ends_the_stream_saying_why() {
    let Served { addr, _stop, .. } = Served::start().await;
    let mut stream = Stream::open_with(addr, vec![hello("shop", "a")])
        .await
        .unwrap();
    stream
        .answer(proxy_message::Message::Subscribe(Subscribe {
            destinations: vec![Subscription {
                key: "k".repeat(300 * 1024),
                ..Default::default()
            }],
        }))
        .await;
    let status = loop {
        match stream.received.message().await {
            Ok(Some(message)) => {
                let welcome = matches!(
                    message.message,
                    Some(controller_message::Message::Welcome(_))
                );
                assert!(welcome, "only the Welcome comes first: {message:?}");
            }
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
}

/// The keys of the `Unknown` messages that come before the stream has `count` of them.
async fn unknowns(stream: &mut Stream, count: usize) -> Vec<(String, String)> {
    let mut unknown = Vec::new();
    while unknown.len() < count {
        let message = stream.received.message().await.unwrap().expect("open");
        if let Some(controller_message::Message::Unknown(u)) = message.message {
            unknown.push((u.key, u.reason));
        }
    }
    unknown
}

#[tokio::test]
async fn a_stream_subscribes_to_destination_keys_only_and_to_a_bounded_number() {
    let Served {
        snapshots,
        service,
        addr,
        _stop,
    } = Served::start().await;
    let keys: Vec<String> = (0..=MAX_KEYS_PER_STREAM)
        .map(|i| format!("s{i}.shop.svc.cluster.local:80"))
        .collect();
    let subscribe = |keys: &[String]| {
        proxy_message::Message::Subscribe(Subscribe {
            destinations: keys
                .iter()
                .map(|key| Subscription {
                    key: key.clone(),
                    ..Default::default()
                })
                .collect(),
        })
    };
    let mut stream = Stream::open_with(addr, vec![hello("shop", "a"), subscribe(&keys)])
        .await
        .unwrap();
    // Every key is unknown here (nothing is published); the one past the limit says so at once.
    let answered = unknowns(&mut stream, keys.len()).await;
    let over: Vec<&(String, String)> = answered
        .iter()
        .filter(|(_, reason)| reason.contains("the most one stream may"))
        .collect();
    assert_eq!(over.len(), 1, "{over:?}");
    assert_eq!(over[0].0, keys[MAX_KEYS_PER_STREAM]);
    let subscribed = service.subscribers().borrow().len();
    assert_eq!(subscribed, MAX_KEYS_PER_STREAM);

    stream.answer(subscribe(&["not a key".to_string()])).await;
    let answered = unknowns(&mut stream, 1).await;
    assert_eq!(answered[0].0, "not a key");
    assert!(
        answered[0].1.starts_with("not a destination key"),
        "{answered:?}"
    );
    assert!(snapshots.current("not a key").is_none(), "never watched");
}

#[tokio::test]
async fn a_rejection_reason_is_kept_to_1_kib_cut_on_a_character_boundary() {
    let Served {
        snapshots,
        service,
        addr,
        _stop,
    } = Served::start().await;
    let mut subscribers = service.subscribers();
    let version = publish(&snapshots, 3);
    let mut a = Stream::open(addr, "a", "").await;
    assert_eq!(a.update().await, version);
    a.answer(proxy_message::Message::Nack(Nack {
        key: KEY.into(),
        version,
        reason: "é".repeat(4096),
    }))
    .await;
    let kept = |subscribers: &Subscribers| {
        subscribers
            .get(KEY)
            .and_then(|proxies| proxies.values().next())
            .and_then(|holding| holding.rejected.clone())
            .map(|(_, reason)| reason)
    };
    let reason = subscribers
        .wait_for(|subscribers| kept(subscribers).is_some())
        .await
        .map(|subscribers| kept(&subscribers).unwrap())
        .unwrap();
    assert!(reason.len() <= MAX_REASON_BYTES, "{} bytes", reason.len());
    assert!(reason.ends_with('…'));
    assert!(reason.trim_end_matches('…').chars().all(|c| c == 'é'));
    assert_eq!(bounded_reason("short".into()), "short");
}

/// The settings the server announces in its first frame, by identifier.
async fn server_settings(addr: std::net::SocketAddr) -> HashMap<u16, u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connection = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The client preface and an empty SETTINGS frame.
    connection
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut header = [0u8; 9];
    connection.read_exact(&mut header).await.unwrap();
    assert_eq!(header[3], 0x4, "the first frame is SETTINGS");
    let length =
        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; length];
    connection.read_exact(&mut payload).await.unwrap();
    payload
        .chunks(6)
        .map(|setting| {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            (id, value)
        })
        .collect()
}

#[tokio::test]
async fn connections_are_limited_in_streams_and_header_size() {
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    let Served { addr, _stop, .. } = Served::start().await;
    let settings = server_settings(addr).await;
    assert_eq!(
        settings.get(&MAX_CONCURRENT_STREAMS),
        Some(&MAX_STREAMS_PER_CONNECTION)
    );
    assert_eq!(
        settings.get(&MAX_HEADER_LIST_SIZE),
        Some(&MAX_HEADER_LIST_BYTES)
    );
}

#[tokio::test(start_paused = true)]
async fn a_connection_with_no_stream_open_is_closed() {
    use tokio::io::AsyncReadExt;
    let Served { addr, _stop, .. } = Served::start().await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(3600), silent.read_to_end(&mut rest))
        .await
        .expect("closed before the test's own deadline")
        .unwrap();
    assert!(started.elapsed() >= IDLE_TIMEOUT);

    // A connection with its configuration stream open stays, however long.
    let mut open = Stream::open(addr, "a", "").await;
    assert_eq!(unknowns(&mut open, 1).await[0].0, KEY);
    tokio::time::sleep(IDLE_TIMEOUT * 4).await;
    let other = "ratings.shop.svc.cluster.local:80";
    open.answer(proxy_message::Message::Subscribe(Subscribe {
        destinations: vec![Subscription {
            key: other.into(),
            ..Default::default()
        }],
    }))
    .await;
    assert_eq!(unknowns(&mut open, 1).await[0].0, other);
}

/// A proxy's connection over memory rather than a socket, served as the listener serves the
/// `number`th connection it accepts: paused time then moves only when every task waits on it.
async fn connect_in_memory(
    service: &DiscoveryService,
    number: u64,
    shutdown: &watch::Receiver<bool>,
) -> (
    DiscoveryClient<tonic::transport::Channel>,
    tokio::task::JoinHandle<()>,
) {
    connect_in_memory_as(service, number, shutdown, None).await
}

/// The same, for a client whose certificate proved `peer`.
async fn connect_in_memory_as(
    service: &DiscoveryService,
    number: u64,
    shutdown: &watch::Receiver<bool>,
    peer: Option<PeerIdentity>,
) -> (
    DiscoveryClient<tonic::transport::Channel>,
    tokio::task::JoinHandle<()>,
) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(serve_connection(
        server_io,
        peer,
        service.clone().into_server(),
        drain_turn(number),
        shutdown.clone(),
    ));
    let mut client_io = Some(client_io);
    let channel = tonic::transport::Endpoint::from_static("http://in-memory")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let io = client_io.take().map(hyper_util::rt::TokioIo::new);
            async move { io.ok_or_else(|| std::io::Error::other("one connection only")) }
        }))
        .await
        .unwrap();
    (DiscoveryClient::new(channel), served)
}

/// How a stream ended: the status the controller sent, or a transport error.
async fn end_of(stream: &mut Stream) -> tonic::Status {
    loop {
        match stream.received.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return tonic::Status::ok("ended without a status"),
            Err(status) => return status,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn on_shutdown_streams_end_with_unavailable_one_connection_after_another_over_the_window() {
    const CONNECTIONS: u64 = 16;
    let snapshots = Snapshots::default();
    snapshots.mark_synced();
    let service = DiscoveryService::new(snapshots, Metrics::default(), "test".into());
    let (stop, shutdown) = watch::channel(false);
    let mut ends = tokio::task::JoinSet::new();
    let mut connections = Vec::new();
    for number in 0..CONNECTIONS {
        let (client, served) = connect_in_memory(&service, number, &shutdown).await;
        let subscribe = proxy_message::Message::Subscribe(Subscribe {
            destinations: vec![Subscription {
                key: KEY.into(),
                ..Default::default()
            }],
        });
        let mut stream = Stream::open_on(client, vec![hello("shop", "a"), subscribe])
            .await
            .unwrap();
        assert_eq!(unknowns(&mut stream, 1).await[0].0, KEY);
        ends.spawn(async move {
            let status = end_of(&mut stream).await;
            (number, tokio::time::Instant::now(), status)
        });
        connections.push(served);
    }
    tokio::time::sleep(IDLE_TIMEOUT * 2).await;
    assert!(
        ends.try_join_next().is_none(),
        "streams go on until shutdown"
    );

    let began = tokio::time::Instant::now();
    stop.send_replace(true);
    let mut quarters = [0; 4];
    let ended = tokio::time::timeout(DRAIN_BOUND * 2, ends.join_all())
        .await
        .expect("every stream ends");
    for (number, ended, status) in ended {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(status.message().contains("shutting down"), "{status}");
        // At its turn, to the timer's millisecond.
        let after = ended - began;
        let turn = drain_turn(number);
        assert!(
            after >= turn && after <= turn + Duration::from_millis(1),
            "stream {number} ended {after:?} after shutdown began, its turn {turn:?}"
        );
        quarters[(after.as_secs_f64() / DRAIN_WINDOW.as_secs_f64() * 4.0) as usize] += 1;
    }
    // Not all at once: every quarter of the window closes some, none most.
    assert!(
        quarters.iter().all(|count| (3..=5).contains(count)),
        "streams ended per quarter of the window: {quarters:?}"
    );
    // GOAWAY, and the connection is done with once its stream is: none is left to be dropped.
    for served in connections {
        tokio::time::timeout(Duration::from_secs(1), served)
            .await
            .expect("the connection closes after its stream")
            .unwrap();
    }
}

#[test]
fn drain_turns_spread_any_run_of_connections_evenly_over_the_window() {
    for first in [0, 12_345, 1 << 40] {
        let mut tenths = [0; 10];
        for number in first..first + 1000 {
            let turn = drain_turn(number);
            assert!(turn < DRAIN_WINDOW, "{turn:?}");
            tenths[(turn.as_secs_f64() / DRAIN_WINDOW.as_secs_f64() * 10.0) as usize] += 1;
        }
        assert!(
            tenths.iter().all(|count| (97..=103).contains(count)),
            "connections {first}.. closed per tenth of the window: {tenths:?}"
        );
    }
}

#[tokio::test]
async fn with_identities_required_a_proxy_is_who_its_certificate_proves_and_nothing_else() {
    let snapshots = Snapshots::default();
    snapshots.mark_synced();
    publish(&snapshots, 1);
    let service = DiscoveryService::new(snapshots.clone(), Metrics::default(), "test".into())
        .requiring_identity("cluster.local".into());
    let (_stop, shutdown) = watch::channel(false);
    let greeting = |namespace: &str, service_account: &str| {
        vec![
            proxy_message::Message::Hello(Hello {
                namespace: namespace.into(),
                workload: "reviews-0".into(),
                service_account: service_account.into(),
                ..Default::default()
            }),
            proxy_message::Message::Subscribe(Subscribe {
                destinations: vec![Subscription {
                    key: KEY.into(),
                    ..Default::default()
                }],
            }),
        ]
    };
    let endpoints = || EndpointsRequest {
        key: KEY.into(),
        groups: Vec::new(),
    };
    let proven = |id: &str| Some(PeerIdentity(id.parse().unwrap()));

    // Without a certificate, neither the stream nor endpoints.
    let (mut client, _) = connect_in_memory_as(&service, 0, &shutdown, None).await;
    let refused = Stream::open_on(client.clone(), greeting("shop", "reviews")).await;
    assert_eq!(
        refused.err().map(|status| status.code()),
        Some(tonic::Code::Unauthenticated)
    );
    let refused = client.endpoints(endpoints()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // A Hello for anyone but the certificate's namespace and ServiceAccount is refused.
    let reviews = "spiffe://cluster.local/ns/shop/sa/reviews";
    for (namespace, account) in [("billing", "reviews"), ("shop", "productpage")] {
        let (client, _) = connect_in_memory_as(&service, 1, &shutdown, proven(reviews)).await;
        let refused = Stream::open_on(client, greeting(namespace, account))
            .await
            .err()
            .expect("a forged Hello is refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains(reviews), "{}", refused.message());
    }
    // So is a certificate of another trust domain.
    let stranger = proven("spiffe://elsewhere.example/ns/shop/sa/reviews");
    let (mut client, _) = connect_in_memory_as(&service, 2, &shutdown, stranger).await;
    let refused = client.endpoints(endpoints()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // Its own identity is served.
    let (mut client, _) = connect_in_memory_as(&service, 3, &shutdown, proven(reviews)).await;
    let mut stream = Stream::open_on(client.clone(), greeting("shop", "reviews"))
        .await
        .unwrap();
    assert!(!stream.update().await.is_empty());
    client.endpoints(endpoints()).await.unwrap();

    // It follows the inbound side of its own namespace's pods, not another's.
    stream
        .answer(proxy_message::Message::Subscribe(Subscribe {
            destinations: vec![Subscription {
                key: "inbound:billing/ledger-0".into(),
                ..Default::default()
            }],
        }))
        .await;
    let refused = unknowns(&mut stream, 1).await;
    assert_eq!(refused[0].0, "inbound:billing/ledger-0");
    assert!(refused[0].1.contains("namespace shop"), "{}", refused[0].1);

    // Of its namespace's meshed pods, it is sent the inbound side of its own ServiceAccount's
    // alone: another's is withheld. A pod without an identity names none: any proxy of the
    // namespace is sent it.
    let inbound_of = |pod: &str, account: &str, ports: u32| {
        let key = format!("inbound:shop/{pod}");
        let destination = proto::Destination {
            namespace: "shop".into(),
            inbound: Some(proto::Inbound {
                service_account: account.into(),
                ports: (0..ports)
                    .map(|port| proto::InboundPort {
                        port: 8080 + port,
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        let snapshot = Snapshot::known(destination, Vec::new(), Instant::now());
        snapshots.publish(&key, Arc::new(snapshot));
        key
    };
    let own = inbound_of("reviews-0", "reviews", 1);
    let other = inbound_of("ledger-0", "ledger", 1);
    let unbound = inbound_of("plain-0", "", 1);
    stream
        .answer(proxy_message::Message::Subscribe(Subscribe {
            destinations: [&other, &unbound, &own]
                .into_iter()
                .map(|key| Subscription {
                    key: key.clone(),
                    ..Default::default()
                })
                .collect(),
        }))
        .await;
    // Whatever comes until a later version of its own arrives is never about the other's key.
    let mut answered = Vec::new();
    while answered.iter().filter(|key| **key == own).count() < 2 {
        let message = stream.received.message().await.unwrap().expect("open");
        let key = match message.message {
            Some(controller_message::Message::Update(update)) => update.key,
            Some(controller_message::Message::Unknown(unknown)) => unknown.key,
            _ => continue,
        };
        assert_ne!(key, other, "another ServiceAccount's pod is withheld");
        if key == own && !answered.contains(&own) {
            inbound_of("reviews-0", "reviews", 2);
        }
        answered.push(key);
    }
    assert!(answered.contains(&unbound), "{answered:?}");
}
