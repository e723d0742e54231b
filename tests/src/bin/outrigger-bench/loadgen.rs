//! Open-loop load: requests leave on a fixed schedule whatever the responses do, and latency counts
//! from the scheduled send time. A closed loop (send, wait, send) would slow down with a stalled
//! server and so hide the stall from its own numbers (coordinated omission).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Where requests go: a TCP address, and the authority they name.
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
}

pub struct Load {
    /// Requests per second.
    pub rate: u32,
    /// Load sent before recording starts, so connections and caches are warm.
    pub warmup: Duration,
    pub duration: Duration,
    pub connections: usize,
    /// A request that cannot leave within this of its scheduled time is dropped and counted as an
    /// error: the generator (or what it waits on) has fallen behind.
    pub max_lag: Duration,
    pub timeout: Duration,
}

/// What one run of a [`Load`] measured; counts cover the recorded window only, except `handled`.
pub struct Measured {
    /// Microseconds from scheduled send time to the end of the response, for 2xx responses.
    pub latency: Histogram<u64>,
    /// Microseconds from scheduled send time until the request's task ran: the generator's own
    /// delay (timer and thread wake-ups), part of every latency above.
    pub dispatch: Histogram<u64>,
    pub scheduled: u64,
    pub ok: u64,
    pub bad_status: u64,
    /// Connection failures, resets, malformed responses and timeouts.
    pub transport: u64,
    /// Dropped because they could not leave within `max_lag` of their scheduled time.
    pub late: u64,
    /// From the start of recording to the last recorded completion.
    pub span: Duration,
    /// Requests sent (all but the late ones), warm-up included: the denominator for CPU cost.
    pub handled: u64,
}

impl Measured {
    pub fn errors(&self) -> u64 {
        self.bad_status + self.transport + self.late
    }
}

/// When request `i` is due, counted from the start of the schedule.
fn offset(i: u64, rate: u32) -> Duration {
    Duration::from_nanos(i * 1_000_000_000 / u64::from(rate))
}

/// How many requests a window of `window` holds at `rate`.
fn count(rate: u32, window: Duration) -> u64 {
    (window.as_nanos() * u128::from(rate) / 1_000_000_000) as u64
}

/// Runs `load` against `target`, scheduling from the calling thread (which must not be a runtime
/// thread) and sending on `runtime`.
pub fn run(runtime: &Handle, target: &Target, load: &Load) -> Result<Measured> {
    let pool = Arc::new(runtime.block_on(Pool::connect(target, load))?);
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let warmup = count(load.rate, load.warmup);
    let total = warmup + count(load.rate, load.duration);
    // A 1ns timer slack (default 50µs) makes the schedule's wake-ups land closer to their time;
    // the slack would otherwise be counted as latency. Best effort: the default is merely coarser.
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };

    let start = Instant::now();
    let recording = start + offset(warmup, load.rate);
    let mut requests = JoinSet::new();
    for i in 0..total {
        let due = start + offset(i, load.rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (pool, recorder) = (pool.clone(), recorder.clone());
        requests.spawn_on(
            async move {
                let started = Instant::now();
                let outcome = pool.send(due).await;
                let times = Times {
                    due,
                    started,
                    done: Instant::now(),
                };
                recorder.lock().unwrap().record(times, i >= warmup, outcome);
            },
            runtime,
        );
    }
    runtime.block_on(async { while requests.join_next().await.is_some() {} });

    let recorder = Arc::into_inner(recorder)
        .expect("every request has finished")
        .into_inner()
        .unwrap();
    Ok(recorder.finish(recording, total - warmup))
}

#[derive(Debug)]
enum Outcome {
    Ok,
    BadStatus,
    Transport,
    Late,
}

/// When one request was due, when its task began, and when it ended.
struct Times {
    due: Instant,
    started: Instant,
    done: Instant,
}

/// Microseconds from `from` to `to`, for a histogram.
fn micros(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u64::MAX)
}

/// 1µs to 10 minutes at 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

struct Recorder {
    latency: Histogram<u64>,
    dispatch: Histogram<u64>,
    ok: u64,
    bad_status: u64,
    transport: u64,
    late: u64,
    last_done: Option<Instant>,
    handled: u64,
}

impl Recorder {
    fn new() -> Self {
        Self {
            latency: histogram(),
            dispatch: histogram(),
            ok: 0,
            bad_status: 0,
            transport: 0,
            late: 0,
            last_done: None,
            handled: 0,
        }
    }

    fn record(&mut self, times: Times, recorded: bool, outcome: Outcome) {
        if !matches!(outcome, Outcome::Late) {
            self.handled += 1;
        }
        if !recorded {
            return;
        }
        self.last_done = self.last_done.max(Some(times.done));
        self.dispatch
            .saturating_record(micros(times.due, times.started));
        match outcome {
            Outcome::Ok => {
                self.ok += 1;
                self.latency
                    .saturating_record(micros(times.due, times.done));
            }
            Outcome::BadStatus => self.bad_status += 1,
            Outcome::Transport => self.transport += 1,
            Outcome::Late => self.late += 1,
        }
    }

    fn finish(self, recording: Instant, scheduled: u64) -> Measured {
        Measured {
            latency: self.latency,
            dispatch: self.dispatch,
            scheduled,
            ok: self.ok,
            bad_status: self.bad_status,
            transport: self.transport,
            late: self.late,
            span: self.last_done.map_or(Duration::ZERO, |done| {
                done.saturating_duration_since(recording)
            }),
            handled: self.handled,
        }
    }
}

/// Keep-alive HTTP/1.1 connections, each carrying one request at a time; requests queue in
/// schedule order for a free one.
struct Pool {
    addr: SocketAddr,
    authority: String,
    free: Semaphore,
    idle: Mutex<Vec<SendRequest<Empty<Bytes>>>>,
    max_lag: Duration,
    timeout: Duration,
}

impl Pool {
    /// Opens every connection up front, so that recorded requests never pay for a handshake.
    async fn connect(target: &Target, load: &Load) -> Result<Self> {
        let mut idle = Vec::with_capacity(load.connections);
        for _ in 0..load.connections {
            idle.push(
                connect(target.addr)
                    .await
                    .with_context(|| format!("connecting to {}", target.addr))?,
            );
        }
        Ok(Self {
            addr: target.addr,
            authority: target.authority.clone(),
            free: Semaphore::new(load.connections),
            idle: Mutex::new(idle),
            max_lag: load.max_lag,
            timeout: load.timeout,
        })
    }

    async fn send(&self, due: Instant) -> Outcome {
        let _permit = self
            .free
            .acquire()
            .await
            .expect("the semaphore is never closed");
        if due.elapsed() > self.max_lag {
            return Outcome::Late;
        }
        let idle = self.idle.lock().unwrap().pop();
        let exchange = async {
            let mut conn = match idle {
                Some(conn) if !conn.is_closed() => conn,
                _ => connect(self.addr).await?,
            };
            conn.ready().await?;
            let request = http::Request::get("/")
                .header(http::header::HOST, &self.authority)
                .body(Empty::new())?;
            let response = conn.send_request(request).await?;
            let status = response.status();
            // Read the whole body: the connection is reusable only after it.
            response.into_body().collect().await?;
            anyhow::Ok((conn, status))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok((conn, status))) => {
                self.idle.lock().unwrap().push(conn);
                if status.is_success() {
                    Outcome::Ok
                } else {
                    Outcome::BadStatus
                }
            }
            // The connection is dropped: it may be mid-exchange. The next user opens a new one.
            Ok(Err(_)) | Err(_) => Outcome::Transport,
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_evenly_spaced_at_the_rate() {
        assert_eq!(offset(0, 1000), Duration::ZERO);
        assert_eq!(offset(1, 1000), Duration::from_millis(1));
        assert_eq!(offset(3, 8000), Duration::from_micros(375));
        // No drift over a long run: request n is due exactly n/rate seconds in.
        assert_eq!(offset(3_000_000, 3000), Duration::from_secs(1000));
    }

    #[test]
    fn window_holds_rate_times_duration_requests() {
        assert_eq!(count(500, Duration::from_secs(5)), 2500);
        assert_eq!(count(8000, Duration::from_millis(250)), 2000);
        assert_eq!(count(3, Duration::from_millis(500)), 1);
    }

    #[test]
    fn latency_counts_from_the_scheduled_time_and_warmup_is_not_recorded() {
        let due = Instant::now();
        let after = |ms| due + Duration::from_millis(ms);
        let times = |started, done| Times {
            due,
            started: after(started),
            done: after(done),
        };
        let mut recorder = Recorder::new();
        recorder.record(times(0, 50), false, Outcome::Ok);
        recorder.record(times(1, 3), true, Outcome::Ok);
        recorder.record(times(0, 4), true, Outcome::BadStatus);
        recorder.record(times(0, 2000), true, Outcome::Late);
        let measured = recorder.finish(due, 4);
        assert_eq!(measured.ok, 1);
        assert_eq!(measured.errors(), 2);
        assert_eq!(measured.handled, 3);
        assert_eq!(measured.latency.len(), 1);
        assert!(measured.latency.equivalent(measured.latency.max(), 3_000));
        assert_eq!(measured.dispatch.len(), 3);
        assert!(measured.dispatch.equivalent(measured.dispatch.max(), 1_000));
        assert_eq!(measured.span, Duration::from_secs(2));
    }
}
