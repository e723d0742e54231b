//! The configuration stream: subscribe to destinations, apply what the controller sends, and
//! acknowledge or reject every version. The stream is re-established with jittered exponential
//! backoff; meanwhile the proxy serves on what it last applied.

use std::time::Duration;

use outrigger_api::proto::{
    self, Ack, EndpointsRequest, Hello, Nack, ProxyMessage, Subscribe, Subscription, Unsubscribe,
    controller_message, discovery_client::DiscoveryClient, proxy_message,
};
use prost::Message as _;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::listen::stopped;
use crate::metrics::{Metrics, UpdateLabels, UpdateResult};
use crate::outbound::resolve::Destinations;
use crate::policy::{ConfigError, invalid};

#[derive(Clone, Debug)]
pub struct Identity {
    pub namespace: String,
    pub workload: String,
    pub service_account: String,
}

/// The control plane, and how this proxy uses it.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    pub url: String,
    pub identity: Identity,
    /// Destinations unused this long are unsubscribed from.
    pub idle_timeout: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A destination with thousands of endpoints is a large snapshot.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Runs until `shutdown`. `ready` turns true at the first Welcome and stays true.
pub async fn run(
    control_plane: ControlPlane,
    destinations: Destinations,
    mut subscriptions: mpsc::UnboundedReceiver<String>,
    metrics: Metrics,
    ready: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let session = session(
            &control_plane,
            &destinations,
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
        if welcomed {
            backoff = BACKOFF_MIN;
        }
        // Full jitter: proxies that lost the same controller do not come back in lockstep.
        let delay = rand::rng().random_range(Duration::ZERO..=backoff);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct SessionError {
    welcomed: bool,
    error: anyhow::Error,
}

async fn session(
    control_plane: &ControlPlane,
    destinations: &Destinations,
    subscriptions: &mut mpsc::UnboundedReceiver<String>,
    metrics: &Metrics,
    ready: &watch::Sender<bool>,
) -> Result<(), SessionError> {
    let mut welcomed = false;
    let fail = |welcomed, error: anyhow::Error| SessionError { welcomed, error };
    let channel = tonic::transport::Endpoint::from_shared(control_plane.url.clone())
        .map_err(|e| {
            fail(
                false,
                anyhow::Error::new(e).context("reading the control plane URL"),
            )
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // A controller that vanished without closing the connection (a partition, a dead node)
        // is noticed by missing pings, not after the kernel gives up.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| fail(false, anyhow::Error::new(e).context("connecting")))?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(256);
    let send = |message| ProxyMessage {
        message: Some(message),
    };
    let hello = proxy_message::Message::Hello(Hello {
        namespace: control_plane.identity.namespace.clone(),
        workload: control_plane.identity.workload.clone(),
        service_account: control_plane.identity.service_account.clone(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    // Everything subscribed so far, with what is applied, so only changes come back. Keys queued
    // while disconnected are in it too.
    while subscriptions.try_recv().is_ok() {}
    let resubscribe = proxy_message::Message::Subscribe(Subscribe {
        destinations: destinations.subscriptions(),
    });
    for message in [hello, resubscribe] {
        tx.try_send(send(message)).expect("fresh channel has room");
    }
    let mut incoming = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|e| fail(false, anyhow::Error::new(e).context("opening stream")))?
        .into_inner();
    let first_sweep = tokio::time::Instant::now() + control_plane.idle_timeout;
    let mut sweeps = tokio::time::interval_at(first_sweep, control_plane.idle_timeout);
    loop {
        let message = tokio::select! {
            message = incoming.message() => message,
            Some(key) = subscriptions.recv() => {
                let subscribe = proxy_message::Message::Subscribe(Subscribe {
                    destinations: vec![Subscription { key, ..Default::default() }],
                });
                if tx.send(send(subscribe)).await.is_err() {
                    return Err(fail(welcomed, anyhow::anyhow!("stream closed")));
                }
                continue;
            }
            _ = sweeps.tick() => {
                let keys = destinations.sweep();
                if !keys.is_empty() {
                    let unsubscribe = proxy_message::Message::Unsubscribe(Unsubscribe { keys });
                    if tx.send(send(unsubscribe)).await.is_err() {
                        return Err(fail(welcomed, anyhow::anyhow!("stream closed")));
                    }
                }
                continue;
            }
        };
        let message = match message {
            Ok(Some(message)) => message,
            Ok(None) => {
                return Err(fail(
                    welcomed,
                    anyhow::anyhow!("controller ended the stream"),
                ));
            }
            Err(status) => return Err(fail(welcomed, status.into())),
        };
        let reply = match message.message {
            Some(controller_message::Message::Welcome(welcome)) => {
                tracing::info!(controller = %welcome.controller, "control plane stream up");
                welcomed = true;
                metrics.control_plane_connected.set(1);
                ready.send_replace(true);
                continue;
            }
            Some(controller_message::Message::Update(update)) => {
                let answered = update_answer(&mut client, destinations, metrics, update)
                    .await
                    .map_err(|status| {
                        fail(
                            welcomed,
                            anyhow::Error::new(status).context("fetching endpoints"),
                        )
                    })?;
                match answered {
                    Some(reply) => reply,
                    None => continue,
                }
            }
            Some(controller_message::Message::Unknown(unknown)) => {
                destinations.set_unknown(&unknown.key, unknown.reason);
                continue;
            }
            None => continue,
        };
        if tx.send(send(reply)).await.is_err() {
            return Err(fail(welcomed, anyhow::anyhow!("stream closed")));
        }
    }
}

/// Applies an update, fetching the endpoint groups it names that are not held: the Ack or Nack
/// to send, or none when a newer update follows (a group fetched at a newer version, or gone).
async fn update_answer(
    client: &mut DiscoveryClient<tonic::transport::Channel>,
    destinations: &Destinations,
    metrics: &Metrics,
    update: proto::DestinationUpdate,
) -> Result<Option<proxy_message::Message>, tonic::Status> {
    let proto::DestinationUpdate {
        key,
        version,
        destination,
    } = update;
    let destination = match decode_destination(destination) {
        Ok(destination) => destination,
        Err(error) => return Ok(Some(answer(metrics, key, version, Err(error)))),
    };
    let missing = destinations.missing_endpoints(&key, &destination.endpoint_groups);
    let fetched = if missing.is_empty() {
        Fetched::Named
    } else {
        fetch_endpoints(client, destinations, &key, missing).await?
    };
    Ok(match fetched {
        Fetched::Named => {
            let applied = destinations.apply(&key, version.clone(), destination);
            Some(answer(metrics, key, version, applied))
        }
        Fetched::Refused(error) => Some(answer(metrics, key, version, Err(error))),
        // A DestinationUnknown follows for a key gone unknown.
        Fetched::Newer | Fetched::Gone => None,
    })
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
    client: &mut DiscoveryClient<tonic::transport::Channel>,
    destinations: &Destinations,
    key: &str,
    groups: Vec<proto::EndpointGroup>,
) -> Result<Fetched, tonic::Status> {
    let request = EndpointsRequest {
        key: key.to_string(),
        groups: groups.iter().map(|group| group.name.clone()).collect(),
    };
    let reply = match client.endpoints(request).await {
        Ok(reply) => reply.into_inner(),
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
        if let Err(error) = destinations.hold_endpoints(key, fetched, &content.endpoints) {
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
        let (destinations, _subscriptions) = Destinations::new(Metrics::new());
        let key = "web.default.svc.cluster.local:80";
        destinations.entry(key);
        let group = |version: &str| proto::EndpointGroup {
            name: "a".into(),
            version: version.into(),
        };
        let fetched = fetch_endpoints(&mut client, &destinations, key, vec![group(named)])
            .await
            .unwrap();
        let held = destinations
            .missing_endpoints(key, &[group("e2")])
            .is_empty();
        (fetched, held)
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
