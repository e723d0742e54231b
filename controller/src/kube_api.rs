//! The Kubernetes API clients the source, leader election and status share: how they are built
//! (with read timeouts), deadlines on calls, and API errors as people read them.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// What the controller asks of the API server, in two kinds: watches, which stay open for minutes
/// (the watcher ends each after 290 s, and reconnects one that has been silent a little longer),
/// and calls (reads and writes of one object), which answer at once. Each kind has its own
/// client, so that a read timeout fit for calls does not cut watches.
#[derive(Clone)]
pub struct Clients {
    pub watch: Client,
    pub call: Client,
}

/// No byte for this long on a watch is a dead connection (the watcher's own idle timeout is
/// 295 s; this catches a list that hangs as well).
const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(300);
/// No byte for this long on a call is a dead connection. Leader election and status put tighter
/// deadlines on their calls; this bounds any other.
const CALL_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Clients for the API server of `--kubeconfig`, else the one inferred as kubectl would (the
/// KUBECONFIG variable or ~/.kube/config), else the cluster this runs in.
pub async fn clients(kubeconfig: Option<&Path>) -> anyhow::Result<Clients> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading the kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "finding the Kubernetes API: not in a cluster and no kubeconfig \
             (give --kubeconfig PATH, or --manifests DIR to run without a cluster)",
        )?,
    };
    let client = |config: Config, read_timeout: Duration| {
        Client::try_from(with_read_timeout(config, read_timeout))
            .context("creating the Kubernetes client")
    };
    Ok(Clients {
        watch: client(config.clone(), WATCH_READ_TIMEOUT)?,
        call: client(config, CALL_READ_TIMEOUT)?,
    })
}

/// `config` whose responses fail after `timeout` without a byte, counted from when the request
/// was sent (not from when its pooled connection went idle).
fn with_read_timeout(mut config: Config, timeout: Duration) -> Config {
    config.read_timeout = Some(timeout);
    config.reset_reader_on_write = true;
    config
}

/// `call`, failed as if the server had failed it when it has not answered within `deadline`.
pub async fn within<T>(
    deadline: Duration,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    tokio::time::timeout(deadline, call)
        .await
        .unwrap_or_else(|_| Err(kube::Error::Service(Box::new(NoAnswer(deadline)))))
}

/// A call that did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}")]
struct NoAnswer(Duration);

/// An API error as people read it: the server's message (which names the resource and, when
/// forbidden, the user and verb) rather than the client's debug dump.
pub fn explain(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.is_forbidden() => format!(
            "{} (the controller's RBAC lacks a permission the Outrigger chart grants)",
            status.message
        ),
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => {
            let mut message = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            message
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! An API server in the test's process, answering as the test says: no sockets, so paused
    //! time runs every deadline at once.

    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use kube::Client;

    /// A request as the fake sees it: method, path and query, body.
    pub(crate) struct Call {
        pub(crate) method: http::Method,
        pub(crate) path: String,
        pub(crate) body: Bytes,
    }

    pub(crate) type Answer = Pin<Box<dyn Future<Output = http::Response<Full<Bytes>>> + Send>>;

    /// A client whose every request `answer` answers.
    pub(crate) fn client(answer: impl Fn(Call) -> Answer + Send + Sync + 'static) -> Client {
        let answer = Arc::new(answer);
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let answer = answer.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await?.to_bytes();
                let call = Call {
                    method: parts.method,
                    path: parts
                        .uri
                        .path_and_query()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    body,
                };
                Ok::<_, kube::Error>(answer(call).await)
            }
        });
        Client::new(service, "default")
    }

    /// A JSON response.
    pub(crate) fn json(status: u16, body: &serde_json::Value) -> http::Response<Full<Bytes>> {
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a valid response")
    }

    /// The API server's error response.
    pub(crate) fn status(code: u16, reason: &str) -> http::Response<Full<Bytes>> {
        json(
            code,
            &serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": reason, "reason": reason, "code": code,
            }),
        )
    }

    /// How long the fake takes to answer an update.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Delay {
        Now,
        After(std::time::Duration),
        Never,
    }

    /// Leases of one namespace as the API server keeps them: a resourceVersion per write, and
    /// an update that names an older one refused as a conflict.
    pub(crate) struct Leases {
        namespace: String,
        /// The last resourceVersion, and each Lease by name.
        stored: std::sync::Mutex<(u64, std::collections::HashMap<String, serde_json::Value>)>,
        updates: std::sync::Mutex<Updates>,
    }

    /// Says, for each update in turn (by Lease name), how long it takes.
    type Updates = Box<dyn FnMut(&str) -> Delay + Send>;

    impl Leases {
        /// A Lease as stored.
        pub(crate) fn get(&self, name: &str) -> Option<serde_json::Value> {
            self.stored.lock().unwrap().1.get(name).cloned()
        }

        /// Stores a Lease as another writer would; returns it as stored.
        pub(crate) fn put(&self, name: &str, mut lease: serde_json::Value) -> serde_json::Value {
            let mut stored = self.stored.lock().unwrap();
            stored.0 += 1;
            lease["metadata"]["name"] = serde_json::json!(name);
            lease["metadata"]["resourceVersion"] = serde_json::json!(stored.0.to_string());
            stored.1.insert(name.to_string(), lease.clone());
            lease
        }

        fn answer(&self, call: &Call) -> (Delay, http::Response<Full<Bytes>>) {
            let prefix = format!(
                "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
                self.namespace
            );
            let path = call.path.split('?').next().unwrap_or_default();
            let Some(rest) = path.strip_prefix(&prefix) else {
                panic!("unexpected call {} {}", call.method, call.path)
            };
            let name = rest.trim_start_matches('/');
            let body = || serde_json::from_slice::<serde_json::Value>(&call.body).unwrap();
            match call.method.as_str() {
                "GET" => match self.get(name) {
                    Some(lease) => (Delay::Now, json(200, &lease)),
                    None => (Delay::Now, status(404, "NotFound")),
                },
                "POST" => {
                    let lease = body();
                    let name = lease["metadata"]["name"].as_str().unwrap().to_string();
                    if self.get(&name).is_some() {
                        return (Delay::Now, status(409, "AlreadyExists"));
                    }
                    (Delay::Now, json(201, &self.put(&name, lease)))
                }
                "PUT" => {
                    let delay = (self.updates.lock().unwrap())(name);
                    let lease = body();
                    let current = self
                        .get(name)
                        .map(|l| l["metadata"]["resourceVersion"].clone());
                    if current.as_ref() != Some(&lease["metadata"]["resourceVersion"]) {
                        return (delay, status(409, "Conflict"));
                    }
                    (delay, json(200, &self.put(name, lease)))
                }
                other => panic!("unexpected {other} {}", call.path),
            }
        }
    }

    /// A client of the Leases of `namespace`, each update taking what `updates` says.
    pub(crate) fn leases(
        namespace: &str,
        updates: impl FnMut(&str) -> Delay + Send + 'static,
    ) -> (Client, Arc<Leases>) {
        let leases = Arc::new(Leases {
            namespace: namespace.to_string(),
            stored: Default::default(),
            updates: std::sync::Mutex::new(Box::new(updates)),
        });
        let served = leases.clone();
        let client = client(move |call| {
            let (delay, answer) = served.answer(&call);
            Box::pin(async move {
                match delay {
                    Delay::Now => {}
                    Delay::After(delay) => tokio::time::sleep(delay).await,
                    Delay::Never => std::future::pending::<()>().await,
                }
                answer
            })
        });
        (client, leases)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::Api;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_the_server_never_answers_fails_after_the_read_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // Reads the request, never answers.
        tokio::spawn(async move {
            let (mut connection, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut connection, &mut request).await;
        });
        let config = with_read_timeout(Config::new(url.parse().unwrap()), CALL_READ_TIMEOUT);
        let client = Client::try_from(config).unwrap();
        let started = tokio::time::Instant::now();
        let leases = Api::<Lease>::namespaced(client, "x");
        let answer = tokio::time::timeout(Duration::from_secs(3600), leases.get("y")).await;
        assert!(matches!(answer, Ok(Err(_))), "failed, not hung: {answer:?}");
        assert!(started.elapsed() >= CALL_READ_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_fails_saying_so() {
        let started = tokio::time::Instant::now();
        let never = std::future::pending::<Result<(), kube::Error>>();
        let error = within(Duration::from_secs(5), never).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(
            explain(&error).contains("no answer within 5s"),
            "{}",
            explain(&error)
        );
    }
}
