//! Transparent redirection for real: `outrigger-proxy init` installs its iptables rules in a
//! network namespace made for the test, an app there calls a Service address with no idea a proxy
//! exists, and the proxy finds the original destination and applies its policy. What is not HTTP,
//! or goes outside the mesh, reaches where it was going as if there were no proxy.
//!
//! Needs root, `ip` and `iptables` (CI installs them).

mod support;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use outrigger_api::proto;
use outrigger_tests::{Backend, ControlPlane, destination};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Self {
        let mut add = Command::new("ip");
        add.args(["netns", "add", name]);
        run(add);
        let netns = Self(name.to_string());
        run(netns.exec("ip", &["link", "set", "lo", "up"]));
        netns
    }

    fn exec(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0, program]).args(args);
        command
    }

    /// Moves the calling thread (only) into the namespace.
    fn enter(&self) {
        let file = File::open(format!("/run/netns/{}", self.0)).expect("open netns");
        let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(mut command: Command) {
    let output = command.output().expect("spawn");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The uid the proxy runs as, so its rules can tell its traffic from the app's.
const PROXY_UID: &str = "65534";

/// The proxy binary where the unprivileged proxy user can run it.
fn proxy_binary(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.join("outrigger-proxy");
    std::fs::copy(env!("CARGO_BIN_EXE_outrigger-proxy"), &binary).unwrap();
    binary
}

/// Starts the proxy in `netns` as the proxy user, against `control_plane`.
fn start_proxy(
    netns: &Netns,
    binary: &std::path::Path,
    control_plane: &str,
    app: &str,
) -> KillOnDrop {
    KillOnDrop(
        netns
            .exec(
                "setpriv",
                &["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"],
            )
            .arg(binary)
            .args([
                "--control-plane",
                control_plane,
                "--namespace",
                "shop",
                "--workload",
                "app-0",
            ])
            .args(["--inbound-addr", "0.0.0.0:4143", "--app-addr", app])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start proxy"),
    )
}

const ADMIN: &str = "127.0.0.1:4191";

#[test]
fn redirected_connections_reach_their_original_destination_through_the_proxy() {
    let name = format!("outrigger-redirect-{}", std::process::id());
    let netns = Netns::create(&name);
    let dir = std::env::temp_dir().join(&name);
    let binary = proxy_binary(&dir);
    run(netns.exec(
        binary.to_str().unwrap(),
        &["init", "--proxy-uid", PROXY_UID],
    ));

    // Everything below runs inside the namespace: this thread's sockets are created there.
    let netns_ref = &netns;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                netns_ref.enter();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let cp = ControlPlane::start().await;
                    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
                    // A ClusterIP that nothing listens on: only redirection makes it answer.
                    let service_ip = "127.0.10.1:80";
                    let mut reviews = destination(
                        "shop",
                        "reviews",
                        80,
                        &[(v1.addr, &["v1"]), (v2.addr, &["v2"])],
                    );
                    reviews.policy_spec = Some(proto::Policy {
                        traffic_split: Some(proto::TrafficSplit {
                            weights: vec![proto::WeightedSubset {
                                subset: "v2".into(),
                                weight: 100,
                            }],
                        }),
                        ..Default::default()
                    });
                    cp.publish(service_ip, reviews);

                    let proxy = start_proxy(netns_ref, &binary, &cp.url(), &v1.addr.to_string());
                    let admin = ADMIN.parse().unwrap();
                    eventually("the proxy is ready", || async {
                        admin_get(admin, "/ready").await.status == 200
                    })
                    .await;

                    // The app calls the Service address as if there were no proxy.
                    for _ in 0..5 {
                        let reply = get(service_ip.parse().unwrap(), "reviews.shop", "/").await;
                        assert_eq!(
                            (reply.status, reply.body.as_str()),
                            (200, "v2"),
                            "{reply:?}"
                        );
                    }
                    assert_eq!((v1.hits(), v2.hits()), (0, 5));
                    let config: serde_json::Value =
                        serde_json::from_str(&admin_get(admin, "/config").await.body).unwrap();
                    assert_eq!(config["destinations"][service_ip]["state"], "ready");

                    // Outside the mesh (an address no Service owns): forwarded as it is.
                    let outside =
                        Backend::start_on("127.0.10.2:0".parse().unwrap(), "outside").await;
                    let reply = get(outside.addr, "example.com", "/").await;
                    assert_eq!(
                        (reply.status, reply.body.as_str()),
                        (200, "outside"),
                        "{reply:?}"
                    );
                    let config: serde_json::Value =
                        serde_json::from_str(&admin_get(admin, "/config").await.body).unwrap();
                    assert_eq!(
                        config["destinations"][outside.addr.to_string()]["state"],
                        "unknown",
                        "the proxy asked, and went around itself"
                    );

                    // Not HTTP (here TLS-like bytes), even to a Service address: forwarded as it
                    // is to where the app was going.
                    let echo = tokio::net::TcpListener::bind("127.0.10.3:0").await.unwrap();
                    let echo_addr = echo.local_addr().unwrap();
                    cp.publish(
                        &echo_addr.to_string(),
                        destination("shop", "db", echo_addr.port(), &[(v1.addr, &[])]),
                    );
                    tokio::spawn(async move {
                        let (mut stream, _) = echo.accept().await.unwrap();
                        let (mut read, mut write) = stream.split();
                        tokio::io::copy(&mut read, &mut write).await.unwrap();
                    });
                    let mut client = tokio::net::TcpStream::connect(echo_addr).await.unwrap();
                    client.write_all(b"\x16\x03\x01 hello").await.unwrap();
                    client.shutdown().await.unwrap();
                    let mut echoed = Vec::new();
                    client.read_to_end(&mut echoed).await.unwrap();
                    assert_eq!(echoed, b"\x16\x03\x01 hello");
                    assert_eq!(
                        v1.hits(),
                        0,
                        "opaque bytes never reach the Service's endpoints"
                    );
                    drop(proxy);
                });
            })
            .join()
            .expect("namespace thread");
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn inbound_connections_reach_the_app_through_the_proxy() {
    let id = std::process::id();
    let (server, client) = (
        Netns::create(&format!("or-srv-{id}")),
        Netns::create(&format!("or-cli-{id}")),
    );
    // Two test hosts joined by a veth pair: 10.231.0.1 (client) and 10.231.0.2 (server).
    let (client_if, server_if) = (format!("orc{id}"), format!("ors{id}"));
    let mut veth = Command::new("ip");
    veth.args([
        "link", "add", &client_if, "type", "veth", "peer", "name", &server_if,
    ]);
    run(veth);
    for (netns, interface, address) in [
        (&client, &client_if, "10.231.0.1/30"),
        (&server, &server_if, "10.231.0.2/30"),
    ] {
        let mut move_in = Command::new("ip");
        move_in.args(["link", "set", interface, "netns", &netns.0]);
        run(move_in);
        run(netns.exec("ip", &["addr", "add", address, "dev", interface]));
        run(netns.exec("ip", &["link", "set", interface, "up"]));
    }
    let dir = std::env::temp_dir().join(format!("or-srv-{id}"));
    let binary = proxy_binary(&dir);
    run(server.exec(
        binary.to_str().unwrap(),
        &["init", "--proxy-uid", PROXY_UID],
    ));

    let (server_ref, client_ref) = (&server, &client);
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // One thread, moving between the hosts: each socket belongs to the namespace it
                // was created in.
                server_ref.enter();
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    let cp = ControlPlane::start().await;
                    let app = Backend::start_on("0.0.0.0:8080".parse().unwrap(), "app").await;
                    let _proxy = start_proxy(server_ref, &binary, &cp.url(), "127.0.0.1:8080");
                    let admin = ADMIN.parse().unwrap();
                    eventually("the proxy is ready", || async { admin_get(admin, "/ready").await.status == 200 }).await;

                    client_ref.enter();
                    let mut conn = Conn::http1("10.231.0.2:8080".parse().unwrap()).await;
                    server_ref.enter();
                    for _ in 0..3 {
                        let reply = conn.get("app.shop", "/").await;
                        assert_eq!((reply.status, reply.body.as_str()), (200, "app"));
                    }
                    assert_eq!(app.hits(), 3);
                    let inbound = r#"outrigger_requests_total{direction="inbound",dst_namespace="shop",dst_service="",dst_subset="",route="",status_code="200",classification="success"}"#;
                    assert_eq!(metric(admin, inbound).await, 3.0, "the requests went through the proxy");

                    // Not HTTP (a database's port, say): forwarded as it is to the app.
                    let database = tokio::net::TcpListener::bind("0.0.0.0:5432").await.unwrap();
                    let echo = tokio::spawn(async move {
                        let (mut stream, peer) = database.accept().await.unwrap();
                        let (mut read, mut write) = stream.split();
                        tokio::io::copy(&mut read, &mut write).await.unwrap();
                        peer
                    });
                    client_ref.enter();
                    let mut client = tokio::net::TcpStream::connect("10.231.0.2:5432").await.unwrap();
                    server_ref.enter();
                    client.write_all(b"\x00\x00\x00\x08\x04\xd2\x16\x2f").await.unwrap();
                    client.shutdown().await.unwrap();
                    let mut echoed = Vec::new();
                    client.read_to_end(&mut echoed).await.unwrap();
                    assert_eq!(echoed, b"\x00\x00\x00\x08\x04\xd2\x16\x2f");
                    let peer = echo.await.unwrap();
                    assert_eq!(
                        peer.ip().to_string(),
                        "10.231.0.2",
                        "the app was reached from the proxy, on the pod's own address"
                    );
                });
            })
            .join()
            .expect("namespace thread");
    });
    let _ = std::fs::remove_dir_all(dir);
}
