//! Every policy of DestinationPolicy through a real proxy, against backends that fail, stall or
//! reset on command: what the app sees, what each backend saw, and the metrics.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use outrigger_api::proto;
use outrigger_tests::{Backend, Behaviour, ControlPlane, ProxyEvent, destination};
use support::*;

const WEB: &str = "web.default.svc.cluster.local:80";

struct Mesh {
    cp: ControlPlane,
    backends: Vec<Backend>,
    proxy: RunningProxy,
}

/// Backends named after their subset (`stable-0`, `canary-0`, ...), a destination over them with
/// `policy`, and a ready proxy that has applied it.
async fn mesh(subsets: &[(&str, usize)], policy: proto::Policy, routes: Vec<proto::Route>) -> Mesh {
    let mut cp = ControlPlane::start().await;
    let mut backends = Vec::new();
    let mut members = Vec::new();
    for (subset, count) in subsets {
        for i in 0..*count {
            let backend = Backend::start(&format!("{subset}-{i}")).await;
            members.push((backend.addr, *subset));
            backends.push(backend);
        }
    }
    let subset_lists: Vec<[&str; 1]> = members.iter().map(|(_, s)| [*s]).collect();
    let endpoints: Vec<_> = members
        .iter()
        .zip(&subset_lists)
        .map(|((addr, _), s)| (*addr, &s[..]))
        .collect();
    let mut d = destination("default", "web", 80, &endpoints);
    d.policy_spec = Some(policy);
    d.routes = routes;
    let version = cp.publish(WEB, d);
    let proxy = RunningProxy::start(settings(&cp.url(), backends[0].addr))
        .await
        .ready()
        .await;
    assert_eq!(get(proxy.outbound, "web", "/warm-up").await.status / 100, 2);
    cp.next_event(|e| {
        matches!(e, ProxyEvent::Acked { version: ref v, .. } if *v == version).then_some(())
    })
    .await;
    Mesh {
        cp,
        backends,
        proxy,
    }
}

fn split(weights: &[(&str, u32)]) -> Option<proto::TrafficSplit> {
    Some(proto::TrafficSplit {
        weights: weights
            .iter()
            .map(|(subset, weight)| proto::WeightedSubset {
                subset: subset.to_string(),
                weight: *weight,
            })
            .collect(),
    })
}

fn retries(attempts: u32, retry_on: &[proto::RetryOn]) -> proto::RetryPolicy {
    proto::RetryPolicy {
        attempts,
        retry_on: retry_on.iter().map(|r| *r as i32).collect(),
        backoff_base_ms: 1,
        backoff_max_ms: 5,
        ..Default::default()
    }
}

fn round_robin() -> Option<proto::LoadBalancer> {
    Some(proto::LoadBalancer {
        algorithm: proto::Algorithm::RoundRobin as i32,
        hash_header: String::new(),
    })
}

/// Sends `n` GETs over one h2c connection, `concurrency` at a time; returns the statuses.
async fn load(outbound: std::net::SocketAddr, n: usize, concurrency: usize) -> Vec<Reply> {
    let conn = Conn::http2(outbound).await;
    let mut replies = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(concurrency) {
        let batch = chunk.iter().map(|_| {
            let mut conn = conn.share();
            async move { conn.get("web", "/").await }
        });
        replies.extend(futures_util::future::join_all(batch).await);
    }
    replies
}

fn hits(backends: &[Backend], prefix: &str) -> u64 {
    backends
        .iter()
        .filter(|b| b.name().starts_with(prefix))
        .map(Backend::hits)
        .sum()
}

#[tokio::test]
async fn split_shares_match_the_weights_and_zero_gets_nothing() {
    let policy = proto::Policy {
        traffic_split: split(&[("stable", 90), ("canary", 10), ("dark", 0)]),
        ..Default::default()
    };
    let m = mesh(&[("stable", 2), ("canary", 1), ("dark", 1)], policy, vec![]).await;
    let replies = load(m.proxy.outbound, 10_000, 100).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let canary = replies
        .iter()
        .filter(|r| r.body.starts_with("canary"))
        .count() as f64
        / 10_000.0;
    assert!((canary - 0.10).abs() <= 0.015, "canary share {canary}");
    assert_eq!(hits(&m.backends, "dark"), 0);
    let canary_series = r#"outrigger_requests_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="canary",route="",tls="false",client_id="",server_id="",status_code="200",classification="success"}"#;
    assert_eq!(
        metric(m.proxy.admin, canary_series).await as u64,
        hits(&m.backends, "canary")
    );
}

#[tokio::test]
async fn a_subset_without_endpoints_fails_over() {
    let policy = proto::Policy {
        traffic_split: split(&[("stable", 50), ("canary", 50)]),
        ..Default::default()
    };
    let mut cp = ControlPlane::start().await;
    let stable = Backend::start("stable-0").await;
    let mut d = destination("default", "web", 80, &[(stable.addr, &["stable"])]);
    d.subsets.push("canary".into());
    d.policy_spec = Some(policy);
    cp.publish(WEB, d);
    let proxy = RunningProxy::start(settings(&cp.url(), stable.addr))
        .await
        .ready()
        .await;
    let replies = load(proxy.outbound, 200, 20).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.body == "stable-0")
    );
    cp.next_event(|e| matches!(e, ProxyEvent::Acked { .. }).then_some(()))
        .await;
}

#[tokio::test]
async fn routes_match_headers_path_and_method_and_override_the_split() {
    let policy = proto::Policy {
        traffic_split: split(&[("stable", 100)]),
        ..Default::default()
    };
    let canary_testers = proto::Route {
        name: "canary-testers".into(),
        r#match: Some(proto::RouteMatch {
            headers: vec![proto::HeaderMatch {
                name: "x-canary".into(),
                value: Some(proto::header_match::Value::Exact("true".into())),
            }],
            path_prefix: "/api".into(),
            method: "GET".into(),
        }),
        traffic_split: split(&[("canary", 100)]),
        ..Default::default()
    };
    let by_regex = proto::Route {
        name: "by-user".into(),
        r#match: Some(proto::RouteMatch {
            headers: vec![proto::HeaderMatch {
                name: "x-user".into(),
                value: Some(proto::header_match::Value::Regex("tester-[0-9]+".into())),
            }],
            ..Default::default()
        }),
        traffic_split: split(&[("canary", 100)]),
        ..Default::default()
    };
    let m = mesh(
        &[("stable", 1), ("canary", 1)],
        policy,
        vec![canary_testers, by_regex],
    )
    .await;
    let send = |path: &str, method: &str, headers: &[(&str, &str)]| {
        let mut request = request("web", path);
        *request.method_mut() = method.parse().unwrap();
        for (k, v) in headers {
            let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            request.headers_mut().insert(name, v.parse().unwrap());
        }
        request
    };
    let mut conn = Conn::http1(m.proxy.outbound).await;
    for (request, expected) in [
        (
            send("/api/items", "GET", &[("x-canary", "true")]),
            "canary-0",
        ),
        (
            send("/api/items", "POST", &[("x-canary", "true")]),
            "stable-0",
        ),
        (send("/web", "GET", &[("x-canary", "true")]), "stable-0"),
        (
            send("/api/items", "GET", &[("x-canary", "false")]),
            "stable-0",
        ),
        (send("/", "GET", &[("x-user", "tester-7")]), "canary-0"),
        (send("/", "GET", &[("x-user", "tester-x")]), "stable-0"),
    ] {
        let description = format!(
            "{} {} {:?}",
            request.method(),
            request.uri(),
            request.headers()
        );
        assert_eq!(
            conn.send(request).await.unwrap().body,
            expected,
            "{description}"
        );
    }
    let routed = r#"outrigger_requests_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="canary",route="canary-testers",tls="false",client_id="",server_id="",status_code="200",classification="success"}"#;
    assert_eq!(metric(m.proxy.admin, routed).await, 1.0);
}

/// The `outrigger_timeouts_total` series of the `web` destination for `kind`.
fn timeouts(kind: &str) -> String {
    format!(
        r#"outrigger_timeouts_total{{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route="",kind="{kind}"}}"#
    )
}

#[tokio::test]
async fn the_request_timeout_bounds_everything_including_retries() {
    let mut attempts = retries(10, &[proto::RetryOn::ServerError]);
    attempts.per_try_timeout_ms = Some(50);
    let policy = proto::Policy {
        timeout_ms: Some(200),
        retries: Some(attempts),
        ..Default::default()
    };
    let m = mesh(&[("stable", 1)], policy, vec![]).await;
    m.backends[0].set(Behaviour::Delay(Duration::from_secs(5)));
    let reply = get(m.proxy.outbound, "web", "/").await;
    assert_eq!(reply.status, 504, "{reply:?}");
    assert!(reply.body.contains("request timed out"), "{reply:?}");
    // 200 ms of 50 ms attempts with tiny backoff: about four tries, never the ten allowed.
    let tries = m.backends[0].hits() - 1;
    assert!((2..=5).contains(&tries), "{tries} tries");
    assert_eq!(metric(m.proxy.admin, &timeouts("request")).await, 1.0);
    assert!(metric(m.proxy.admin, &timeouts("per_try")).await >= 2.0);
}

#[tokio::test]
async fn the_request_timeout_cuts_a_body_still_streaming_when_it_passes() {
    use http_body_util::BodyExt;
    let policy = proto::Policy {
        timeout_ms: Some(200),
        ..Default::default()
    };
    let m = mesh(&[("stable", 1)], policy, vec![]).await;
    let mut conn = Conn::http1(m.proxy.outbound).await;
    let response = conn.send_raw(request("web", "/stream")).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first\n");
    // The backend holds its last chunk back past the deadline: the app's body is cut there.
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("cut at the deadline, not left hanging");
    assert!(rest.is_err(), "the body must not look complete: {rest:?}");
    assert_eq!(metric(m.proxy.admin, &timeouts("request")).await, 1.0);
    // A 200 whose body was cut is a failure, not a success.
    eventually("the cut response counts as a failure", || async {
        let metrics = admin_get(m.proxy.admin, "/metrics").await.body;
        metrics.lines().any(|line| {
            line.starts_with("outrigger_requests_total{")
                && line.contains(r#"status_code="200",classification="failure""#)
                && line.ends_with(" 1")
        })
    })
    .await;
}

#[tokio::test]
async fn a_slow_attempt_times_out_and_is_retried_on_another_endpoint() {
    let mut attempts = retries(2, &[proto::RetryOn::GatewayError]);
    attempts.per_try_timeout_ms = Some(100);
    let policy = proto::Policy {
        retries: Some(attempts),
        load_balancer: round_robin(),
        ..Default::default()
    };
    let m = mesh(&[("stable", 2)], policy, vec![]).await;
    m.backends[0].set(Behaviour::Delay(Duration::from_secs(5)));
    for _ in 0..6 {
        let reply = get(m.proxy.outbound, "web", "/").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "stable-1"));
    }
    assert!(metric(m.proxy.admin, &timeouts("per_try")).await >= 1.0);
}

#[tokio::test]
async fn failed_attempts_are_retried_on_a_different_endpoint() {
    let policy = proto::Policy {
        retries: Some(retries(1, &[proto::RetryOn::GatewayError])),
        load_balancer: round_robin(),
        ..Default::default()
    };
    let m = mesh(&[("stable", 2)], policy, vec![]).await;
    m.backends[0].set(Behaviour::Status(503));
    let before = m.backends[0].hits();
    for _ in 0..20 {
        let reply = get(m.proxy.outbound, "web", "/").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "stable-1"));
    }
    // One retry allowed: had it gone back to the failing endpoint, some requests would fail.
    assert!(m.backends[0].hits() - before <= 20);
    let retried = r#"outrigger_retries_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route="",reason="gateway-error"}"#;
    assert_eq!(
        metric(m.proxy.admin, retried).await,
        (m.backends[0].hits() - before) as f64
    );
}

#[tokio::test]
async fn non_idempotent_and_large_requests_are_not_retried() {
    let m = mesh(
        &[("stable", 1)],
        proto::Policy {
            retries: Some(retries(3, &[proto::RetryOn::ServerError])),
            ..Default::default()
        },
        vec![],
    )
    .await;
    m.backends[0].set(Behaviour::Status(500));
    let before = m.backends[0].hits();
    let mut post = request("web", "/");
    *post.method_mut() = http::Method::POST;
    assert_eq!(
        Conn::http1(m.proxy.outbound)
            .await
            .send(post)
            .await
            .unwrap()
            .status,
        500
    );
    assert_eq!(m.backends[0].hits() - before, 1, "POST is not retried");

    let mut allowed = retries(3, &[proto::RetryOn::ServerError]);
    allowed.retry_non_idempotent = true;
    let mut d = destination("default", "web", 80, &[(m.backends[0].addr, &["stable"])]);
    d.policy_spec = Some(proto::Policy {
        retries: Some(allowed),
        ..Default::default()
    });
    let mut cp = m.cp;
    let version = cp.publish(WEB, d);
    cp.next_event(|e| {
        matches!(e, ProxyEvent::Acked { version: ref v, .. } if *v == version).then_some(())
    })
    .await;
    let send_post = |size: usize| {
        let mut post = request("web", "/echo");
        *post.method_mut() = http::Method::POST;
        *post.body_mut() = Full::new(Bytes::from(vec![b'x'; size]));
        post
    };
    let before = m.backends[0].hits();
    assert_eq!(
        Conn::http1(m.proxy.outbound)
            .await
            .send(send_post(1024))
            .await
            .unwrap()
            .status,
        500
    );
    assert_eq!(
        m.backends[0].hits() - before,
        4,
        "retryNonIdempotent: first try and 3 retries"
    );
    let before = m.backends[0].hits();
    assert_eq!(
        Conn::http1(m.proxy.outbound)
            .await
            .send(send_post(100 * 1024))
            .await
            .unwrap()
            .status,
        500
    );
    assert_eq!(
        m.backends[0].hits() - before,
        1,
        "a body over 64 KiB is not retried"
    );
}

#[tokio::test]
async fn retries_stay_within_the_budget() {
    let mut policy = retries(3, &[proto::RetryOn::ServerError]);
    policy.budget = Some(proto::RetryBudget {
        percent: 0,
        min_retries_per_second: 1,
    });
    let m = mesh(
        &[("stable", 1)],
        proto::Policy {
            retries: Some(policy),
            ..Default::default()
        },
        vec![],
    )
    .await;
    m.backends[0].set(Behaviour::Status(500));
    let before = m.backends[0].hits();
    let replies = load(m.proxy.outbound, 50, 5).await;
    assert!(replies.iter().all(|r| r.status == 500));
    // 1 retry per second over a 10 s window: at most 10 retries for 50 requests.
    let retries_sent = m.backends[0].hits() - before - 50;
    assert_eq!(retries_sent, 10);
    let exhausted = r#"outrigger_retry_budget_exhausted_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route=""}"#;
    // Every request that wanted a retry and found the budget spent: the 40 never retried and the
    // 10 whose one retry failed too.
    assert_eq!(metric(m.proxy.admin, exhausted).await, 50.0);
}

#[tokio::test]
async fn without_a_policy_a_connect_failure_is_retried_once_elsewhere() {
    let cp = ControlPlane::start().await;
    let live = Backend::start("live").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut d = destination("default", "web", 80, &[(closed, &[]), (live.addr, &[])]);
    d.policy_spec = Some(proto::Policy {
        load_balancer: round_robin(),
        ..Default::default()
    });
    cp.publish(WEB, d);
    let proxy = RunningProxy::start(settings(&cp.url(), live.addr))
        .await
        .ready()
        .await;
    for _ in 0..10 {
        let mut post = request("web", "/");
        *post.method_mut() = http::Method::POST;
        let reply = Conn::http1(proxy.outbound).await.send(post).await.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "live"),
            "even a POST: nothing was sent"
        );
    }
    let retried = r#"outrigger_retries_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route="",reason="connect-failure"}"#;
    assert!(metric(proxy.admin, retried).await >= 1.0);
}

fn outlier(base_ms: u64) -> Option<proto::OutlierDetection> {
    Some(proto::OutlierDetection {
        consecutive_5xx_errors: 3,
        base_ejection_time_ms: base_ms,
        max_ejection_time_ms: base_ms * 10,
        max_ejection_percent: 50,
        ..Default::default()
    })
}

async fn endpoint_states(admin: std::net::SocketAddr) -> Vec<(String, String)> {
    let endpoints: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/endpoints").await.body).unwrap();
    endpoints[WEB]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn consecutive_errors_eject_and_probation_sends_exactly_one_probe() {
    // Ejections long enough for 30 requests on a loaded machine; their ends are waited for, not
    // slept through.
    let policy = proto::Policy {
        outlier_detection: outlier(2000),
        load_balancer: round_robin(),
        ..Default::default()
    };
    let m = mesh(&[("stable", 3)], policy, vec![]).await;
    let bad = &m.backends[0];
    let state_of_bad = || async {
        endpoint_states(m.proxy.admin)
            .await
            .into_iter()
            .find(|(address, _)| *address == bad.addr.to_string())
            .map(|(_, state)| state)
            .expect("the bad endpoint is listed")
    };
    bad.set(Behaviour::Status(500));
    let mut conn = Conn::http1(m.proxy.outbound).await;
    for _ in 0..9 {
        conn.get("web", "/").await;
    }
    let at_ejection = bad.hits();
    assert_eq!(state_of_bad().await, "ejected");
    let ejected =
        r#"outrigger_endpoints{dst_namespace="default",dst_service="web",state="ejected"}"#;
    assert_eq!(metric(m.proxy.admin, ejected).await, 1.0);
    let ejections =
        r#"outrigger_outlier_ejections_total{dst_namespace="default",dst_service="web"}"#;
    assert_eq!(metric(m.proxy.admin, ejections).await, 1.0);

    // While ejected: no traffic at all.
    for _ in 0..30 {
        assert_eq!(conn.get("web", "/").await.status, 200);
    }
    assert_eq!(bad.hits(), at_ejection);
    assert_eq!(
        state_of_bad().await,
        "ejected",
        "the ejection outlasted the requests"
    );

    // Probation: exactly one probe, which fails, so it is ejected again (for twice as long).
    eventually("probation", || async {
        state_of_bad().await == "probation"
    })
    .await;
    let probation =
        r#"outrigger_endpoints{dst_namespace="default",dst_service="web",state="probation"}"#;
    assert_eq!(metric(m.proxy.admin, probation).await, 1.0);
    for _ in 0..30 {
        conn.get("web", "/").await;
    }
    assert_eq!(bad.hits(), at_ejection + 1, "one probe");
    assert_eq!(metric(m.proxy.admin, ejections).await, 2.0);
    assert_eq!(state_of_bad().await, "ejected");

    // Recovered: the next probe succeeds and it is back in rotation.
    bad.set(Behaviour::Answer);
    eventually("probation again", || async {
        state_of_bad().await == "probation"
    })
    .await;
    for _ in 0..30 {
        assert_eq!(conn.get("web", "/").await.status, 200);
    }
    assert!(bad.hits() >= at_ejection + 1 + 10, "back in rotation");
    let states = endpoint_states(m.proxy.admin).await;
    assert!(states.iter().all(|(_, s)| s == "healthy"), "{states:?}");
}

#[tokio::test]
async fn pool_limits_fail_fast_with_a_reason() {
    let policy = proto::Policy {
        connection_pool: Some(proto::ConnectionPool {
            max_connections: Some(1),
            max_pending_requests: Some(1),
            connect_timeout_ms: 0,
        }),
        ..Default::default()
    };
    let m = mesh(&[("stable", 1)], policy, vec![]).await;
    let backend = &m.backends[0];
    let warmed_up = backend.hits();
    backend.set(Behaviour::Hold);
    // HTTP/1 throughout, as the warm-up: its idle connection is the one pool slot. The first
    // request holds it until released, the second waits for it, the rest are refused at once.
    let mut replies: futures_util::stream::FuturesUnordered<_> =
        (0..6).map(|_| get(m.proxy.outbound, "web", "/")).collect();
    let mut refused = Vec::new();
    while refused.len() < 4 {
        let reply = replies.next().await.expect("six replies");
        assert_eq!(
            reply.status, 503,
            "only refusals come before the release: {reply:?}"
        );
        refused.push(reply);
    }
    backend.set(Behaviour::Answer);
    backend.release(1);
    let answered: Vec<_> = replies.collect().await;
    assert!(answered.iter().all(|r| r.status == 200), "{answered:?}");
    assert_eq!(answered.len(), 2);
    assert_eq!(backend.hits(), warmed_up + 2);
    assert!(
        refused[0]
            .header("outrigger-proxy-error")
            .contains("maxPendingRequests")
    );
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let policy = proto::Policy {
        rate_limit: Some(proto::RateLimit {
            requests_per_second: 1,
            burst: 5,
        }),
        ..Default::default()
    };
    let m = mesh(&[("stable", 1)], policy, vec![]).await;
    // The warm-up request took one token; the bucket refills one a second meanwhile, however long
    // the requests take here.
    let started = tokio::time::Instant::now();
    let replies = load(m.proxy.outbound, 20, 1).await;
    let refilled = started.elapsed().as_secs() + 1;
    let limited: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    let passed = (replies.len() - limited.len()) as u64;
    assert!(
        (4..=4 + refilled).contains(&passed) && !limited.is_empty(),
        "{passed} passed in {refilled} s: {replies:?}"
    );
    assert_eq!(limited[0].header("retry-after"), "1");
    let counted = r#"outrigger_rate_limited_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route=""}"#;
    assert_eq!(metric(m.proxy.admin, counted).await, limited.len() as f64);
}

#[tokio::test]
async fn faults_abort_and_delay_on_command() {
    let abort_all = proto::Policy {
        fault_injection: Some(proto::FaultInjection {
            delay: None,
            abort: Some(proto::FaultAbort {
                percent: 100.0,
                http_status: 418,
            }),
        }),
        ..Default::default()
    };
    let mut cp = ControlPlane::start().await;
    let backend = Backend::start("stable-0").await;
    let mut d = destination("default", "web", 80, &[(backend.addr, &[])]);
    d.policy_spec = Some(abort_all);
    cp.publish(WEB, d.clone());
    let proxy = RunningProxy::start(settings(&cp.url(), backend.addr))
        .await
        .ready()
        .await;
    let reply = get(proxy.outbound, "web", "/").await;
    assert_eq!(reply.status, 418);
    assert_eq!(reply.header("outrigger-fault"), "abort");
    assert_eq!(backend.hits(), 0);

    d.policy_spec = Some(proto::Policy {
        fault_injection: Some(proto::FaultInjection {
            delay: Some(proto::FaultDelay {
                percent: 100.0,
                fixed_delay_ms: 300,
            }),
            abort: None,
        }),
        ..Default::default()
    });
    let version = cp.publish(WEB, d);
    cp.next_event(|e| {
        matches!(e, ProxyEvent::Acked { version: ref v, .. } if *v == version).then_some(())
    })
    .await;
    let started = tokio::time::Instant::now();
    assert_eq!(get(proxy.outbound, "web", "/").await.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the delay was injected"
    );
}

/// One of three backends fails hard mid-load; with retries and ejection the app barely notices,
/// and the failed endpoint gets nothing but probes.
#[tokio::test]
async fn chaos_one_backend_dies_mid_load() {
    // The seed picks the victim and the moment; printed so a failure can be replayed.
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    println!("CHAOS_SEED={seed}");
    let victim = (seed % 3) as usize;
    let fail_after_batches = 5 + (seed % 7) as usize;

    let policy = proto::Policy {
        retries: Some(retries(
            2,
            &[
                proto::RetryOn::ServerError,
                proto::RetryOn::ConnectFailure,
                proto::RetryOn::Reset,
            ],
        )),
        outlier_detection: outlier(300),
        ..Default::default()
    };
    let m = mesh(&[("stable", 3)], policy, vec![]).await;
    let conn = Conn::http2(m.proxy.outbound).await;
    let mut statuses = Vec::new();
    let mut victim_hits_at_failure = 0;
    for batch in 0..60 {
        if batch == fail_after_batches {
            m.backends[victim].set(Behaviour::Reset);
            victim_hits_at_failure = m.backends[victim].hits();
        }
        let requests = (0..50).map(|_| {
            let mut conn = conn.share();
            async move { conn.get("web", "/").await.status }
        });
        statuses.extend(futures_util::future::join_all(requests).await);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count() as f64 / statuses.len() as f64;
    assert!(ok >= 0.999, "success rate {ok}");
    let ejections = metric(
        m.proxy.admin,
        r#"outrigger_outlier_ejections_total{dst_namespace="default",dst_service="web"}"#,
    )
    .await;
    assert!(ejections >= 1.0);
    // After the failure: the requests that tripped ejection (at most a batch in flight), then
    // exactly one probe per later ejection.
    let after_failure = m.backends[victim].hits() - victim_hits_at_failure;
    assert!(
        after_failure <= 50 + ejections as u64,
        "{after_failure} requests reached the dead backend, {ejections} ejections"
    );
}

#[tokio::test]
async fn grpc_is_retried_on_unavailable_only_when_non_idempotent_retries_are_allowed() {
    // Every gRPC call is a POST, and UNAVAILABLE is an answer: the call may have run.
    let policy = proto::Policy {
        retries: Some(retries(1, &[proto::RetryOn::ServerError])),
        load_balancer: round_robin(),
        ..Default::default()
    };
    let m = mesh(&[("stable", 2)], policy, vec![]).await;
    let mut conn = Conn::http2(m.proxy.outbound).await;
    m.backends[0].set(Behaviour::GrpcStatus(14));
    m.backends[1].set(Behaviour::GrpcStatus(14));
    let before = m.backends[0].hits() + m.backends[1].hits();
    let reply = conn.send(grpc_call()).await.unwrap();
    assert_eq!(reply.header("grpc-status"), "14");
    let tries = m.backends[0].hits() + m.backends[1].hits() - before;
    assert_eq!(tries, 1, "not retried");
}

/// An h2c server that refuses every stream before processing it (RST_STREAM REFUSED_STREAM).
async fn refusing_h2_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_refused_stream_is_retried_whatever_the_method() {
    let cp = ControlPlane::start().await;
    let good = Backend::start("good").await;
    let refusing = refusing_h2_server().await;
    let mut d = destination("default", "web", 80, &[(refusing, &[]), (good.addr, &[])]);
    d.policy_spec = Some(proto::Policy {
        retries: Some(retries(1, &[proto::RetryOn::ServerError])),
        load_balancer: round_robin(),
        ..Default::default()
    });
    cp.publish(WEB, d);
    let proxy = RunningProxy::start(settings(&cp.url(), good.addr))
        .await
        .ready()
        .await;
    let mut conn = Conn::http2(proxy.outbound).await;
    for _ in 0..10 {
        let mut post = request("web", "/orders");
        *post.method_mut() = http::Method::POST;
        let reply = conn.send(post).await.unwrap();
        // Nothing reached the refusing server: sent again, to the other one.
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(good.hits(), 10);
}

#[tokio::test]
async fn grpc_server_errors_eject_the_endpoint_though_http_says_200() {
    let policy = proto::Policy {
        outlier_detection: outlier(60_000),
        load_balancer: round_robin(),
        ..Default::default()
    };
    let m = mesh(&[("stable", 3)], policy, vec![]).await;
    m.backends[0].set(Behaviour::GrpcStatus(13));
    let mut conn = Conn::http2(m.proxy.outbound).await;
    for _ in 0..12 {
        conn.send(grpc_call()).await.unwrap();
    }
    let states = endpoint_states(m.proxy.admin).await;
    assert!(
        states.contains(&(m.backends[0].addr.to_string(), "ejected".into())),
        "{states:?}"
    );
}

fn grpc_call() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut call = request("web", "/pkg.Service/Method");
    *call.method_mut() = http::Method::POST;
    call.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    call.headers_mut().insert("te", "trailers".parse().unwrap());
    call
}

#[tokio::test]
async fn grpc_is_retried_on_unavailable_and_classified_by_grpc_status() {
    let policy = proto::Policy {
        retries: Some(proto::RetryPolicy {
            retry_non_idempotent: true,
            ..retries(1, &[proto::RetryOn::ServerError])
        }),
        load_balancer: round_robin(),
        ..Default::default()
    };
    let m = mesh(&[("stable", 2)], policy, vec![]).await;
    let mut conn = Conn::http2(m.proxy.outbound).await;
    m.backends[0].set(Behaviour::GrpcStatus(14));
    m.backends[1].set(Behaviour::GrpcStatus(0));
    for _ in 0..6 {
        let reply = conn.send(grpc_call()).await.unwrap();
        assert_eq!(
            reply.header("grpc-status"),
            "0",
            "UNAVAILABLE was retried on the other endpoint"
        );
    }
    // INTERNAL is not retried, and counts as a failure though the HTTP status is 200.
    m.backends[0].set(Behaviour::GrpcStatus(13));
    m.backends[1].set(Behaviour::GrpcStatus(13));
    let before = m.backends[0].hits() + m.backends[1].hits();
    let reply = conn.send(grpc_call()).await.unwrap();
    assert_eq!(reply.header("grpc-status"), "13");
    assert_eq!(m.backends[0].hits() + m.backends[1].hits() - before, 1);
    let failed = r#"outrigger_requests_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route="",tls="false",client_id="",server_id="",status_code="200",classification="failure"}"#;
    assert_eq!(metric(m.proxy.admin, failed).await, 1.0);
}
