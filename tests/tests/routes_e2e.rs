//! Gateway API routes end to end in manifests mode: a controller serving a directory of YAML
//! files (Services, EndpointSlices, HTTPRoutes, a DestinationPolicy), real proxies of two
//! namespaces, and two versions of a backend, all on loopback. The routes of the Service `echo`
//! split its calls by weight, match paths, change headers, redirect and rewrite; a consumer route
//! serves its own namespace's calls alone; the DestinationPolicy of a backend Service still
//! applies to what a route sends it. Every wait is a bounded poll.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use outrigger_tests::Backend;
use outrigger_tests::e2e::{Answer, RunningController, RunningProxy, eventually, request};

/// The Services: `echo` (port 80) reaches both versions, `echo-v1` and `echo-v2` (port 8080) one
/// each.
fn services(v1: SocketAddr, v2: SocketAddr) -> String {
    let service = |name: &str, ip: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: {port}}}]}}\n---\n"
        )
    };
    let slice = |service: &str, version: &str, addr: SocketAddr| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {service}-{version}, namespace: shop, \
             labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}}}]\n\
             endpoints: [{{addresses: [{ip}], conditions: {{ready: true}}, \
             targetRef: {{kind: Pod, name: echo-{version}, namespace: shop}}}}]\n---\n",
            port = addr.port(),
            ip = addr.ip(),
        )
    };
    [
        service("echo", "10.96.2.1", 80),
        service("echo-v1", "10.96.2.2", 8080),
        service("echo-v2", "10.96.2.3", 8080),
        slice("echo", "v1", v1),
        slice("echo", "v2", v2),
        slice("echo-v1", "v1", v1),
        slice("echo-v2", "v2", v2),
    ]
    .concat()
}

const PRODUCER_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: Exact, value: /v2}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: X-Test-Added, value: by-route}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Header-Set, value: producer}]}
    backendRefs: [{name: echo-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.org, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /faulty}}]
    backendRefs: [{name: echo-v2, port: 8080}]
  - backendRefs:
    - {name: echo-v1, port: 8080, weight: 70}
    - {name: echo-v2, port: 8080, weight: 30}
    # No such Service: with weight 0 it is never chosen, and breaks nothing.
    - {name: echo-v3, port: 8080, weight: 0}
";

/// From the namespace `frontend`, for its own calls to `echo.shop`.
const CONSUMER_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: frontend}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, namespace: shop}]
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Header-Set, value: consumer}]}
    backendRefs: [{name: echo-v1, namespace: shop, port: 8080}]
";

/// On the backend `echo-v2`: every call refused with 418.
const BACKEND_POLICY: &str = "\
apiVersion: outrigger.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: echo-v2, namespace: shop}
spec:
  host: echo-v2
  faultInjection:
    abort: {percent: 100, httpStatus: 418}
";

fn write(path: &Path, content: &str) {
    let staged = path.with_extension("tmp");
    std::fs::File::create(&staged)
        .and_then(|mut f| f.write_all(content.as_bytes()))
        .unwrap();
    std::fs::rename(&staged, path).unwrap();
}

async fn call(proxy: &RunningProxy, host: &str, path: &str) -> Answer {
    request(proxy.outbound, host, path, &[])
        .await
        .unwrap_or_else(|| panic!("no answer from {host}{path}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_split_match_filter_redirect_and_rewrite_and_backend_policies_still_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (
        Backend::start("echo-v1").await,
        Backend::start("echo-v2").await,
    );
    write(
        &dir.path().join("services.yaml"),
        &services(v1.addr, v2.addr),
    );
    let controller = RunningController::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let grpc = controller.grpc;
    let shop = RunningProxy::start(grpc, "shop", "client").await;
    let frontend = RunningProxy::start(grpc, "frontend", "web").await;

    // Without a route, `echo` balances over both versions.
    eventually("echo answers from both versions", || async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.insert(call(&shop, "echo", "/").await.body);
        }
        seen.len() == 2
    })
    .await;

    write(&dir.path().join("route.yaml"), PRODUCER_ROUTE);
    eventually("the route's exact path match goes to v2", || async {
        let answer = call(&shop, "echo", "/v2").await;
        answer.body == "echo-v2" && answer.header("x-header-set") == "producer"
    })
    .await;
    let answer = call(&shop, "echo", "/v2").await;
    assert_eq!(answer.header("x-seen-added"), "by-route", "{answer:?}");

    let hits = v1.hits() + v2.hits();
    let redirect = call(&shop, "echo", "/redirect/here?x=1").await;
    assert_eq!(redirect.status, 301, "{redirect:?}");
    assert_eq!(
        redirect.header("location"),
        "http://example.org/redirect/here?x=1"
    );
    assert_eq!(v1.hits() + v2.hits(), hits, "answered by the proxy alone");

    let rewritten = call(&shop, "echo", "/old/thing").await;
    assert_eq!(
        (rewritten.body.as_str(), rewritten.header("x-seen-path")),
        ("echo-v1", "/new/thing")
    );

    // 70/30 per request, and the missing weight-0 backend never chosen.
    let mut v1_share = 0;
    for _ in 0..200 {
        let answer = call(&shop, "echo", "/").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        if answer.body == "echo-v1" {
            v1_share += 1;
        }
    }
    assert!(
        (110..=170).contains(&v1_share),
        "{v1_share} of 200 went to echo-v1"
    );

    // The consumer route serves its own namespace, in place of the producer routes.
    write(&dir.path().join("consumer.yaml"), CONSUMER_ROUTE);
    eventually("frontend's calls take its own route", || async {
        let answer = call(&frontend, "echo.shop", "/v2").await;
        answer.body == "echo-v1" && answer.header("x-header-set") == "consumer"
    })
    .await;
    let answer = call(&shop, "echo", "/v2").await;
    assert_eq!(
        (answer.body.as_str(), answer.header("x-header-set")),
        ("echo-v2", "producer"),
        "the producer namespace keeps the producer routes"
    );

    // The backend's DestinationPolicy applies to what a route sends it.
    assert_eq!(call(&shop, "echo", "/faulty").await.status, 200);
    write(&dir.path().join("policy.yaml"), BACKEND_POLICY);
    eventually("echo-v2's policy answers /faulty", || async {
        call(&shop, "echo", "/faulty").await.status == 418
    })
    .await;

    // Deleting the route: `echo` balances over both versions again.
    std::fs::remove_file(dir.path().join("route.yaml")).unwrap();
    eventually("without the route, /v2 reaches both versions", || async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let answer = call(&shop, "echo", "/v2").await;
            if answer.header("x-header-set") == "producer" {
                return false;
            }
            seen.insert(answer.body);
        }
        seen.len() == 2
    })
    .await;

    shop.stop().await;
    frontend.stop().await;
    controller.stop().await;
}
