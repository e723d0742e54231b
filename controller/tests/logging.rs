//! The controller's logs: no colour codes off a terminal (`kubectl logs` shows them as they are),
//! and one JSON object a line with `--log-format json`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The controller's first log lines, up to the one saying it serves, in `format`.
fn first_lines(format: &str) -> Vec<String> {
    let manifests = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outrigger-controller"))
        .arg("--manifests")
        .arg(manifests.path())
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--log-format", format])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the controller");
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let serving = line.contains("controller serving");
        lines.push(line);
        if serving {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines
            .last()
            .is_some_and(|line| line.contains("controller serving")),
        "the controller exited before serving: {lines:?}"
    );
    lines
}

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal() {
    for line in first_lines("text") {
        assert!(!line.contains('\u{1b}'), "{line:?}");
    }
}

#[test]
fn json_logs_are_one_object_a_line() {
    for line in first_lines("json") {
        let entry: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(entry["level"].is_string(), "{line}");
    }
}
