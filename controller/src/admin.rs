//! The controller's admin server: `/metrics`, `/live`, `/ready`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::listen;
use crate::metrics::Metrics;

/// Probes and a few Prometheus servers; more is someone else.
const MAX_CONNECTIONS: usize = 64;

/// Serves forever; `/ready` answers 200 once `synced` is true (the index has its first full view),
/// and 503 again from the moment `stopping` is, so that no new proxy is sent here while the
/// streams drain.
///
/// It stays 200 when a watch fails afterwards (the failure is logged and counted in
/// `outrigger_controller_reconcile_errors_total`): an API server outage fails every replica's
/// watches at once, and turning them all unready would take the Service's endpoints away, cutting
/// every proxy off from the last good configuration, which is what they should keep serving.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    synced: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
) {
    let serve_connection = |stream, _| {
        let metrics = metrics.clone();
        let (synced, stopping) = (synced.clone(), stopping.clone());
        let service =
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let readiness = match (*stopping.borrow(), *synced.borrow()) {
                    (true, _) => Readiness::Stopping,
                    (false, true) => Readiness::Ready,
                    (false, false) => Readiness::Syncing,
                };
                let response = respond(&metrics, readiness, request.uri().path());
                std::future::ready(Ok::<_, Infallible>(response))
            });
        // Probes and scrapes are answered until the process exits.
        listen::serve_http1(stream, service, std::future::pending())
    };
    listen::serve(
        listener,
        "admin",
        MAX_CONNECTIONS,
        std::future::pending(),
        serve_connection,
    )
    .await;
}

/// What `/ready` says.
#[derive(Clone, Copy)]
enum Readiness {
    Syncing,
    Ready,
    Stopping,
}

fn respond(metrics: &Metrics, readiness: Readiness, path: &str) -> http::Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/live" => (200, "text/plain", "ok\n".to_string()),
        "/ready" => match readiness {
            Readiness::Ready => (200, "text/plain", "ok\n".to_string()),
            Readiness::Syncing => (503, "text/plain", "not synced yet\n".to_string()),
            Readiness::Stopping => (503, "text/plain", "shutting down\n".to_string()),
        },
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn response(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    async fn status(addr: std::net::SocketAddr, path: &str) -> String {
        let response = response(addr, path).await;
        response.lines().next().unwrap_or_default().to_string()
    }

    /// An admin server on a loopback port, with the senders of `synced` and `stopping`.
    async fn start() -> (
        std::net::SocketAddr,
        watch::Sender<bool>,
        watch::Sender<bool>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (synced, synced_changes) = watch::channel(false);
        let (stopping, stopping_changes) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            Metrics::default(),
            synced_changes,
            stopping_changes,
        ));
        (addr, synced, stopping)
    }

    #[tokio::test]
    async fn ready_once_the_index_has_synced() {
        let (addr, synced, _stopping) = start().await;
        assert_eq!(status(addr, "/live").await, "HTTP/1.1 200 OK");
        assert_eq!(
            status(addr, "/ready").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        synced.send_replace(true);
        assert_eq!(status(addr, "/ready").await, "HTTP/1.1 200 OK");
        assert_eq!(status(addr, "/nothing").await, "HTTP/1.1 404 Not Found");
    }

    #[tokio::test]
    async fn not_ready_from_the_moment_shutdown_begins() {
        let (addr, synced, stopping) = start().await;
        synced.send_replace(true);
        assert_eq!(status(addr, "/ready").await, "HTTP/1.1 200 OK");
        stopping.send_replace(true);
        let answer = response(addr, "/ready").await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.ends_with("shutting down\n"), "{answer}");
        assert_eq!(status(addr, "/live").await, "HTTP/1.1 200 OK");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_request_is_dropped() {
        use std::time::Duration;

        let (addr, _synced, _stopping) = start().await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(3600), silent.read(&mut buffer)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "the connection is closed: {read:?}"
        );
    }
}
