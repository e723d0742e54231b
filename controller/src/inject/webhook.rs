//! The admission webhook server: HTTPS (the API server calls webhooks over TLS only), answering
//! AdmissionReviews for pods with the patch from `inject`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::ServingTls;
use crate::inject::patch::{ControlPlaneTrust, InjectorConfig, MTLS_ANNOTATION, OptIn, patch};
use crate::listen;

#[derive(clap::Args, Clone, Debug)]
pub struct WebhookSettings {
    /// Where the sidecar-injection webhook listens; it is off unless a certificate is given.
    #[arg(long, env = "OUTRIGGER_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: std::net::SocketAddr,
    /// PEM certificate chain of the webhook (the API server checks it against the webhook
    /// configuration's caBundle).
    #[arg(long, env = "OUTRIGGER_WEBHOOK_CERT", requires_all = ["webhook_key", "injector_config"])]
    pub webhook_cert: Option<PathBuf>,
    #[arg(long, env = "OUTRIGGER_WEBHOOK_KEY", requires = "webhook_cert")]
    pub webhook_key: Option<PathBuf>,
    /// YAML describing the injected containers (images, control plane URL, resources).
    #[arg(long, env = "OUTRIGGER_INJECTOR_CONFIG", requires = "webhook_cert")]
    pub injector_config: Option<PathBuf>,
}

/// The webhook off.
impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            webhook_addr: ([0, 0, 0, 0], 9443).into(),
            webhook_cert: None,
            webhook_key: None,
            injector_config: None,
        }
    }
}

/// Called for pods in namespaces labelled `outrigger.dev/inject=enabled`.
pub const INJECT_NAMESPACED_PATH: &str = "/inject";
/// Called for pods elsewhere labelled `outrigger.dev/inject: enabled`.
pub const INJECT_POD_PATH: &str = "/inject-pod";

/// Reviews larger than this are refused: a pod spec is far smaller.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// The API server calls with a few connections at a time; more is someone else.
const MAX_CONNECTIONS: usize = 256;
/// The API server sends a review whole; it gives up on the webhook after at most 30 s anyway.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server answers a read of one namespace at once.
const NAMESPACE_READ_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Webhook {
    listener: TcpListener,
    tls: Arc<ServingCertificate>,
    injector: Arc<Injector>,
}

/// What the webhook injects: the configured containers and, with identity, the controller's
/// trust (read for each pod: the trust anchors change in a rotation).
struct Injector {
    config: InjectorConfig,
    control_plane: Option<Arc<ServingTls>>,
    /// Where a pod's namespace says whether its pods are strict; without the Kubernetes API
    /// (the manifests source), only pods do.
    namespaces: Option<Api<Namespace>>,
}

impl Injector {
    /// The `outrigger.dev/mtls` annotation of the pod's namespace, when the pod has none of its
    /// own; an error when the namespace cannot be read, for the pod is not admitted without the
    /// setting it may be under.
    async fn namespace_mtls(
        &self,
        request: &AdmissionRequest<Pod>,
    ) -> Result<Option<String>, String> {
        let own = request
            .object
            .as_ref()
            .and_then(|pod| pod.metadata.annotations.as_ref())
            .is_some_and(|annotations| annotations.contains_key(MTLS_ANNOTATION));
        let (Some(namespaces), Some(namespace), false) =
            (&self.namespaces, request.namespace.as_deref(), own)
        else {
            return Ok(None);
        };
        let read = tokio::time::timeout(NAMESPACE_READ_TIMEOUT, namespaces.get_metadata(namespace));
        match read.await {
            Ok(Ok(meta)) => Ok(meta
                .metadata
                .annotations
                .and_then(|mut annotations| annotations.remove(MTLS_ANNOTATION))),
            Ok(Err(error)) => Err(format!(
                "reading namespace {namespace} for its {MTLS_ANNOTATION} annotation: {}",
                crate::kube_api::explain(&error)
            )),
            Err(_) => Err(format!(
                "reading namespace {namespace} for its {MTLS_ANNOTATION} annotation took over \
                 {NAMESPACE_READ_TIMEOUT:?}"
            )),
        }
    }

    fn trust(&self) -> Option<ControlPlaneTrust> {
        self.control_plane.as_ref().map(|tls| ControlPlaneTrust {
            identity: tls.id().clone(),
            trust_anchors_pem: tls.trust_anchors_pem(),
        })
    }
}

/// The webhook's certificate and key, read again for each connection and taken when they changed:
/// the kubelet updates a mounted Secret in place, so a renewed certificate needs no restart (and
/// the chart need not restart the controller for one). Files that cannot be read or do not make a
/// TLS identity leave the last good one serving.
struct ServingCertificate {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Loaded>,
}

struct Loaded {
    pem: (Vec<u8>, Vec<u8>),
    acceptor: TlsAcceptor,
}

impl ServingCertificate {
    fn load(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let pem = Self::read(cert, key)?;
        let acceptor = acceptor(&pem)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Mutex::new(Loaded { pem, acceptor }),
        })
    }

    fn read(cert: &Path, key: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("reading the webhook {what} {}", path.display()))
        };
        Ok((read(cert, "certificate")?, read(key, "key")?))
    }

    fn acceptor(&self) -> TlsAcceptor {
        let mut current = self.current.lock().expect("not poisoned");
        let reloaded = Self::read(&self.cert, &self.key).and_then(|pem| {
            if pem != current.pem {
                current.acceptor = acceptor(&pem)?;
                current.pem = pem;
                tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
            }
            Ok(())
        });
        if let Err(error) = reloaded {
            tracing::warn!(
                error = format!("{error:#}"),
                "keeping the webhook certificate"
            );
        }
        current.acceptor.clone()
    }
}

fn acceptor((cert, key): &(Vec<u8>, Vec<u8>)) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .context("reading the webhook certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key).context("reading the webhook key")?;
    let tls = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the webhook certificate and key do not make a TLS identity")?;
    Ok(TlsAcceptor::from(Arc::new(tls)))
}

impl Webhook {
    /// Binds the webhook when the settings enable it. Proxies injected with identity trust
    /// `control_plane`, which identity in the injector config needs; `client`, when given, reads
    /// namespaces' settings.
    pub async fn bind(
        settings: &WebhookSettings,
        control_plane: Option<Arc<ServingTls>>,
        client: Option<kube::Client>,
    ) -> anyhow::Result<Option<Self>> {
        let (Some(cert), Some(key), Some(config)) = (
            &settings.webhook_cert,
            &settings.webhook_key,
            &settings.injector_config,
        ) else {
            return Ok(None);
        };
        let tls = ServingCertificate::load(cert, key)?;
        let injector = std::fs::read_to_string(config)
            .with_context(|| format!("reading {}", config.display()))?;
        let injector: InjectorConfig = serde_norway::from_str(&injector)
            .with_context(|| format!("reading the injector config {}", config.display()))?;
        if injector.identity.is_some() && control_plane.is_none() {
            anyhow::bail!(
                "the injector config gives proxies identity, which needs the controller's \
                 (--identity-dir)"
            );
        }
        let listener = TcpListener::bind(settings.webhook_addr)
            .await
            .with_context(|| {
                format!("binding the webhook listener on {}", settings.webhook_addr)
            })?;
        Ok(Some(Self {
            listener,
            tls: Arc::new(tls),
            injector: Arc::new(Injector {
                config: injector,
                control_plane,
                namespaces: client.map(Api::all),
            }),
        }))
    }

    /// Serves reviews until `shutdown`; then takes no new connection and closes each open one once
    /// its review is answered. The API server keeps webhook connections alive: left open, they
    /// would bring this stopping replica (and the injector settings it started with) every review
    /// while its configuration streams drain, instead of the Service's other replicas.
    pub async fn serve(self, shutdown: watch::Receiver<bool>) {
        let (tls, injector) = (self.tls, self.injector);
        let connections = listen::serve(
            self.listener,
            "webhook",
            MAX_CONNECTIONS,
            listen::stopping(shutdown.clone()),
            |stream, peer| {
                let stop = listen::stopping(shutdown.clone());
                serve_connection(stream, peer, tls.acceptor(), injector.clone(), stop)
            },
        )
        .await;
        connections.join_all().await;
    }
}

/// One connection from the API server: TLS, then HTTP/1 reviews.
async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    tls: TlsAcceptor,
    injector: Arc<Injector>,
    stop: impl Future<Output = ()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(stream) = listen::handshake(tls, stream, "webhook", peer).await else {
        return;
    };
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let injector = injector.clone();
        async move { Ok::<_, Infallible>(review(&injector, request).await) }
    });
    listen::serve_http1(stream, service, stop).await;
}

async fn review<B>(injector: &Injector, request: http::Request<B>) -> http::Response<Full<Bytes>>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let opt_in = match request.uri().path() {
        INJECT_NAMESPACED_PATH => OptIn::Namespace,
        INJECT_POD_PATH => OptIn::Pod,
        _ => return respond(404, Bytes::from_static(b"not found\n")),
    };
    let body = Limited::new(request.into_body(), MAX_REVIEW_BYTES).collect();
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, body).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) => {
            return respond(400, Bytes::from(format!("reading the review: {error}\n")));
        }
        Err(_) => {
            return respond(
                408,
                Bytes::from(format!(
                    "the review's body did not arrive within {BODY_READ_TIMEOUT:?}\n"
                )),
            );
        }
    };
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(error) => {
            return respond(
                400,
                Bytes::from(format!("not an AdmissionReview: {error}\n")),
            );
        }
    };
    let request: Result<AdmissionRequest<Pod>, _> = review.try_into();
    let response = match request {
        Ok(request) => match injector.namespace_mtls(&request).await {
            Ok(namespace_mtls) => decide(injector, opt_in, &request, namespace_mtls.as_deref()),
            Err(error) => {
                tracing::warn!(%error, "refusing a pod");
                AdmissionResponse::from(&request).deny(error)
            }
        },
        Err(error) => AdmissionResponse::invalid(error.to_string()),
    };
    let body = serde_json::to_vec(&response.into_review()).expect("reviews serialize");
    respond(200, Bytes::from(body))
}

/// Admits every pod whose namespace could be read: the webhook only ever adds the mesh.
fn decide(
    injector: &Injector,
    opt_in: OptIn,
    request: &AdmissionRequest<Pod>,
    namespace_mtls: Option<&str>,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let Some(pod) = &request.object else {
        return response;
    };
    let trust = injector.trust();
    match patch(
        pod,
        opt_in,
        &injector.config,
        trust.as_ref(),
        namespace_mtls,
    ) {
        Ok(operations) => {
            let operations =
                serde_json::from_value(operations).expect("inject writes valid JSON patches");
            tracing::info!(
                namespace = request.namespace.as_deref().unwrap_or(""),
                pod = pod
                    .metadata
                    .name
                    .as_deref()
                    .or(pod.metadata.generate_name.as_deref())
                    .unwrap_or(""),
                "injecting the proxy"
            );
            response
                .with_patch(operations)
                .unwrap_or_else(|error| AdmissionResponse::from(request).deny(error.to_string()))
        }
        Err(skip) => {
            tracing::debug!(?skip, "not injecting");
            response
        }
    }
}

fn respond(status: u16, body: Bytes) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
    use tokio_rustls::rustls::sign::CertifiedKey;

    use super::*;

    /// Enough TLS for a client that never says hello.
    #[derive(Debug)]
    struct NoCertificate;

    impl ResolvesServerCert for NoCertificate {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            None
        }
    }

    /// A self-signed certificate for `localhost`, as PEM files, and a client that trusts it alone.
    fn certificate(dir: &Path) -> tokio_rustls::TlsConnector {
        let generated = rcgen::generate_simple_self_signed(["localhost".to_owned()]).unwrap();
        std::fs::write(dir.join("tls.crt"), generated.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), generated.signing_key.serialize_pem()).unwrap();
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots.add(generated.cert.der().clone()).unwrap();
        let config = tokio_rustls::rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Whether a handshake with `serving` succeeds for `client`.
    async fn handshake(serving: &ServingCertificate, client: &tokio_rustls::TlsConnector) -> bool {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let acceptor = serving.acceptor();
        let (client, _server) = tokio::join!(client.connect(name, client_io), async move {
            acceptor.accept(server_io).await
        });
        client.is_ok()
    }

    #[tokio::test]
    async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let first = certificate(dir.path());
        let serving = ServingCertificate::load(&cert, &key).unwrap();
        assert!(handshake(&serving, &first).await);

        let renewed = certificate(dir.path());
        assert!(
            handshake(&serving, &renewed).await,
            "the renewed one is served"
        );
        assert!(
            !handshake(&serving, &first).await,
            "the first one is not any more"
        );

        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(
            handshake(&serving, &renewed).await,
            "the last good one stays"
        );
        std::fs::remove_file(&key).unwrap();
        assert!(
            handshake(&serving, &renewed).await,
            "the last good one stays"
        );
    }

    #[tokio::test]
    async fn a_stopping_webhook_closes_kept_alive_connections_so_reviews_go_elsewhere() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let dir = tempfile::tempdir().unwrap();
        let client = certificate(dir.path());
        let serving =
            ServingCertificate::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
                .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let webhook = Webhook {
            listener,
            tls: Arc::new(serving),
            injector: injector(),
        };
        let (shutdown, stopping) = watch::channel(false);
        let served = tokio::spawn(webhook.serve(stopping));

        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = client.connect(name, tcp).await.unwrap();
        let request = "GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n";
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut response = [0u8; 12];
        tls.read_exact(&mut response).await.unwrap();
        assert!(response.starts_with(b"HTTP/1.1"), "{response:?}");

        shutdown.send_replace(true);
        // The connection is closed by the webhook; without that, this would wait for ever.
        let patience = Duration::from_secs(60);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(patience, tls.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the kept-alive connection stays open");
        tokio::time::timeout(patience, served)
            .await
            .expect("the webhook stops serving")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "no new connection is taken"
        );
    }

    fn injector() -> Arc<Injector> {
        Arc::new(Injector {
            config: serde_norway::from_str("proxyImage: p\ninitImage: i\ncontrolPlane: c\n")
                .unwrap(),
            control_plane: None,
            namespaces: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_completes_the_tls_handshake_is_dropped() {
        let config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCertificate));
        let (_silent, server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let served = serve_connection(
            server,
            SocketAddr::from(([127, 0, 0, 1], 1)),
            TlsAcceptor::from(Arc::new(config)),
            injector(),
            std::future::pending(),
        );
        tokio::time::timeout(Duration::from_secs(3600), served)
            .await
            .expect("the connection is given up");
        assert_eq!(started.elapsed(), listen::TLS_HANDSHAKE_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_whose_namespace_cannot_be_read_is_refused_saying_why() {
        let injector = Injector {
            namespaces: Some(Api::all(crate::kube_api::fake::client(|_| {
                Box::pin(std::future::ready(crate::kube_api::fake::status(
                    503,
                    "the API server is overloaded",
                )))
            }))),
            ..Arc::into_inner(injector()).unwrap()
        };
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "7",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": "shop",
                "userInfo": {},
                "object": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "web"},
                    "spec": {"containers": [{"name": "web", "image": "web"}]},
                },
            },
        });
        let request = http::Request::post(INJECT_NAMESPACED_PATH)
            .body(Full::new(Bytes::from(review.to_string())))
            .unwrap();
        let response = review_of(&injector, request).await;
        assert_eq!(response["response"]["allowed"], false, "{response}");
        let reason = response["response"]["status"]["message"].as_str().unwrap();
        assert!(
            reason.contains("reading namespace shop") && reason.contains("overloaded"),
            "{reason}"
        );
    }

    async fn review_of(
        injector: &Injector,
        request: http::Request<Full<Bytes>>,
    ) -> serde_json::Value {
        let response = review(injector, request).await;
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_review_whose_body_never_arrives_is_answered_408() {
        let body = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::io::Error>,
        >());
        let request = http::Request::post(INJECT_NAMESPACED_PATH)
            .body(body)
            .unwrap();
        let response =
            tokio::time::timeout(Duration::from_secs(3600), review(&injector(), request))
                .await
                .expect("answered");
        assert_eq!(response.status(), 408);
    }
}
