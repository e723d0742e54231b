//! The control plane end to end in manifests mode: a controller serving a directory of YAML files,
//! two real proxies, and two versions of a backend, all on loopback. Every wait is a bounded poll.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use outrigger_tests::Backend;
use outrigger_tests::e2e::{RunningController, RunningProxy, eventually};

/// How the proxies' clients call the `reviews` Service.
const REVIEWS: &str = "reviews:9080";

/// Logs of every test in this binary, for the assertions about what the controller reported.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Captured;

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(bytes);
        std::io::stderr().write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing_subscriber::fmt()
            .with_writer(|| Captured)
            .with_ansi(false)
            .with_env_filter("info")
            .init();
    });
}

fn logged(needle: &str) -> bool {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).contains(needle)
}

/// The `reviews` Service of namespace `shop`: pod reviews-v1 (version v1) and pod reviews-v2
/// (version v2), each behind its own loopback backend.
fn service_manifests(v1: SocketAddr, v2: SocketAddr, with_service: bool) -> String {
    let service = "\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 9080}]
---
";
    let slice = |version: &str, addr: SocketAddr| {
        format!(
            "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-{version}
  namespace: shop
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
- addresses: [{ip}]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: reviews-{version}, namespace: shop}}
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-{version}
  namespace: shop
  labels: {{app: reviews, version: {version}}}
---
",
            port = addr.port(),
            ip = addr.ip(),
        )
    };
    let service = if with_service { service } else { "" };
    format!("{service}{}{}", slice("v1", v1), slice("v2", v2))
}

/// A policy sending `v1_weight` to the v1 pods and `v2_weight` to the v2 pods.
fn policy_manifest(v1_weight: u32, v2_weight: u32) -> String {
    format!(
        "\
apiVersion: outrigger.dev/v1alpha1
kind: DestinationPolicy
metadata: {{name: reviews, namespace: shop}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  trafficSplit:
  - {{subset: v1, weight: {v1_weight}}}
  - {{subset: v2, weight: {v2_weight}}}
  timeout: 5s
"
    )
}

/// A controller on a manifests directory, two proxies, and the two versions of `reviews`.
struct Mesh {
    dir: tempfile::TempDir,
    v1: Backend,
    v2: Backend,
    controller: RunningController,
    proxies: Vec<RunningProxy>,
}

impl Mesh {
    /// Starts with every call going to v1.
    async fn start() -> Self {
        capture_logs();
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
        write(
            &dir.path().join("reviews.yaml"),
            &service_manifests(v1.addr, v2.addr, true),
        );
        write(&dir.path().join("policy.yaml"), &policy_manifest(100, 0));
        let controller = RunningController::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
        let proxies = vec![
            RunningProxy::start(controller.grpc, "shop", "client-a").await,
            RunningProxy::start(controller.grpc, "shop", "client-b").await,
        ];
        let mesh = Self {
            dir,
            v1,
            v2,
            controller,
            proxies,
        };
        mesh.until_every_proxy_serves_from("v1").await;
        mesh
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn until_every_proxy_serves_from(&self, backend: &str) {
        for (i, proxy) in self.proxies.iter().enumerate() {
            eventually(&format!("proxy {i} sends every call to {backend}"), || {
                proxy.all_served_by(REVIEWS, backend, 10)
            })
            .await;
        }
    }

    async fn stop(self) {
        for proxy in self.proxies {
            proxy.stop().await;
        }
        self.controller.stop().await;
    }
}

/// Replaces a file whole, as an editor saving it would.
fn write(path: &Path, content: &str) {
    let staged = path.with_extension("tmp");
    std::fs::File::create(&staged)
        .and_then(|mut f| f.write_all(content.as_bytes()))
        .unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edit_reaches_every_proxy() {
    let mesh = Mesh::start().await;
    assert_eq!(mesh.v2.hits(), 0);
    write(&mesh.file("policy.yaml"), &policy_manifest(0, 100));
    mesh.until_every_proxy_serves_from("v2").await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_service_becomes_unknown() {
    let mesh = Mesh::start().await;
    write(
        &mesh.file("reviews.yaml"),
        &service_manifests(mesh.v1.addr, mesh.v2.addr, false),
    );
    for proxy in &mesh.proxies {
        eventually("calls to the deleted Service get 503", || async {
            matches!(proxy.call(REVIEWS).await, Some((503, body)) if body.contains("reviews"))
        })
        .await;
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_an_error_keeps_its_last_good_state_and_is_reported() {
    let mesh = Mesh::start().await;
    let broken = policy_manifest(0, 100).replace("timeout: 5s", "timeout: 5 seconds");
    write(&mesh.file("policy.yaml"), &broken);
    eventually("the controller reports the file", || async {
        mesh.controller.reconcile_errors().await >= 1.0
    })
    .await;
    // Where the broken value is: line 12, column 12, reported with the file's path.
    let place = format!("{}:12:12:", mesh.file("policy.yaml").display());
    assert!(logged(&place), "no log names {place}");
    for proxy in &mesh.proxies {
        assert!(
            proxy.all_served_by(REVIEWS, "v1", 10).await,
            "the last good split stays"
        );
    }

    // Fixed, it applies.
    write(&mesh.file("policy.yaml"), &policy_manifest(0, 100));
    mesh.until_every_proxy_serves_from("v2").await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_without_the_controller_and_resync_when_it_is_back() {
    let Mesh {
        dir,
        v1,
        v2,
        controller,
        proxies,
    } = Mesh::start().await;
    let grpc = controller.grpc;
    controller.stop().await;
    for proxy in &proxies {
        assert!(
            proxy.all_served_by(REVIEWS, "v1", 20).await,
            "the last config stays"
        );
    }

    // Edited while the controller is down; seen once it is back on the same address.
    write(&dir.path().join("policy.yaml"), &policy_manifest(0, 100));
    let controller = RunningController::start(dir.path(), grpc).await;
    let mesh = Mesh {
        dir,
        v1,
        v2,
        controller,
        proxies,
    };
    mesh.until_every_proxy_serves_from("v2").await;
    mesh.stop().await;
}
