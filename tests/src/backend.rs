//! A real HTTP/1.1 + h2c server that tests steer: answer, fail, stall or reset on command, and count
//! what it received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, oneshot};

/// How the backend answers the next requests.
#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    /// 200 with the backend's name as the body.
    Answer,
    /// This status, with the backend's name as the body.
    Status(u16),
    /// Waits this long, then answers.
    Delay(Duration),
    /// Closes the connection without answering.
    Reset,
    /// A gRPC trailers-only answer: HTTP 200 with this `grpc-status`.
    GrpcStatus(u32),
    /// 500 for this share of requests (0 to 100), picked at random; the rest are answered.
    FailPercent(u32),
    /// Waits until [`Backend::release`] lets it through, then answers: a request in flight for
    /// as long as a test needs, however slow the machine.
    Hold,
}

/// `answer`, `status 503`, `delay 500ms`, `reset`, `grpc-status 14`, `fail-percent 50`: how a
/// backend running as a program of its own is steered.
impl std::str::FromStr for Behaviour {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut words = text.split_whitespace();
        let kind = words.next().unwrap_or_default();
        let argument = words.next();
        let number = |what: &str| {
            argument
                .and_then(|value| value.parse::<u32>().ok())
                .ok_or_else(|| format!("`{kind}` needs {what}, as in `{kind} 50`"))
        };
        let behaviour = match kind {
            "answer" => Behaviour::Answer,
            "status" => Behaviour::Status(
                u16::try_from(number("a status code")?).map_err(|err| err.to_string())?,
            ),
            "delay" => Behaviour::Delay(
                argument
                    .ok_or("`delay` needs a duration, as in `delay 500ms`")
                    .and_then(|value| {
                        outrigger_api::duration::parse(value)
                            .map_err(|_| "`delay` needs a duration, as in `delay 500ms`")
                    })?,
            ),
            "reset" => Behaviour::Reset,
            "grpc-status" => Behaviour::GrpcStatus(number("a gRPC status code")?),
            "fail-percent" => Behaviour::FailPercent(number("a percentage")?.min(100)),
            _ => {
                return Err(format!(
                    "unknown behaviour {text:?}: answer, status N, delay D, reset, grpc-status N \
                     or fail-percent N"
                ));
            }
        };
        if words.next().is_some() {
            return Err(format!("{text:?} has more words than `{kind}` takes"));
        }
        Ok(behaviour)
    }
}

type Body = BoxBody<Bytes, Infallible>;

struct State {
    name: String,
    behaviour: Mutex<Behaviour>,
    hits: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
    /// Responses with a 5xx status.
    errors: AtomicU64,
    /// Lets a `/stream` response send its last chunk.
    release: Notify,
    /// Permits for held requests.
    held: Semaphore,
}

pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            name: name.to_string(),
            behaviour: Mutex::new(Behaviour::Answer),
            hits: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            release: Notify::new(),
            held: Semaphore::new(0),
        });
        let (stop, mut stopped) = oneshot::channel();
        let served = state.clone();
        tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = served.clone();
                        state.connections.fetch_add(1, Ordering::SeqCst);
                        connections.spawn(serve_connection(stream, state));
                    }
                    _ = &mut stopped => break,
                }
            }
        });
        Self {
            addr,
            state,
            stop: Some(stop),
        }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().unwrap() = behaviour;
    }

    /// Requests received so far.
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Responses with a 5xx status sent so far.
    pub fn errors(&self) -> u64 {
        self.state.errors.load(Ordering::SeqCst)
    }

    /// Lets every waiting `/stream` response finish.
    pub fn release_streams(&self) {
        self.state.release.notify_waiters();
    }

    /// Lets `requests` held requests through (or ones yet to come).
    pub fn release(&self, requests: usize) {
        self.state.held.add_permits(requests);
    }

    /// Stops accepting and drops every open connection.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<State>) {
    // A service error makes hyper drop the connection without answering: a reset.
    let service = hyper::service::service_fn(move |request| {
        let state = state.clone();
        async move {
            let response = respond(state.clone(), request)
                .await
                .ok_or("reset on command")?;
            if response.status().is_server_error() {
                state.errors.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, &str>(response)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

async fn respond(
    state: Arc<State>,
    request: http::Request<Incoming>,
) -> Option<http::Response<Body>> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let behaviour = state.behaviour.lock().unwrap().clone();
    match behaviour {
        Behaviour::Answer => {}
        Behaviour::Status(code) => return Some(text(code, &state.name, &request)),
        Behaviour::FailPercent(percent) if rand::random_range(0..100) < percent => {
            return Some(text(500, &state.name, &request));
        }
        Behaviour::FailPercent(_) => {}
        Behaviour::Delay(delay) => tokio::time::sleep(delay).await,
        Behaviour::Hold => state.held.acquire().await.ok()?.forget(),
        Behaviour::Reset => return None,
        Behaviour::GrpcStatus(code) => {
            let mut response = text(200, "", &request);
            let headers = response.headers_mut();
            headers.insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", code.into());
            return Some(response);
        }
    }
    Some(match request.uri().path() {
        "/echo" => {
            let mut response = text(200, "", &request);
            let bytes = request.into_body().collect().await.ok()?.to_bytes();
            *response.body_mut() = Full::new(bytes).boxed();
            response
        }
        "/stream" => {
            let state = state.clone();
            let chunks = async_stream(state);
            let mut response = text(200, "", &request);
            *response.body_mut() = chunks;
            response
        }
        "/upgrade" => upgrade(request),
        _ if is_grpc(&request) => grpc(&state.name, &request),
        _ => text(200, &state.name, &request),
    })
}

fn is_grpc(request: &http::Request<Incoming>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A gRPC answer to any method: one message holding `name` (not protobuf: the client reads it
/// as bytes), then `grpc-status: 0` in the trailers.
fn grpc(name: &str, request: &http::Request<Incoming>) -> http::Response<Body> {
    let mut message = vec![0];
    message.extend(u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    message.extend(name.as_bytes());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        Ok(Frame::data(Bytes::from(message))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response = text(200, "", request);
    *response.body_mut() = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A body whose first chunk comes at once and whose second waits for `release_streams`.
fn async_stream(state: Arc<State>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    let released = state.clone();
    tokio::spawn(async move {
        let wait = released.release.notified();
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"first\n"))))
            .await;
        wait.await;
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"last\n"))))
            .await;
    });
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
}

/// Answers `Upgrade: echo` with 101, then echoes every byte on the upgraded connection.
fn upgrade(mut request: http::Request<Incoming>) -> http::Response<Body> {
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = [0u8; 1024];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    http::Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

/// A response that also reports what the backend saw of the request, for assertions.
fn text(code: u16, body: &str, request: &http::Request<Incoming>) -> http::Response<Body> {
    let mut builder = http::Response::builder()
        .status(code)
        .header("x-seen-version", format!("{:?}", request.version()))
        .header("x-seen-path", request.uri().path());
    if let Some(host) = request.headers().get("host") {
        builder = builder.header("x-seen-host", host);
    } else if let Some(authority) = request.uri().authority() {
        builder = builder.header("x-seen-host", authority.as_str());
    }
    // Headers a test sets, or a route adds, come back so that the test can see them arrive.
    for (name, value) in request.headers() {
        if let Some(name) = name.as_str().strip_prefix("x-test-") {
            builder = builder.header(format!("x-seen-{name}"), value);
        }
    }
    for hop in ["connection", "keep-alive", "proxy-connection", "x-hop"] {
        if request.headers().contains_key(hop) {
            builder = builder.header("x-seen-hop-header", hop);
        }
    }
    builder
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}
