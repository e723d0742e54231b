//! Load balancing through a real proxy: each algorithm's distribution, and endpoint churn under
//! load without a failed request.

mod support;

use std::time::Duration;

use outrigger_api::proto;
use outrigger_tests::{Backend, Behaviour, Configuration, ControlPlane, ProxyEvent, destination};
use support::*;

const WEB: &str = "web.default.svc.cluster.local:80";

fn with_algorithm(
    mut d: Configuration,
    algorithm: proto::Algorithm,
    hash_header: &str,
) -> Configuration {
    d.policy_spec = Some(proto::Policy {
        load_balancer: Some(proto::LoadBalancer {
            algorithm: algorithm as i32,
            hash_header: hash_header.into(),
        }),
        ..Default::default()
    });
    d
}

async fn three_backends() -> Vec<Backend> {
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        backends.push(Backend::start(name).await);
    }
    backends
}

async fn proxy_for(
    algorithm: proto::Algorithm,
    hash_header: &str,
    backends: &[Backend],
) -> (ControlPlane, RunningProxy) {
    let cp = ControlPlane::start().await;
    let endpoints: Vec<_> = backends.iter().map(|b| (b.addr, &[][..])).collect();
    cp.publish(
        WEB,
        with_algorithm(
            destination("default", "web", 80, &endpoints),
            algorithm,
            hash_header,
        ),
    );
    let proxy = RunningProxy::start(settings(&cp.url(), backends[0].addr))
        .await
        .ready()
        .await;
    (cp, proxy)
}

#[tokio::test]
async fn round_robin_and_random_spread_evenly() {
    for (algorithm, tolerance) in [
        (proto::Algorithm::RoundRobin, 0),
        (proto::Algorithm::Random, 40),
    ] {
        let backends = three_backends().await;
        let (_cp, proxy) = proxy_for(algorithm, "", &backends).await;
        let mut conn = Conn::http1(proxy.outbound).await;
        for _ in 0..300 {
            assert_eq!(conn.get("web", "/").await.status, 200);
        }
        for backend in &backends {
            let hits = backend.hits() as i64;
            assert!(
                (hits - 100).abs() <= tolerance,
                "{algorithm:?}: {} got {hits}",
                backend.name()
            );
        }
    }
}

#[tokio::test]
async fn load_aware_algorithms_send_less_to_a_slow_endpoint() {
    for algorithm in [proto::Algorithm::PeakEwma, proto::Algorithm::LeastRequest] {
        let backends = three_backends().await;
        backends[0].set(Behaviour::Delay(Duration::from_millis(100)));
        let (_cp, proxy) = proxy_for(algorithm, "", &backends).await;
        let conn = Conn::http2(proxy.outbound).await;
        // 10 concurrent callers, 30 requests each.
        let callers = (0..10).map(|_| {
            let mut conn = conn.share();
            async move {
                for _ in 0..30 {
                    assert_eq!(conn.get("web", "/").await.status, 200);
                }
            }
        });
        futures_util::future::join_all(callers).await;
        let slow = backends[0].hits();
        let fast = backends[1].hits() + backends[2].hits();
        assert_eq!(slow + fast, 300);
        // An even spread would give the slow one 100.
        assert!(slow < 40, "{algorithm:?}: slow endpoint got {slow} of 300");
    }
}

#[tokio::test]
async fn the_default_balancer_spreads_over_equal_endpoints_and_shuns_a_dead_one() {
    // No policy: PeakEwma. Three equal endpoints and one whose port refuses connections. Under
    // light load a strict order by latency would give the one that looked fastest two thirds and
    // the one that looked slowest next to nothing.
    let backends = three_backends().await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let cp = ControlPlane::start().await;
    let endpoints = [
        (backends[0].addr, &[][..]),
        (backends[1].addr, &[]),
        (backends[2].addr, &[]),
        (dead, &[]),
    ];
    cp.publish(WEB, destination("default", "web", 80, &endpoints));
    let proxy = RunningProxy::start(settings(&cp.url(), backends[0].addr))
        .await
        .ready()
        .await;
    let mut conn = Conn::http1(proxy.outbound).await;
    for _ in 0..300 {
        // A refused connection is retried once elsewhere: the app sees no failure.
        assert_eq!(conn.get("web", "/").await.status, 200);
    }
    // Each first attempt at the dead endpoint is one connect-failure retry; after its first
    // failure it is shunned for as long as the test runs.
    let retried = metric_if_present(
        proxy.admin,
        r#"outrigger_retries_total{direction="outbound",dst_namespace="default",dst_service="web",dst_subset="",route="",reason="connect-failure"}"#,
    )
    .await
    // Absent: no attempt went there at all.
    .unwrap_or(0.0);
    assert!(
        retried <= 5.0,
        "{retried} first attempts went to the dead endpoint"
    );
    // A third each is even; under a tenth is what a strict order does.
    let hits: Vec<u64> = backends.iter().map(Backend::hits).collect();
    assert!(hits.iter().all(|&h| h >= 30), "of 300: {hits:?}");
}

#[tokio::test]
async fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let backends = three_backends().await;
    let (_cp, proxy) = proxy_for(proto::Algorithm::ConsistentHash, "x-user", &backends).await;
    let mut conn = Conn::http1(proxy.outbound).await;
    let mut owners = std::collections::HashSet::new();
    for user in 0..30 {
        let mut bodies = std::collections::HashSet::new();
        for _ in 0..5 {
            let mut request = request("web", "/");
            request
                .headers_mut()
                .insert("x-user", user.to_string().parse().unwrap());
            bodies.insert(conn.send(request).await.unwrap().body);
        }
        assert_eq!(bodies.len(), 1, "user {user} was spread over {bodies:?}");
        owners.extend(bodies);
    }
    assert_eq!(owners.len(), 3, "30 keys should land on every endpoint");
}

#[tokio::test]
async fn endpoint_and_policy_churn_under_load_fails_no_request() {
    let mut cp = ControlPlane::start().await;
    let mut backends = Vec::new();
    for i in 0..6 {
        backends.push(Backend::start(&format!("b{i}")).await);
        // Slow enough that requests are in flight on an endpoint while it is removed.
        backends[i].set(Behaviour::Delay(Duration::from_millis(5)));
    }
    let set = |range: std::ops::Range<usize>| {
        let endpoints: Vec<_> = backends[range].iter().map(|b| (b.addr, &[][..])).collect();
        destination("default", "web", 80, &endpoints)
    };
    cp.publish(WEB, set(0..3));
    let proxy = RunningProxy::start(settings(&cp.url(), backends[0].addr))
        .await
        .ready()
        .await;

    let outbound = proxy.outbound;
    let load = tokio::spawn(async move {
        let conn = Conn::http2(outbound).await;
        let mut keep_alive = Conn::http1(outbound).await;
        let mut failures = Vec::new();
        for _ in 0..60 {
            let batch = (0..8).map(|_| {
                let mut conn = conn.share();
                async move { conn.get("web", "/").await }
            });
            for reply in futures_util::future::join_all(batch).await {
                if reply.status != 200 {
                    failures.push(reply);
                }
            }
            let reply = keep_alive.get("web", "/").await;
            if reply.status != 200 {
                failures.push(reply);
            }
        }
        failures
    });
    // Move the whole set over, one endpoint at a time, while the load runs, changing the policy
    // as well; removed backends stay up, as a terminating pod does.
    let algorithms = [
        proto::Algorithm::RoundRobin,
        proto::Algorithm::LeastRequest,
        proto::Algorithm::Random,
        proto::Algorithm::PeakEwma,
        proto::Algorithm::RoundRobin,
    ];
    for (step, algorithm) in [1..4, 2..5, 3..6, 0..6, 4..6].into_iter().zip(algorithms) {
        let mut next = with_algorithm(set(step), algorithm, "");
        next.policy_spec.as_mut().unwrap().timeout_ms = Some(5_000);
        let version = cp.publish(WEB, next);
        cp.next_event(|e| {
            matches!(e, ProxyEvent::Acked { version: ref v, .. } if *v == version).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let failures = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
    let total: u64 = backends.iter().map(Backend::hits).sum();
    assert_eq!(total, 60 * 9);
    assert!(
        backends[5].hits() > 0,
        "the last endpoint added never got traffic"
    );
}
