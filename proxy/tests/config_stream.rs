//! The configuration stream through a real proxy: pushes apply, bad versions are rejected and the
//! last good one stays, and the proxy rides out the controller going away.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use outrigger_tests::{Backend, ControlPlane, ProxyEvent, destination};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const WEB: &str = "web.default.svc.cluster.local:80";

#[tokio::test]
async fn pushes_apply_and_are_acknowledged() {
    let mut cp = ControlPlane::start().await;
    let (one, two) = (Backend::start("one").await, Backend::start("two").await);
    let version = cp.publish(WEB, destination("default", "web", 80, &[(one.addr, &[])]));
    let proxy = RunningProxy::start(settings(&cp.url(), one.addr))
        .await
        .ready()
        .await;
    assert_eq!(get(proxy.outbound, "web", "/").await.body, "one");
    let acked = cp
        .next_event(|e| match e {
            ProxyEvent::Acked { key, version, .. } if key == WEB => Some(version),
            _ => None,
        })
        .await;
    assert_eq!(acked, version);

    let version = cp.publish(WEB, destination("default", "web", 80, &[(two.addr, &[])]));
    let acked = cp
        .next_event(|e| match e {
            ProxyEvent::Acked { version, .. } => Some(version),
            _ => None,
        })
        .await;
    assert_eq!(acked, version);
    for _ in 0..10 {
        assert_eq!(get(proxy.outbound, "web", "/").await.body, "two");
    }
}

#[tokio::test]
async fn a_config_that_cannot_apply_is_rejected_and_the_last_good_one_stays() {
    let mut cp = ControlPlane::start().await;
    let backend = Backend::start("good").await;
    let good = cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let proxy = RunningProxy::start(settings(&cp.url(), backend.addr))
        .await
        .ready()
        .await;
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);

    let mut bad = destination("default", "web", 80, &[(backend.addr, &[])]);
    bad.endpoints[0].address = "not-an-address".into();
    let bad_version = cp.publish(WEB, bad);
    let (version, reason) = cp
        .next_event(|e| match e {
            ProxyEvent::Rejected {
                version, reason, ..
            } => Some((version, reason)),
            _ => None,
        })
        .await;
    assert_eq!(version, bad_version);
    assert_eq!(
        reason,
        "endpoints[0].address: `not-an-address` is not ip:port"
    );

    assert_eq!(get(proxy.outbound, "web", "/").await.body, "good");
    let config: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin, "/config").await.body).unwrap();
    assert_eq!(config["destinations"][WEB]["version"], good.as_str());
    assert_eq!(
        metric(
            proxy.admin,
            r#"outrigger_config_updates_total{result="rejected"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn keeps_serving_without_the_controller_and_resyncs_when_it_returns() {
    let mut cp = ControlPlane::start().await;
    let (one, two) = (Backend::start("one").await, Backend::start("two").await);
    cp.publish(WEB, destination("default", "web", 80, &[(one.addr, &[])]));
    let proxy = RunningProxy::start(settings(&cp.url(), one.addr))
        .await
        .ready()
        .await;
    assert_eq!(get(proxy.outbound, "web", "/").await.body, "one");
    cp.next_event(|e| matches!(e, ProxyEvent::Acked { .. }).then_some(()))
        .await;

    let cp_addr = cp.addr;
    let cp = cp.restart_later().await;
    eventually("the proxy notices the controller is gone", || async {
        metric(proxy.admin, "outrigger_control_plane_connected").await == 0.0
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get(proxy.outbound, "web", "/").await.body, "one");
    }
    assert_eq!(admin_get(proxy.admin, "/ready").await.status, 200);
    // A destination never asked about cannot be learned meanwhile: refused without waiting for
    // an answer that cannot come, saying why.
    let unseen = get(proxy.outbound, "other", "/").await;
    assert_eq!(unseen.status, 503);
    assert!(
        unseen.body.contains("the control plane is unreachable"),
        "{}",
        unseen.body
    );

    // While it is away the policy changes; when it is back the proxy resubscribes and gets it.
    let mut cp = cp.start().await;
    assert_eq!(cp.addr, cp_addr);
    cp.publish(WEB, destination("default", "web", 80, &[(two.addr, &[])]));
    cp.next_event(|e| matches!(e, ProxyEvent::Connected(_)).then_some(()))
        .await;
    eventually("the new endpoints reach the proxy", || async {
        get(proxy.outbound, "web", "/").await.body == "two"
    })
    .await;
    assert_eq!(
        metric(proxy.admin, "outrigger_control_plane_connected").await,
        1.0
    );
}

#[tokio::test]
async fn a_resubscribe_is_not_sent_what_the_proxy_already_has() {
    let mut cp = ControlPlane::start().await;
    let one = Backend::start("one").await;
    cp.publish(WEB, destination("default", "web", 80, &[(one.addr, &[])]));
    let proxy = RunningProxy::start(settings(&cp.url(), one.addr))
        .await
        .ready()
        .await;
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);
    cp.next_event(|e| matches!(e, ProxyEvent::Acked { .. }).then_some(()))
        .await;

    let mut cp = cp.restart_later().await.start().await;
    cp.next_event(|e| matches!(e, ProxyEvent::Connected(_)).then_some(()))
        .await;
    // Unchanged state: nothing is re-sent, so the only update the proxy ever applied is the first.
    let marker = cp.publish(
        "other.default.svc.cluster.local:80",
        destination("default", "other", 80, &[(one.addr, &[])]),
    );
    assert_eq!(get(proxy.outbound, "other", "/").await.status, 200);
    let acked = cp
        .next_event(|e| match e {
            ProxyEvent::Acked { key, version, .. } => Some((key, version)),
            _ => None,
        })
        .await;
    assert_eq!(
        acked,
        ("other.default.svc.cluster.local:80".to_string(), marker)
    );
    assert_eq!(
        metric(
            proxy.admin,
            r#"outrigger_config_updates_total{result="applied"}"#
        )
        .await,
        2.0
    );
}

/// A TCP relay that can stop passing bytes while keeping both connections open: a partition.
struct Relay {
    addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        tokio::spawn(async move {
            while let Ok((downstream, _)) = listener.accept().await {
                let upstream = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (down_read, down_write) = downstream.into_split();
                let (up_read, up_write) = upstream.into_split();
                tokio::spawn(pass(down_read, up_write, flag.clone()));
                tokio::spawn(pass(up_read, down_write, flag.clone()));
            }
        });
        Self { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

async fn pass(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: Arc<AtomicBool>) {
    let mut buf = vec![0; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything, close nothing; the halves stay open with this task.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

#[tokio::test]
async fn a_controller_that_silently_vanishes_is_noticed_by_keepalive() {
    let cp = ControlPlane::start().await;
    let backend = Backend::start("one").await;
    cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let relay = Relay::start(cp.addr).await;
    let proxy = RunningProxy::start(settings(&format!("http://{}", relay.addr), backend.addr))
        .await
        .ready()
        .await;
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);
    relay.freeze();
    // Keepalive pings every 10 s, 5 s to answer: well within 30 s.
    for _ in 0..300 {
        if metric(proxy.admin, "outrigger_control_plane_connected").await == 0.0 {
            assert_eq!(
                get(proxy.outbound, "web", "/").await.status,
                200,
                "still serving"
            );
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the proxy never noticed the controller was gone");
}

#[tokio::test]
async fn destinations_left_unused_are_unsubscribed_and_come_back_when_called() {
    let mut cp = ControlPlane::start().await;
    let backend = Backend::start("web").await;
    cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let mut settings = settings(&cp.url(), backend.addr);
    settings.discovery_idle_timeout = std::time::Duration::from_millis(200);
    let proxy = RunningProxy::start(settings).await.ready().await;
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);

    // The connection is closed: nothing uses the destination any more.
    let keys = cp
        .next_event(|e| match e {
            ProxyEvent::Unsubscribed { keys, .. } => Some(keys),
            _ => None,
        })
        .await;
    assert_eq!(keys, [WEB]);
    let config: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin, "/config").await.body).unwrap();
    assert!(config["destinations"].get(WEB).is_none(), "{config}");

    // Called again: subscribed again, and served.
    assert_eq!(get(proxy.outbound, "web", "/").await.body, "web");
}
