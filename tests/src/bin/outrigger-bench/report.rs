//! Turns measurements into the Markdown that goes to stdout and to docs/benchmarks.md.

use std::fmt::Write as _;
use std::time::Duration;

use crate::loadgen::Measured;

/// A path sustains a rate when under 1% of its requests fail and it completes at least 95% of it.
const MAX_ERROR_RATE: f64 = 0.01;
const MIN_ACHIEVED: f64 = 0.95;

/// One path at one rate, reduced to what the report shows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub achieved: f64,
    /// Microseconds.
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// The load generator's own part of p99.9, see [`Measured::dispatch`].
    pub generator_p999: u64,
    pub error_rate: f64,
}

impl Summary {
    pub fn of(measured: &Measured, duration: Duration) -> Self {
        let latency = &measured.latency;
        // Completions over the longer of the window and the time they actually took, so that a
        // path that falls behind and catches up late does not look as fast as one that kept up.
        let span = measured.span.max(duration).as_secs_f64();
        Self {
            achieved: measured.ok as f64 / span,
            p50: latency.value_at_quantile(0.5),
            p99: latency.value_at_quantile(0.99),
            p999: latency.value_at_quantile(0.999),
            max: latency.max(),
            generator_p999: measured.dispatch.value_at_quantile(0.999),
            error_rate: if measured.scheduled == 0 {
                0.0
            } else {
                measured.errors() as f64 / measured.scheduled as f64
            },
        }
    }

    pub fn sustains(&self, rate: u32) -> bool {
        self.error_rate < MAX_ERROR_RATE && self.achieved >= MIN_ACHIEVED * f64::from(rate)
    }
}

/// The proxy's cost during one proxied run.
pub struct Cost {
    pub cpu: Duration,
    pub wall: Duration,
    pub requests: u64,
    /// Bytes resident right after the run.
    pub rss: u64,
}

impl Cost {
    pub fn cpu_ms_per_1k(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.cpu.as_secs_f64() * 1e3 / (self.requests as f64 / 1e3)
    }

    /// Share of one core, in percent.
    pub fn cpu_percent(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(f64::EPSILON) * 100.0
    }
}

pub struct Row {
    pub rate: u32,
    pub direct: Summary,
    pub proxied: Option<(Summary, Cost)>,
    /// Through the proxy to a Service with every policy enabled.
    pub policies: Option<(Summary, Cost)>,
    /// Through the proxy to a Service whose calls an HTTPRoute serves.
    pub routed: Option<(Summary, Cost)>,
    /// Through a client proxy and a server proxy, over mutual TLS: the cost of each.
    pub mesh: Option<(Summary, [Cost; 2])>,
}

/// What the two-proxy path measured besides its rows.
pub struct MeshFigures {
    /// Of the client proxy, then the server proxy: bytes resident once ready, and at most.
    pub idle_rss: [u64; 2],
    pub peak_rss: [u64; 2],
    /// Mutual TLS handshakes the server proxy accepted, from this many callers at once.
    pub handshakes: u64,
    pub callers: usize,
    /// The server proxy's, during the handshakes (its `requests` are the handshakes).
    pub handshake_cost: Cost,
}

pub struct Report {
    pub command: String,
    pub machine: String,
    pub date: String,
    pub setup: String,
    pub rows: Vec<Row>,
    /// Bytes resident once ready, before any load, and at most during the whole run.
    pub idle_rss: Option<u64>,
    pub peak_rss: Option<u64>,
    pub mesh: Option<MeshFigures>,
}

/// Percentiles of proxied minus direct: what the proxy adds, in microseconds.
pub fn added(proxied: &Summary, direct: &Summary) -> [i64; 3] {
    let diff = |p: u64, d: u64| p as i64 - d as i64;
    [
        diff(proxied.p50, direct.p50),
        diff(proxied.p99, direct.p99),
        diff(proxied.p999, direct.p999),
    ]
}

/// The highest rate sustained, and whether it is the highest rate tried (so the limit lies above).
fn max_sustained(rates: impl Iterator<Item = (u32, bool)>) -> Option<(u32, bool)> {
    let rates: Vec<(u32, bool)> = rates.collect();
    let top = rates.iter().map(|&(rate, _)| rate).max()?;
    let best = rates
        .iter()
        .filter(|&&(_, ok)| ok)
        .map(|&(rate, _)| rate)
        .max()?;
    Some((best, best == top))
}

fn sustained_text(found: Option<(u32, bool)>) -> String {
    match found {
        None => "none of the rates tried".into(),
        Some((rate, true)) => format!("≥ {rate} req/s (the highest rate tried)"),
        Some((rate, false)) => format!("{rate} req/s"),
    }
}

/// Proxied over direct highest sustained rate; a rate that is the highest tried is only a bound.
fn ratio_text(proxied: Option<(u32, bool)>, direct: Option<(u32, bool)>) -> String {
    let (Some((p, p_top)), Some((d, d_top))) = (proxied, direct) else {
        return "not known: a path sustained none of the rates tried".into();
    };
    let ratio = f64::from(p) / f64::from(d);
    match (p_top, d_top) {
        (true, true) => "not known: both paths sustained the highest rate tried".into(),
        (false, true) => {
            format!("≤ {ratio:.2} (the direct path's limit lies above the rates tried)")
        }
        (true, false) => format!("≥ {ratio:.2}"),
        (false, false) => format!("{ratio:.2}"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn percent(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}

impl Report {
    /// The `## Proxy` section of docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        // Writing to a String cannot fail.
        let _ = writeln!(w, "## Proxy\n");
        let _ = writeln!(
            w,
            "What the proxy adds to a plain HTTP/1.1 GET: the same load generator sends to a \
             backend directly, through the proxy's outbound listener (to a Service without a \
             policy, to one with every policy, to one whose calls an HTTPRoute serves), and \
             through two proxies (client and server, over mutual TLS), as between two meshed \
             pods.\n"
        );
        let _ = writeln!(w, "- Command: `{}`", self.command);
        let _ = writeln!(w, "- Date: {}", self.date);
        let _ = writeln!(w, "- Machine: {}", self.machine);
        let _ = writeln!(w, "- Setup: {}\n", self.setup);

        let _ = writeln!(
            w,
            "Latency in µs from each request's scheduled send time to the end of its response \
             (2xx only); `added` is proxied minus direct at each percentile. `gen. p99.9` is the \
             load generator's own share: from the scheduled time until the request's task ran \
             (timer and thread wake-ups), included in the latencies; where it comes close to \
             p99.9, the tail is the generator's and not the path's. Errors are non-2xx \
             answers, transport failures and requests that could not leave on schedule.\n"
        );
        let _ = writeln!(
            w,
            "| Rate (req/s) | Path | Achieved (req/s) | p50 | p99 | p99.9 | max | gen. p99.9 | Errors |"
        );
        let _ = writeln!(w, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.rows {
            let line = |w: &mut String, path: &str, s: &Summary| summary_line(w, row.rate, path, s);
            line(w, "direct", &row.direct);
            if let Some((proxied, _)) = &row.proxied {
                line(w, "proxied", proxied);
                let [p50, p99, p999] = added(proxied, &row.direct);
                let _ = writeln!(
                    w,
                    "| {} | **added** | | **{p50:+}** | **{p99:+}** | **{p999:+}** | | | |",
                    row.rate
                );
                if let Some((policies, _)) = &row.policies {
                    line(w, "every policy", policies);
                    let [p50, p99, p999] = added(policies, proxied);
                    let _ = writeln!(
                        w,
                        "| {} | **policies vs bare proxy** | | **{p50:+}** | **{p99:+}** | **{p999:+}** | | | |",
                        row.rate
                    );
                }
                if let Some((routed, _)) = &row.routed {
                    line(w, "HTTPRoute", routed);
                    let [p50, p99, p999] = added(routed, proxied);
                    let _ = writeln!(
                        w,
                        "| {} | **route vs bare proxy** | | **{p50:+}** | **{p99:+}** | **{p999:+}** | | | |",
                        row.rate
                    );
                }
                if let Some((mesh, _)) = &row.mesh {
                    line(w, "two proxies, mTLS", mesh);
                    let [p50, p99, p999] = added(mesh, &row.direct);
                    let _ = writeln!(
                        w,
                        "| {} | **added by two proxies** | | **{p50:+}** | **{p99:+}** | **{p999:+}** | | | |",
                        row.rate
                    );
                }
            }
        }

        let direct = max_sustained(
            self.rows
                .iter()
                .map(|r| (r.rate, r.direct.sustains(r.rate))),
        );
        let _ = writeln!(
            w,
            "\nHighest rate sustained (under {} errors and at least {:.0}% of the rate achieved):\n",
            percent(MAX_ERROR_RATE),
            MIN_ACHIEVED * 100.0
        );
        let _ = writeln!(w, "- direct: {}", sustained_text(direct));
        if self.rows.iter().all(|r| r.proxied.is_some()) {
            let proxied = max_sustained(self.rows.iter().filter_map(|r| {
                let (summary, _) = r.proxied.as_ref()?;
                Some((r.rate, summary.sustains(r.rate)))
            }));
            let _ = writeln!(w, "- proxied: {}", sustained_text(proxied));
            let _ = writeln!(w, "- proxied / direct: {}", ratio_text(proxied, direct));
            if self.rows.iter().all(|r| r.mesh.is_some()) {
                let mesh = max_sustained(self.rows.iter().filter_map(|r| {
                    let (summary, _) = r.mesh.as_ref()?;
                    Some((r.rate, summary.sustains(r.rate)))
                }));
                let _ = writeln!(w, "- two proxies, mTLS: {}", sustained_text(mesh));
                let _ = writeln!(w, "- two proxies / direct: {}", ratio_text(mesh, direct));
            }

            let _ = writeln!(
                w,
                "\nProxy process cost during each proxied run (warm-up included):\n"
            );
            let _ = writeln!(
                w,
                "| Rate (req/s) | Path | CPU ms per 1k requests | CPU (% of one core) | RSS after |"
            );
            let _ = writeln!(w, "|---:|---|---:|---:|---:|");
            for row in &self.rows {
                let single = [
                    ("proxied", &row.proxied),
                    ("every policy", &row.policies),
                    ("HTTPRoute", &row.routed),
                ]
                .into_iter()
                .filter_map(|(path, run)| Some((path, &run.as_ref()?.1)));
                let mesh = row.mesh.iter().flat_map(|(_, [client, server])| {
                    [
                        ("two proxies: client's", client),
                        ("two proxies: server's", server),
                    ]
                });
                for (path, cost) in single.chain(mesh) {
                    let _ = writeln!(
                        w,
                        "| {} | {path} | {:.1} | {:.0}% | {} |",
                        row.rate,
                        cost.cpu_ms_per_1k(),
                        cost.cpu_percent(),
                        mib(cost.rss)
                    );
                }
            }
            if let (Some(idle), Some(peak)) = (self.idle_rss, self.peak_rss) {
                let _ = writeln!(
                    w,
                    "\nProxy resident memory: {} idle (ready, before any load), {} at most (VmHWM).",
                    mib(idle),
                    mib(peak)
                );
            }
            if let Some(mesh) = &self.mesh {
                let _ = writeln!(
                    w,
                    "\nTwo proxies, mTLS: resident memory of the client proxy {} idle, {} at most; \
                     of the server proxy {} idle, {} at most (VmHWM). Mutual TLS handshakes the \
                     server proxy completed, each on a new connection from {} callers at once: \
                     {:.0} per second, {:.2} ms of its CPU each.",
                    mib(mesh.idle_rss[0]),
                    mib(mesh.peak_rss[0]),
                    mib(mesh.idle_rss[1]),
                    mib(mesh.peak_rss[1]),
                    mesh.callers,
                    mesh.handshakes as f64
                        / mesh.handshake_cost.wall.as_secs_f64().max(f64::EPSILON),
                    mesh.handshake_cost.cpu_ms_per_1k() / 1e3,
                );
            }
        }
        out
    }
}

/// `doc` with the section whose heading is `section`'s first line replaced by `section` (or
/// `section` appended, when `doc` has no such heading).
pub fn replace_section(doc: &str, section: &str) -> String {
    let section = section.trim_end();
    let heading = section.lines().next().unwrap_or_default().trim_end();
    if doc.trim().is_empty() {
        return format!(
            "# Benchmarks\n\nMeasured with `cargo xtask bench <target>`, which rewrites its own \
             section of this file.\n\n{section}\n"
        );
    }
    let lines: Vec<&str> = doc.lines().collect();
    let Some(start) = lines.iter().position(|line| line.trim_end() == heading) else {
        return format!("{}\n\n{section}\n", doc.trim_end());
    };
    let end = lines[start + 1..]
        .iter()
        .position(|line| line.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = lines[..start].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(section);
    out.push('\n');
    if end < lines.len() {
        out.push('\n');
        out.push_str(&lines[end..].join("\n"));
        out.push('\n');
    }
    out
}

/// One row of the latency table.
fn summary_line(w: &mut String, rate: u32, path: &str, s: &Summary) {
    let _ = writeln!(
        w,
        "| {rate} | {path} | {:.0} | {} | {} | {} | {} | {} | {} |",
        s.achieved,
        s.p50,
        s.p99,
        s.p999,
        s.max,
        s.generator_p999,
        percent(s.error_rate)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::Measured;
    use hdrhistogram::Histogram;

    fn measured(latencies_us: impl IntoIterator<Item = u64>, errors: u64) -> Measured {
        let mut latency = Histogram::new_with_bounds(1, 600_000_000, 3).unwrap();
        for value in latencies_us {
            latency.record(value).unwrap();
        }
        let ok = latency.len();
        Measured {
            dispatch: latency.clone(),
            latency,
            scheduled: ok + errors,
            ok,
            bad_status: errors,
            transport: 0,
            late: 0,
            span: Duration::from_secs(1),
            handled: ok + errors,
        }
    }

    #[test]
    fn percentiles_and_added_latency() {
        // 1..=1000 µs: p50 is 500, p99 990, p99.9 999.
        let direct = Summary::of(&measured(1..=1000, 0), Duration::from_secs(1));
        let proxied = Summary::of(
            &measured((1..=1000).map(|v| v + 250), 0),
            Duration::from_secs(1),
        );
        assert_eq!((direct.p50, direct.p99, direct.p999), (500, 990, 999));
        assert_eq!(added(&proxied, &direct), [250, 250, 250]);
        // A proxied percentile below the direct one shows as negative, not as a wrapped u64.
        assert_eq!(added(&direct, &proxied), [-250, -250, -250]);
    }

    #[test]
    fn sustaining_needs_few_errors_and_the_rate_achieved() {
        let window = Duration::from_secs(1);
        assert!(Summary::of(&measured(1..=1000, 9), window).sustains(1000));
        assert!(!Summary::of(&measured(1..=1000, 11), window).sustains(1000));
        // 900 completions in a second fall short of 95% of 1000 req/s.
        assert!(!Summary::of(&measured(1..=900, 0), window).sustains(1000));
        // Completions that trail 1s past the window count against the achieved rate.
        let mut late = measured(1..=1000, 0);
        late.span = Duration::from_secs(2);
        assert!(!Summary::of(&late, window).sustains(1000));
    }

    #[test]
    fn highest_sustained_rate_says_when_it_is_the_top_one_tried() {
        let rates = [(500, true), (1000, true), (2000, false), (4000, false)];
        assert_eq!(max_sustained(rates.into_iter()), Some((1000, false)));
        assert_eq!(
            max_sustained([(500, true), (1000, true)].into_iter()),
            Some((1000, true))
        );
        assert_eq!(max_sustained([(500, false)].into_iter()), None);
    }

    #[test]
    fn ratio_is_a_bound_when_a_path_was_not_pushed_to_its_limit() {
        assert_eq!(ratio_text(Some((4000, false)), Some((8000, false))), "0.50");
        assert!(ratio_text(Some((4000, false)), Some((8000, true))).starts_with("≤ 0.50"));
        assert!(ratio_text(Some((8000, true)), Some((8000, true))).starts_with("not known"));
        assert!(ratio_text(None, Some((8000, true))).starts_with("not known"));
    }

    #[test]
    fn cost_per_thousand_requests() {
        let cost = Cost {
            cpu: Duration::from_millis(300),
            wall: Duration::from_secs(6),
            requests: 6000,
            rss: 0,
        };
        assert_eq!(cost.cpu_ms_per_1k(), 50.0);
        assert_eq!(cost.cpu_percent(), 5.0);
    }

    #[test]
    fn replaces_only_the_proxy_section() {
        let doc = "# Benchmarks\n\nIntro.\n\n## Proxy\n\nold\n### Sub\nold too\n\n## Control plane\n\nkept\n";
        let out = replace_section(doc, "## Proxy\n\nnew\n");
        assert_eq!(
            out,
            "# Benchmarks\n\nIntro.\n\n## Proxy\n\nnew\n\n## Control plane\n\nkept\n"
        );
        // Idempotent: running twice gives the same file.
        assert_eq!(replace_section(&out, "## Proxy\n\nnew\n"), out);
    }

    #[test]
    fn appends_or_creates_the_section() {
        let out = replace_section(
            "# Benchmarks\n\n## Control plane\n\nkept\n",
            "## Proxy\n\nnew",
        );
        assert_eq!(
            out,
            "# Benchmarks\n\n## Control plane\n\nkept\n\n## Proxy\n\nnew\n"
        );
        let created = replace_section("", "## Proxy\n\nnew");
        assert!(created.starts_with("# Benchmarks\n"));
        assert!(created.ends_with("\n## Proxy\n\nnew\n"));
    }
}
