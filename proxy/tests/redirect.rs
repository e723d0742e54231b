//! Transparent redirection for real: `outrigger-proxy init` installs its iptables rules in a
//! network namespace made for the test (the pod), an app there calls a Service address with no
//! idea a proxy exists, and the proxy finds the original destination and applies its policy. What
//! is not HTTP, or goes outside the mesh, reaches where it was going as if there were no proxy.
//! From a second namespace (a neighbour, as another pod would be), the pod must offer nothing the
//! neighbour could not reach without the mesh.
//!
//! Needs root, `ip`, `iptables` and `ip6tables` (CI installs them).

mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use outrigger_api::proto;
use outrigger_proxy::Proxy;
use outrigger_tests::{Backend, ControlPlane, allowing, destination};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// The pod's addresses on the link to its neighbour, and the neighbour's.
const POD: &str = "10.231.0.2";
const NEIGHBOUR: &str = "10.231.0.1";
const POD_V6: &str = "fd00:231::2";
const NEIGHBOUR_V6: &str = "fd00:231::1";
/// Addresses of the pod's own (on its loopback interface, but not loopback addresses): where its
/// test backends listen, standing for the cluster. The neighbour has no route to them.
const IN_POD: &str = "10.232.0";
/// The pod's admin server, from inside the pod.
const ADMIN: &str = "127.0.0.1:4191";

/// A meshed pod and a neighbour: two namespaces joined by a veth pair.
struct Hosts {
    pod: Netns,
    neighbour: Netns,
    dir: PathBuf,
    binary: PathBuf,
}

impl Hosts {
    /// `tag` (a few letters) tells this test's interfaces from the others'.
    fn create(tag: &str) -> Self {
        let id = std::process::id();
        let (pod, neighbour) = (
            Netns::create(&format!("or-{tag}-pod-{id}")),
            Netns::create(&format!("or-{tag}-nbr-{id}")),
        );
        let (pod_if, neighbour_if) = (format!("or{tag}p{id}"), format!("or{tag}n{id}"));
        let mut veth = Command::new("ip");
        veth.args([
            "link",
            "add",
            &pod_if,
            "type",
            "veth",
            "peer",
            "name",
            &neighbour_if,
        ]);
        run(veth);
        for (netns, interface, v4, v6) in [
            (&pod, &pod_if, POD, POD_V6),
            (&neighbour, &neighbour_if, NEIGHBOUR, NEIGHBOUR_V6),
        ] {
            let mut move_in = Command::new("ip");
            move_in.args(["link", "set", interface, "netns", &netns.0]);
            run(move_in);
            let (v4, v6) = (format!("{v4}/30"), format!("{v6}/64"));
            run(netns.exec("ip", &["addr", "add", &v4, "dev", interface]));
            // No duplicate address detection: the address is usable at once.
            run(netns.exec("ip", &["-6", "addr", "add", &v6, "dev", interface, "nodad"]));
            run(netns.exec("ip", &["link", "set", interface, "up"]));
        }
        let in_pod = format!("{IN_POD}.1/24");
        run(pod.exec("ip", &["addr", "add", &in_pod, "dev", "lo"]));
        let dir = std::env::temp_dir().join(&pod.0);
        let binary = proxy_binary(&dir);
        Self {
            pod,
            neighbour,
            dir,
            binary,
        }
    }

    /// `outrigger-proxy init` in the pod, as the injected init container runs it.
    fn init(&self, extra: &[&str]) {
        run(self.pod.exec(
            self.binary.to_str().unwrap(),
            &[&["init", "--proxy-uid", PROXY_UID][..], extra].concat(),
        ));
    }

    /// Runs `test` on a thread inside the pod's namespace: the sockets it creates are the pod's.
    fn run<F: std::future::Future<Output = ()>>(&self, test: impl FnOnce() -> F + Send) {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.pod.enter();
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(test())
                })
                .join()
                .expect("namespace thread");
        });
    }

    /// Starts the proxy in the pod as the proxy user, listening as the injector sets it up.
    fn start_proxy(&self, control_plane: &str, app: &str) -> KillOnDrop {
        KillOnDrop(
            self.pod
                .exec(
                    "setpriv",
                    &["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"],
                )
                .arg(&self.binary)
                .args([
                    "--control-plane",
                    control_plane,
                    "--namespace",
                    "shop",
                    "--workload",
                    "app-0",
                ])
                .args([
                    "--inbound-addr",
                    "0.0.0.0:4143",
                    "--admin-addr",
                    "0.0.0.0:4191",
                ])
                .args(["--app-addr", app])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start proxy"),
        )
    }

    /// A connection from the neighbour (called from a thread inside the pod, which it returns to).
    async fn connect_from_neighbour(&self, addr: &str) -> std::io::Result<TcpStream> {
        self.neighbour.enter();
        let stream = TcpStream::connect(addr).await;
        self.pod.enter();
        stream
    }

    /// `GET path` from the neighbour; None when the connection is refused or closed unanswered.
    async fn neighbour_get(&self, addr: &str, host: &str, path: &str) -> Option<Reply> {
        let stream = self.connect_from_neighbour(addr).await.ok()?;
        Conn::http1_over(stream)
            .await
            .send(request(host, path))
            .await
            .ok()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The proxy binary where the unprivileged proxy user can run it: a hard link, as a copy is a file
/// open for writing, which a child forked meanwhile by another test keeps open, and running it
/// then fails with "Text file busy".
fn proxy_binary(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.join("outrigger-proxy");
    std::fs::hard_link(env!("CARGO_BIN_EXE_outrigger-proxy"), &binary)
        .expect("the test's directory and the build are on one file system");
    binary
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

async fn proxy_ready() {
    eventually("the proxy is ready", || async {
        admin_get(addr(ADMIN), "/ready").await.status == 200
    })
    .await;
}

/// The state of `key` in the proxy's `/config`, null when the proxy never saw it.
async fn destination_state(key: &str) -> serde_json::Value {
    let config: serde_json::Value =
        serde_json::from_str(&admin_get(addr(ADMIN), "/config").await.body).unwrap();
    config["destinations"][key]["state"].clone()
}

/// The number of inbound requests the proxy answered 200.
async fn inbound_ok() -> f64 {
    let series = r#"outrigger_requests_total{direction="inbound",dst_namespace="shop",dst_service="",dst_subset="",route="",tls="false",client_id="",server_id="",status_code="200",classification="success"}"#;
    metric(addr(ADMIN), series).await
}

/// An echo server on `listener` for one connection; resolves to the peer it saw.
fn echo_once(listener: Arc<TcpListener>) -> tokio::task::JoinHandle<SocketAddr> {
    tokio::spawn(async move {
        let (mut stream, peer) = listener.accept().await.unwrap();
        let (mut read, mut write) = stream.split();
        tokio::io::copy(&mut read, &mut write).await.unwrap();
        peer
    })
}

/// Sends `bytes`, half-closes, and returns all that comes back.
async fn exchange(mut stream: TcpStream, bytes: &[u8]) -> Vec<u8> {
    // A peer that closes at once makes these fail; what came back says so.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    answer
}

#[test]
fn redirected_connections_reach_their_original_destination_through_the_proxy() {
    let hosts = Hosts::create("r");
    hosts.init(&[]);
    hosts.run(|| async {
        let cp = ControlPlane::start().await;
        let v1 = Backend::start_on(addr(&format!("{IN_POD}.11:0")), "v1").await;
        let v2 = Backend::start_on(addr(&format!("{IN_POD}.12:0")), "v2").await;
        // A ClusterIP that nothing listens on: only redirection makes it answer.
        let service_ip = format!("{IN_POD}.100:80");
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
        cp.publish(&service_ip, reviews);

        let _proxy = hosts.start_proxy(&cp.url(), &v1.addr.to_string());
        proxy_ready().await;

        // The app calls the Service address as if there were no proxy.
        for _ in 0..5 {
            let reply = get(addr(&service_ip), "reviews.shop", "/").await;
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (200, "v2"),
                "{reply:?}"
            );
        }
        assert_eq!((v1.hits(), v2.hits()), (0, 5));
        assert_eq!(destination_state(&service_ip).await, "ready");

        // Outside the mesh (an address no Service owns): forwarded as it is.
        let outside = Backend::start_on(addr(&format!("{IN_POD}.13:0")), "outside").await;
        let reply = get(outside.addr, "example.com", "/").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "outside"),
            "{reply:?}"
        );
        assert_eq!(
            destination_state(&outside.addr.to_string()).await,
            "unknown",
            "the proxy asked, and went around itself"
        );

        // Not HTTP (here TLS-like bytes) to a Service address, where nothing listens: relayed
        // as they are to the endpoint the proxy picks (in plaintext, this proxy having no
        // identity), as kube-proxy would have sent them.
        let echo = TcpListener::bind(format!("{IN_POD}.14:0")).await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let db: SocketAddr = format!("{IN_POD}.15:{}", echo_addr.port()).parse().unwrap();
        cp.publish(
            &db.to_string(),
            destination("shop", "db", db.port(), &[(echo_addr, &[])]),
        );
        let echoed = echo_once(Arc::new(echo));
        let client = TcpStream::connect(db).await.unwrap();
        assert_eq!(
            exchange(client, b"\x16\x03\x01 hello").await,
            b"\x16\x03\x01 hello"
        );
        echoed.await.unwrap();

        // Loopback, the whole range in both families, is the app talking to itself: the proxy
        // never sees it.
        for local in ["127.0.10.1:0", "[::1]:0"] {
            let backend = Backend::start_on(addr(local), "local").await;
            assert_eq!(get(backend.addr, "local", "/").await.body, "local");
            assert_eq!(
                destination_state(&backend.addr.to_string()).await,
                serde_json::Value::Null,
                "{local} went through the proxy"
            );
        }
    });
}

#[test]
fn inbound_connections_reach_the_app_through_the_proxy() {
    let hosts = Hosts::create("i");
    hosts.init(&[]);
    hosts.run(|| async {
        let cp = ControlPlane::start().await;
        let app = Backend::start_on(addr("0.0.0.0:8080"), "app").await;
        let _proxy = hosts.start_proxy(&cp.url(), "127.0.0.1:8080");
        proxy_ready().await;

        let stream = hosts
            .connect_from_neighbour(&format!("{POD}:8080"))
            .await
            .unwrap();
        let mut conn = Conn::http1_over(stream).await;
        for _ in 0..3 {
            let reply = conn.get("app.shop", "/").await;
            assert_eq!((reply.status, reply.body.as_str()), (200, "app"));
        }
        assert_eq!(app.hits(), 3);
        assert_eq!(
            inbound_ok().await,
            3.0,
            "the requests went through the proxy"
        );

        // Not HTTP (a database's port, say): forwarded as it is to the app.
        let echoed = echo_once(Arc::new(TcpListener::bind("0.0.0.0:5432").await.unwrap()));
        let client = hosts
            .connect_from_neighbour(&format!("{POD}:5432"))
            .await
            .unwrap();
        let postgres = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
        assert_eq!(exchange(client, postgres).await, postgres);
        assert_eq!(
            echoed.await.unwrap().ip().to_string(),
            POD,
            "the app was reached from the proxy, on the pod's own address"
        );
    });
}

#[test]
fn an_authorization_policy_refuses_redirected_requests_and_closes_connections_that_are_not_http() {
    let hosts = Hosts::create("z");
    hosts.init(&[]);
    hosts.run(|| async {
        let mut cp = ControlPlane::start().await;
        let app = Backend::start_on(addr("0.0.0.0:8080"), "app").await;
        let _proxy = hosts.start_proxy(&cp.url(), "127.0.0.1:8080");
        proxy_ready().await;
        // The pod ports redirected connections were addressed to name the policies.
        let version = cp.publish(
            "inbound:shop/app-0",
            allowing("shop/readers", &["shop/productpage"], &[8080, 5432]),
        );
        cp.next_event(|event| match event {
            outrigger_tests::ProxyEvent::Acked { version: v, .. } if v == version => Some(()),
            _ => None,
        })
        .await;

        // The neighbour is not meshed: no identity, no rule matches it.
        let reply = hosts
            .neighbour_get(&format!("{POD}:8080"), "app.shop", "/")
            .await
            .expect("an answer");
        assert_eq!(reply.status, 403, "{}", reply.body);
        assert!(reply.body.contains("shop/readers"), "{}", reply.body);
        assert_eq!(app.hits(), 0);

        // Something listens there, which never answers: forwarded, the exchange would hang.
        let _listener = TcpListener::bind("0.0.0.0:5432").await.unwrap();
        let client = hosts
            .connect_from_neighbour(&format!("{POD}:5432"))
            .await
            .unwrap();
        let postgres = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
        let answer = tokio::time::timeout(Duration::from_secs(5), exchange(client, postgres));
        assert_eq!(
            answer.await.ok(),
            Some(Vec::new()),
            "closed at once, nothing forwarded"
        );
    });
}

#[test]
fn a_pod_is_no_relay_to_what_it_can_reach() {
    let hosts = Hosts::create("x");
    // A third host the pod can reach and its neighbour cannot (the pod forwards nothing).
    let far = Netns::create(&format!("or-x-far-{}", std::process::id()));
    let (pod_if, far_if) = (
        format!("orxf{}", std::process::id()),
        format!("orxg{}", std::process::id()),
    );
    let mut veth = Command::new("ip");
    veth.args([
        "link", "add", &pod_if, "type", "veth", "peer", "name", &far_if,
    ]);
    run(veth);
    for (netns, interface, address) in [
        (&hosts.pod, &pod_if, "10.233.0.2/24"),
        (&far, &far_if, "10.233.0.1/24"),
    ] {
        let mut move_in = Command::new("ip");
        move_in.args(["link", "set", interface, "netns", &netns.0]);
        run(move_in);
        run(netns.exec("ip", &["addr", "add", address, "dev", interface]));
        run(netns.exec("ip", &["link", "set", interface, "up"]));
    }
    run(hosts
        .neighbour
        .exec("ip", &["route", "add", "10.233.0.0/24", "via", POD]));
    // The pod forwards nothing: it refuses what is routed through it, at once.
    run(hosts.pod.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]));
    run(hosts.pod.exec(
        "iptables",
        &[
            "-A",
            "FORWARD",
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    ));
    hosts.init(&[]);
    hosts.run(|| async {
        let cp = ControlPlane::start().await;
        let app = Backend::start_on(addr("0.0.0.0:8080"), "app").await;
        let secret = Backend::start_on(addr(&format!("{IN_POD}.9:0")), "secret").await;
        cp.publish(
            "secret.shop.svc.cluster.local:80",
            destination("shop", "secret", 80, &[(secret.addr, &[])]),
        );
        let _proxy = hosts.start_proxy(&cp.url(), "127.0.0.1:8080");
        proxy_ready().await;
        // The pod itself reaches the Service.
        assert_eq!(
            get(addr("127.0.0.1:4140"), "secret.shop", "/").await.body,
            "secret"
        );
        assert_eq!(secret.hits(), 1);

        // The neighbour, at every port of the proxy's, asking for that Service.
        for port in [4140, 4143, 4191] {
            let reply = hosts
                .neighbour_get(&format!("{POD}:{port}"), "secret.shop", "/")
                .await;
            assert!(
                reply.as_ref().is_none_or(|r| r.status >= 400),
                "port {port}: {reply:?}"
            );
        }
        assert_eq!(
            secret.hits(),
            1,
            "the neighbour reached the Service through the pod"
        );

        // With the rules of earlier versions, which redirected the outbound port like any other:
        // the proxy itself refuses.
        run(hosts.pod.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-I",
                "OUTRIGGER_INBOUND",
                "1",
                "-p",
                "tcp",
                "--dport",
                "4140",
                "-j",
                "REDIRECT",
                "--to-ports",
                "4143",
            ],
        ));
        let reply = hosts
            .neighbour_get(&format!("{POD}:4140"), "secret.shop", "/")
            .await;
        assert!(reply.is_none(), "{reply:?}");
        assert_eq!(secret.hits(), 1, "the proxy forwarded to its outbound port");

        // A connection routed through the pod to a far address: the pod forwards nothing, so
        // without the mesh it goes nowhere, and the proxy must not make it.
        far.enter();
        let far_listener = TcpListener::bind("10.233.0.1:5432").await.unwrap();
        hosts.pod.enter();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = far_listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        match hosts.connect_from_neighbour("10.233.0.1:5432").await {
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused),
            Ok(stream) => panic!(
                "connected through the pod; it echoed {:?}",
                exchange(stream, b"\x00hello").await
            ),
        }
        // The same, redirected by a rule that does not check the destination is this pod's.
        run(hosts.pod.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-I",
                "OUTRIGGER_INBOUND",
                "1",
                "-p",
                "tcp",
                "-d",
                "10.233.0.1",
                "-j",
                "REDIRECT",
                "--to-ports",
                "4143",
            ],
        ));
        let stream = hosts
            .connect_from_neighbour("10.233.0.1:5432")
            .await
            .unwrap();
        assert_eq!(
            exchange(stream, b"\x00hello").await,
            b"",
            "relayed to the far host"
        );

        // And the app is served as before.
        let reply = hosts
            .neighbour_get(&format!("{POD}:8080"), "app", "/")
            .await;
        assert_eq!(reply.map(|r| r.body), Some("app".to_string()));
        assert_eq!(app.hits(), 1);
    });
}

/// `Proxy::bind`, again while a port is still taken: a child another test forks keeps the
/// listeners of the attempt before open until it runs its program.
async fn bind(settings: outrigger_proxy::Settings) -> anyhow::Result<Proxy> {
    let in_use = |error: &anyhow::Error| {
        error.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
        })
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Proxy::bind(settings.clone()).await {
            Err(error) if in_use(&error) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            bound => return bound,
        }
    }
}

#[test]
fn settings_that_would_make_the_proxy_a_relay_are_refused() {
    let netns = Netns::create(&format!("or-s-{}", std::process::id()));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // The proxy's real ports, free in a namespace of its own.
                netns.enter();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let pod = |outbound: &str, app: &str| {
                        let mut settings = settings("http://127.0.0.1:1", addr(app));
                        settings.outbound_addr = addr(outbound);
                        settings.inbound_addr = addr("0.0.0.0:4143");
                        settings.admin_addr = addr("0.0.0.0:4191");
                        settings
                    };
                    for (outbound, app, refused) in [
                        ("127.0.0.1:4140", "127.0.0.1:4140", "--app-addr"),
                        ("127.0.0.1:4140", "127.0.0.1:4143", "--app-addr"),
                        ("127.0.0.1:4140", "127.0.0.1:4191", "--app-addr"),
                        ("127.0.0.1:4140", "192.0.2.1:8080", "--app-addr"),
                        ("0.0.0.0:4140", "127.0.0.1:8080", "--outbound-addr"),
                    ] {
                        match bind(pod(outbound, app)).await {
                            Ok(_) => panic!("outbound {outbound}, app {app}: bound"),
                            Err(error) => {
                                let error = format!("{error:#}");
                                assert!(error.contains(refused), "{app}: {error}");
                            }
                        }
                    }
                    let proxy = bind(pod("127.0.0.1:4140", "127.0.0.1:8080")).await;
                    if let Err(error) = proxy {
                        panic!("the injected settings: {error:#}");
                    }
                });
            })
            .join()
            .expect("namespace thread");
    });
}

#[test]
fn inbound_requests_go_to_the_address_they_were_sent_to() {
    let hosts = Hosts::create("o");
    hosts.init(&[]);
    hosts.run(|| async {
        let cp = ControlPlane::start().await;
        // Bound to loopback only: the app means no one else to reach it.
        let private = Backend::start_on(addr("127.0.0.1:8080"), "private").await;
        let public = Backend::start_on(addr(&format!("{POD}:9001")), "public").await;
        let _proxy = hosts.start_proxy(&cp.url(), "127.0.0.1:8080");
        proxy_ready().await;

        // Bound to the pod's address only: reached, through the proxy.
        let reply = hosts
            .neighbour_get(&format!("{POD}:9001"), "app", "/")
            .await;
        assert_eq!(
            reply.map(|r| (r.status, r.body)),
            Some((200, "public".to_string()))
        );
        assert_eq!(public.hits(), 1);
        assert_eq!(inbound_ok().await, 1.0, "through the proxy");

        // Bound to loopback only: not reached from outside, redirected or at the inbound port.
        let reply = hosts
            .neighbour_get(&format!("{POD}:8080"), "app", "/")
            .await;
        assert!(reply.as_ref().is_none_or(|r| r.status >= 400), "{reply:?}");
        let reply = hosts
            .neighbour_get(&format!("{POD}:4143"), "app", "/")
            .await;
        assert!(reply.as_ref().is_none_or(|r| r.status >= 400), "{reply:?}");
        assert_eq!(
            private.hits(),
            0,
            "a loopback-only listener answered the neighbour"
        );

        // From inside the pod, the inbound port still leads to --app-addr.
        assert_eq!(
            get(addr("127.0.0.1:4143"), "app", "/").await.body,
            "private"
        );
    });
}

#[test]
fn configuration_dumps_are_served_to_loopback_only() {
    let hosts = Hosts::create("a");
    hosts.init(&[]);
    hosts.run(|| async {
        let cp = ControlPlane::start().await;
        let _proxy = hosts.start_proxy(&cp.url(), "127.0.0.1:8080");
        proxy_ready().await;
        let admin = format!("{POD}:4191");
        // Probes and scrapes come from outside the pod.
        for path in ["/live", "/ready", "/metrics"] {
            let reply = hosts.neighbour_get(&admin, "pod", path).await;
            assert_eq!(reply.map(|r| r.status), Some(200), "{path}");
        }
        for path in ["/config", "/endpoints"] {
            let reply = hosts.neighbour_get(&admin, "pod", path).await.unwrap();
            assert_eq!(reply.status, 403, "{path}: {reply:?}");
            // The app calling the pod's own address goes through the outbound proxy, which
            // forwards it as the proxy: no more than the neighbour.
            assert_eq!(get(addr(&admin), "pod", path).await.status, 403, "{path}");
            assert_eq!(admin_get(addr(ADMIN), path).await.status, 200, "{path}");
        }
    });
}

#[test]
fn ipv6_goes_through_the_mesh_too() {
    let hosts = Hosts::create("6");
    // More ports than one multiport match takes.
    let skipped: Vec<String> = (9100..9120).map(|port| port.to_string()).collect();
    hosts.init(&[&format!("--skip-inbound-ports={}", skipped.join(","))]);
    hosts.run(|| async {
        let cp = ControlPlane::start().await;
        let app = Backend::start_on(addr("[::]:8080"), "app").await;
        let _proxy = hosts.start_proxy(&cp.url(), "127.0.0.1:8080");
        proxy_ready().await;

        // Inbound, to the pod's IPv6 address.
        let reply = hosts
            .neighbour_get(&format!("[{POD_V6}]:8080"), "app", "/")
            .await;
        assert_eq!(reply.map(|r| r.body), Some("app".to_string()));
        assert_eq!(app.hits(), 1);
        assert_eq!(
            inbound_ok().await,
            1.0,
            "the request went through the proxy"
        );
        let reply = hosts
            .neighbour_get(&format!("[{POD_V6}]:4191"), "pod", "/ready")
            .await;
        assert_eq!(
            reply.map(|r| r.status),
            Some(200),
            "probes reach the pod over IPv6"
        );

        // Outbound, to an IPv6 address outside the mesh: forwarded as it is, by the proxy.
        hosts.neighbour.enter();
        let outside = Backend::start_on(addr(&format!("[{NEIGHBOUR_V6}]:9000")), "outside").await;
        hosts.pod.enter();
        let reply = get(outside.addr, "example.com", "/").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "outside"));
        assert_eq!(
            destination_state(&outside.addr.to_string()).await,
            "unknown",
            "the connection went around the proxy"
        );

        // The last skipped port, in both families: reached directly, not through the proxy. One
        // listener for both: binding the port again could find the first still closing.
        let skipped = Arc::new(TcpListener::bind("[::]:9119").await.unwrap());
        for (target, neighbour) in [
            (format!("{POD}:9119"), NEIGHBOUR),
            (format!("[{POD_V6}]:9119"), NEIGHBOUR_V6),
        ] {
            let echoed = echo_once(skipped.clone());
            let stream = hosts.connect_from_neighbour(&target).await.unwrap();
            assert_eq!(exchange(stream, b"\x00skip").await, b"\x00skip");
            let peer = echoed.await.unwrap().ip().to_canonical();
            assert_eq!(peer.to_string(), neighbour, "{target}");
        }
    });
}

#[test]
fn a_dry_run_prints_both_families_rules_and_runs_nothing() {
    let output = Command::new(env!("CARGO_BIN_EXE_outrigger-proxy"))
        .args([
            "init",
            "--dry-run",
            "--skip-outbound-cidrs=10.0.0.0/8,fd00::/8",
        ])
        // Nothing to run: neither iptables-save nor anything else can be found.
        .env("PATH", "")
        .output()
        .expect("run outrigger-proxy");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (v4, v6) = stdout
        .split_once("# ip6tables-restore --noflush\n")
        .unwrap_or_else(|| panic!("no IPv6 rules: {stdout}"));
    assert!(
        v4.starts_with("# iptables-restore --noflush\n*nat\n"),
        "{v4}"
    );
    for (rules, own, other) in [
        (v4, "10.0.0.0/8", "fd00::/8"),
        (v6, "fd00::/8", "10.0.0.0/8"),
    ] {
        assert!(
            rules.contains("-A PREROUTING -p tcp -j OUTRIGGER_INBOUND"),
            "{rules}"
        );
        assert!(rules.contains(&format!("-d {own} -j RETURN")), "{rules}");
        assert!(!rules.contains(other), "{rules}");
        assert!(rules.ends_with("COMMIT\n"), "{rules}");
    }
}
