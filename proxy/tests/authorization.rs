//! The inbound side enforces what the controller sends under the pod's own key: before anything
//! arrives every caller is allowed; an ALLOW policy refuses a caller it does not list with 403
//! naming the policy, before the app sees the request; Audit mode only counts; a version the
//! proxy cannot apply is refused and the last good one stays; a key withdrawn allows everyone.

mod support;

use outrigger_tests::{Configuration, ControlPlane, ProxyEvent, allowing};
use support::*;

const KEY: &str = "inbound:shop/reviews-0";

/// The ALLOW policy shop/readers on `port`, which lets only shop/productpage call.
fn readers(port: u16, audit: bool) -> Configuration {
    let mut readers = allowing("shop/readers", &["shop/productpage"], &[port]);
    readers.destination.inbound.as_mut().unwrap().ports[0].authorizations[0].audit = audit;
    readers
}

async fn applied(cp: &mut ControlPlane, version: &str) {
    cp.next_event(|event| match event {
        ProxyEvent::Acked {
            key, version: v, ..
        } if key == KEY && v == version => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test]
async fn a_pods_policies_refuse_the_callers_they_do_not_allow_and_audit_only_counts() {
    let app = outrigger_tests::Backend::start("reviews").await;
    let mut cp = ControlPlane::start().await;
    let mut settings = settings(&cp.url(), app.addr);
    settings.namespace = "shop".into();
    settings.workload = "reviews-0".into();
    // Connections are made to the inbound listener itself: its port is the pod port they name.
    settings.inbound_addr = outrigger_tests::process::free_port().unwrap();
    let port = settings.inbound_addr.port();
    let proxy = RunningProxy::start(settings).await.ready().await;
    assert_eq!(
        get(proxy.inbound, "reviews", "/").await.status,
        200,
        "no policy yet: allowed"
    );

    let enforced = cp.publish(KEY, readers(port, false));
    applied(&mut cp, &enforced).await;
    // A plaintext caller has no identity: no source matches it.
    let denied = get(proxy.inbound, "reviews", "/").await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(denied.body, "denied by AuthorizationPolicy shop/readers\n");
    assert_eq!(app.hits(), 1, "the denied request never reached the app");
    let counted = r#"outrigger_authz_decisions_total{policy="shop/readers",decision="deny"}"#;
    assert_eq!(metric(proxy.admin, counted).await, 1.0);
    // `/config` shows what is in force.
    let config: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin, "/config").await.body).unwrap();
    let inbound = &config["inbound"];
    assert_eq!(inbound["version"], enforced, "{config}");
    let policy = &inbound["ports"][port.to_string()][0];
    assert_eq!(
        (&policy["policy"], &policy["action"], &policy["mode"]),
        (&"shop/readers".into(), &"ALLOW".into(), &"Enforce".into()),
        "{config}"
    );
    assert_eq!(
        policy["rules"][0]["from"][0]["serviceAccounts"],
        serde_json::json!(["shop/productpage"]),
        "{config}"
    );

    let audit = cp.publish(KEY, readers(port, true));
    applied(&mut cp, &audit).await;
    assert_eq!(get(proxy.inbound, "reviews", "/").await.status, 200);
    let would = r#"outrigger_authz_decisions_total{policy="shop/readers",decision="audit_deny"}"#;
    assert_eq!(metric(proxy.admin, would).await, 1.0);

    // A version it cannot apply: refused, naming the field; the audit version stays.
    let mut broken = readers(port, false);
    broken.destination.inbound.as_mut().unwrap().ports[0].port = 0;
    let version = cp.publish(KEY, broken);
    let reason = cp
        .next_event(|event| match event {
            ProxyEvent::Rejected {
                version: v, reason, ..
            } if v == version => Some(reason),
            _ => None,
        })
        .await;
    assert!(reason.contains("inbound.ports[0].port"), "{reason}");
    assert_eq!(get(proxy.inbound, "reviews", "/").await.status, 200);
    assert_eq!(app.hits(), 3);

    // Enforced again, then withdrawn (no policy reaches the pod any more): every caller again.
    let enforced = cp.publish(KEY, readers(port, false));
    applied(&mut cp, &enforced).await;
    assert_eq!(get(proxy.inbound, "reviews", "/").await.status, 403);
    cp.withdraw(KEY);
    eventually("the withdrawn policy to stop denying", || async {
        get(proxy.inbound, "reviews", "/").await.status == 200
    })
    .await;
}
