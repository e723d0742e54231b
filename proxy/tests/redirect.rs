//! Transparent redirection for real: `outrigger-proxy init` installs its iptables rules in a
//! network namespace made for the test, an app there calls a Service address with no idea a proxy
//! exists, and the proxy finds the original destination and applies its policy.
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

                    let proxy = KillOnDrop(
                        netns_ref
                            .exec(
                                "setpriv",
                                &["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"],
                            )
                            .arg(&binary)
                            .args([
                                "--control-plane",
                                &cp.url(),
                                "--namespace",
                                "shop",
                                "--workload",
                                "app-0",
                            ])
                            .args([
                                "--inbound-addr",
                                "0.0.0.0:4143",
                                "--app-addr",
                                &v1.addr.to_string(),
                            ])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("start proxy"),
                    );
                    let admin = "127.0.0.1:4191".parse().unwrap();
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
                    drop(proxy);
                });
            })
            .join()
            .expect("namespace thread");
    });
    let _ = std::fs::remove_dir_all(dir);
}
