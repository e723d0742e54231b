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
async fn until_held(subscribers: &mut watch::Receiver<Subscribers>, expected: &[(&str, Holding)]) {
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
        let snapshots = Snapshots::default();
        snapshots.mark_synced();
        let service = DiscoveryService::new(snapshots.clone(), Metrics::default(), "test".into());
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
