//! The node on this machine (needs root): pods run, reach the API server through the
//! `kubernetes` Service and resolve names through CoreDNS, nothing outside the cluster resolves
//! and nothing they send leaves the bridge; `kubectl logs` and `kubectl exec` work. Stopping the
//! node leaves the machine as it was, and so does a start after a crash that left pods, shims,
//! mounts and chains behind.
//!
//! One test, so that the machine is compared under one hold of the node's lock: another node
//! (another test binary, another checkout's tests) cannot start in between.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outrigger_cluster::{
    Cluster, Image, Lifetime, MachineSnapshot, NodeLock, is_alive, stop_node_under,
};

/// A shell for pods, from this machine's bash and coreutils: bash's `/dev/tcp` makes TCP
/// connections, getent resolves names with the pod's resolv.conf.
const SHELL_IMAGE: &str = "localhost/outrigger-test/shell:1";

fn shell_image(dir: &Path) -> PathBuf {
    let mut image = Image::new(SHELL_IMAGE);
    for program in [
        "/bin/bash",
        "/usr/bin/getent",
        "/usr/bin/sleep",
        "/usr/bin/timeout",
    ] {
        let host = std::fs::canonicalize(program).unwrap();
        image.add_program(program, &host).unwrap();
    }
    image
        .set_entrypoint(&["/bin/bash", "-c"])
        .set_user("1000:1000");
    std::fs::create_dir_all(dir).unwrap();
    let archive = dir.join("shell.tar");
    image.write_docker_archive(&archive).unwrap();
    archive
}

/// A pod running `script` in the shell image.
fn shell_pod(name: &str, script: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: shell
    image: {SHELL_IMAGE}
    imagePullPolicy: Never
    args: [{script:?}]
"#
    )
}

fn apply(cluster: &Cluster, manifest: &str) {
    let output = cluster
        .kubectl_with_input(&["apply", "-f", "-"], manifest)
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn wait_ready(cluster: &Cluster, pod: &str) {
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=180s",
        ])
        .unwrap_or_else(|err| {
            let described = cluster
                .kubectl(&["describe", "pod", pod])
                .unwrap_or_default();
            panic!("{err}\n{described}")
        });
}

/// Runs `script` in the pod's shell with `kubectl exec`; (exit code, stdout).
fn exec(cluster: &Cluster, pod: &str, script: &str) -> (i32, String) {
    let output = cluster
        .kubectl_command()
        .args(["exec", pod, "--", "/bin/bash", "-c", script])
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Packets the node's forwarding guard has dropped.
fn guard_drops() -> u64 {
    let output = Command::new("iptables")
        .args([
            "-w",
            "-t",
            "mangle",
            "-L",
            "OUTRIGGER-NODE-GUARD",
            "-v",
            "-x",
            "-n",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the guard chain exists while the node runs"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("DROP"))
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn assert_unchanged(before: &MachineSnapshot, when: &str) {
    let differences = MachineSnapshot::take().unwrap().differences_from(before);
    assert!(
        differences.is_empty(),
        "{when}, the machine differs from before the node started:\n{}",
        differences.join("\n")
    );
}

#[test]
fn pods_run_their_traffic_stays_on_the_machine_and_the_node_leaves_nothing_behind() {
    let lock = NodeLock::acquire().unwrap();
    let images = std::env::temp_dir().join(format!("outrigger-node-test-{}", std::process::id()));
    let shell = shell_image(&images);
    // What a node killed earlier left (a run stopped midway) is not this node's to leave behind.
    let undone = stop_node_under(&lock).unwrap();
    if !undone.is_empty() {
        eprintln!("undid what an earlier node left: {}", undone.join("; "));
    }
    let before = MachineSnapshot::take().unwrap();

    let started = Instant::now();
    let cluster = Cluster::builder()
        .node_under(&lock)
        .images([shell.clone()])
        .start()
        .expect("starting the node");
    eprintln!("node started in {:?}", started.elapsed());
    apply(
        &cluster,
        &shell_pod("shell", "echo started; exec sleep 3600"),
    );
    wait_ready(&cluster, "shell");
    eprintln!("first pod Ready {:?} after the start", started.elapsed());

    let logs = cluster.kubectl(&["logs", "shell"]).unwrap();
    assert_eq!(logs, "started\n", "kubectl logs");
    assert_eq!(exec(&cluster, "shell", "echo hello"), (0, "hello\n".into()));

    let (status, resolved) = exec(
        &cluster,
        "shell",
        "getent hosts kubernetes.default.svc.cluster.local",
    );
    assert_eq!(status, 0, "CoreDNS resolves the kubernetes Service");
    assert!(resolved.starts_with("10.0.0.1 "), "{resolved:?}");
    assert_eq!(
        exec(
            &cluster,
            "shell",
            "timeout 10 bash -c '</dev/tcp/kubernetes.default.svc.cluster.local/443' && echo connected",
        ),
        (0, "connected\n".into()),
        "the API server answers through the Service's ClusterIP (kube-proxy's rules)"
    );
    let (status, _) = exec(&cluster, "shell", "getent hosts example.com");
    assert_ne!(status, 0, "CoreDNS answers cluster.local only");

    // The machine's default gateway is beyond the bridge: the guard drops what a pod sends it.
    let drops_before = guard_drops();
    let (status, _) = exec(
        &cluster,
        "shell",
        "timeout 3 bash -c '</dev/tcp/192.0.2.1/80'",
    );
    assert_ne!(status, 0, "a pod cannot connect beyond the bridge");
    assert!(
        guard_drops() > drops_before,
        "the guard dropped the attempt"
    );

    let stopped = cluster.stop().expect("stopping the node");
    assert!(stopped.iter().all(|process| !is_alive(process.pid)));
    assert_unchanged(&before, "after a stop");

    // A crash: every process of the node killed outright while a pod runs, leaving its shim,
    // container, mounts, network namespace, veth, chains and cgroups.
    let crashed = Cluster::builder()
        .node_under(&lock)
        .images([shell.clone()])
        .lifetime(Lifetime::Detached)
        .start()
        .expect("starting the node to crash it");
    apply(&crashed, &shell_pod("survivor", "exec sleep 3600"));
    wait_ready(&crashed, "survivor");
    let pids: Vec<u32> = crashed.pids().iter().map(|(_, pid)| *pid).collect();
    crashed.leave_running();
    for pid in &pids {
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -KILL {pid}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|pid| is_alive(*pid)) {
        assert!(Instant::now() < deadline, "the killed processes are gone");
        std::thread::sleep(Duration::from_millis(50));
    }

    let restarted = Cluster::builder()
        .node_under(&lock)
        .images([shell])
        .start()
        .expect("starting a node after a crash");
    apply(&restarted, &shell_pod("shell", "exec sleep 3600"));
    wait_ready(&restarted, "shell");
    restarted.stop().expect("stopping the node");
    assert_unchanged(&before, "after a crash, a start and a stop");
    std::fs::remove_dir_all(&images).unwrap();
}
