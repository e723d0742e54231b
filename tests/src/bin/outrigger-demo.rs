//! `cargo xtask demo`: Outrigger end to end on this machine, no cluster needed.
//!
//! The controller reads the demo's manifests (`examples/demo/`, copied to a scratch directory you
//! may edit); `reviews` v1 answers every request and the canary v2 fails 30% of them; a proxy
//! carries an app's calls to `reviews` under the DestinationPolicy; a load generator plays the
//! app. Every second a line shows the split, the success rate the app sees against the one the
//! backends give, retries and ejections. Every so often the demo edits the policy itself, so you
//! can watch the proxies follow. Ctrl-C stops everything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use outrigger_tests::process::{ChildProcess, free_port, sibling_binary};
use outrigger_tests::{Backend, Behaviour};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "outrigger-demo",
    about = "Outrigger end to end on this machine"
)]
struct Cli {
    /// The demo's manifests.
    #[arg(long, default_value = "examples/demo")]
    manifests: PathBuf,
    /// Requests per second the app sends.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Seconds between the demo's own policy edits.
    #[arg(long, default_value_t = 15)]
    edit_every: u64,
}

const POLICY_FILE: &str = "reviews-policy.yaml";
/// Where the manifests put the two versions of `reviews`.
const STABLE: &str = "127.0.0.1:9081";
const CANARY: &str = "127.0.0.1:9082";
/// Percent of requests the canary fails: often enough that retries matter and ejections happen,
/// rarely enough that it spends most of its time in rotation.
const CANARY_FAILURES: u32 = 30;

/// The demo's script: what each step does to the policy, and what to expect.
/// Rewrites the policy file's text.
type Edit = fn(&str) -> String;

const STEPS: [(&str, Edit); 4] = [
    (
        "shift half the traffic to the canary: more retries, more ejections, the app still fine",
        |policy| set_weights(policy, 50, 50),
    ),
    (
        "remove the retries: the canary's failures now reach the app",
        |policy| without_block(&set_weights(policy, 50, 50), "retries:"),
    ),
    (
        "send everything to stable: the canary gets nothing",
        |policy| without_block(&set_weights(policy, 100, 0), "retries:"),
    ),
    ("back to the start: 90/10 with retries", |policy| {
        policy.to_string()
    }),
];

/// The policy with the `trafficSplit` weights of `stable` and `canary` set.
fn set_weights(policy: &str, stable: u32, canary: u32) -> String {
    let lines = policy.lines().map(|line| {
        let indent = &line[..line.len() - line.trim_start().len()];
        for (subset, weight) in [("stable", stable), ("canary", canary)] {
            if line
                .trim_start()
                .starts_with(&format!("- {{subset: {subset}, weight:"))
            {
                return format!("{indent}- {{subset: {subset}, weight: {weight}}}");
            }
        }
        line.to_string()
    });
    lines.collect::<Vec<_>>().join("\n") + "\n"
}

/// The policy without the `spec` field starting with `key` (and everything indented below it).
fn without_block(policy: &str, key: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = None;
    for line in policy.lines() {
        let indent = line.len() - line.trim_start().len();
        match skipping {
            Some(depth) if indent > depth && !line.trim().is_empty() => continue,
            _ => skipping = None,
        }
        if line.trim_start().starts_with(key) {
            skipping = Some(indent);
            continue;
        }
        out.push(line);
    }
    out.join("\n") + "\n"
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let scratch = std::env::temp_dir().join(format!("outrigger-demo-{}", std::process::id()));
    copy_manifests(&cli.manifests, &scratch)?;
    let original_policy = std::fs::read_to_string(scratch.join(POLICY_FILE))
        .with_context(|| format!("reading {POLICY_FILE} from {}", cli.manifests.display()))?;

    let stable = Backend::start_on(STABLE.parse()?, "v1").await;
    let canary = Backend::start_on(CANARY.parse()?, "v2").await;
    canary.set(Behaviour::FailPercent(CANARY_FAILURES));

    let (grpc, controller_admin) = (free_port()?, free_port()?);
    let mut controller = ChildProcess::spawn(
        "controller",
        Command::new(sibling_binary("outrigger-controller")?)
            .arg("--manifests")
            .arg(&scratch)
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--admin-addr",
                &controller_admin.to_string(),
            ]),
    )?;
    controller
        .wait_ready(controller_admin, "/ready", Duration::from_secs(20))
        .await?;
    let (outbound, proxy_admin) = (free_port()?, free_port()?);
    let mut proxy = ChildProcess::spawn(
        "proxy",
        Command::new(sibling_binary("outrigger-proxy")?)
            .args([
                "--control-plane",
                &format!("http://{grpc}"),
                "--namespace",
                "demo",
            ])
            .args([
                "--workload",
                "productpage-0",
                "--outbound-addr",
                &outbound.to_string(),
            ])
            .args([
                "--inbound-addr",
                &free_port()?.to_string(),
                "--admin-addr",
                &proxy_admin.to_string(),
                // reviews v1 and v2 listen on loopback too.
                "--allow-loopback-endpoints",
            ]),
    )?;
    proxy
        .wait_ready(proxy_admin, "/ready", Duration::from_secs(20))
        .await?;

    println!(
        "Outrigger demo: an app calls `reviews` through its proxy at {}/s.",
        cli.rate
    );
    println!(
        "  reviews v1 (stable) on {STABLE} answers every request; v2 (canary) on {CANARY} fails {CANARY_FAILURES}%."
    );
    println!(
        "  The policy the controller serves: {}",
        scratch.join(POLICY_FILE).display()
    );
    println!("  Edit it while this runs and watch the next lines change. Ctrl-C stops.\n");
    print_policy(&original_policy);

    let tally = Arc::new(Tally::default());
    let load = tokio::spawn(generate_load(outbound, cli.rate, tally.clone()));
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut previous = Snapshot::default();
    let mut step = 0;
    println!("{}", Snapshot::HEADER);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
        let elapsed = started.elapsed().as_secs();
        let now = Snapshot::take(&tally, &stable, &canary, proxy_admin).await;
        println!("{}", now.line(&previous, elapsed));
        previous = now;
        if cli.seconds > 0 && elapsed >= cli.seconds {
            break;
        }
        if cli.edit_every > 0 && elapsed.is_multiple_of(cli.edit_every) {
            let (what, edit) = STEPS[step % STEPS.len()];
            let policy = edit(&original_policy);
            std::fs::write(scratch.join(POLICY_FILE), &policy).context("editing the policy")?;
            println!("\n>>> edited {POLICY_FILE}: {what}");
            print_policy(&policy);
            println!("{}", Snapshot::HEADER);
            step += 1;
        }
    }
    load.abort();
    drop((proxy, controller));
    let _ = std::fs::remove_dir_all(&scratch);
    println!("\nstopped: controller and proxy shut down.");
    Ok(())
}

fn copy_manifests(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let entries = std::fs::read_dir(from)
        .with_context(|| format!("reading {} (run from the repository root)", from.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, to.join(path.file_name().expect("a file")))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    if !to.join(POLICY_FILE).is_file() {
        bail!("{} has no {POLICY_FILE}", from.display());
    }
    Ok(())
}

/// The lines of the policy that matter to the demo.
fn print_policy(policy: &str) {
    let spec = policy.lines().skip_while(|l| !l.starts_with("spec:"));
    for line in spec.filter(|l| !l.trim_start().starts_with('#')) {
        println!("    | {line}");
    }
    println!();
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    /// Answered or failed: the base of the app's success rate.
    done: AtomicU64,
    ok: AtomicU64,
}

async fn generate_load(outbound: SocketAddr, rate: u32, tally: Arc<Tally>) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    loop {
        ticks.tick().await;
        let (client, tally) = (client.clone(), tally.clone());
        tokio::spawn(async move {
            tally.sent.fetch_add(1, Ordering::Relaxed);
            let request = http::Request::get(format!("http://{outbound}/reviews/1"))
                .header(http::header::HOST, "reviews:9080")
                .body(Empty::new())
                .expect("a valid request");
            let ok = match client.request(request).await {
                Ok(response) => {
                    let ok = response.status().is_success();
                    ok && response.into_body().collect().await.is_ok()
                }
                Err(_) => false,
            };
            tally.done.fetch_add(1, Ordering::Relaxed);
            if ok {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Counters at one moment; a line shows the difference between two.
#[derive(Default)]
struct Snapshot {
    sent: u64,
    done: u64,
    ok: u64,
    stable: u64,
    canary: u64,
    backend_errors: u64,
    retries: u64,
    ejections: u64,
    canary_state: String,
}

impl Snapshot {
    const HEADER: &str = " time  req/s  to stable  to canary  app success  backend success  retries  ejections  canary";

    async fn take(tally: &Tally, stable: &Backend, canary: &Backend, admin: SocketAddr) -> Self {
        let metrics = scrape(admin, "/metrics").await.unwrap_or_default();
        let sum = |name: &str| -> u64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map(|v| v as u64)
                .sum()
        };
        let endpoints = scrape(admin, "/endpoints").await.unwrap_or_default();
        Self {
            sent: tally.sent.load(Ordering::Relaxed),
            done: tally.done.load(Ordering::Relaxed),
            ok: tally.ok.load(Ordering::Relaxed),
            stable: stable.hits(),
            canary: canary.hits(),
            backend_errors: stable.errors() + canary.errors(),
            retries: sum("outrigger_retries_total{"),
            ejections: sum("outrigger_outlier_ejections_total{"),
            canary_state: endpoint_state(&endpoints, CANARY).unwrap_or_else(|| "-".into()),
        }
    }

    fn line(&self, before: &Snapshot, elapsed: u64) -> String {
        let percent = |part: u64, whole: u64| {
            if whole == 0 {
                "-".to_string()
            } else {
                format!("{:.1}%", 100.0 * part as f64 / whole as f64)
            }
        };
        let sent = self.sent - before.sent;
        let (stable, canary) = (self.stable - before.stable, self.canary - before.canary);
        let served = stable + canary;
        let backend_ok = served.saturating_sub(self.backend_errors - before.backend_errors);
        format!(
            "{elapsed:>4}s  {sent:>5}  {:>9}  {:>9}  {:>11}  {:>15}  {:>7}  {:>9}  {}",
            percent(stable, served),
            percent(canary, served),
            percent(self.ok - before.ok, self.done - before.done),
            percent(backend_ok, served),
            self.retries - before.retries,
            self.ejections,
            self.canary_state,
        )
    }
}

async fn scrape(admin: SocketAddr, path: &str) -> Option<String> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .get(format!("http://{admin}{path}").parse().ok()?)
        .await
        .ok()?;
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// The state (`healthy`, `ejected`, `probation`) of the endpoint at `address` in `/endpoints`.
fn endpoint_state(endpoints_json: &str, address: &str) -> Option<String> {
    let destinations: serde_json::Value = serde_json::from_str(endpoints_json).ok()?;
    destinations
        .as_object()?
        .values()
        .filter_map(|endpoints| endpoints.as_array())
        .flatten()
        .find(|endpoint| endpoint["address"] == address)
        .and_then(|endpoint| endpoint["state"].as_str())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_edits_the_policy_and_returns_to_the_start() {
        let original = "spec:\n  trafficSplit:\n  - {subset: stable, weight: 90}\n  - {subset: canary, weight: 10}\n  retries:\n    attempts: 2\n    perTryTimeout: 500ms\n  outlierDetection:\n    interval: 1s\n";
        let steps: Vec<String> = STEPS.iter().map(|(_, edit)| edit(original)).collect();
        assert_eq!(
            steps[0],
            "spec:\n  trafficSplit:\n  - {subset: stable, weight: 50}\n  - {subset: canary, weight: 50}\n  retries:\n    attempts: 2\n    perTryTimeout: 500ms\n  outlierDetection:\n    interval: 1s\n"
        );
        assert_eq!(
            steps[1],
            "spec:\n  trafficSplit:\n  - {subset: stable, weight: 50}\n  - {subset: canary, weight: 50}\n  outlierDetection:\n    interval: 1s\n"
        );
        assert!(
            steps[2].contains("{subset: stable, weight: 100}")
                && steps[2].contains("{subset: canary, weight: 0}")
        );
        assert_eq!(steps[3], original);
    }

    #[test]
    fn reads_an_endpoint_state() {
        let json = r#"{"k": [{"address": "127.0.0.1:9081", "state": "healthy"}, {"address": "127.0.0.1:9082", "pod": "x", "state": "ejected"}]}"#;
        assert_eq!(
            endpoint_state(json, "127.0.0.1:9082").as_deref(),
            Some("ejected")
        );
        assert_eq!(endpoint_state(json, "127.0.0.1:1"), None);
    }
}
