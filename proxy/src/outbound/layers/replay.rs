//! A request body that can be sent again: the first attempt streams it from the app while keeping
//! a copy, up to a limit; retries replay the copy, then continue from the app if the first attempt
//! did not read it all. Past the limit the copy is dropped and the request cannot be retried, but
//! it still streams: nothing waits for a large body to be buffered.
//!
//! One attempt owns the body at a time: the newest. An earlier attempt still being sent (one a
//! per-try timeout abandoned while its connection writes on) fails its next read instead of
//! taking chunks from the app's body that the newer attempt needs.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};

use crate::http::body::{Body, BoxError};

/// SPEC.md: bodies over 64 KiB are not retried.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

struct Shared {
    /// The app's body, read by whichever attempt gets past the copy first.
    source: Body,
    copy: Vec<Bytes>,
    copied_bytes: usize,
    /// The copy is incomplete: a retry could not resend the body.
    overflowed: bool,
    /// The source is finished; these were its trailers.
    finished: Option<Option<HeaderMap>>,
    /// The attempt that owns the body now.
    owner: u64,
}

pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Which attempt this is.
    attempt: u64,
    /// How many copied chunks this attempt has sent.
    position: usize,
    trailers_sent: bool,
}

impl ReplayBody {
    pub fn new(source: Body) -> Self {
        let finished = source.is_end_stream().then_some(None);
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source,
                copy: Vec::new(),
                copied_bytes: 0,
                overflowed: false,
                finished,
                owner: 0,
            })),
            attempt: 0,
            position: 0,
            trailers_sent: false,
        }
    }

    /// A body for the next attempt, from the start; it owns the body from now on.
    pub fn replay(&self) -> Self {
        let attempt = {
            let mut shared = self.shared.lock().expect("replay lock");
            shared.owner += 1;
            shared.owner
        };
        Self {
            shared: self.shared.clone(),
            attempt,
            position: 0,
            trailers_sent: false,
        }
    }

    pub fn is_replayable(&self) -> bool {
        !self.shared.lock().expect("replay lock").overflowed
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().expect("replay lock");
        if shared.owner != this.attempt {
            return Poll::Ready(Some(Err("a newer attempt owns the request body".into())));
        }
        if let Some(chunk) = shared.copy.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if let Some(trailers) = &shared.finished {
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            return Poll::Ready(trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        let frame = match Pin::new(&mut shared.source).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        match frame {
            None => {
                shared.finished = Some(None);
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Some(Err(error)) => Poll::Ready(Some(Err(error))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if !shared.overflowed {
                        if shared.copied_bytes + data.len() <= MAX_REPLAY_BYTES {
                            shared.copied_bytes += data.len();
                            shared.copy.push(data.clone());
                            this.position += 1;
                        } else {
                            shared.overflowed = true;
                            shared.copy = Vec::new();
                            shared.copied_bytes = 0;
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    shared.finished = Some(trailers.clone());
                    this.trailers_sent = true;
                    Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().expect("replay lock");
        self.position >= shared.copy.len()
            && (self.trailers_sent || matches!(shared.finished, Some(None)))
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().expect("replay lock");
        if shared.finished.is_some() {
            let remaining: usize = shared.copy[self.position.min(shared.copy.len())..]
                .iter()
                .map(Bytes::len)
                .sum();
            return SizeHint::with_exact(remaining as u64);
        }
        // Content-Length must survive: an HTTP/1 upstream otherwise gets a chunked body.
        let source = shared.source.size_hint();
        let copied = if self.position == 0 {
            shared.copied_bytes as u64
        } else {
            0
        };
        let mut hint = SizeHint::new();
        if let Some(upper) = source.upper() {
            hint.set_upper(upper + copied);
        }
        hint.set_lower(source.lower() + copied);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body::{boxed, full};
    use http_body_util::{BodyExt, StreamBody};

    async fn read(body: ReplayBody) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_small_body_is_sent_again_whole() {
        let body = ReplayBody::new(full("hello"));
        assert_eq!(read(body.replay()).await, b"hello");
        assert!(body.is_replayable());
        let second = body.replay();
        assert_eq!(second.size_hint().exact(), Some(5));
        assert_eq!(read(second).await, b"hello");
    }

    #[tokio::test]
    async fn a_retry_continues_where_an_abandoned_attempt_stopped() {
        let chunks =
            ["one ", "two ", "three"].map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c))));
        let source = boxed(StreamBody::new(futures_util::stream::iter(chunks)));
        let body = ReplayBody::new(source);
        let mut first = body.replay();
        // The first attempt reads one chunk, then fails.
        let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&chunk[..], b"one ");
        drop(first);
        assert_eq!(read(body.replay()).await, b"one two three");
    }

    #[tokio::test]
    async fn an_abandoned_attempt_still_being_sent_cannot_take_the_newer_ones_chunks() {
        let chunks =
            ["one ", "two ", "three"].map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c))));
        let source = boxed(StreamBody::new(futures_util::stream::iter(chunks)));
        let body = ReplayBody::new(source);
        let mut first = body.replay();
        let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&chunk[..], b"one ");
        // A per-try timeout gives up on the first attempt; its connection still reads its body.
        let second = body.replay();
        assert!(first.frame().await.unwrap().is_err());
        assert_eq!(read(second).await, b"one two three");
    }

    #[tokio::test]
    async fn a_large_body_streams_but_cannot_be_replayed() {
        let big = vec![b'x'; MAX_REPLAY_BYTES + 1];
        let body = ReplayBody::new(full(big.clone()));
        assert_eq!(read(body.replay()).await.len(), big.len());
        assert!(!body.is_replayable());
    }
}
