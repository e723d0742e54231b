//! The test apps of the end-to-end suite in pods (`tests/tests/pods_e2e.rs`), one program with a
//! role each (its image is built by `cargo xtask images`):
//!
//! - `backend`: the steerable HTTP/1.1 + h2c backend (`outrigger_tests::Backend`), answering with
//!   its name, steered over a control port (`PUT /behaviour` with `status 503`, `fail-percent 50`,
//!   ...; `GET /stats`; `GET /healthz` for probes, whatever the behaviour);
//! - `echo`: a plain TCP echo;
//! - `idle`: an app that only waits (tests `kubectl exec` the client role in its pod), and on
//!   SIGTERM makes one call, to show whether the network still works while it stops;
//! - `http` and `tcp`: clients that make calls and print a JSON summary of what came back;
//! - `get`: one GET whose body it prints, for what the pod's proxy shows on loopback only
//!   (`/config`, `/endpoints`).
//!
//! The long-running roles print, first thing, what their pod's proxy said to `/ready` when they
//! started (the injected sidecar should be ready before the app starts).

#[path = "outrigger-test-app/client.rs"]
mod client;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_tests::{Backend, Behaviour};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "outrigger-test-app",
    about = "The end-to-end suite's test apps"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// The steerable HTTP backend.
    Backend {
        #[arg(long, default_value = "0.0.0.0:9080")]
        listen: SocketAddr,
        /// Where it is steered, and probed.
        #[arg(long, default_value = "0.0.0.0:9081")]
        control: SocketAddr,
        /// What it answers with (the pod's name).
        #[arg(long, env = "POD_NAME")]
        name: String,
        #[command(flatten)]
        start: StartReport,
    },
    /// A TCP echo: every byte received is sent back.
    Echo {
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: SocketAddr,
        #[command(flatten)]
        start: StartReport,
    },
    /// Waits for SIGTERM; then GETs `--on-stop-url` and prints what came back.
    Idle {
        #[arg(long)]
        on_stop_url: Option<String>,
        #[command(flatten)]
        start: StartReport,
    },
    /// HTTP calls; prints a JSON summary.
    Http(client::HttpCalls),
    /// TCP round trips; prints a JSON summary.
    Tcp(client::TcpRoundTrips),
    /// One GET; prints the body, and fails unless the status is 200.
    Get { url: String },
}

#[derive(clap::Args)]
struct StartReport {
    /// The pod's proxy's readiness, asked once at start and printed.
    #[arg(long, default_value = "http://127.0.0.1:4191/ready")]
    proxy_ready_url: String,
}

impl StartReport {
    async fn print(&self) {
        let answer = match client::get(&self.proxy_ready_url, &[]).await {
            Ok(response) => response.status.to_string(),
            Err(err) => format!("no answer ({err:#})"),
        };
        println!("proxy ready at app start: {answer}");
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().role {
        Role::Backend {
            listen,
            control,
            name,
            start,
        } => {
            start.print().await;
            let backend = Arc::new(Backend::start_on(listen, &name).await);
            println!("backend {name} on {}", backend.addr);
            let control = TcpListener::bind(control)
                .await
                .with_context(|| format!("binding the control port {control}"))?;
            tokio::spawn(serve_control(control, backend));
            terminated().await
        }
        Role::Echo { listen, start } => {
            start.print().await;
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            println!("echo on {listen}");
            tokio::spawn(echo(listener));
            terminated().await
        }
        Role::Idle { on_stop_url, start } => {
            start.print().await;
            terminated().await?;
            if let Some(url) = on_stop_url {
                match client::get(&url, &[]).await {
                    Ok(response) => println!("on stop: {url} answered {}", response.status),
                    Err(err) => println!("on stop: {url} failed: {err:#}"),
                }
            }
            Ok(())
        }
        Role::Http(calls) => calls.run().await,
        Role::Tcp(round_trips) => round_trips.run().await,
        Role::Get { url } => {
            let answer = client::get(&url, &[]).await?;
            print!("{}", answer.body);
            anyhow::ensure!(answer.status == 200, "{url} answered {}", answer.status);
            Ok(())
        }
    }
}

/// Returns on SIGTERM (what the kubelet sends) or SIGINT.
async fn terminated() -> Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    println!("stopping");
    Ok(())
}

async fn echo(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut reader, mut writer) = stream.split();
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
            let _ = writer.shutdown().await;
        });
    }
}

async fn serve_control(listener: TcpListener, backend: Arc<Backend>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let backend = backend.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let backend = backend.clone();
                async move { Ok::<_, Infallible>(control(&backend, request).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `GET /healthz`, `GET /stats`, `PUT /behaviour`.
async fn control(
    backend: &Backend,
    request: http::Request<Incoming>,
) -> http::Response<Full<Bytes>> {
    let respond = |status: u16, body: String| {
        http::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    match (request.method().as_str(), request.uri().path()) {
        ("GET", "/healthz") => respond(200, "ok\n".into()),
        ("GET", "/stats") => respond(
            200,
            serde_json::json!({
                "name": backend.name(),
                "hits": backend.hits(),
                "errors": backend.errors(),
                "connections": backend.connections(),
            })
            .to_string(),
        ),
        ("PUT", "/behaviour") => {
            let body = match request.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(err) => return respond(400, format!("reading the body: {err}\n")),
            };
            match String::from_utf8_lossy(&body).trim().parse::<Behaviour>() {
                Ok(behaviour) => {
                    println!("behaviour: {behaviour:?}");
                    backend.set(behaviour);
                    respond(200, "ok\n".into())
                }
                Err(err) => respond(400, format!("{err}\n")),
            }
        }
        _ => respond(404, "GET /healthz, GET /stats or PUT /behaviour\n".into()),
    }
}
