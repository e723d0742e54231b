//! `docs/reference.md` checked against the code, so that it cannot go stale. Each test reads the
//! truth from the code, not from a list kept by hand, and fails naming what is missing on either
//! side.
//!
//! - `every_crd_field_is_documented`: every property path of every CRD schema in `crds/`
//!   (`spec.retries.budget.percent`, `spec.routes[].match.headers.<name>.exact`) is a row of its
//!   kind's section (`## DestinationPolicy`), and every row there is a path of the schema.
//! - `every_flag_and_environment_variable_is_documented`: the `--help` of both binaries and of each
//!   of their subcommands (found in the help itself) is read; every long flag is a row of the
//!   command's section (`### \`outrigger-proxy init\``), with the environment variable the help
//!   names for it, and every row is a flag of that command. The binaries are the ones cargo built
//!   next to this test; one missing or older than the sources is built first.
//! - `every_metric_and_admin_endpoint_is_documented`: a real controller (reading a manifests
//!   directory) and a real proxy run in this process, started from their flags as the binaries
//!   are; some traffic makes every series exist (a retry, an ejection). Every metric family either
//!   exposes at `/metrics` is a row of its section, with its type and exactly the labels its
//!   series carry, and every row is a family it exposes. Every admin path documented answers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use outrigger_tests::Backend;
use outrigger_tests::dashboards::http_get;
use outrigger_tests::live;
use outrigger_tests::process::free_port;
use outrigger_tests::workspace;
use regex::Regex;
use serde_json::Value;

// ------------------------------------------------------------------------------------------------
// Reading the reference

fn reference() -> String {
    let path = workspace().join("docs/reference.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The text under the heading that is exactly `heading` (`## DestinationPolicy`), up to the next
/// heading of the same level or above.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut start = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        let line_level = trimmed.chars().take_while(|c| *c == '#').count();
        let is_heading = line_level > 0 && trimmed[line_level..].starts_with(' ');
        match start {
            None if trimmed == heading => start = Some(offset + line.len()),
            Some(begin) if is_heading && line_level <= level => return &text[begin..offset],
            _ => {}
        }
        offset += line.len();
    }
    match start {
        Some(begin) => &text[begin..],
        None => panic!("docs/reference.md has no heading {heading:?}"),
    }
}

/// The cells of every table row in `text`, header and separator rows left out. A `\|` is a pipe
/// inside a cell.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let mut cells = Vec::new();
        let mut cell = String::new();
        let mut chars = line[1..].chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'|') => {
                    cell.push('|');
                    chars.next();
                }
                '|' => cells.push(std::mem::take(&mut cell).trim().to_string()),
                _ => cell.push(c),
            }
        }
        let is_separator = cells
            .iter()
            .all(|c| !c.is_empty() && c.chars().all(|c| matches!(c, '-' | ':' | ' ')));
        if !in_table {
            // The first row of a table is its header.
            in_table = true;
            continue;
        }
        if !is_separator {
            rows.push(cells);
        }
    }
    rows
}

/// The code spans of a cell: `` `a`, `b` `` gives `a` and `b`.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The first code span of each row's first cell, with its row.
fn keyed_rows(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut keyed = BTreeMap::new();
    for row in table_rows(text) {
        if let Some(key) = row.first().and_then(|c| code_spans(c).into_iter().next()) {
            assert!(
                keyed.insert(key.clone(), row).is_none(),
                "docs/reference.md: {key} has two rows"
            );
        }
    }
    keyed
}

/// Fails with every problem found, one a line.
fn report(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "docs/reference.md disagrees with the code ({} problem(s)):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

// ------------------------------------------------------------------------------------------------
// (a) CRD fields

/// Every property path of an OpenAPI schema, under `prefix`: `.name` for a property, `[]` for the
/// items of an array, `.<name>` for the values of a map.
fn property_paths(schema: &Value, prefix: &str, paths: &mut BTreeSet<String>) {
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            paths.insert(path.clone());
            property_paths(property, &path, paths);
        }
    }
    if schema["items"].is_object() {
        property_paths(&schema["items"], &format!("{prefix}[]"), paths);
    }
    if schema["additionalProperties"].is_object() {
        property_paths(
            &schema["additionalProperties"],
            &format!("{prefix}.<name>"),
            paths,
        );
    }
}

#[test]
fn every_crd_field_is_documented() {
    let reference = reference();
    let dir = workspace().join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no CRD in {}", dir.display());
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let crd: Value =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let kind = crd["spec"]["names"]["kind"].as_str().expect("a kind");
        let mut in_schema = BTreeSet::new();
        for version in crd["spec"]["versions"].as_array().expect("versions") {
            property_paths(&version["schema"]["openAPIV3Schema"], "", &mut in_schema);
        }
        let documented: BTreeSet<String> = keyed_rows(section(&reference, &format!("## {kind}")))
            .into_keys()
            .collect();
        for path in in_schema.difference(&documented) {
            problems.push(format!("{kind}: field `{path}` is not documented"));
        }
        for path in documented.difference(&in_schema) {
            problems.push(format!(
                "{kind}: `{path}` is documented but is not a field of {}",
                file.display()
            ));
        }
    }
    report(problems);
}

// ------------------------------------------------------------------------------------------------
// (b) Flags and environment variables

/// The sources a binary is built from: a binary older than any of them may be stale.
const SOURCES: [&str; 4] = ["api", "proxy", "controller", "Cargo.lock"];

fn newest_mtime(path: &Path) -> SystemTime {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut newest = meta.modified().unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            let entry = entry.unwrap();
            // Build outputs and editors' files are no sources.
            if entry.file_name().to_string_lossy().starts_with(['.', '#']) {
                continue;
            }
            newest = newest.max(newest_mtime(&entry.path()));
        }
    }
    newest
}

/// The binary `name` (of the package of the same name) that cargo built next to this test,
/// built first when it is missing or older than its sources.
fn binary(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let mut dir = me.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    let sources = SOURCES
        .iter()
        .map(|source| newest_mtime(&workspace().join(source)))
        .max()
        .unwrap();
    let fresh = std::fs::metadata(&path)
        .and_then(|meta| meta.modified())
        .is_ok_and(|built| built >= sources);
    if !fresh {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .current_dir(workspace())
            .args(["build", "--package", name, "--bin", name]);
        match dir.file_name().and_then(|p| p.to_str()) {
            Some("debug") => {}
            Some("release") => {
                command.arg("--release");
            }
            Some(profile) => {
                command.args(["--profile", profile]);
            }
            None => panic!("no profile directory above {}", me.display()),
        }
        if let Some(target) = dir.parent() {
            command.env("CARGO_TARGET_DIR", target);
        }
        eprintln!("building {name}: {command:?}");
        let status = command.status().expect("running cargo");
        assert!(status.success(), "building {name} failed: {status}");
    }
    path
}

/// One command's `--help`: each long flag with the environment variable it reads, if any, and the
/// names of its subcommands.
struct Help {
    flags: BTreeMap<String, Option<String>>,
    subcommands: Vec<String>,
}

fn help(binary: &Path, args: &[&str]) -> Help {
    let output = Command::new(binary)
        .args(args)
        .arg("--help")
        // Set variables would show their values; none should come from the test's environment.
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
    assert!(
        output.status.success(),
        "{} {} --help failed",
        binary.display(),
        args.join(" ")
    );
    let text = String::from_utf8(output.stdout).unwrap();
    // Flags start at column 2 (`-h, --help`) or 6 (`--namespace`); descriptions further in.
    let flag = Regex::new(r"^  (?:-[A-Za-z0-9], |    )--([a-z0-9][a-z0-9-]*)").unwrap();
    let env = Regex::new(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)").unwrap();
    let subcommand = Regex::new(r"^  ([a-z][a-z0-9-]*)(?:\s{2,}|$)").unwrap();
    let mut flags = BTreeMap::new();
    let mut subcommands = Vec::new();
    let mut current: Option<String> = None;
    let mut in_commands = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_commands = line.trim_end() == "Commands:";
            continue;
        }
        if in_commands {
            if let Some(captures) = subcommand.captures(line)
                && &captures[1] != "help"
            {
                subcommands.push(captures[1].to_string());
            }
            continue;
        }
        if let Some(captures) = flag.captures(line) {
            let name = format!("--{}", &captures[1]);
            flags.insert(name.clone(), None);
            current = Some(name);
        }
        if let Some(captures) = env.captures(line) {
            let name = current.as_ref().expect("an [env: ] line follows its flag");
            flags.insert(name.clone(), Some(captures[1].to_string()));
        }
    }
    assert!(
        !flags.is_empty(),
        "no flag read from {} {} --help:\n{text}",
        binary.display(),
        args.join(" ")
    );
    Help { flags, subcommands }
}

/// An environment variable's name, as the reference writes one in a code span.
fn is_variable(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Checks the section of `command` (a binary and its subcommand path) and its subcommands'.
fn check_command(reference: &str, binary: &Path, command: &[&str], problems: &mut Vec<String>) {
    let name = command.join(" ");
    let help = help(binary, &command[1..]);
    let documented = keyed_rows(section(reference, &format!("### `{name}`")));
    for (flag, env) in &help.flags {
        let Some(row) = documented.get(flag) else {
            problems.push(format!("{name}: flag {flag} is not documented"));
            continue;
        };
        let documented_env: Vec<String> = row
            .iter()
            .skip(1)
            .take(1)
            .flat_map(|cell| code_spans(cell))
            .filter(|span| is_variable(span))
            .collect();
        let expected: Vec<String> = env.iter().cloned().collect();
        if documented_env != expected {
            problems.push(format!(
                "{name}: {flag} reads {} but is documented with {}",
                env.as_deref().unwrap_or("no environment variable"),
                if documented_env.is_empty() {
                    "none".to_string()
                } else {
                    documented_env.join(", ")
                }
            ));
        }
    }
    for flag in documented.keys() {
        if !help.flags.contains_key(flag) {
            problems.push(format!(
                "{name}: {flag} is documented but `{name} --help` has no such flag"
            ));
        }
    }
    for subcommand in &help.subcommands {
        let mut path = command.to_vec();
        path.push(subcommand);
        check_command(reference, binary, &path, problems);
    }
}

#[test]
fn every_flag_and_environment_variable_is_documented() {
    let reference = reference();
    let mut problems = Vec::new();
    for name in ["outrigger-proxy", "outrigger-controller"] {
        check_command(&reference, &binary(name), &[name], &mut problems);
    }
    report(problems);
}

// ------------------------------------------------------------------------------------------------
// (c) Metrics and admin endpoints

/// One metric family as exposed: its type and the labels its series carry.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
    has_series: bool,
}

/// The families of a text exposition, by name (`outrigger_requests`, without `_total`).
fn families(exposition: &str) -> BTreeMap<String, Family> {
    let label = Regex::new(r#"([A-Za-z_][A-Za-z0-9_]*)="(?:[^"\\]|\\.)*""#).unwrap();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in exposition.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declaration.split_once(' ').expect("# TYPE name type");
            families.entry(name.to_string()).or_default().kind = kind.to_string();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let sample = &line[..end];
        let family = ["_total", "_bucket", "_count", "_sum", "_created", ""]
            .iter()
            .filter_map(|suffix| sample.strip_suffix(suffix))
            .find(|family| families.contains_key(*family))
            .unwrap_or_else(|| panic!("sample {sample} of no declared family"))
            .to_string();
        let family = families.get_mut(&family).unwrap();
        family.has_series = true;
        if line[end..].starts_with('{') {
            let close = line.rfind('}').expect("labels close");
            for captures in label.captures_iter(&line[end + 1..close]) {
                if &captures[1] != "le" {
                    family.labels.insert(captures[1].to_string());
                }
            }
        }
    }
    families
}

/// The name a family is queried by: a counter's samples end in `_total`.
fn queried_name(family: &str, kind: &str) -> String {
    match kind {
        "counter" => format!("{family}_total"),
        _ => family.to_string(),
    }
}

/// Checks the families of one binary's exposition against the section `heading`.
fn check_metrics(reference: &str, heading: &str, exposition: &str, problems: &mut Vec<String>) {
    let documented = keyed_rows(section(reference, heading));
    let mut exposed = BTreeSet::new();
    for (family, found) in families(exposition) {
        let name = queried_name(&family, &found.kind);
        exposed.insert(name.clone());
        let Some(row) = documented.get(&name) else {
            problems.push(format!("{heading}: metric {name} is not documented"));
            continue;
        };
        let kind = row.get(1).map(|c| c.trim()).unwrap_or_default();
        if kind != found.kind {
            problems.push(format!(
                "{heading}: {name} is a {}, documented as {kind:?}",
                found.kind
            ));
        }
        if !found.has_series {
            problems.push(format!(
                "{heading}: {name} has no series after the test's traffic, so its labels \
                 cannot be checked: make the test produce one"
            ));
            continue;
        }
        let labels: BTreeSet<String> = row
            .get(2)
            .map(|cell| code_spans(cell).into_iter().collect())
            .unwrap_or_default();
        for missing in found.labels.difference(&labels) {
            problems.push(format!(
                "{heading}: label {missing} of {name} is not documented"
            ));
        }
        for extra in labels.difference(&found.labels) {
            problems.push(format!(
                "{heading}: {name} is documented with label {extra}, which it does not carry"
            ));
        }
    }
    for name in documented.keys() {
        if !exposed.contains(name) {
            problems.push(format!(
                "{heading}: {name} is documented but not exposed at /metrics"
            ));
        }
    }
}

const PATIENCE: Duration = Duration::from_secs(30);

async fn scrape(admin: SocketAddr) -> String {
    match http_get(admin, "admin", "/metrics").await {
        Ok((200, body)) => body,
        other => panic!("scraping {admin}: {other:?}"),
    }
}

/// Whether a sample of `sample` is exposed (with any labels).
fn has_sample(exposition: &str, sample: &str) -> bool {
    exposition.lines().any(|line| {
        line.strip_prefix(sample)
            .is_some_and(|rest| rest.starts_with(['{', ' ']))
    })
}

/// The reviews Service with two pods: `live` answers, nothing listens at `dead`.
fn manifests(live: SocketAddr, dead: SocketAddr) -> String {
    let mut manifest = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\n\
         spec:\n  ports: [{name: http, port: 9080}]\n",
    );
    for (pod, addr) in [("reviews-live", live), ("reviews-dead", dead)] {
        manifest += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {pod}\n  namespace: shop\n  labels: {{kubernetes.io/service-name: reviews}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}}}]\n\
             endpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: shop}}\n\
             ---\napiVersion: v1\nkind: Pod\n\
             metadata:\n  name: {pod}\n  namespace: shop\n  labels: {{app: reviews, version: v1}}\n",
            port = addr.port(),
            ip = addr.ip(),
        );
    }
    // Every policy that makes series of its own: timeouts, retries, outlier detection (one
    // connect failure ejects), a rate limit; round robin, so the dead pod is tried at once.
    manifest += r#"---
apiVersion: outrigger.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
  trafficSplit: [{subset: v1, weight: 100}]
  timeout: 10s
  retries: {attempts: 2, perTryTimeout: 5s, retryOn: [connect-failure, 5xx]}
  outlierDetection: {consecutiveGatewayErrors: 1, maxEjectionPercent: 50}
  loadBalancer: {algorithm: RoundRobin}
  rateLimit: {requestsPerSecond: 10000}
"#;
    manifest
}

/// The proxy's own pod, reached at `inbound`, behind a Service an AuthorizationPolicy guards, so
/// that a plaintext call to its inbound side is denied and counted.
fn guarded_pod(inbound: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: productpage, namespace: shop}}\n\
         spec:\n  ports: [{{name: http, port: 9080}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: productpage\n  namespace: shop\n  labels: {{kubernetes.io/service-name: productpage}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}}}]\n\
         endpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: productpage-0, namespace: shop}}\n\
         ---\napiVersion: outrigger.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: productpage-callers, namespace: shop}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: productpage}}]\n\
         \x20 rules: [{{from: [{{serviceAccounts: [shop/reviews]}}]}}]\n",
        port = inbound.port(),
        ip = inbound.ip(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_admin_endpoint_is_documented() {
    let reference = reference();
    let backend = Backend::start("reviews-live").await;
    let dead = free_port().unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("reviews.yaml"),
        manifests(backend.addr, dead),
    )
    .unwrap();
    let controller = live::start_controller(dir.path()).await;
    let controller_admin = controller.admin;
    // The proxy starts once the controller has read the whole directory, as in a cluster.
    let until = Instant::now() + PATIENCE;
    while !matches!(
        http_get(controller_admin, "admin", "/ready").await,
        Ok((200, _))
    ) {
        assert!(
            Instant::now() < until,
            "the controller was not ready within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let identity = ["--namespace", "shop", "--workload", "productpage-0"];
    let proxy = live::start_proxy(&controller.url, backend.addr, &identity).await;
    let (outbound, proxy_admin) = (proxy.outbound, proxy.admin);

    // Requests until one was retried on the live pod after the dead one refused it, and the
    // dead one was ejected for it.
    let until = Instant::now() + PATIENCE;
    let mut statuses = BTreeMap::new();
    loop {
        let status = match http_get(outbound, "reviews.shop:9080", "/").await {
            Ok((status, _)) => status,
            Err(_) => 0,
        };
        *statuses.entry(status).or_insert(0) += 1;
        let exposition = scrape(proxy_admin).await;
        if has_sample(&exposition, "outrigger_retries_total")
            && has_sample(&exposition, "outrigger_outlier_ejections_total")
        {
            break;
        }
        if Instant::now() > until {
            let config = http_get(proxy_admin, "admin", "/config").await;
            let ready = http_get(controller_admin, "admin", "/ready").await;
            panic!(
                "no retry and ejection within {PATIENCE:?}; statuses {statuses:?}; the proxy's \
                 /config: {config:?}; the controller's /ready: {ready:?}:\n{exposition}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A plaintext caller of the proxy's own pod, which its AuthorizationPolicy does not allow.
    std::fs::write(
        dir.path().join("productpage.yaml"),
        guarded_pod(proxy.inbound),
    )
    .unwrap();
    let until = Instant::now() + PATIENCE;
    loop {
        match http_get(proxy.inbound, "productpage.shop:9080", "/").await {
            Ok((403, _)) => break,
            other => assert!(
                Instant::now() < until,
                "no 403 from the inbound side within {PATIENCE:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut problems = Vec::new();
    check_metrics(
        &reference,
        "### Proxy metrics",
        &scrape(proxy_admin).await,
        &mut problems,
    );
    check_metrics(
        &reference,
        "### Controller metrics",
        &scrape(controller_admin).await,
        &mut problems,
    );

    // Every documented admin path answers (from loopback, where all of them are served).
    for (heading, admin) in [
        ("### Proxy admin endpoints", proxy_admin),
        ("### Controller admin endpoints", controller_admin),
    ] {
        let paths = keyed_rows(section(&reference, heading));
        assert!(!paths.is_empty(), "{heading} lists no endpoint");
        for path in paths.keys() {
            match http_get(admin, "admin", path).await {
                Ok((200, _)) => {}
                other => problems.push(format!("{heading}: GET {path} answers {other:?}")),
            }
        }
        match http_get(admin, "admin", "/no-such-path").await {
            Ok((404, _)) => {}
            other => problems.push(format!("{heading}: an unknown path answers {other:?}")),
        }
    }
    report(problems);
}
