//! What the controller's process-level tests share: ports, a plain HTTP GET, signals.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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
