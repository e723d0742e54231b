//! `bench control-plane`: how fast a policy edit reaches every proxy, and what the controller
//! costs, with many proxies and endpoints.
//!
//! The controller (the real binary) serves a manifests directory holding one Service with many
//! endpoints and its DestinationPolicy. One process opens many configuration streams to it, each a
//! proxy of its own (its own HTTP/2 connection, the real protocol): it says Hello, subscribes to
//! the Service, and acknowledges every version at once. Then the policy file is edited, again and
//! again, and each stream notes when the new version reached it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use outrigger_api::proto::{
    self as proto, Ack, EndpointsRequest, Hello, ProxyMessage, Subscribe, Subscription,
    controller_message, discovery_client::DiscoveryClient, proxy_message,
};
use outrigger_tests::process::{ChildProcess, free_port};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::proxy::memory;

const KEY: &str = "reviews.bench.svc.cluster.local:9080";
const ENDPOINTS_PER_SLICE: usize = 100;

#[derive(Args)]
pub struct ControlPlaneArgs {
    /// The outrigger-controller binary to measure.
    #[arg(long)]
    controller_bin: PathBuf,
    /// Configuration streams, one per simulated proxy.
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    /// Endpoints of the Service every proxy subscribes to.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    /// Policy edits to time.
    #[arg(long, default_value_t = 10)]
    edits: usize,
    /// Endpoint changes (one endpoint of one EndpointSlice) to time.
    #[arg(long, default_value_t = 5)]
    endpoint_changes: usize,
    /// Replace the `## Control plane, <proxies> proxies` section of this Markdown file with the
    /// results (one section per fleet size, so that runs of different sizes stand side by side).
    #[arg(long)]
    write: Option<PathBuf>,
    /// How to reproduce this run, as recorded in the results (default: this command line).
    #[arg(long)]
    command: Option<String>,
}

/// The latest version each simulated proxy received, and when.
type Received = Arc<Mutex<Vec<Option<(String, Instant)>>>>;

/// Bytes of endpoints every simulated proxy fetched, together.
type Fetched = Arc<std::sync::atomic::AtomicU64>;

pub fn run(args: ControlPlaneArgs, machine: String, date: String) -> Result<()> {
    if args.proxies == 0 || args.endpoints == 0 {
        bail!("--proxies and --endpoints must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let manifests = std::env::temp_dir().join(format!("outrigger-bench-cp-{}", std::process::id()));
    write_manifests(&manifests, args.endpoints)?;
    write_policy(&manifests, 1)?;
    let result = runtime.block_on(measure(&args, &manifests));
    let _ = std::fs::remove_dir_all(&manifests);
    let measured = result?;
    let section = measured.report(&args, &machine, &date);
    print!("{section}");
    if let Some(path) = &args.write {
        crate::write_section(path, &section)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

struct Measured {
    /// Per edit, each proxy's time from the edit to receiving (and acknowledging) it.
    latencies: Vec<Vec<Duration>>,
    /// The same per endpoint change.
    endpoint_latencies: Vec<Vec<Duration>>,
    /// Endpoint bytes fetched per proxy: on connecting, and per endpoint change.
    fetched_on_connect: u64,
    fetched_per_change: u64,
    /// Bytes.
    rss_idle: u64,
    rss_connected: u64,
    /// After the edits, once a second has gone by without any.
    rss_settled: u64,
    rss_peak: u64,
    connect_time: Duration,
    push_seconds: String,
}

/// How long the controller is left alone before its settled memory is read.
const SETTLE: Duration = Duration::from_secs(1);

async fn measure(args: &ControlPlaneArgs, manifests: &Path) -> Result<Measured> {
    let (grpc, admin) = (free_port()?, free_port()?);
    let mut controller = ChildProcess::spawn(
        "controller",
        Command::new(&args.controller_bin)
            .arg("--manifests")
            .arg(manifests)
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .env("RUST_LOG", "warn"),
    )?;
    controller
        .wait_ready(admin, "/ready", Duration::from_secs(60))
        .await?;
    let rss_idle = memory(controller.pid())?.rss;

    let received: Received = Arc::new(Mutex::new(vec![None; args.proxies]));
    let fetched: Fetched = Arc::default();
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for proxy in 0..args.proxies {
        streams.spawn(simulate_proxy(
            format!("http://{grpc}"),
            proxy,
            received.clone(),
            fetched.clone(),
            stopped.clone(),
        ));
    }
    let first = match wait_all(&received, |_| true, Duration::from_secs(120)).await {
        Ok(first) => first,
        Err(error) => return Err(with_stream_failure(error, &mut streams)),
    };
    let connect_time = started.elapsed();
    let rss_connected = memory(controller.pid())?.rss;
    let per_proxy = |bytes: u64| bytes / args.proxies as u64;
    let fetched_on_connect = per_proxy(fetched.swap(0, Ordering::Relaxed));

    let (latencies, previous) = time_changes(&received, first, args.edits, |edit| {
        write_policy(manifests, edit as u64 + 2)
    })
    .await?;
    let (endpoint_latencies, _) =
        time_changes(&received, previous, args.endpoint_changes, |change| {
            write_slice(manifests, 0, args.endpoints, change + 1)
        })
        .await?;
    let fetched_per_change =
        per_proxy(fetched.load(Ordering::Relaxed)) / args.endpoint_changes.max(1) as u64;
    tokio::time::sleep(SETTLE).await;
    let rss_settled = memory(controller.pid())?.rss;
    let rss_peak = memory(controller.pid())?.peak;
    let push_seconds = scrape_push_seconds(admin).await.unwrap_or_default();
    let _ = stop.send(true);
    while streams.join_next().await.is_some() {}
    drop(controller);
    Ok(Measured {
        latencies,
        endpoint_latencies,
        fetched_on_connect,
        fetched_per_change,
        rss_idle,
        rss_connected,
        rss_settled,
        rss_peak,
        connect_time,
        push_seconds,
    })
}

/// `error`, with why the first simulated proxy that gave up did, if one did.
fn with_stream_failure(
    error: anyhow::Error,
    streams: &mut tokio::task::JoinSet<Result<()>>,
) -> anyhow::Error {
    while let Some(ended) = streams.try_join_next() {
        if let Ok(Err(failure)) = ended {
            return error.context(format!("a simulated proxy failed: {failure:#}"));
        }
    }
    error
}

/// Makes `count` changes one after the other, each timed from when it is made to when each proxy
/// received the version it led to; returns the times and the last version.
async fn time_changes(
    received: &Received,
    mut previous: String,
    count: usize,
    change: impl Fn(usize) -> Result<()>,
) -> Result<(Vec<Vec<Duration>>, String)> {
    let mut latencies = Vec::new();
    for n in 0..count {
        change(n)?;
        let changed = Instant::now();
        let version = wait_all(
            received,
            |version| version != previous,
            Duration::from_secs(60),
        )
        .await?;
        let arrivals = received.lock().expect("received lock").clone();
        latencies.push(
            arrivals
                .into_iter()
                .map(|arrival| {
                    arrival
                        .expect("every proxy received")
                        .1
                        .saturating_duration_since(changed)
                })
                .collect(),
        );
        previous = version;
    }
    Ok((latencies, previous))
}

/// Waits until every proxy holds one same version for which `is_new` holds; returns it.
async fn wait_all(
    received: &Received,
    is_new: impl Fn(&str) -> bool,
    deadline: Duration,
) -> Result<String> {
    let until = Instant::now() + deadline;
    loop {
        {
            let received = received.lock().expect("received lock");
            let versions: Vec<Option<&str>> = received
                .iter()
                .map(|r| r.as_ref().map(|(v, _)| v.as_str()))
                .collect();
            if let Some(Some(first)) = versions.first()
                && is_new(first)
                && versions.iter().all(|v| *v == Some(*first))
            {
                return Ok(first.to_string());
            }
        }
        if Instant::now() > until {
            let missing = received
                .lock()
                .expect("received lock")
                .iter()
                .filter(|r| r.is_none())
                .count();
            bail!(
                "not every proxy got the new version within {deadline:?} ({missing} never got any)"
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One proxy's configuration stream: Hello, Subscribe, and an Ack for every version.
/// Connects as a proxy does, trying again after a failure: when a whole fleet connects at once,
/// some connections find the listen queue full.
async fn connect(url: String) -> Result<DiscoveryClient<tonic::transport::Channel>> {
    const ATTEMPTS: u32 = 20;
    let mut attempt = 1;
    loop {
        match DiscoveryClient::connect(url.clone()).await {
            Ok(client) => return Ok(client),
            Err(error) if attempt == ATTEMPTS => {
                return Err(error)
                    .context(format!("connecting to the controller, {ATTEMPTS} times"));
            }
            Err(_) => {
                let pause = Duration::from_millis(100) * attempt.min(10);
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
        }
    }
}

async fn simulate_proxy(
    url: String,
    id: usize,
    received: Received,
    fetched: Fetched,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    let mut client = connect(url)
        .await?
        .max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    let send = |message| ProxyMessage {
        message: Some(message),
    };
    let hello = proxy_message::Message::Hello(Hello {
        namespace: "bench".into(),
        workload: format!("client-{id}"),
        service_account: "client".into(),
        proxy_version: "bench".into(),
    });
    let subscribe = proxy_message::Message::Subscribe(Subscribe {
        destinations: vec![Subscription {
            key: KEY.into(),
            ..Default::default()
        }],
    });
    tx.send(send(hello)).await?;
    tx.send(send(subscribe)).await?;
    let mut incoming = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let mut held: HashMap<String, String> = HashMap::new();
    loop {
        let message = tokio::select! {
            message = incoming.message() => message?,
            _ = stopped.changed() => return Ok(()),
        };
        let Some(message) = message else {
            return Ok(());
        };
        if let Some(controller_message::Message::Update(update)) = message.message {
            // As a proxy does: fetch the endpoint groups the destination names that are not held.
            let destination = proto::Destination::decode(update.destination)?;
            let missing: Vec<String> = destination
                .endpoint_groups
                .into_iter()
                .filter(|group| held.get(&group.name) != Some(&group.version))
                .map(|group| group.name)
                .collect();
            if !missing.is_empty() {
                let request = EndpointsRequest {
                    key: update.key.clone(),
                    groups: missing,
                };
                for group in client.endpoints(request).await?.into_inner().groups {
                    fetched.fetch_add(group.endpoints.len() as u64, Ordering::Relaxed);
                    held.insert(group.name, group.version);
                }
            }
            let at = Instant::now();
            tx.send(send(proxy_message::Message::Ack(Ack {
                key: update.key,
                version: update.version.clone(),
            })))
            .await?;
            received.lock().expect("received lock")[id] = Some((update.version, at));
        }
    }
}

/// The Service, and its EndpointSlices each in a file of its own, so that changing one is one
/// file's event, as it is one object's watch event in a cluster.
fn write_manifests(dir: &Path, endpoints: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bench}\n\
         spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 9080}]}\n";
    replace_file(dir, "reviews.yaml", service).context("writing the Service")?;
    for slice in 0..endpoints.div_ceil(ENDPOINTS_PER_SLICE) {
        write_slice(dir, slice, endpoints, 0)?;
    }
    Ok(())
}

/// EndpointSlice number `slice`; `change` > 0 adds one endpoint to it, different for each
/// `change`.
fn write_slice(dir: &Path, slice: usize, endpoints: usize, change: usize) -> Result<()> {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: reviews-{slice}, namespace: bench, labels: {{kubernetes.io/service-name: reviews}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints:\n"
    );
    for index in slice * ENDPOINTS_PER_SLICE..((slice + 1) * ENDPOINTS_PER_SLICE).min(endpoints) {
        // Addresses only: nothing ever connects to them.
        writeln!(
            yaml,
            "- {{addresses: [127.1.{}.{}], conditions: {{ready: true}}}}",
            index / 250,
            index % 250 + 1
        )?;
    }
    if change > 0 {
        writeln!(
            yaml,
            "- {{addresses: [127.2.{}.{}], conditions: {{ready: true}}}}",
            change / 250,
            change % 250 + 1
        )?;
    }
    replace_file(dir, &format!("reviews-slice-{slice}.yaml"), &yaml)
        .with_context(|| format!("writing EndpointSlice {slice}"))
}

/// The policy, with a timeout that differs at each edit so each edit is a new version.
fn write_policy(dir: &Path, seconds: u64) -> Result<()> {
    let policy = format!(
        "apiVersion: outrigger.dev/v1alpha1\nkind: DestinationPolicy\n\
         metadata: {{name: reviews, namespace: bench}}\n\
         spec: {{host: reviews, timeout: {seconds}s, retries: {{attempts: 2}}}}\n"
    );
    replace_file(dir, "reviews-policy.yaml", &policy).context("writing the policy")
}

/// Written whole, then renamed over the old file: the controller never reads half a file.
fn replace_file(dir: &Path, name: &str, content: &str) -> std::io::Result<()> {
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, content)?;
    std::fs::rename(&partial, dir.join(name))
}

/// The controller's own `outrigger_controller_push_seconds` histogram, as text.
async fn scrape_push_seconds(admin: std::net::SocketAddr) -> Option<String> {
    let (_, body) = crate::proxy::get(admin, "/metrics", &admin.to_string())
        .await
        .ok()?;
    Some(
        body.lines()
            .filter(|line| line.starts_with("outrigger_controller_push_seconds"))
            .map(|line| format!("    {line}\n"))
            .collect(),
    )
}

/// Every proxy's time, and each change's slowest, both sorted.
fn spread(latencies: &[Vec<Duration>]) -> (Vec<Duration>, Vec<Duration>) {
    let mut all: Vec<Duration> = latencies.iter().flatten().copied().collect();
    all.sort();
    let mut last: Vec<Duration> = latencies
        .iter()
        .map(|change| change.iter().copied().max().unwrap_or_default())
        .collect();
    last.sort();
    (all, last)
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

impl Measured {
    fn report(&self, args: &ControlPlaneArgs, machine: &str, date: &str) -> String {
        let (all, last) = spread(&self.latencies);
        let (endpoint_all, endpoint_last) = spread(&self.endpoint_latencies);
        let command = args
            .command
            .clone()
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
        let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
        let mut out = format!("## Control plane, {} proxies\n\n", args.proxies);
        let _ = writeln!(
            out,
            "How fast a DestinationPolicy edit and an endpoint change reach every proxy, and what the \
             controller costs.\n"
        );
        let _ = writeln!(out, "- Command: `{command}`");
        let _ = writeln!(out, "- Date: {date}");
        let _ = writeln!(out, "- Machine: {machine}");
        let _ = writeln!(
            out,
            "- Setup: the controller binary (release) in manifests mode, serving one Service with {} endpoints \
             ({} EndpointSlices) and its DestinationPolicy; {} configuration streams from one process, each its \
             own HTTP/2 connection, subscribed to that Service, fetching its endpoints with the `Endpoints` \
             call when a version names ones it does not hold (as a proxy does; here once, on connecting), and \
             acknowledging every version at once; {} edits of the policy file (its timeout), each timed from \
             the file's replacement to the moment each stream received the new version, then {} endpoint \
             changes (one endpoint added to one EndpointSlice), timed the same way. Policy edits leave \
             the endpoints as they are, so each sends every stream a few hundred bytes; an endpoint \
             change sends the new version of one group (one slice's endpoints). The manifests source is told of edits by the \
             filesystem (inotify) and reads the directory once its events have been quiet for 10 ms, so \
             about 10 ms of each figure is that wait; the controller's own histogram below starts when \
             it sees the change.\n",
            args.endpoints,
            args.endpoints.div_ceil(ENDPOINTS_PER_SLICE),
            args.proxies,
            args.edits,
            args.endpoint_changes
        );
        let proxies = args.proxies;
        let at = |latencies: &[Duration], p: f64| format!("{} ms", ms(percentile(latencies, p)));
        let rows = [
            (
                "Edit to a proxy's acknowledgement, p50".to_string(),
                at(&all, 50.0),
            ),
            (
                "Edit to a proxy's acknowledgement, p99".into(),
                at(&all, 99.0),
            ),
            (
                "Edit to the last proxy's acknowledgement, p50 over edits".into(),
                at(&last, 50.0),
            ),
            (
                "Edit to the last proxy's acknowledgement, worst edit".into(),
                at(&last, 100.0),
            ),
            (
                "Endpoint change to a proxy's acknowledgement, p50".into(),
                at(&endpoint_all, 50.0),
            ),
            (
                "Endpoint change to a proxy's acknowledgement, p99".into(),
                at(&endpoint_all, 99.0),
            ),
            (
                "Endpoint change to the last proxy's acknowledgement, worst change".into(),
                at(&endpoint_last, 100.0),
            ),
            (
                "Endpoints fetched per proxy: on connecting / per endpoint change".into(),
                format!(
                    "{} / {}",
                    kib(self.fetched_on_connect),
                    kib(self.fetched_per_change)
                ),
            ),
            (
                format!("{proxies} streams connected and first version acknowledged"),
                format!("{} ms", ms(self.connect_time)),
            ),
            (
                "Controller RSS, index loaded, no proxies".into(),
                mib(self.rss_idle),
            ),
            (
                format!("Controller RSS, {proxies} proxies connected"),
                mib(self.rss_connected),
            ),
            (
                format!(
                    "Controller RSS, {proxies} proxies connected, {SETTLE:?} after the last edit"
                ),
                mib(self.rss_settled),
            ),
            ("Controller peak RSS (VmHWM)".into(), mib(self.rss_peak)),
        ];
        let _ = writeln!(out, "| Measure | Value |\n|---|---:|");
        for (measure, value) in rows {
            let _ = writeln!(out, "| {measure} | {value} |");
        }
        let _ = writeln!(
            out,
            "\nThe controller's `outrigger_controller_push_seconds` (change seen to acknowledged) at the end:\n"
        );
        let _ = writeln!(out, "{}", self.push_seconds);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&values, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&values, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn manifests_hold_every_endpoint_in_slices() {
        let dir = tempfile::tempdir().unwrap();
        write_manifests(dir.path(), 250).unwrap();
        let all = || -> String {
            let mut files: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .collect();
            files.sort();
            files
                .iter()
                .map(|file| std::fs::read_to_string(file).unwrap())
                .collect()
        };
        let yaml = all();
        assert_eq!(yaml.matches("kind: Service").count(), 1);
        assert_eq!(yaml.matches("kind: EndpointSlice").count(), 3);
        assert_eq!(yaml.matches("conditions: {ready: true}").count(), 250);
        assert!(yaml.contains("127.1.0.250") && yaml.contains("127.1.0.1]"));

        // A change adds one endpoint to one slice.
        write_slice(dir.path(), 0, 250, 3).unwrap();
        assert_eq!(all().matches("conditions: {ready: true}").count(), 251);
        let first = std::fs::read_to_string(dir.path().join("reviews-slice-0.yaml")).unwrap();
        assert!(first.contains("127.2.0.4]"));
    }
}
