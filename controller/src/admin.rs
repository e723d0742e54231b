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

/// Serves forever; `/ready` answers 200 once `ready` is true (the index has its first full view).
///
/// It stays 200 when a watch fails afterwards (the failure is logged and counted in
/// `outrigger_controller_reconcile_errors_total`): an API server outage fails every replica's
/// watches at once, and turning them all unready would take the Service's endpoints away, cutting
/// every proxy off from the last good configuration, which is what they should keep serving.
pub async fn serve(listener: TcpListener, metrics: Metrics, ready: watch::Receiver<bool>) {
    let serve_connection = |stream, _| {
        let metrics = metrics.clone();
        let ready = ready.clone();
        let service =
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let response = respond(&metrics, *ready.borrow(), request.uri().path());
                std::future::ready(Ok::<_, Infallible>(response))
            });
        listen::serve_http1(stream, service)
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

fn respond(metrics: &Metrics, ready: bool, path: &str) -> http::Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/live" => (200, "text/plain", "ok\n".to_string()),
        "/ready" if ready => (200, "text/plain", "ok\n".to_string()),
        "/ready" => (503, "text/plain", "not synced yet\n".to_string()),
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

    async fn status(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response.lines().next().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn ready_once_the_index_has_synced() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (synced, ready) = watch::channel(false);
        tokio::spawn(serve(listener, Metrics::default(), ready));
        assert_eq!(status(addr, "/live").await, "HTTP/1.1 200 OK");
        assert_eq!(
            status(addr, "/ready").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        synced.send_replace(true);
        assert_eq!(status(addr, "/ready").await, "HTTP/1.1 200 OK");
        assert_eq!(status(addr, "/nothing").await, "HTTP/1.1 404 Not Found");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_request_is_dropped() {
        use std::time::Duration;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_synced, ready) = watch::channel(true);
        tokio::spawn(serve(listener, Metrics::default(), ready));
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(3600), silent.read(&mut buffer)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "the connection is closed: {read:?}"
        );
    }
}
