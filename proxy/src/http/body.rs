//! The body type every layer passes along, and the proxy's own error responses.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Streams as it arrives: nothing is buffered unless a layer (retries) chooses to.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(Full::new(bytes.into()).map_err(|never| match never {}))
}

/// Header naming why the proxy (not the upstream) produced a response.
pub const PROXY_ERROR_HEADER: &str = "outrigger-proxy-error";

/// A response made by the proxy itself, with the reason in a header and in the body.
pub fn proxy_error(status: http::StatusCode, reason: &str) -> http::Response<Body> {
    let mut response = http::Response::new(full(format!("{reason}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(value) = http::HeaderValue::from_str(reason) {
        headers.insert(PROXY_ERROR_HEADER, value);
    }
    response
}
