//! The demo (`cargo xtask demo`) runs the whole chain, edits its policy, and stops cleanly on
//! Ctrl-C, leaving no process behind. Needs the controller and proxy binaries built next to it
//! (`cargo test --workspace` builds them).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_shows_traffic_follows_edits_and_stops_on_ctrl_c() {
    let workspace = outrigger_tests::workspace();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_outrigger-demo"))
        .args(["--edit-every", "3", "--rate", "100"])
        .current_dir(workspace)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let pid = demo.id();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until the first edit has been followed by a line of traffic.
    while Instant::now() < deadline {
        let line = lines.next().expect("the demo ended early").unwrap();
        seen.push(line);
        let edited = seen.iter().position(|l| l.starts_with(">>> edited"));
        if edited.is_some_and(|at| seen[at..].iter().any(|l| l.trim_start().starts_with("4s"))) {
            break;
        }
    }
    let traffic: Vec<&String> = seen
        .iter()
        .filter(|l| l.trim_end().ends_with("healthy") || l.contains("ejected"))
        .collect();
    assert!(
        !traffic.is_empty(),
        "no traffic lines:\n{}",
        seen.join("\n")
    );
    // Every traffic line: the app succeeded on most requests, thanks to retries.
    let first = traffic[0].split_whitespace().collect::<Vec<_>>();
    assert!(
        first[4].trim_end_matches('%').parse::<f64>().unwrap() > 90.0,
        "{}",
        traffic[0]
    );
    assert!(
        seen.iter().any(|l| l.contains("weight: 50}")),
        "the edit was shown:\n{}",
        seen.join("\n")
    );

    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = demo.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(rest.iter().any(|l| l.starts_with("stopped")), "{rest:?}");
    // Its controller and proxy are gone with it.
    let scratch = format!("outrigger-demo-{pid}");
    let stragglers: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| {
            cmdline.contains(&scratch) || cmdline.contains("--workload productpage-0")
        })
        .collect();
    assert!(stragglers.is_empty(), "{stragglers:?}");
}
