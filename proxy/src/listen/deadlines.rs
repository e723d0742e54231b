//! How long an HTTP connection may take apart from its requests: once a client starts an HTTP/1
//! request head it must finish it within the header-read timeout, and a connection with no request
//! in flight is closed after the idle timeout. An HTTP/2 connection has the idle timeout alone:
//! its peer sends frames (pings, settings) with no request in flight, so bytes read say nothing of
//! a request starting, and only the requests the service sees count.
//!
//! hyper's own header-read timeout also runs while a keep-alive connection waits for its next
//! request, so it acted as an idle timeout shorter than clients keep pooled connections, and a
//! client's next request met a connection being closed. Here the two are apart, and the idle
//! timeout outlasts the pools of the clients that call the proxy (the proxy's own keeps idle
//! connections 90 s).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::http::body::FrameWatcher;

/// Requests started and finished on one connection: the service side counts them, the connection
/// side reads them to know whether it is idle, and since when.
///
/// A finishing request does not wake the connection's reader: it is dropped on the connection's
/// own task, and a task that wakes itself is queued behind the others and wakes a sibling worker
/// to steal it, a futex call and a thread switch per request (a fifth more CPU per request at
/// 2,000 req/s). A reader waiting while requests are in flight looks again every idle timeout
/// instead (hyper does not always read again once a response is done), and counts the idle time
/// from the last finish.
pub struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
    /// When the last request finished, as nanoseconds since `epoch`.
    last_finished: AtomicU64,
    epoch: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            last_finished: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// A request in flight on its connection, until dropped (with the response body).
pub struct InFlight(Arc<Activity>);

/// Held by the response body: the request is in flight until the body is done.
impl FrameWatcher for InFlight {}

impl Activity {
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    fn last_finished(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_finished.load(Ordering::Acquire))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let since_epoch = self.0.epoch.elapsed().as_nanos();
        self.0.last_finished.fetch_max(
            u64::try_from(since_epoch).unwrap_or(u64::MAX),
            Ordering::AcqRel,
        );
        self.0.finished.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading a request head: the header-read deadline runs.
    Head,
    /// Requests in flight: the deadline is only when to look again (policies bound requests).
    Busy,
    /// Nothing in flight: the idle deadline runs.
    Idle,
}

pub struct Timed<T> {
    io: T,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    /// HTTP/1: bytes read while idle start a request head. HTTP/2: they never do.
    heads: bool,
    phase: Phase,
    /// Requests started as of the last look.
    seen_started: u64,
    deadline: Pin<Box<Sleep>>,
}

impl<T> Timed<T> {
    /// A fresh connection: its first request head is due within the header-read timeout.
    pub fn new(io: T, activity: Arc<Activity>, timeouts: Timeouts) -> Self {
        Self {
            io,
            activity,
            timeouts,
            heads: true,
            phase: Phase::Head,
            seen_started: 0,
            deadline: Box::pin(tokio::time::sleep(timeouts.header_read)),
        }
    }

    /// A fresh HTTP/2 connection: idle until its first request, and closed after `idle` with
    /// nothing in flight, whatever frames its peer sends meanwhile.
    pub fn http2(io: T, activity: Arc<Activity>, idle: Duration) -> Self {
        Self {
            io,
            activity,
            timeouts: Timeouts {
                header_read: idle,
                idle,
            },
            heads: false,
            phase: Phase::Idle,
            seen_started: 0,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Brings the phase up to date with the requests the service has seen.
    fn observe(&mut self) {
        let started = self.activity.started.load(Ordering::Acquire);
        let finished = self.activity.finished.load(Ordering::Acquire);
        if started != self.seen_started {
            // A head was read whole (the service got its request).
            self.seen_started = started;
            self.phase = Phase::Busy;
            self.look_again();
        }
        if self.phase == Phase::Busy && started == finished {
            self.phase = Phase::Idle;
            let idle_until = self.activity.last_finished() + self.timeouts.idle;
            self.deadline.as_mut().reset(idle_until);
        }
    }

    /// Whether the deadline of the phase has passed; while busy, it only sets when to look again.
    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        while self.deadline.as_mut().poll(cx).is_ready() {
            if self.phase != Phase::Busy {
                return true;
            }
            self.observe();
            if self.phase == Phase::Busy {
                self.look_again();
            }
        }
        false
    }

    /// While busy, the reader looks again within the idle timeout: if the requests have finished
    /// by then, the idle deadline counted from the last finish has not passed yet, so an idle
    /// connection still closes on time.
    fn look_again(&mut self) {
        let look_again = Instant::now() + self.timeouts.idle;
        self.deadline.as_mut().reset(look_again);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Timed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.observe();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(()))
                if this.heads && this.phase == Phase::Idle && buf.filled().len() > before =>
            {
                this.phase = Phase::Head;
                let head_until = Instant::now() + this.timeouts.header_read;
                this.deadline.as_mut().reset(head_until);
            }
            Poll::Pending if this.deadline_passed(cx) => {
                return Poll::Ready(match this.phase {
                    // Read as the end of the stream: an idle connection closes quietly.
                    Phase::Idle => Ok(()),
                    _ => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the request head did not arrive within the header-read timeout",
                    )),
                });
            }
            _ => {}
        }
        polled
    }
}

crate::io::write_through!(Timed<T>, io);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TIMEOUTS: Timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(3600),
    };

    async fn read_some(timed: &mut Timed<tokio::io::DuplexStream>) -> std::io::Result<usize> {
        let mut buf = [0u8; 64];
        timed.read(&mut buf).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_arrive_in_time_from_its_first_byte_not_from_idle() {
        let activity = Arc::new(Activity::default());
        let (mut client, server) = tokio::io::duplex(64);
        let mut timed = Timed::new(server, activity.clone(), TIMEOUTS);

        // The first request: its head arrives, the service takes it and answers.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_some(&mut timed).await.unwrap() > 0);
        let request = activity.begin();
        drop(request);

        // Idle far longer than the header-read timeout: still open.
        let idle = tokio::spawn(async move {
            let read = read_some(&mut timed).await;
            (read, timed)
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!idle.is_finished(), "an idle connection was closed early");
        client.write_all(b"GET").await.unwrap();
        let (read, mut timed) = idle.await.unwrap();
        assert_eq!(read.unwrap(), 3);

        // Half a head, then silence: cut at the header-read timeout.
        let cut = read_some(&mut timed).await.unwrap_err();
        assert_eq!(cut.kind(), std::io::ErrorKind::TimedOut);
    }

    /// A connection whose first request was read whole and is being answered.
    struct Answering {
        client: tokio::io::DuplexStream,
        timed: Timed<tokio::io::DuplexStream>,
        request: InFlight,
    }

    async fn answering(timeouts: Timeouts) -> Answering {
        let activity = Arc::new(Activity::default());
        let (mut client, server) = tokio::io::duplex(64);
        let mut timed = Timed::new(server, activity.clone(), timeouts);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read_some(&mut timed).await.unwrap();
        let request = activity.begin();
        Answering {
            client,
            timed,
            request,
        }
    }

    /// How long after the request finishes, `busy_for` from now, the connection closes, its
    /// reader waiting from before the response is done and not polled again.
    async fn closed_after_finishing(connection: Answering, busy_for: Duration) -> Duration {
        let Answering {
            client,
            mut timed,
            request,
        } = connection;
        let reader = tokio::spawn(async move {
            let read = read_some(&mut timed).await;
            (read, Instant::now())
        });
        tokio::time::sleep(busy_for).await;
        assert!(!reader.is_finished(), "a busy connection was timed out");
        let finished = Instant::now();
        drop(request);
        let (read, closed) = reader.await.unwrap();
        assert_eq!(read.unwrap(), 0, "closed as the end of the stream");
        drop(client);
        closed - finished
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_nothing_in_flight_closes_after_the_idle_timeout() {
        // A long response: no deadline meanwhile.
        let connection = answering(TIMEOUTS).await;
        let closed_after = closed_after_finishing(connection, TIMEOUTS.idle * 2).await;
        assert_eq!(closed_after, TIMEOUTS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_header_read_one_still_counts_from_the_last_finish() {
        let timeouts = Timeouts {
            header_read: Duration::from_secs(60),
            idle: Duration::from_secs(1),
        };
        let connection = answering(timeouts).await;
        let closed_after = closed_after_finishing(connection, Duration::from_millis(500)).await;
        assert_eq!(closed_after, timeouts.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_closes_after_the_idle_timeout_whatever_frames_come_meanwhile() {
        let idle = Duration::from_secs(10);
        let activity = Arc::new(Activity::default());
        let (mut client, server) = tokio::io::duplex(64);
        let mut timed = Timed::http2(server, activity.clone(), idle);
        let opened = Instant::now();
        let reader = tokio::spawn(async move {
            let mut total = 0;
            loop {
                match read_some(&mut timed).await {
                    Ok(0) => return (total, Instant::now(), timed),
                    Ok(read) => total += read,
                    Err(error) => panic!("an idle HTTP/2 connection ends quietly: {error}"),
                }
            }
        });
        // A ping every 3 s keeps bytes coming, and no request.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            client.write_all(b"ping").await.unwrap();
        }
        let (read, closed, mut timed) = reader.await.unwrap();
        assert_eq!(read, 12, "the frames were read");
        assert_eq!(
            closed - opened,
            idle,
            "closed on time, the pings counting for nothing"
        );

        // A request in flight keeps it open; the idle time counts from its end.
        let request = activity.begin();
        let reader = tokio::spawn(async move { (read_some(&mut timed).await, Instant::now()) });
        tokio::time::sleep(idle * 3).await;
        assert!(!reader.is_finished(), "a busy connection was closed");
        let finished = Instant::now();
        drop(request);
        let (read, closed) = reader.await.unwrap();
        assert_eq!(read.unwrap(), 0);
        assert_eq!(closed - finished, idle);
        drop(client);
    }

    /// Counts the wake-ups of the task it stands for.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_finishing_request_does_not_wake_the_connection_s_reader() {
        let Answering {
            client: _client,
            mut timed,
            request,
        } = answering(TIMEOUTS).await;
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut buf = [0u8; 64];
        let mut buf = ReadBuf::new(&mut buf);
        let polled = Pin::new(&mut timed).poll_read(&mut Context::from_waker(&waker), &mut buf);
        assert!(
            polled.is_pending(),
            "nothing to read while the request is in flight"
        );
        drop(request);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "the request is dropped on the reader's own task, which must not wake itself"
        );
    }
}
