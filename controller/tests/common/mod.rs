//! What the controller's process-level tests share: ports, a plain HTTP GET, signals, a
//! configuration stream.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command};

use outrigger_api::proto::{
    ControllerMessage, Hello, ProxyMessage, Subscribe, Subscription,
    discovery_client::DiscoveryClient, proxy_message,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
}

/// Status code and body of `GET http://{addr}{path}`; None when nothing answers.
#[allow(dead_code)] // Not every test binary asks.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((code, body.to_string()))
}

/// Stops `child` as Kubernetes does.
#[allow(dead_code)] // Not every test binary stops its controller gracefully.
pub fn sigterm(child: &Child) {
    let pid = child.id().to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(signalled.success());
}

#[allow(dead_code)] // Not every test binary opens one.
/// A configuration stream to `grpc` on a connection of its own, as `namespace/workload`,
/// subscribed to `key`; what the controller sends, and where to answer.
pub async fn open_stream(
    grpc: SocketAddr,
    namespace: &str,
    workload: &str,
    key: &str,
) -> (
    tonic::Streaming<ControllerMessage>,
    mpsc::Sender<ProxyMessage>,
) {
    let mut client = DiscoveryClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (send, outgoing) = mpsc::channel(16);
    let hello = proxy_message::Message::Hello(Hello {
        namespace: namespace.into(),
        workload: workload.into(),
        ..Default::default()
    });
    let subscribe = proxy_message::Message::Subscribe(Subscribe {
        destinations: vec![Subscription {
            key: key.into(),
            known_version: String::new(),
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
    (received, send)
}
