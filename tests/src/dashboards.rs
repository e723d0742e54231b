//! The chart's Grafana dashboards (`charts/outrigger/dashboards`) and a real Prometheus to run
//! their queries against, shared by the suites that check them: `tests/tests/dashboards.rs`
//! (binaries in this process) and `tests/tests/pods_e2e.rs` (meshed pods on the test node).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use regex::Regex;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::process::ChildProcess;

/// Prometheus scrapes this often; `$__rate_interval` is what Grafana makes of it at a 1 s step
/// (four scrape intervals).
pub const SCRAPE_INTERVAL: &str = "1s";
pub const RATE_INTERVAL: &str = "4s";

/// Grafana's own variables, which need no definition in the dashboard.
pub const GLOBAL_VARIABLES: [&str; 3] = ["__rate_interval", "__interval", "__range"];

/// The dashboards' uids: links and bookmarks depend on them, so they never change.
pub const DASHBOARD_UIDS: [&str; 3] = [
    "outrigger-mesh-overview",
    "outrigger-destination",
    "outrigger-control-plane",
];

pub struct Dashboard {
    pub file: String,
    pub json: Value,
}

/// One query of one panel, named for messages.
pub struct Target {
    pub name: String,
    pub expr: String,
    pub instant: bool,
}

impl Dashboard {
    pub fn uid(&self) -> &str {
        self.json["uid"].as_str().unwrap_or_default()
    }

    /// Every panel, those inside rows included, rows themselves excluded.
    pub fn panels(&self) -> Vec<&Value> {
        let mut panels = Vec::new();
        for panel in self.json["panels"].as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                panels.extend(panel["panels"].as_array().into_iter().flatten());
            } else {
                panels.push(panel);
            }
        }
        panels
    }

    pub fn variables(&self) -> Vec<&Value> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .collect()
    }

    /// Every query target, named for messages.
    pub fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for panel in self.panels() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                targets.push(Target {
                    name: format!(
                        "{} / {:?} / {}",
                        self.file,
                        panel["title"].as_str().unwrap_or("untitled"),
                        target["refId"].as_str().unwrap_or("?"),
                    ),
                    expr: target["expr"].as_str().unwrap_or_default().to_string(),
                    instant: target["instant"] == true,
                });
            }
        }
        targets
    }
}

pub fn dashboards_dir() -> PathBuf {
    crate::workspace().join("charts/outrigger/dashboards")
}

/// Every dashboard of the chart, in file order; panics unless there is one per uid.
pub fn load_dashboards() -> Vec<Dashboard> {
    let dir = dashboards_dir();
    let mut dashboards: Vec<Dashboard> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            Dashboard {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                json: serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            }
        })
        .collect();
    dashboards.sort_by(|a, b| a.file.cmp(&b.file));
    let uids: BTreeSet<&str> = dashboards.iter().map(Dashboard::uid).collect();
    assert_eq!(
        uids,
        BTreeSet::from(DASHBOARD_UIDS),
        "one dashboard per uid, and no other"
    );
    dashboards
}

pub fn variable_references(text: &str) -> Vec<String> {
    let reference = Regex::new(r"\$\{(\w+)\}|\$(\w+)").unwrap();
    reference
        .captures_iter(text)
        .map(|c| c.get(1).or(c.get(2)).unwrap().as_str().to_string())
        .collect()
}

/// `text` with its variables replaced, `${name}` and `$name` alike; unknown ones are left.
pub fn substitute(text: &str, values: &BTreeMap<&str, String>) -> String {
    let reference = Regex::new(r"\$\{(\w+)\}|\$(\w+)").unwrap();
    reference
        .replace_all(text, |c: &regex::Captures| {
            let name = c.get(1).or(c.get(2)).unwrap().as_str();
            values
                .get(name)
                .cloned()
                .unwrap_or_else(|| c[0].to_string())
        })
        .into_owned()
}

/// The metric names a PromQL expression reads: identifiers that are not functions, keywords,
/// label names, label values or durations.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let strings = Regex::new(r#""(?:[^"\\]|\\.)*""#).unwrap();
    let matchers = Regex::new(r"\{[^}]*\}").unwrap();
    let ranges = Regex::new(r"\[[^\]]*\]").unwrap();
    let label_lists =
        Regex::new(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)").unwrap();
    let identifier = Regex::new(r"[A-Za-z_:][A-Za-z0-9_:]*").unwrap();
    const KEYWORDS: [&str; 8] = [
        "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
    ];
    let expr = strings.replace_all(expr, "\"\"");
    let expr = matchers.replace_all(&expr, " ");
    let expr = ranges.replace_all(&expr, " ");
    let expr = label_lists.replace_all(&expr, " ");
    identifier
        .find_iter(&expr)
        .filter(|m| {
            let preceded_by_digit = expr[..m.start()]
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_digit() || c == '.');
            let is_function = expr[m.end()..].trim_start().starts_with('(');
            !preceded_by_digit && !is_function && !KEYWORDS.contains(&m.as_str())
        })
        .map(|m| m.as_str().to_string())
        .collect()
}

/// Sample names (`outrigger_requests_total`) and family names (`outrigger_requests`) of an
/// OpenMetrics or Prometheus text exposition.
pub fn exposed_names(exposition: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut samples = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            families.insert(declaration.split(' ').next().unwrap().to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    (samples, families)
}

/// The family a sample name belongs to.
pub fn family_of<'a>(sample: &'a str, families: &BTreeSet<String>) -> Option<&'a str> {
    ["", "_total", "_bucket", "_count", "_sum", "_created"]
        .iter()
        .filter_map(|suffix| sample.strip_suffix(suffix))
        .find(|family| families.contains(*family))
}

/// The sum of every series of `sample` in an exposition whose labels contain `labels`; `None`
/// when there is no such series (which is not the same as a count of zero).
pub fn series_sum(exposition: &str, sample: &str, labels: &str) -> Option<f64> {
    let values: Vec<f64> = exposition
        .lines()
        .filter(|line| {
            line.strip_prefix(sample)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && line.contains(labels)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// One GET over a fresh HTTP/1.1 connection: (status, body).
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let io = TokioIo::new(TcpStream::connect(addr).await?);
    let (mut send, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))?;
    let response = send.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A real Prometheus, scraping every [`SCRAPE_INTERVAL`], on a loopback port of its own.
pub struct Prometheus {
    process: ChildProcess,
    addr: SocketAddr,
    /// Its configuration and storage, removed with it.
    dir: PathBuf,
}

impl Prometheus {
    /// Debian's Prometheus (`apt-get install prometheus`), whose build has no Kubernetes
    /// service discovery.
    pub fn debian() -> PathBuf {
        on_path("prometheus").unwrap_or_else(|| {
            panic!(
                "prometheus is not installed: `apt-get install prometheus` (Debian's package; \
                 `cargo xtask ci` installs it)"
            )
        })
    }

    /// Starts `binary` with `scrape_configs`, the YAML list of its configuration's
    /// `scrape_configs:` (see [`static_scrape_configs`]).
    pub fn start(binary: &Path, scrape_configs: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "outrigger-prometheus-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global: {{scrape_interval: {SCRAPE_INTERVAL}, scrape_timeout: {SCRAPE_INTERVAL}, \
             evaluation_interval: {SCRAPE_INTERVAL}}}\nscrape_configs:\n{scrape_configs}"
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        // A port the kernel just handed out and took back: free unless another process races
        // for it, which a failed start below would report.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let process = ChildProcess::spawn(
            "prometheus",
            Command::new(binary)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null()),
        )
        .expect("starting prometheus");
        Self { process, addr, dir }
    }

    /// The end of Prometheus' own log, for failure messages.
    pub fn log(&self) -> String {
        self.process.log_tail()
    }

    pub async fn ready(&mut self) {
        self.process
            .wait_ready(self.addr, "/-/ready", Duration::from_secs(60))
            .await
            .expect("prometheus to be ready");
    }

    /// The `data` of a successful API answer, or why there is none.
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
            .collect();
        let uri = format!("{path}?{}", query.join("&"));
        let (status, body) = http_get(self.addr, "prometheus", &uri)
            .await
            .map_err(|e| format!("GET {uri}: {e}"))?;
        let answer: Value =
            serde_json::from_str(&body).map_err(|e| format!("GET {uri}: {status} {e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!(
                "{}: {}",
                answer["errorType"].as_str().unwrap_or("error"),
                answer["error"].as_str().unwrap_or(&body)
            ));
        }
        Ok(answer["data"].clone())
    }

    pub async fn targets_up(&self) -> usize {
        let Ok(targets) = self.api("/api/v1/targets", &[("state", "active")]).await else {
            return 0;
        };
        targets["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["health"] == "up")
            .count()
    }

    /// The time of the oldest of every target's latest scrape.
    pub async fn last_scraped(&self) -> f64 {
        let Ok(data) = self
            .api("/api/v1/query", &[("query", "min(timestamp(up))")])
            .await
        else {
            return 0.0;
        };
        data["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `scrape_configs` entries with fixed targets: one job per `(name, targets)`.
pub fn static_scrape_configs(jobs: &[(&str, Vec<SocketAddr>)]) -> String {
    let mut config = String::new();
    for (job, targets) in jobs {
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        config += &format!(
            "- job_name: {job}\n  static_configs: [{{targets: [{}]}}]\n",
            targets.join(", ")
        );
    }
    config
}

/// What [`query_every_panel`] found.
pub struct PanelQueries {
    /// One line per variable that does not offer its value, and per query without data.
    pub problems: Vec<String>,
    pub queries_run: usize,
}

/// Runs every template variable's query and every panel's query of `dashboards`, as Grafana would
/// with `namespace` and `service` chosen, over `[start, end]` (Unix seconds): each variable must
/// offer the value chosen, each query must return a series with a number.
pub async fn query_every_panel(
    dashboards: &[Dashboard],
    prometheus: &Prometheus,
    namespace: &str,
    service: &str,
    start: f64,
    end: f64,
) -> PanelQueries {
    let (start, end) = (start.floor(), (end + 1.0).ceil());
    let values: BTreeMap<&str, String> = BTreeMap::from([
        ("namespace", namespace.to_string()),
        ("service", service.to_string()),
        ("__rate_interval", RATE_INTERVAL.to_string()),
        ("__interval", SCRAPE_INTERVAL.to_string()),
        ("__range", format!("{}s", end - start)),
    ]);
    let (start, end) = (start.to_string(), end.to_string());
    let mut problems = Vec::new();
    let mut queries_run = 0;
    let label_values = Regex::new(r"^label_values\((.+),\s*(\w+)\)$").unwrap();
    for dashboard in dashboards {
        for variable in dashboard.variables() {
            if variable["type"] != "query" {
                continue;
            }
            let name = variable["name"].as_str().unwrap();
            let query = variable["query"].as_str().unwrap_or_default();
            let Some(parts) = label_values.captures(query) else {
                problems.push(format!(
                    "{}: variable {name}: not label_values(selector, label): {query}",
                    dashboard.file
                ));
                continue;
            };
            let selector = substitute(&parts[1], &values);
            let offered = prometheus
                .api(
                    &format!("/api/v1/label/{}/values", &parts[2]),
                    &[("match[]", &selector), ("start", &start), ("end", &end)],
                )
                .await;
            queries_run += 1;
            let wanted = Value::from(values[name].as_str());
            match offered {
                Ok(list) if list.as_array().is_some_and(|l| l.contains(&wanted)) => {}
                other => problems.push(format!(
                    "{}: variable {name} ({query}) does not offer {wanted}: {other:?}",
                    dashboard.file
                )),
            }
        }
        for target in dashboard.targets() {
            let expr = substitute(&target.expr, &values);
            if expr.contains('$') {
                problems.push(format!("{}: unsubstituted variable in {expr}", target.name));
                continue;
            }
            let answer = if target.instant {
                prometheus
                    .api("/api/v1/query", &[("query", &expr), ("time", &end)])
                    .await
            } else {
                prometheus
                    .api(
                        "/api/v1/query_range",
                        &[
                            ("query", &expr),
                            ("start", &start),
                            ("end", &end),
                            ("step", "1"),
                        ],
                    )
                    .await
            };
            queries_run += 1;
            match answer {
                Ok(data) if has_a_finite_value(&data) => {}
                Ok(data) => problems.push(format!("{}: no data for {expr}: {data}", target.name)),
                Err(error) => problems.push(format!("{}: {expr}: {error}", target.name)),
            }
        }
    }
    PanelQueries {
        problems,
        queries_run,
    }
}

fn url_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                encoded.push(byte as char)
            }
            _ => encoded += &format!("%{byte:02X}"),
        }
    }
    encoded
}

/// Whether a query answer holds at least one series with a number (not NaN, not infinite).
fn has_a_finite_value(data: &Value) -> bool {
    let finite = |point: &Value| {
        point[1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    };
    data["result"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|series| {
            series["values"]
                .as_array()
                .into_iter()
                .flatten()
                .any(finite)
                || finite(&series["value"])
        })
}

pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}
