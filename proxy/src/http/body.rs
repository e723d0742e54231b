//! The body type every layer passes along, and the proxy's own error responses.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
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

/// Sees each frame of a body as it passes, and goes with the body: a watcher that reports when
/// dropped reports when the body ends, or is given up.
pub trait FrameWatcher: Send + 'static {
    fn frame(&mut self, _frame: &Result<Frame<Bytes>, BoxError>) {}
}

/// `body`, unchanged, shown to `watcher` frame by frame.
pub fn watched(body: Body, watcher: impl FrameWatcher) -> Body {
    boxed(Watched {
        inner: body,
        watcher,
    })
}

pin_project_lite::pin_project! {
    struct Watched<W> {
        #[pin]
        inner: Body,
        watcher: W,
    }
}

impl<W: FrameWatcher> http_body::Body for Watched<W> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(frame)) = &polled {
            this.watcher.frame(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Writes down the frames it sees, and when it was dropped.
    struct Log(Arc<Mutex<Vec<String>>>);

    impl FrameWatcher for Log {
        fn frame(&mut self, frame: &Result<Frame<Bytes>, BoxError>) {
            let seen = match frame {
                Ok(frame) if frame.is_data() => "data",
                Ok(_) => "trailers",
                Err(_) => "error",
            };
            self.0.lock().unwrap().push(seen.into());
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            self.0.lock().unwrap().push("dropped".into());
        }
    }

    #[tokio::test]
    async fn a_watched_body_passes_every_frame_and_its_watcher_goes_with_it() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let body =
            boxed(full("hello").with_trailers(async move { Some(Ok::<_, BoxError>(trailers)) }));
        let body = watched(body, Log(log.clone()));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "hello");
        assert_eq!(*log.lock().unwrap(), ["data", "trailers", "dropped"]);
    }
}
