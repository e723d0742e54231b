//! `outrigger-bench`: measures Outrigger components on loopback. Run it through
//! `cargo xtask bench <target>`, which builds it and the binaries it measures in release mode.

#[path = "outrigger-bench/control_plane.rs"]
mod control_plane;
#[path = "outrigger-bench/loadgen.rs"]
mod loadgen;
#[path = "outrigger-bench/mesh.rs"]
mod mesh;
#[path = "outrigger-bench/proxy.rs"]
mod proxy;
#[path = "outrigger-bench/report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use outrigger_tests::process::{free_port, host_address};
use outrigger_tests::{Backend, ControlPlane, destination};
use tokio::runtime::{Handle, Runtime};

use loadgen::{Load, Target};
use mesh::{MESH_AUTHORITY, Mesh};
use proxy::Proxy;
use report::{Cost, MeshFigures, Report, Row, Summary};

/// The Service the proxied path calls, as the proxy resolves it from the request's authority.
const SERVICE_AUTHORITY: &str = "bench.default.svc.cluster.local:80";
/// The same backend as another Service, whose DestinationPolicy enables every policy.
const POLICIES_AUTHORITY: &str = "bench-policies.default.svc.cluster.local:80";
/// A Service whose calls an HTTPRoute serves, sending them to the bench Service.
const ROUTED_AUTHORITY: &str = "bench-routed.default.svc.cluster.local:80";
/// A request that cannot leave this long after its scheduled time counts as an error.
const MAX_LAG: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(about = "Benchmarks Outrigger components on loopback")]
struct Cli {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Subcommand)]
enum BenchTarget {
    /// Latency, throughput and cost that the proxy adds to requests, against a direct path.
    Proxy(ProxyArgs),
    /// Time from a policy edit to every proxy's acknowledgement, and the controller's memory, with
    /// many proxies and endpoints.
    ControlPlane(control_plane::ControlPlaneArgs),
}

#[derive(Args)]
struct ProxyArgs {
    /// The outrigger-proxy binary to measure.
    #[arg(long, required_unless_present = "direct_only")]
    proxy_bin: Option<PathBuf>,
    /// The outrigger-controller binary: with it, the two-proxy path too (a client proxy calling a
    /// server proxy over mutual TLS, both certified by the controller against the test
    /// cluster's API server), and the server proxy's handshakes per second.
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Callers opening mutual TLS connections to the server proxy at once, for handshakes per
    /// second.
    #[arg(long, default_value_t = 8)]
    handshake_callers: usize,
    /// Measure the direct path only: a baseline for the load generator itself.
    #[arg(long, conflicts_with = "write")]
    direct_only: bool,
    /// Request rates to measure, in requests per second.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "500,1000,2000,4000,8000,16000,24000,32000"
    )]
    rates: Vec<u32>,
    /// How long each rate is recorded on each path.
    #[arg(long, default_value = "5s", value_parser = outrigger_proxy::parse_duration)]
    duration: Duration,
    /// Load sent, unrecorded, before each recording.
    #[arg(long, default_value = "1s", value_parser = outrigger_proxy::parse_duration)]
    warmup: Duration,
    /// Keep-alive HTTP/1.1 connections per path.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Replace the `## Proxy` section of this Markdown file with the results.
    #[arg(long)]
    write: Option<PathBuf>,
    /// How to reproduce this run, as recorded in the results (default: this command line).
    #[arg(long)]
    command: Option<String>,
}

fn main() -> Result<()> {
    match Cli::parse().target {
        BenchTarget::Proxy(args) => bench_proxy(args),
        BenchTarget::ControlPlane(args) => control_plane::run(args, machine()?, now()?),
    }
}

fn bench_proxy(args: ProxyArgs) -> Result<()> {
    if args.rates.is_empty() || args.rates.contains(&0) {
        bail!("--rates needs one or more rates above zero");
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    // Taken before we add load of our own: other work on the machine skews every number, and the
    // report says how much there was.
    let machine = machine()?;
    // The backend and the load generator get a runtime (and a thread) each, so that one's backlog
    // does not delay the other's timers.
    let backend_runtime = runtime("bench-backend")?;
    let client_runtime = runtime("bench-client")?;
    let client = client_runtime.handle();

    // On this machine's address, not loopback: the server proxy of the two-proxy path passes
    // callers from other addresses only to an app that is not on loopback, as in a pod.
    let backend = backend_runtime.block_on(Backend::start_on(
        std::net::SocketAddr::new(host_address(), 0),
        "bench",
    ));
    let control_plane = backend_runtime.block_on(ControlPlane::start());
    control_plane.publish(
        SERVICE_AUTHORITY,
        destination("default", "bench", 80, &[(backend.addr, &[])]),
    );
    control_plane.publish(POLICIES_AUTHORITY, every_policy(backend.addr));
    control_plane.publish(ROUTED_AUTHORITY, routed());
    let direct = Target {
        addr: backend.addr,
        authority: backend.addr.to_string(),
    };
    check_answers(client, &direct, "the backend")?;

    let mut proxied = match (&args.proxy_bin, args.direct_only) {
        (Some(bin), false) => {
            let flags = ["--namespace", "default", "--workload", "bench-client"].map(String::from);
            let paths = (backend.addr, free_port()?);
            let proxy = Proxy::start(client, bin, &control_plane.url(), paths, &flags)?;
            eprintln!("proxy ready, pid {}", proxy.pid());
            let target = |authority: &str| Target {
                addr: proxy.outbound,
                authority: authority.into(),
            };
            let single = SingleProxy {
                bare: target(SERVICE_AUTHORITY),
                policies: target(POLICIES_AUTHORITY),
                routed: target(ROUTED_AUTHORITY),
                proxy,
            };
            check_answers(client, &single.bare, "the proxy")?;
            check_answers(client, &single.policies, "the proxy with every policy")?;
            check_answers(client, &single.routed, "the proxy through an HTTPRoute")?;
            Some(single)
        }
        _ => None,
    };
    let idle_rss = match &proxied {
        Some(single) => Some(single.proxy.memory()?.rss),
        None => None,
    };
    let mut mesh = match (&args.proxy_bin, &args.controller_bin, args.direct_only) {
        (Some(proxy_bin), Some(controller_bin), false) => {
            let mesh = Mesh::start(client, proxy_bin, controller_bin, backend.addr)?;
            eprintln!(
                "two-proxy path ready, client proxy pid {}, server proxy pid {}",
                mesh.client.pid(),
                mesh.server.pid()
            );
            let idle_rss = [mesh.client.memory()?.rss, mesh.server.memory()?.rss];
            settle()?;
            Some((mesh, idle_rss))
        }
        _ => None,
    };
    let mesh_target = mesh.as_ref().map(|(mesh, _)| Target {
        addr: mesh.client.outbound,
        authority: MESH_AUTHORITY.into(),
    });

    let mut rows = Vec::new();
    for &rate in &args.rates {
        let load = Load {
            rate,
            warmup: args.warmup,
            duration: args.duration,
            connections: args.connections,
            max_lag: MAX_LAG,
            timeout: REQUEST_TIMEOUT,
        };
        let measured = loadgen::run(client, &direct, &load).context("direct run")?;
        let direct_summary = Summary::of(&measured, args.duration);
        progress(rate, "direct", &direct_summary);
        let [proxied_summary, policies_summary, routed_summary] = match &mut proxied {
            Some(single) => {
                let runs = [
                    ("proxied", &single.bare),
                    ("policies", &single.policies),
                    ("routed", &single.routed),
                ];
                let mut summaries = [None, None, None];
                for ((path, target), summary) in runs.into_iter().zip(&mut summaries) {
                    let (measured, [cost]) =
                        proxied_run(client, [&mut single.proxy], target, &load)?;
                    progress(rate, path, &measured);
                    *summary = Some((measured, cost));
                }
                summaries
            }
            None => [None, None, None],
        };
        let mesh_summary = match (&mut mesh, &mesh_target) {
            (Some((mesh, _)), Some(target)) => {
                mesh.check_running()?;
                let (summary, costs) =
                    proxied_run(client, [&mut mesh.client, &mut mesh.server], target, &load)?;
                progress(rate, "2 proxies", &summary);
                Some((summary, costs))
            }
            _ => None,
        };
        rows.push(Row {
            rate,
            direct: direct_summary,
            proxied: proxied_summary,
            policies: policies_summary,
            routed: routed_summary,
            mesh: mesh_summary,
        });
    }

    let peak_rss = match &proxied {
        Some(single) => Some(single.proxy.memory()?.peak),
        None => None,
    };
    let mesh_figures = match &mut mesh {
        Some((mesh, idle_rss)) => {
            let peak_rss = [mesh.client.memory()?.peak, mesh.server.memory()?.peak];
            let callers = args.handshake_callers;
            let (handshakes, handshake_cost) = mesh.handshakes(client, callers, args.duration)?;
            eprintln!(
                "mutual TLS handshakes: {handshakes} in {:?} from {callers} callers",
                handshake_cost.wall
            );
            Some(MeshFigures {
                idle_rss: *idle_rss,
                peak_rss,
                handshakes,
                callers,
                handshake_cost,
            })
        }
        None => None,
    };
    let report = Report {
        setup: setup(&args),
        command: args
            .command
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" ")),
        machine,
        date: now()?,
        rows,
        idle_rss,
        peak_rss,
        mesh: mesh_figures,
    };
    let markdown = report.markdown();
    println!("{markdown}");
    if let Some(path) = &args.write {
        write_section(path, &markdown)?;
        eprintln!("wrote the Proxy section of {}", path.display());
    }
    // Stopped last, so that a proxy slow to stop cannot cost the results.
    if let Some(single) = proxied {
        single.proxy.stop()?;
    }
    Ok(())
}

/// The single-proxy paths: one proxy, called for three Services of the same backend.
struct SingleProxy {
    proxy: Proxy,
    /// A Service without a policy.
    bare: Target,
    /// A Service whose policy enables everything.
    policies: Target,
    /// A Service whose calls an HTTPRoute serves.
    routed: Target,
}

fn runtime(name: &str) -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("building the {name} runtime"))
}

/// Fails early, and clearly, when a path does not answer 200 from the backend. Retries for a few
/// seconds because a proxy may resolve a destination on its first request.
fn check_answers(client: &Handle, target: &Target, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = client.block_on(proxy::get(target.addr, "/", &target.authority));
        let last = match answer {
            Ok((200, body)) if body == "bench" => return Ok(()),
            Ok((status, body)) => format!("{status} {body:?}"),
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "GET / to {what} at {} with Host {} did not get 200 \"bench\" within 5s; last answer: {last}",
                target.addr,
                target.authority
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One run through `proxies`, with each one's CPU time and memory around it.
fn proxied_run<const N: usize>(
    client: &Handle,
    mut proxies: [&mut Proxy; N],
    target: &Target,
    load: &Load,
) -> Result<(Summary, [Cost; N])> {
    let mut cpu_before = [Duration::ZERO; N];
    for (proxy, before) in proxies.iter_mut().zip(&mut cpu_before) {
        proxy.check_running()?;
        *before = proxy.cpu_time()?;
    }
    let started = Instant::now();
    let measured = loadgen::run(client, target, load).context("proxied run")?;
    let wall = started.elapsed();
    let mut costs = Vec::with_capacity(N);
    for (proxy, before) in proxies.iter_mut().zip(cpu_before) {
        let cpu = proxy.cpu_time()?.saturating_sub(before);
        proxy.check_running()?;
        costs.push(Cost {
            cpu,
            wall,
            requests: measured.handled,
            rss: proxy.memory()?.rss,
        });
    }
    let costs = costs
        .try_into()
        .unwrap_or_else(|_| unreachable!("one cost per proxy"));
    Ok((Summary::of(&measured, load.duration), costs))
}

fn progress(rate: u32, path: &str, s: &Summary) {
    eprintln!(
        "{rate:>6} req/s {path:<7}: achieved {:>6.0}/s, p50 {:>6}µs, p99 {:>7}µs, p99.9 {:>7}µs \
         (generator {:>6}µs), errors {:.2}%",
        s.achieved,
        s.p50,
        s.p99,
        s.p999,
        s.generator_p999,
        s.error_rate * 100.0
    );
}

/// The backend as a Service whose policy enables everything, none of it tripping: a route (that
/// this traffic does not match) and the spec-level policy with a split, a timeout, retries with a
/// budget and a per-try timeout, outlier detection, connection pool limits, a rate limit and fault
/// injection at 0%. What it costs is the price of evaluating them on every request.
fn every_policy(backend: std::net::SocketAddr) -> outrigger_tests::Configuration {
    use outrigger_api::proto;
    let split = Some(proto::TrafficSplit {
        weights: vec![proto::WeightedSubset {
            subset: "stable".into(),
            weight: 100,
        }],
    });
    let retries = Some(proto::RetryPolicy {
        attempts: 2,
        per_try_timeout_ms: Some(5_000),
        retry_on: vec![
            proto::RetryOn::ServerError as i32,
            proto::RetryOn::ConnectFailure as i32,
        ],
        backoff_base_ms: 25,
        backoff_max_ms: 250,
        budget: Some(proto::RetryBudget {
            percent: 20,
            min_retries_per_second: 10,
        }),
        ..Default::default()
    });
    let mut d = destination("default", "bench-policies", 80, &[(backend, &["stable"])]);
    d.policy_spec = Some(proto::Policy {
        traffic_split: split.clone(),
        timeout_ms: Some(10_000),
        retries: retries.clone(),
        outlier_detection: Some(proto::OutlierDetection {
            consecutive_5xx_errors: 5,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_time_ms: 300_000,
            max_ejection_percent: 50,
            ..Default::default()
        }),
        load_balancer: None,
        connection_pool: Some(proto::ConnectionPool {
            max_connections: Some(100_000),
            max_pending_requests: Some(100_000),
            connect_timeout_ms: 1_000,
        }),
        rate_limit: Some(proto::RateLimit {
            requests_per_second: 1_000_000,
            burst: 1_000_000,
        }),
        fault_injection: Some(proto::FaultInjection {
            delay: Some(proto::FaultDelay {
                percent: 0.0,
                fixed_delay_ms: 100,
            }),
            abort: Some(proto::FaultAbort {
                percent: 0.0,
                http_status: 503,
            }),
        }),
    });
    d.routes = vec![proto::Route {
        name: "canary-testers".into(),
        r#match: Some(proto::RouteMatch {
            headers: vec![proto::HeaderMatch {
                name: "x-canary".into(),
                value: Some(proto::header_match::Value::Exact("true".into())),
            }],
            path_prefix: "/api".into(),
            method: "GET".into(),
        }),
        traffic_split: split,
        timeout_ms: Some(2_000),
        retries,
    }];
    d
}

/// A Service that a producer HTTPRoute serves, with no endpoints of its own: a rule for canary
/// testers (a header, a path prefix and a method, which this traffic does not match), then the
/// catch-all rule, which sets a request header and sends to the bench Service. What it costs is
/// the price of the route table's lookup and filter, and of resolving the backend Service.
fn routed() -> outrigger_tests::Configuration {
    use outrigger_api::proto;
    use proto::http_route_match::Path;
    let rule = |name: &str, filters: Vec<proto::HttpFilter>| proto::HttpRouteRule {
        route: "HTTPRoute/default/bench-routed".into(),
        name: name.into(),
        filters,
        backends: vec![proto::RouteBackend {
            key: SERVICE_AUTHORITY.into(),
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let set_header = proto::HttpFilter {
        kind: Some(proto::http_filter::Kind::RequestHeaders(
            proto::HeaderModifier {
                set: vec![proto::HeaderValue {
                    name: "x-route".into(),
                    value: "bench-routed".into(),
                }],
                ..Default::default()
            },
        )),
    };
    let mut d = destination("default", "bench-routed", 80, &[]);
    d.http_routes = vec![proto::HttpRouteTable {
        consumer_namespace: String::new(),
        rules: vec![
            rule("canary-testers", Vec::new()),
            rule("everyone", vec![set_header]),
        ],
        matches: vec![
            proto::HttpRouteMatch {
                rule: 0,
                path: Some(Path::Prefix("/api".into())),
                headers: vec![proto::HeaderMatch {
                    name: "x-canary".into(),
                    value: Some(proto::header_match::Value::Exact("true".into())),
                }],
                method: "GET".into(),
                ..Default::default()
            },
            proto::HttpRouteMatch {
                rule: 1,
                path: Some(Path::Prefix("/".into())),
                ..Default::default()
            },
        ],
    }];
    d
}

fn setup(args: &ProxyArgs) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "open loop, {} keep-alive HTTP/1.1 connections per path; at each rate a direct run then a \
         proxied run then a run through the proxy to a Service with every policy enabled (a route, \
         split, timeout, retries with budget and per-try timeout, outlier detection, pool limits, \
         rate limit, fault injection at 0%; none of them trips), then a run through the proxy to a \
         Service whose calls an HTTPRoute serves (a rule this traffic does not match, then one that \
         sets a request header and sends to the bench Service){}, each {:?} of unrecorded warm-up \
         then {:?} recorded. The load generator, the \
         backend and the proxies run side by side on this machine's {cores} cores and compete for \
         them, so absolute latencies and the highest sustained rates describe the whole setup on \
         this machine, not the proxy alone.",
        args.connections,
        match args.controller_bin {
            Some(_) =>
                ", then a run through two proxies: a client proxy calling a server proxy \
                        over mutual TLS (TLS 1.3, X25519MLKEM768) in front of the backend, both \
                        certified by the controller, which checks their tokens with the test \
                        cluster's API server",
            None => "",
        },
        args.warmup,
        args.duration
    )
}

fn machine() -> Result<String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("MemTotal:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .context("no MemTotal in /proc/meminfo")?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let busy = cpu_busy(Duration::from_secs(1))?;
    Ok(format!(
        "{cores} CPUs ({model}), {:.1} GiB memory, Linux {}; CPUs {:.0}% busy with other work in \
         the second before the bench started",
        memory_kib as f64 / (1024.0 * 1024.0),
        kernel.trim(),
        busy * 100.0
    ))
}

/// Waits, up to a minute, for a second in which the machine is under 10% busy: the API server
/// and the controller the two-proxy path started do their start-up work before the runs, not
/// during the first ones.
fn settle() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let busy = cpu_busy(Duration::from_secs(1))?;
        if busy < 0.1 || Instant::now() >= deadline {
            eprintln!("machine {:.0}% busy before the runs", busy * 100.0);
            return Ok(());
        }
    }
}

/// The share of all CPUs' time that was not idle over `window`.
fn cpu_busy(window: Duration) -> Result<f64> {
    let sample = || -> Result<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        cpu_totals(&stat).context("no cpu line in /proc/stat")
    };
    let (total_before, idle_before) = sample()?;
    std::thread::sleep(window);
    let (total_after, idle_after) = sample()?;
    let total = total_after.saturating_sub(total_before);
    let idle = idle_after.saturating_sub(idle_before);
    Ok(if total == 0 {
        0.0
    } else {
        1.0 - idle as f64 / total as f64
    })
}

/// All time and idle time (idle + iowait), in ticks, from the first line of `/proc/stat`.
fn cpu_totals(stat: &str) -> Option<(u64, u64)> {
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user and nice]
    let total = ticks.iter().take(8).sum();
    Some((total, ticks.get(3)? + ticks.get(4)?))
}

fn now() -> Result<String> {
    let output = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .context("running date")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn write_section(path: &Path, section: &str) -> Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(doc) => doc,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, report::replace_section(&doc, section))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_totals_count_iowait_as_idle_and_guests_once() {
        let stat = "cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 3 0\n";
        assert_eq!(cpu_totals(stat), Some((990, 820)));
        assert_eq!(cpu_totals("intr 1 2 3\n"), None);
    }
}
