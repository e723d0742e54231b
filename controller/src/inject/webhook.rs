//! The admission webhook server: HTTPS (the API server calls webhooks over TLS only), answering
//! AdmissionReviews for pods with the patch from `inject`.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::inject::patch::{InjectorConfig, OptIn, patch};

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
/// Called for pods elsewhere: injected only when annotated `outrigger.dev/inject: enabled`.
pub const INJECT_ANNOTATED_PATH: &str = "/inject-annotated";

/// Reviews larger than this are refused: a pod spec is far smaller.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

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
        loop {
            let Ok((stream, peer)) = self.listener.accept().await else {
                continue;
            };
            let (tls, injector) = (self.tls.clone(), self.injector.clone());
            tokio::spawn(async move {
                let stream = match tls.accept(stream).await {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "webhook TLS handshake failed");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |request| {
                    let injector = injector.clone();
                    async move { Ok::<_, Infallible>(review(&injector, request).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

async fn review(
    injector: &InjectorConfig,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let opt_in = match request.uri().path() {
        INJECT_NAMESPACED_PATH => OptIn::Namespace,
        INJECT_ANNOTATED_PATH => OptIn::Annotation,
        _ => return respond(404, Bytes::from_static(b"not found\n")),
    };
    let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => return respond(400, Bytes::from(format!("reading the review: {error}\n"))),
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
