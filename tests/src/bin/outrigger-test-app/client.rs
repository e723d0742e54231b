//! The client roles: HTTP calls and TCP round trips, summed up as JSON on stdout for the test
//! that ran them with `kubectl exec`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn parse_duration(value: &str) -> Result<Duration, String> {
    outrigger_api::duration::parse(value).map_err(|err| err.to_string())
}

#[derive(clap::Args)]
pub struct HttpCalls {
    /// `http://host:port/path`: the app's view, a name its resolver looks up.
    #[arg(long)]
    url: String,
    /// `name: value`, sent with every call.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Calls to make.
    #[arg(long, default_value_t = 1)]
    requests: u64,
    /// Instead of `--requests`, keep calling until stdin closes (load for as long as a test needs).
    #[arg(long)]
    until_stdin_closes: bool,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Pause between one worker's calls.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pause: Duration,
    /// How long one call may take.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Unary gRPC calls (HTTP/2 POSTs of an empty message to the URL's path, `/<service>/<method>`)
    /// instead of GETs: the body is the answer's first message, as text, and the trailers come
    /// with the headers.
    #[arg(long)]
    grpc: bool,
}

/// What one HTTP call got back.
pub struct Answer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// What the calls got back, counted.
#[derive(Default)]
struct Tally {
    calls: u64,
    statuses: BTreeMap<String, u64>,
    bodies: BTreeMap<String, u64>,
    failures: BTreeMap<String, u64>,
    last: Option<Value>,
}

impl Tally {
    fn count(&mut self, outcome: Result<Answer>) {
        self.calls += 1;
        match outcome {
            Ok(answer) => {
                *self.statuses.entry(answer.status.to_string()).or_default() += 1;
                *self.bodies.entry(answer.body.clone()).or_default() += 1;
                self.last = Some(json!({
                    "status": answer.status,
                    "headers": answer.headers,
                    "body": answer.body,
                }));
            }
            Err(err) => *self.failures.entry(format!("{err:#}")).or_default() += 1,
        }
    }
}

impl HttpCalls {
    pub async fn run(self) -> Result<()> {
        let headers = self
            .headers
            .iter()
            .map(|header| {
                header
                    .split_once(':')
                    .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
                    .with_context(|| format!("--header {header:?} is not `name: value`"))
            })
            .collect::<Result<Vec<_>>>()?;
        let client = if self.grpc {
            Caller::Grpc(
                Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .build_http(),
            )
        } else {
            Caller::Http(http_client())
        };
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        if self.until_stdin_closes {
            tokio::task::spawn_blocking(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                let _ = stop.send(true);
            });
        }
        let call = Arc::new(self);
        let headers = Arc::new(headers);
        let workers: Vec<_> = (0..call.concurrency.max(1))
            .map(|worker| {
                let (call, headers, client, tally) =
                    (call.clone(), headers.clone(), client.clone(), tally.clone());
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let mut made = 0;
                    loop {
                        let more = if call.until_stdin_closes {
                            !*stopped.borrow()
                        } else {
                            // Worker w makes calls w, w + c, w + 2c, ... of --requests.
                            made * call.concurrency as u64 + (worker as u64) < call.requests
                        };
                        if !more {
                            break;
                        }
                        let outcome =
                            tokio::time::timeout(call.timeout, client.call(&call.url, &headers))
                                .await
                                .unwrap_or_else(|_| bail!("no answer within {:?}", call.timeout));
                        tally.lock().expect("tally lock").count(outcome);
                        made += 1;
                        tokio::time::sleep(call.pause).await;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.context("a calling task failed")?;
        }
        let tally = tally.lock().expect("tally lock");
        println!(
            "{}",
            json!({
                "calls": tally.calls,
                "statuses": tally.statuses,
                "bodies": tally.bodies,
                "failures": tally.failures,
                "last": tally.last,
            })
        );
        Ok(())
    }
}

/// How the calls are made.
#[derive(Clone)]
enum Caller {
    Http(Client<HttpConnector, Empty<Bytes>>),
    Grpc(Client<HttpConnector, Full<Bytes>>),
}

impl Caller {
    async fn call(&self, url: &str, headers: &[(String, String)]) -> Result<Answer> {
        match self {
            Self::Http(client) => request(client, url, headers).await,
            Self::Grpc(client) => grpc_call(client, url, headers).await,
        }
    }
}

/// One unary gRPC call of an empty message.
async fn grpc_call(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(String, String)],
) -> Result<Answer> {
    let mut builder = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    // An uncompressed message of no bytes.
    let request = builder
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .with_context(|| format!("building a gRPC call of {url}"))?;
    let response = client.request(request).await.context("calling")?;
    let status = response.status().as_u16();
    let mut headers = header_map(response.headers());
    let collected = response
        .into_body()
        .collect()
        .await
        .context("reading the answer")?;
    if let Some(trailers) = collected.trailers() {
        headers.extend(header_map(trailers));
    }
    let bytes = collected.to_bytes();
    let message = bytes.get(5..).unwrap_or_default();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(message).into_owned(),
    })
}

fn header_map(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn http_client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn request(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    headers: &[(String, String)],
) -> Result<Answer> {
    let mut builder = http::Request::get(url);
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Empty::new())
        .with_context(|| format!("building a request for {url}"))?;
    let response = client.request(request).await.context("calling")?;
    let status = response.status().as_u16();
    let headers = header_map(response.headers());
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the body")?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One GET of `url`, on a connection of its own.
pub async fn get(url: &str, headers: &[(String, String)]) -> Result<Answer> {
    tokio::time::timeout(
        Duration::from_secs(10),
        request(&http_client(), url, headers),
    )
    .await
    .unwrap_or_else(|_| bail!("no answer within 10s"))
}

#[derive(clap::Args)]
pub struct TcpRoundTrips {
    /// `host:port`.
    #[arg(long)]
    addr: String,
    /// What to send; a round trip succeeds when exactly this comes back.
    #[arg(long)]
    message: String,
    /// Round trips, each on a connection of its own.
    #[arg(long, default_value_t = 1)]
    count: u64,
}

impl TcpRoundTrips {
    pub async fn run(self) -> Result<()> {
        let mut echoed = 0;
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        for _ in 0..self.count {
            let round_trip = tokio::time::timeout(Duration::from_secs(10), self.round_trip())
                .await
                .unwrap_or_else(|_| bail!("no echo within 10s"));
            match round_trip {
                Ok(()) => echoed += 1,
                Err(err) => *failures.entry(format!("{err:#}")).or_default() += 1,
            }
        }
        println!(
            "{}",
            json!({"round_trips": self.count, "echoed": echoed, "failures": failures})
        );
        Ok(())
    }

    async fn round_trip(&self) -> Result<()> {
        let mut stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream
            .write_all(self.message.as_bytes())
            .await
            .context("sending")?;
        let mut echo = vec![0; self.message.len()];
        stream
            .read_exact(&mut echo)
            .await
            .context("reading the echo")?;
        if echo != self.message.as_bytes() {
            bail!(
                "sent {:?}, got {:?} back",
                self.message,
                String::from_utf8_lossy(&echo)
            );
        }
        Ok(())
    }
}
