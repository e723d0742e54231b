//! The admission webhook server: HTTPS (the API server calls webhooks over TLS only), answering
//! AdmissionReviews for pods with the patch from `inject`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::inject::patch::{InjectorConfig, OptIn, patch};
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
/// A TLS client sends its hello at once.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server sends a review whole; it gives up on the webhook after at most 30 s anyway.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Webhook {
    listener: TcpListener,
    tls: TlsAcceptor,
    injector: Arc<InjectorConfig>,
}

impl Webhook {
    /// Binds the webhook when the settings enable it.
    pub async fn bind(settings: &WebhookSettings) -> anyhow::Result<Option<Self>> {
        let (Some(cert), Some(key), Some(config)) = (
            &settings.webhook_cert,
            &settings.webhook_key,
            &settings.injector_config,
        ) else {
            return Ok(None);
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading the webhook certificate {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading the webhook key {}", key.display()))?;
        let tls = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the webhook certificate and key do not make a TLS identity")?;
        let injector = std::fs::read_to_string(config)
            .with_context(|| format!("reading {}", config.display()))?;
        let injector: InjectorConfig = serde_norway::from_str(&injector)
            .with_context(|| format!("reading the injector config {}", config.display()))?;
        let listener = TcpListener::bind(settings.webhook_addr)
            .await
            .with_context(|| {
                format!("binding the webhook listener on {}", settings.webhook_addr)
            })?;
        Ok(Some(Self {
            listener,
            tls: TlsAcceptor::from(Arc::new(tls)),
            injector: Arc::new(injector),
        }))
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.listener.local_addr().expect("bound")
    }

    pub async fn serve(self) {
        let (tls, injector) = (self.tls, self.injector);
        listen::serve(
            self.listener,
            "webhook",
            MAX_CONNECTIONS,
            std::future::pending(),
            |stream, peer| serve_connection(stream, peer, tls.clone(), injector.clone()),
        )
        .await;
    }
}

/// One connection from the API server: TLS, then HTTP/1 reviews.
async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    tls: TlsAcceptor,
    injector: Arc<InjectorConfig>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "webhook TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "webhook TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let injector = injector.clone();
        async move { Ok::<_, Infallible>(review(&injector, request).await) }
    });
    listen::serve_http1(stream, service).await;
}

async fn review<B>(
    injector: &InjectorConfig,
    request: http::Request<B>,
) -> http::Response<Full<Bytes>>
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
        Ok(request) => decide(injector, opt_in, &request),
        Err(error) => AdmissionResponse::invalid(error.to_string()),
    };
    let body = serde_json::to_vec(&response.into_review()).expect("reviews serialize");
    respond(200, Bytes::from(body))
}

/// Admits every pod: the webhook only ever adds the mesh, it never refuses a pod.
fn decide(
    injector: &InjectorConfig,
    opt_in: OptIn,
    request: &AdmissionRequest<Pod>,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let Some(pod) = &request.object else {
        return response;
    };
    match patch(pod, opt_in, injector) {
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

    fn injector() -> Arc<InjectorConfig> {
        Arc::new(serde_norway::from_str("proxyImage: p\ninitImage: i\ncontrolPlane: c\n").unwrap())
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
        );
        tokio::time::timeout(Duration::from_secs(3600), served)
            .await
            .expect("the connection is given up");
        assert_eq!(started.elapsed(), TLS_HANDSHAKE_TIMEOUT);
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
