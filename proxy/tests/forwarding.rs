//! Forwarding through a real proxy: both directions, both protocols, upgrades, streaming, unknown
//! destinations, metrics and the admin endpoints.

mod support;

use std::time::Duration;

use outrigger_tests::{Backend, ControlPlane, destination};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: &str = "web.default.svc.cluster.local:80";

async fn setup() -> (ControlPlane, Backend, RunningProxy) {
    let cp = ControlPlane::start().await;
    let backend = Backend::start("web-1").await;
    cp.publish(
        WEB,
        destination("default", "web", 80, &[(backend.addr, &[])]),
    );
    let app = Backend::start("local-app").await;
    let proxy = RunningProxy::start(settings(&cp.url(), app.addr))
        .await
        .ready()
        .await;
    std::mem::forget(app); // lives as long as the test process
    (cp, backend, proxy)
}

#[tokio::test]
async fn outbound_http1_reaches_the_service_by_each_name_form() {
    let (_cp, backend, proxy) = setup().await;
    for host in [
        "web",
        "web:80",
        "web.default",
        "web.default.svc.cluster.local:80",
    ] {
        let reply = get(proxy.outbound, host, "/hello").await;
        assert_eq!(reply.status, 200, "{host}: {reply:?}");
        assert_eq!(reply.body, "web-1");
        assert_eq!(
            reply.header("x-seen-host"),
            host,
            "the upstream sees the name it was called by"
        );
        assert_eq!(reply.header("x-seen-version"), "HTTP/1.1");
        assert_eq!(reply.header("x-seen-path"), "/hello");
    }
    assert_eq!(backend.hits(), 4);
}

#[tokio::test]
async fn outbound_h2c_and_keep_alive_reuse_one_upstream_connection() {
    let (_cp, backend, proxy) = setup().await;
    let mut conn = Conn::http2(proxy.outbound).await;
    let replies = futures_util::future::join_all((0..20).map(|_| {
        let mut conn = conn.share();
        async move { conn.get("web", "/").await }
    }))
    .await;
    for reply in replies {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-seen-version"), "HTTP/2.0");
        assert_eq!(reply.header("x-seen-host"), "web");
    }
    assert_eq!(conn.get("web", "/").await.body, "web-1");
    assert_eq!(backend.hits(), 21);
    assert_eq!(
        backend.connections(),
        1,
        "21 requests multiplexed on one HTTP/2 connection"
    );

    let mut keep_alive = Conn::http1(proxy.outbound).await;
    for _ in 0..5 {
        assert_eq!(keep_alive.get("web", "/").await.status, 200);
    }
    assert_eq!(
        backend.connections(),
        2,
        "5 HTTP/1.1 requests on one kept-alive connection"
    );
    assert_eq!(
        metric(
            proxy.admin,
            r#"outrigger_connections_open{direction="outbound"}"#
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_proxy() {
    let (_cp, _backend, proxy) = setup().await;
    let mut request = request("web", "/");
    request
        .headers_mut()
        .insert("connection", "x-hop".parse().unwrap());
    request.headers_mut().insert("x-hop", "1".parse().unwrap());
    request
        .headers_mut()
        .insert("proxy-connection", "keep-alive".parse().unwrap());
    let reply = Conn::http1(proxy.outbound)
        .await
        .send(request)
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-seen-hop-header"), "", "{reply:?}");
}

#[tokio::test]
async fn inbound_reaches_the_local_app_and_both_directions_are_counted() {
    let (_cp, _backend, proxy) = setup().await;
    let reply = get(proxy.inbound, "anything", "/").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "local-app"));
    let reply = Conn::http2(proxy.inbound).await.get("anything", "/").await;
    assert_eq!(reply.header("x-seen-version"), "HTTP/2.0");
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);
    let inbound = r#"outrigger_requests_total{direction="inbound",dst_namespace="default",dst_service="",dst_subset="",route="",tls="false",client_id="",server_id="",status_code="200",classification="success"}"#;
    let outbound = r#"outrigger_requests_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route="",tls="false",client_id="",server_id="",status_code="200",classification="success"}"#;
    assert_eq!(metric(proxy.admin, inbound).await, 2.0);
    assert_eq!(metric(proxy.admin, outbound).await, 1.0);
    let histogram = r#"outrigger_request_duration_seconds_count{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route="",tls="false",client_id="",server_id=""}"#;
    assert_eq!(metric(proxy.admin, histogram).await, 1.0);
}

#[tokio::test]
async fn unknown_destinations_get_503_naming_them() {
    let (_cp, _backend, proxy) = setup().await;
    let reply = get(proxy.outbound, "nope", "/").await;
    assert_eq!(reply.status, 503);
    assert!(
        reply.body.contains("nope.default.svc.cluster.local:80"),
        "{reply:?}"
    );
    let reply = get(proxy.outbound, "a.b.c.d", "/").await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("a.b.c.d"), "{reply:?}");
    assert!(
        reply
            .header("outrigger-proxy-error")
            .contains("unknown destination")
    );
    let failures = r#"outrigger_requests_total{direction="outbound",dst_namespace="",dst_service="",dst_subset="",route="",tls="false",client_id="",server_id="",status_code="503",classification="failure"}"#;
    assert_eq!(metric(proxy.admin, failures).await, 2.0);
}

#[tokio::test]
async fn a_grpc_caller_gets_the_proxy_s_own_error_as_a_grpc_status() {
    let (_cp, _backend, proxy) = setup().await;
    let mut conn = Conn::http2(proxy.outbound).await;
    let mut call = request("nope", "/shop.Reviews/List");
    *call.method_mut() = http::Method::POST;
    call.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let reply = conn.send(call).await.unwrap();
    assert_eq!(reply.status, 200, "trailers-only: {reply:?}");
    assert_eq!(reply.header("grpc-status"), "14", "UNAVAILABLE");
    assert!(
        reply.header("grpc-message").contains("unknown destination"),
        "{reply:?}"
    );
    assert_eq!(reply.body, "");
}

#[tokio::test]
async fn upstream_failures_are_gateway_errors() {
    let cp = ControlPlane::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cp.publish(WEB, destination("default", "web", 80, &[(closed, &[])]));
    cp.publish(
        "empty.default.svc.cluster.local:80",
        destination("default", "empty", 80, &[]),
    );
    let proxy = RunningProxy::start(settings(&cp.url(), closed))
        .await
        .ready()
        .await;
    let reply = get(proxy.outbound, "web", "/").await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert!(reply.body.contains(&closed.to_string()), "{reply:?}");
    let reply = get(proxy.outbound, "empty", "/").await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("no endpoints"), "{reply:?}");
    assert_eq!(get(proxy.inbound, "app", "/").await.status, 502);
}

#[tokio::test]
async fn upgrades_become_a_byte_tunnel() {
    let (_cp, _backend, proxy) = setup().await;
    let mut stream = outrigger_tests::e2e::upgraded(proxy.outbound, "web").await;
    for message in [&b"ping"[..], b"pong and more"] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0; message.len()];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
    }
}

#[tokio::test]
async fn bodies_stream_through_without_buffering() {
    let (_cp, backend, proxy) = setup().await;
    let mut conn = Conn::http1(proxy.outbound).await;
    let response = conn.send_raw(request("web", "/stream")).await.unwrap();
    let mut body = response.into_body();
    use http_body_util::BodyExt;
    // The backend holds its last chunk back until released: the first one must arrive before.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first\n");
    backend.release_streams();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"last\n");

    // And a large request body reaches the backend whole.
    let payload = "x".repeat(1 << 20);
    let mut upload = request("web", "/echo");
    *upload.method_mut() = http::Method::POST;
    *upload.body_mut() = http_body_util::Full::new(bytes::Bytes::from(payload.clone()));
    let reply = Conn::http1(proxy.outbound)
        .await
        .send(upload)
        .await
        .unwrap();
    assert_eq!(reply.body.len(), payload.len());
}

#[tokio::test]
async fn admin_reports_config_endpoints_and_health() {
    let (cp, backend, proxy) = setup().await;
    assert_eq!(admin_get(proxy.admin, "/live").await.status, 200);
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);
    let config: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin, "/config").await.body).unwrap();
    let web = &config["destinations"][WEB];
    assert_eq!(web["state"], "ready");
    assert_eq!(web["version"].as_str().unwrap().len(), 16);
    assert_eq!(web["config"]["service"], "web");
    assert_eq!(web["config"]["load_balancer"], "PeakEwma");
    let endpoints: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin, "/endpoints").await.body).unwrap();
    assert_eq!(endpoints[WEB][0]["address"], backend.addr.to_string());
    assert_eq!(endpoints[WEB][0]["state"], "healthy");
    let healthy =
        r#"outrigger_endpoints{dst_namespace="default",dst_service="web",state="healthy"}"#;
    assert_eq!(metric(proxy.admin, healthy).await, 1.0);
    assert_eq!(
        metric(proxy.admin, "outrigger_control_plane_connected").await,
        1.0
    );
    assert_eq!(
        metric(
            proxy.admin,
            r#"outrigger_config_updates_total{result="applied"}"#
        )
        .await,
        1.0
    );
    drop(cp);
}

#[tokio::test]
async fn not_ready_until_the_control_plane_answers() {
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = RunningProxy::start(settings(&format!("http://{unreachable}"), unreachable)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(admin_get(proxy.admin, "/ready").await.status, 503);
    let reply = get(proxy.outbound, "web", "/").await;
    assert_eq!(reply.status, 503);
    assert!(
        reply.body.contains("control plane has not answered"),
        "{reply:?}"
    );
    proxy.stop().await;
}
