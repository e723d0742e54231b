//! gRPC callers get the proxy's own error answers as gRPC statuses: a "trailers-only" response
//! (HTTP 200, `grpc-status` and `grpc-message` in the headers, no body), as a gRPC server or
//! Envoy would answer. A client would map a bare HTTP status itself, but would lose the reason.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::FutureExt as _;
use futures_util::future::Map;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::http::body::{Body, PROXY_ERROR_HEADER, full};

/// Whether a request or response is gRPC, by its content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status for an HTTP status the proxy answered with: gRPC's own mapping
/// (doc/http-grpc-status-mapping.md), except that the proxy's 504 is always a deadline it
/// enforced, so DEADLINE_EXCEEDED.
fn grpc_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "13",             // INTERNAL
        401 => "16",             // UNAUTHENTICATED
        403 => "7",              // PERMISSION_DENIED
        404 => "12",             // UNIMPLEMENTED
        504 => "4",              // DEADLINE_EXCEEDED
        429 | 502 | 503 => "14", // UNAVAILABLE
        _ => "2",                // UNKNOWN
    }
}

/// What `grpc-message` must percent-encode: all but printable ASCII, and `%` itself.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// `response` as a gRPC caller must get it: unchanged unless the proxy made it as an error.
pub fn answer_grpc(mut response: Response<Body>) -> Response<Body> {
    let status = response.status();
    let Some(reason) = response.headers().get(PROXY_ERROR_HEADER).cloned() else {
        return response;
    };
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let message =
        utf8_percent_encode(&String::from_utf8_lossy(reason.as_bytes()), GRPC_MESSAGE).to_string();
    *response.status_mut() = StatusCode::OK;
    *response.body_mut() = full(bytes::Bytes::new());
    let headers = response.headers_mut();
    headers.remove(http::header::CONTENT_LENGTH);
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from_static(grpc_status(status)));
    if let Ok(message) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", message);
    }
    response
}

/// Wraps a side's service so that its gRPC callers get [`answer_grpc`]'s answers.
#[derive(Clone)]
pub struct GrpcErrors<S> {
    inner: S,
}

impl<S> GrpcErrors<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// How a response is finished: [`answer_grpc`] for a gRPC caller, as it is for others.
type Finish = fn(Result<Response<Body>, Infallible>) -> Result<Response<Body>, Infallible>;

impl<S> tower::Service<Request<Body>> for GrpcErrors<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    // A plain function over the inner future: nothing allocated per request.
    type Future = Map<S::Future, Finish>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let finish: Finish = if is_grpc(request.headers()) {
            |response| response.map(answer_grpc)
        } else {
            std::convert::identity
        };
        self.inner.call(request).map(finish)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;
    use crate::http::body::proxy_error;

    /// A side that answers every request with `response()`, wrapped.
    fn answering(
        response: fn() -> Response<Body>,
    ) -> impl tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible> {
        GrpcErrors::new(tower::service_fn(move |_: Request<Body>| async move {
            Ok::<_, Infallible>(response())
        }))
    }

    fn grpc_request() -> Request<Body> {
        Request::builder()
            .uri("/shop.Reviews/List")
            .header(http::header::CONTENT_TYPE, "application/grpc+proto")
            .body(full(bytes::Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn the_proxy_s_own_error_reaches_a_grpc_caller_as_a_grpc_status_with_its_reason() {
        let side = answering(|| {
            proxy_error(
                StatusCode::NOT_FOUND,
                "no route of echo.shop:80 matches: 100% sure",
            )
        });
        let response = side.oneshot(grpc_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers["grpc-status"], "12", "UNIMPLEMENTED");
        assert_eq!(
            headers["grpc-message"],
            "no route of echo.shop:80 matches: 100%25 sure"
        );
        assert_eq!(headers[http::header::CONTENT_TYPE], "application/grpc");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "trailers-only: {body:?}");
    }

    #[test]
    fn each_proxy_status_has_its_grpc_status() {
        for (status, expected) in [
            (StatusCode::BAD_REQUEST, "13"),
            (StatusCode::FORBIDDEN, "7"),
            (StatusCode::TOO_MANY_REQUESTS, "14"),
            (StatusCode::INTERNAL_SERVER_ERROR, "2"),
            (StatusCode::BAD_GATEWAY, "14"),
            (StatusCode::SERVICE_UNAVAILABLE, "14"),
            (StatusCode::GATEWAY_TIMEOUT, "4"),
        ] {
            let response = answer_grpc(proxy_error(status, "why"));
            assert_eq!(response.headers()["grpc-status"], expected, "{status}");
        }
    }

    #[tokio::test]
    async fn http_callers_and_upstream_answers_are_left_alone() {
        let not_found = || proxy_error(StatusCode::NOT_FOUND, "no route");
        let plain = Request::new(full(bytes::Bytes::new()));
        let response = answering(not_found).oneshot(plain).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(!response.headers().contains_key("grpc-status"));

        let upstream = || {
            let mut response = Response::new(full("from the app"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        };
        let response = answering(upstream).oneshot(grpc_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "the app's own");

        let redirect = || proxy_error(StatusCode::MOVED_PERMANENTLY, "a redirect, not an error");
        let response = answering(redirect).oneshot(grpc_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    }
}
