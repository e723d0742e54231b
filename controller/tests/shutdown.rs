//! The controller binary stopped as Kubernetes stops it (SIGTERM): `/ready` fails, every
//! configuration stream ends with UNAVAILABLE (which proxies answer by reconnecting) rather than
//! a reset connection, and the process exits, cleanly, within the pod's termination grace. How the
//! ends are spread over the drain window is the unit tests' business (on paused time); here every
//! wait is a bounded poll.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

use outrigger_api::proto::{ControllerMessage, ProxyMessage};
use tokio::sync::mpsc;
use tokio::time::Instant;

use common::{free_port, get, sigterm};

/// Kubernetes' default `terminationGracePeriodSeconds`, which the chart keeps: past it the
/// controller would be killed.
const TERMINATION_GRACE: Duration = Duration::from_secs(30);
/// For starting up on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(60);
const STREAMS: usize = 3;

/// The controller binary on an empty manifests directory; killed when dropped.
struct Controller {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    _manifests: tempfile::TempDir,
}

impl Controller {
    async fn start() -> Self {
        let manifests = tempfile::tempdir().unwrap();
        let (grpc, admin) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_outrigger-controller"))
            .arg("--manifests")
            .arg(manifests.path())
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .spawn()
            .unwrap();
        let controller = Self {
            child,
            grpc,
            admin,
            _manifests: manifests,
        };
        let deadline = Instant::now() + DEADLINE;
        while get(admin, "/ready")
            .await
            .is_none_or(|(code, _)| code != 200)
        {
            assert!(Instant::now() < deadline, "the controller is never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        controller
    }

    fn terminate(&self) {
        sigterm(&self.child);
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A configuration stream on a connection of its own, subscribed to one key and answered.
async fn open_stream(
    grpc: SocketAddr,
) -> (
    tonic::Streaming<ControllerMessage>,
    mpsc::Sender<ProxyMessage>,
) {
    let (mut received, send) = common::open_stream(
        grpc,
        "shop",
        "caller",
        "reviews.shop.svc.cluster.local:9080",
    )
    .await;
    // Welcome, then the key is unknown: the stream is up.
    for _ in 0..2 {
        received
            .message()
            .await
            .unwrap()
            .expect("the stream is open");
    }
    (received, send)
}

#[tokio::test]
async fn sigterm_fails_ready_ends_every_stream_with_unavailable_and_exits_within_the_grace() {
    let mut controller = Controller::start().await;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(open_stream(controller.grpc).await);
    }

    controller.terminate();
    let signalled = Instant::now();
    // The admin server answers throughout the drain, saying the replica is going.
    loop {
        match get(controller.admin, "/ready").await {
            Some((503, body)) => {
                assert_eq!(body, "shutting down\n");
                break;
            }
            other => assert!(
                signalled.elapsed() < TERMINATION_GRACE,
                "/ready still answers {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (mut received, _send) in streams {
        let status = loop {
            match received.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    }
    let exit = loop {
        if let Some(exit) = controller.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            signalled.elapsed() < TERMINATION_GRACE,
            "still running {TERMINATION_GRACE:?} after SIGTERM; its bound is {:?}",
            outrigger_controller::STOP_BOUND
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
}
