//! The controller's real distribution service on a loopback port, fed by the test instead of an
//! index.

use std::net::SocketAddr;
use std::time::Instant;

use outrigger_api::proto;
use outrigger_controller::{DiscoveryService, Metrics, ProxyEvent, Snapshot, Snapshots};
use tokio::sync::{broadcast, watch};

pub struct ControlPlane {
    pub addr: SocketAddr,
    snapshots: Snapshots,
    events: broadcast::Receiver<ProxyEvent>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), Snapshots::default()).await
    }

    /// Stops, keeping the address and the published state so that `Stopped::start` comes back
    /// as a restarted controller would. Publishing goes on while it is down.
    pub async fn restart_later(self) -> Stopped {
        let stopped = Stopped {
            addr: self.addr,
            snapshots: self.snapshots.clone(),
        };
        self.stop().await;
        stopped
    }

    async fn start_on(addr: SocketAddr, snapshots: Snapshots) -> Self {
        snapshots.mark_synced();
        let service = DiscoveryService::new(snapshots.clone(), Metrics::default(), "test".into());
        let events = service.events();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind control plane");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        // The controller's own serving: stopping ends every stream as a stopping controller does
        // (GOAWAY, then UNAVAILABLE, the connections spread over the drain window).
        let server = tokio::spawn(outrigger_controller::serve_grpc(
            listener, service, None, stopped,
        ));
        Self {
            addr,
            snapshots,
            events,
            stop,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes `configuration` as the state of `key`; returns its version.
    pub fn publish(&self, key: &str, configuration: Configuration) -> String {
        // One group: how the controller groups endpoints is the index's business.
        let groups = vec![("all".to_string(), configuration.endpoints)];
        let snapshot = Snapshot::known(configuration.destination, groups, Instant::now());
        let Snapshot::Known { version, .. } = &snapshot else {
            unreachable!("Snapshot::known is known")
        };
        let version = version.clone();
        self.snapshots.publish(key, std::sync::Arc::new(snapshot));
        version
    }

    /// Withdraws `key`, as the controller does when what it named is gone: subscribers are told
    /// it is unknown.
    pub fn withdraw(&self, key: &str) {
        self.snapshots.remove(key);
    }

    /// Waits for the next event matching `pick`.
    pub async fn next_event<T>(&mut self, mut pick: impl FnMut(ProxyEvent) -> Option<T>) -> T {
        let wait = async {
            loop {
                match self.events.recv().await {
                    Ok(event) => {
                        if let Some(found) = pick(event) {
                            return found;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => panic!("control plane stopped"),
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait)
            .await
            .expect("no such proxy event within 10s")
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
    }
}

/// A control plane that is down.
pub struct Stopped {
    addr: SocketAddr,
    snapshots: Snapshots,
}

impl Stopped {
    pub async fn start(self) -> ControlPlane {
        ControlPlane::start_on(self.addr, self.snapshots).await
    }
}

/// What the controller publishes for a key: a destination and its endpoints, which the protocol
/// carries apart. It derefs to the destination, so a test edits the policy as `d.policy_spec`.
#[derive(Clone, Debug)]
pub struct Configuration {
    pub destination: proto::Destination,
    pub endpoints: Vec<proto::Endpoint>,
}

impl std::ops::Deref for Configuration {
    type Target = proto::Destination;

    fn deref(&self) -> &proto::Destination {
        &self.destination
    }
}

impl std::ops::DerefMut for Configuration {
    fn deref_mut(&mut self) -> &mut proto::Destination {
        &mut self.destination
    }
}

/// A destination for Service `service.namespace:port` with the given endpoints and their subsets.
pub fn destination(
    namespace: &str,
    service: &str,
    port: u16,
    endpoints: &[(SocketAddr, &[&str])],
) -> Configuration {
    let mut subsets: Vec<String> = endpoints
        .iter()
        .flat_map(|(_, subsets)| subsets.iter().map(|s| s.to_string()))
        .collect();
    subsets.sort();
    subsets.dedup();
    Configuration {
        destination: proto::Destination {
            namespace: namespace.into(),
            service: service.into(),
            port: port.into(),
            subsets,
            policy_spec: Some(proto::Policy::default()),
            ..Default::default()
        },
        endpoints: endpoints
            .iter()
            .map(|(addr, subsets)| proto::Endpoint {
                address: addr.to_string(),
                subsets: subsets.iter().map(|s| s.to_string()).collect(),
                pod: format!("pod-{}", addr.port()),
                h2c: false,
                identity: String::new(),
            })
            .collect(),
    }
}

/// What the controller sends under a pod's inbound key when the ALLOW policy `policy` guards each
/// of `ports`, letting only the ServiceAccounts `accounts` (`namespace/name`) call.
pub fn allowing(policy: &str, accounts: &[&str], ports: &[u16]) -> Configuration {
    let authorization = proto::Authorization {
        policy: policy.into(),
        action: proto::AuthorizationAction::Allow.into(),
        audit: false,
        rules: vec![proto::AuthorizationRule {
            sources: vec![proto::AuthorizationSource {
                service_accounts: accounts.iter().map(|a| a.to_string()).collect(),
                namespaces: Vec::new(),
            }],
            targets: Vec::new(),
        }],
    };
    let ports = ports
        .iter()
        .map(|&port| proto::InboundPort {
            port: port.into(),
            authorizations: vec![authorization.clone()],
        })
        .collect();
    Configuration {
        destination: proto::Destination {
            inbound: Some(proto::Inbound {
                ports,
                ..Default::default()
            }),
            ..Default::default()
        },
        endpoints: Vec::new(),
    }
}
