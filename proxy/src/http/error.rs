//! Why the proxy could not get a response from upstream, and what the app is told.

use std::time::Duration;

use http::StatusCode;

use crate::http::body::{Body, proxy_error};
use crate::metrics::TimeoutKind;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no endpoints available for {0}")]
    NoEndpoints(String),
    #[error("connection to {endpoint} failed: {source}")]
    Connect {
        endpoint: std::net::SocketAddr,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("request to {endpoint} failed: {source}")]
    Upstream {
        endpoint: std::net::SocketAddr,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{} timed out after {after:?}", match kind { TimeoutKind::Request => "request", TimeoutKind::PerTry => "attempt" })]
    Timeout { kind: TimeoutKind, after: Duration },
    /// A connection pool limit was reached; the request was not queued.
    #[error("{0}")]
    Overflow(&'static str),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoEndpoints(_) | Self::Overflow(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Connect { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The server refused the stream before processing it (HTTP/2 REFUSED_STREAM).
    pub fn is_refused_stream(&self) -> bool {
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            if let Some(h2) = cause.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = cause.source();
        }
        false
    }

    pub fn into_response(self) -> http::Response<Body> {
        // The source chain says what went wrong (refused, reset, ...); the app deserves it.
        let mut reason = self.to_string();
        let mut source = std::error::Error::source(&self).and_then(std::error::Error::source);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        proxy_error(self.status(), &reason)
    }
}
