//! What the proxy must not do for a client or a control plane it cannot trust: connect where an
//! endpoint address would take it inside its own pod or to the node, or pass on requests that the
//! next hop would read differently from the proxy (upgrades around its policy, framing).

mod support;

use outrigger_tests::{ControlPlane, ProxyEvent, destination};
use support::*;

const WEB: &str = "web.default.svc.cluster.local:80";

#[tokio::test]
async fn endpoints_inside_the_pod_or_on_the_node_are_refused() {
    let mut cp = ControlPlane::start().await;
    let good = cp.publish(WEB, destination("default", "web", 80, &[]));
    let mut settings = settings(&cp.url(), "127.0.0.1:1".parse().unwrap());
    settings.allow_loopback_endpoints = false;
    let proxy = RunningProxy::start(settings).await.ready().await;
    // Subscribes; no endpoints yet.
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 503);
    cp.next_event(|e| match e {
        ProxyEvent::Acked { version, .. } if version == good => Some(()),
        _ => None,
    })
    .await;

    for (address, problem) in [
        ("127.0.0.1:80", "loopback"),
        ("127.1.2.3:80", "loopback"),
        ("[::1]:80", "loopback"),
        ("[::ffff:127.0.0.1]:80", "loopback"),
        ("169.254.169.254:80", "link-local"),
        ("[fe80::1]:80", "link-local"),
        ("0.0.0.0:80", "unspecified"),
        ("[::]:80", "unspecified"),
        ("224.0.0.1:80", "multicast"),
        ("[ff02::1]:80", "multicast"),
        ("255.255.255.255:80", "broadcast"),
    ] {
        let mut bad = destination(
            "default",
            "web",
            80,
            &[("10.0.0.1:80".parse().unwrap(), &[])],
        );
        bad.endpoints.push(outrigger_api::proto::Endpoint {
            address: address.into(),
            ..Default::default()
        });
        let version = cp.publish(WEB, bad);
        let reason = cp
            .next_event(|e| match e {
                ProxyEvent::Rejected {
                    version: v, reason, ..
                } if v == version => Some(reason),
                ProxyEvent::Acked { version: v, .. } if v == version => {
                    panic!("{address} was accepted")
                }
                _ => None,
            })
            .await;
        assert!(
            reason.starts_with(&format!("endpoints[1].address: `{address}` is {problem}")),
            "{address}: {reason}"
        );
        let config: serde_json::Value =
            serde_json::from_str(&admin_get(proxy.admin, "/config").await.body).unwrap();
        assert_eq!(
            config["destinations"][WEB]["version"],
            good.as_str(),
            "the last good version stays"
        );
    }
}
