//! What a node changes on this machine, recorded before it starts and undone when it stops (or,
//! after a crash, when the next node starts): processes left in pod cgroups and runc shims,
//! mounts under the node's directories, the bridge and its veths, iptables chains (v4 and v6, the
//! kubelet's own included), nftables tables that were not there, pod cgroups, kernel tunables and
//! the few fixed paths containerd, the CNI library and the kubelet use.
//!
//! [`MachineSnapshot`] is the wider view a test compares before and after.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Result, bail};
use crate::process::{self, send_signal};

/// The node's bridge: pods' veths are its ports, and it holds the node's IP.
pub(crate) const BRIDGE: &str = "cni0";

/// Chains the node's parts make: kube-proxy's and the kubelet's `KUBE-*`, the CNI plugins'
/// `CNI-*`, and our forwarding guard.
const NODE_CHAIN_PREFIXES: [&str; 3] = ["KUBE-", "CNI-", "OUTRIGGER-NODE-"];

/// The guard in `mangle FORWARD` that drops whatever is forwarded other than bridge to bridge.
pub(crate) const GUARD_CHAIN: &str = "OUTRIGGER-NODE-GUARD";

/// Kernel tunables the node changes: forwarding (ours, and the bridge plugin's), those the
/// kubelet sets at start (`setupKernelTunables`), and those kube-proxy may set.
const RESTORED_SYSCTLS: [&str; 13] = [
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_be_liberal",
];

/// Fixed paths the node's parts create whatever they are configured with: the CNI library's
/// result cache, the kubelet's container-log symlinks and device-plugin directory (under
/// `/var/lib/kubelet` whatever its root directory), containerd's shim socket directory, the
/// iptables lock, and libmount's table of mounts (`/run/mount`, made by the first mount(8)). A
/// machine that never ran a kubelet has none of them.
const FIXED_PATHS: [&str; 9] = [
    "/var/lib/cni",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
    "/run/xtables.lock",
    "/opt/containerd",
    "/run/netns",
    "/var/lib/kubelet",
    "/run/mount",
];

/// The machine as a node found it, saved before it changes anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    sysctls: Vec<(String, String)>,
    /// [`FIXED_PATHS`] that did not exist.
    absent_paths: Vec<PathBuf>,
    /// `ip filter`, `ip6 nat`, ...
    nft_tables: BTreeSet<String>,
}

impl Record {
    pub(crate) fn take() -> Result<Record> {
        let mut sysctls = Vec::new();
        for name in RESTORED_SYSCTLS {
            if let Some(value) = read_sysctl(name)? {
                sysctls.push((name.to_string(), value));
            }
        }
        Ok(Record {
            sysctls,
            absent_paths: FIXED_PATHS
                .iter()
                .map(PathBuf::from)
                .filter(|path| fs::symlink_metadata(path).is_err())
                .collect(),
            nft_tables: nft_tables()?,
        })
    }

    /// One `kind value...` per line, for a file a later run can read after a crash.
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let mut text = String::new();
        for (name, value) in &self.sysctls {
            text.push_str(&format!("sysctl {name} {value}\n"));
        }
        for path in &self.absent_paths {
            text.push_str(&format!("absent {}\n", path.display()));
        }
        for table in &self.nft_tables {
            text.push_str(&format!("nft {table}\n"));
        }
        let aside = path.with_extension("tmp");
        fs::write(&aside, text).context(|| format!("writing {}", aside.display()))?;
        fs::rename(&aside, path).context(|| format!("renaming {}", aside.display()))
    }

    /// The record saved at `path`, if there is one.
    pub(crate) fn load(path: &Path) -> Result<Option<Record>> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err).context(|| format!("reading {}", path.display())),
        };
        let mut record = Record {
            sysctls: Vec::new(),
            absent_paths: Vec::new(),
            nft_tables: BTreeSet::new(),
        };
        for line in text.lines().filter(|line| !line.is_empty()) {
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            match kind {
                "sysctl" => {
                    let (name, value) = rest
                        .split_once(' ')
                        .context(|| format!("{}: malformed line {line:?}", path.display()))?;
                    record.sysctls.push((name.to_string(), value.to_string()));
                }
                "absent" => record.absent_paths.push(PathBuf::from(rest)),
                "nft" => {
                    record.nft_tables.insert(rest.to_string());
                }
                _ => bail!("{}: malformed line {line:?}", path.display()),
            }
        }
        Ok(Some(record))
    }
}

/// What [`restore`] needs to know about the node besides the record.
pub(crate) struct NodeFootprint<'a> {
    /// Every mount below it is the node's (containerd's snapshots and netns, the kubelet's volumes).
    pub(crate) state_dir: &'a Path,
    /// The shim binary: any process running it belongs to the node.
    pub(crate) shim: &'a Path,
}

/// Undoes what a node changed, as far as `record` and `footprint` tell; returns what it did, for
/// the log. Safe to run when nothing is left to undo.
pub(crate) fn restore(record: &Record, footprint: &NodeFootprint) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let killed = kill_node_processes(footprint.shim)?;
    if killed > 0 {
        done.push(format!("killed {killed} pod or shim processes"));
    }
    let unmounted = unmount_below(footprint.state_dir)?;
    if unmounted > 0 {
        done.push(format!("unmounted {unmounted} mounts"));
    }
    if remove_bridge()? {
        done.push(format!("deleted the bridge {BRIDGE} and its veths"));
    }
    let chains = remove_node_chains()?;
    if chains > 0 {
        done.push(format!("removed {chains} iptables chains"));
    }
    for table in nft_tables()?.difference(&record.nft_tables) {
        if is_empty_nft_table(table)? {
            run(Command::new("nft").args(format!("delete table {table}").split(' ')))?;
            done.push(format!("deleted nftables table {table}"));
        }
    }
    let cgroups = remove_pod_cgroups()?;
    if cgroups > 0 {
        done.push(format!("removed {cgroups} pod cgroups"));
    }
    for (name, value) in &record.sysctls {
        if read_sysctl(name)?.as_deref() != Some(value.as_str()) {
            let path = Path::new("/proc/sys").join(name);
            fs::write(&path, format!("{value}\n"))
                .context(|| format!("restoring {} to {value}", path.display()))?;
            done.push(format!("restored {name} to {value}"));
        }
    }
    for path in &record.absent_paths {
        match fs::symlink_metadata(path) {
            Ok(metadata) => {
                if metadata.is_dir() {
                    fs::remove_dir_all(path)
                } else {
                    fs::remove_file(path)
                }
                .context(|| format!("removing {}", path.display()))?;
                done.push(format!("removed {}", path.display()));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).context(|| format!("reading {}", path.display())),
        }
    }
    Ok(done)
}

/// Kills every process in a pod cgroup (containers, whatever their runtime left) and every shim
/// of ours, and waits until they are gone. Returns how many there were.
fn kill_node_processes(shim: &Path) -> Result<usize> {
    let mut pids = BTreeSet::new();
    for dir in pod_cgroups()? {
        let procs = dir.join("cgroup.procs");
        if let Ok(text) = fs::read_to_string(&procs) {
            pids.extend(
                text.lines()
                    .filter_map(|line| line.trim().parse::<u32>().ok()),
            );
        }
    }
    for entry in fs::read_dir("/proc").context(|| "listing /proc".into())? {
        let Some(pid) = entry
            .ok()
            .and_then(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        if process::program_of(pid).as_deref() == Some(shim) {
            pids.insert(pid);
        }
    }
    pids.remove(&std::process::id());
    for &pid in &pids {
        // Gone already is fine: it may have exited since it was listed.
        let _ = send_signal(pid, "KILL");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(pid) = pids.iter().find(|&&pid| process::is_alive(pid)) {
        if Instant::now() > deadline {
            bail!("pid {pid} (a pod or shim process) is still alive after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pids.len())
}

/// Unmounts every mount at or below `dir`, deepest first. Returns how many there were.
fn unmount_below(dir: &Path) -> Result<usize> {
    let mut count = 0;
    // A mount can hide another at the same point: go on until none is left.
    for _ in 0..10 {
        let mut points: Vec<PathBuf> = mount_points()?
            .into_iter()
            .filter(|point| point.starts_with(dir))
            .collect();
        if points.is_empty() {
            return Ok(count);
        }
        points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
        for point in points {
            let output = Command::new("umount")
                .arg(&point)
                .stdin(Stdio::null())
                .output()
                .context(|| format!("running umount {}", point.display()))?;
            if !output.status.success() {
                // Busy (a process we do not know of): detach it, so nothing stays reachable.
                run(Command::new("umount").arg("--lazy").arg(&point))?;
            }
            count += 1;
        }
    }
    bail!("mounts below {} keep coming back", dir.display())
}

/// Mount points of this mount namespace, `\040`-style escapes decoded.
fn mount_points() -> Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .context(|| "reading /proc/self/mountinfo".into())?;
    Ok(text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_field(point)))
        .collect())
}

fn unescape_mount_field(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&digits, 8) {
                Ok(byte) => out.push(char::from(byte)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&digits);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Deletes the bridge's veths and the bridge (with its address and routes). Returns whether it
/// was there.
fn remove_bridge() -> Result<bool> {
    if !Path::new("/sys/class/net").join(BRIDGE).exists() {
        return Ok(false);
    }
    let ports = fs::read_dir(Path::new("/sys/class/net").join(BRIDGE).join("brif"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for port in ports {
        // Its peer's namespace may be going away right now, taking it along.
        let _ = run(Command::new("ip").args(["link", "delete", &port]));
    }
    run(Command::new("ip").args(["link", "delete", BRIDGE]))?;
    Ok(true)
}

/// The iptables commands of this machine, v4 and v6.
const IPTABLES: [(&str, &str); 2] = [
    ("iptables-save", "iptables-restore"),
    ("ip6tables-save", "ip6tables-restore"),
];

/// Removes the node's chains from every table, v4 and v6, and the rules elsewhere that jump to
/// them. Returns how many chains there were.
fn remove_node_chains() -> Result<usize> {
    let mut removed = 0;
    for (save, restore) in IPTABLES {
        let rules = run(&mut Command::new(save))?;
        let (script, chains) = node_chain_removal(&rules);
        if chains == 0 {
            continue;
        }
        let mut child = Command::new(restore)
            .args(["--noflush", "-w", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context(|| format!("running {restore} --noflush"))?;
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(script.as_bytes())
            .context(|| format!("writing to {restore}"))?;
        let output = child
            .wait_with_output()
            .context(|| format!("waiting for {restore}"))?;
        if !output.status.success() {
            bail!(
                "{restore} --noflush refused to remove the node's chains: {}\n{script}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        removed += chains;
    }
    Ok(removed)
}

fn is_node_chain(chain: &str) -> bool {
    NODE_CHAIN_PREFIXES
        .iter()
        .any(|prefix| chain.starts_with(prefix))
}

/// An `iptables-restore --noflush` script that deletes, per table, the rules of other chains
/// that jump to a node chain, then flushes and deletes the node chains; and how many those are.
fn node_chain_removal(saved: &str) -> (String, usize) {
    let mut script = String::new();
    let mut chains = 0;
    let mut table: Option<(&str, Vec<String>, Vec<&str>)> = None;
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Some((name, Vec::new(), Vec::new()));
        } else if let Some((_, deletions, node_chains)) = table.as_mut() {
            if let Some(declaration) = line.strip_prefix(':') {
                let chain = declaration.split(' ').next().unwrap_or_default();
                if is_node_chain(chain) {
                    node_chains.push(chain);
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split(' ').next().unwrap_or_default();
                let jumps_to_node_chain = rule
                    .split(' ')
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|pair| matches!(pair[0], "-j" | "-g") && is_node_chain(pair[1]));
                if !is_node_chain(chain) && jumps_to_node_chain {
                    deletions.push(format!("-D {rule}"));
                }
            } else if line == "COMMIT" {
                let (name, deletions, node_chains) = table.take().expect("inside a table");
                if deletions.is_empty() && node_chains.is_empty() {
                    continue;
                }
                chains += node_chains.len();
                script.push_str(&format!("*{name}\n"));
                for deletion in deletions {
                    script.push_str(&deletion);
                    script.push('\n');
                }
                for chain in &node_chains {
                    script.push_str(&format!("-F {chain}\n"));
                }
                for chain in &node_chains {
                    script.push_str(&format!("-X {chain}\n"));
                }
                script.push_str("COMMIT\n");
            }
        }
    }
    (script, chains)
}

/// nftables tables (`ip filter`, ...); none when `nft` is not installed (legacy iptables).
fn nft_tables() -> Result<BTreeSet<String>> {
    let output = match Command::new("nft")
        .args(["list", "tables"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) => output,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(err) => return Err(err).context(|| "running nft list tables".into()),
    };
    if !output.status.success() {
        bail!(
            "nft list tables failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix("table "))
        .map(str::to_string)
        .collect())
}

/// Whether a table holds no rule and no chain but the base chains iptables-nft declares.
fn is_empty_nft_table(table: &str) -> Result<bool> {
    let listing = run(Command::new("nft").args(format!("list table {table}").split(' ')))?;
    Ok(listing.lines().map(str::trim).all(|line| {
        line.is_empty()
            || line == "}"
            || line.starts_with("table ")
            || line.starts_with("type ")
            || (line.starts_with("chain ")
                && ["INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"]
                    .iter()
                    .any(|base| line == format!("chain {base} {{")))
    }))
}

/// The roots of this machine's cgroup hierarchies (v1 controllers and the unified one).
fn cgroup_roots() -> Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .context(|| "reading /proc/self/mountinfo".into())?;
    Ok(text
        .lines()
        .filter(|line| {
            line.split(" - ")
                .nth(1)
                .and_then(|fields| fields.split(' ').next())
                .is_some_and(|kind| kind == "cgroup" || kind == "cgroup2")
        })
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_field(point)))
        .collect())
}

/// Every pod cgroup directory (the kubelet's `kubepods` trees), deepest first.
fn pod_cgroups() -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for root in cgroup_roots()? {
        let Ok(entries) = fs::read_dir(&root) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("kubepods") && entry.path().is_dir()
            {
                collect_dirs(&entry.path(), &mut dirs);
            }
        }
    }
    dirs.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
    Ok(dirs)
}

fn collect_dirs(dir: &Path, into: &mut Vec<PathBuf>) {
    into.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                collect_dirs(&entry.path(), into);
            }
        }
    }
}

/// Removes the pod cgroups, deepest first (their processes are gone). Returns how many.
fn remove_pod_cgroups() -> Result<usize> {
    let dirs = pod_cgroups()?;
    for dir in &dirs {
        // A cgroup is removed with rmdir, even though its control files are still listed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                // The kernel lets a cgroup go a moment after its last process exits.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(err) => return Err(err).context(|| format!("removing {}", dir.display())),
            }
        }
    }
    Ok(dirs.len())
}

/// A kernel tunable by its path below /proc/sys, `None` where this kernel has none.
fn read_sysctl(name: &str) -> Result<Option<String>> {
    let path = Path::new("/proc/sys").join(name);
    match fs::read_to_string(&path) {
        Ok(value) => Ok(Some(value.trim().to_string())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).context(|| format!("reading {}", path.display())),
    }
}

/// Sets a kernel tunable by its path below /proc/sys.
pub(crate) fn write_sysctl(name: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(name);
    fs::write(&path, value).context(|| format!("setting {} to {value}", path.display()))
}

/// Runs `command`; its stdout, or an error with its stderr.
pub(crate) fn run(command: &mut Command) -> Result<String> {
    let description = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let output = command
        .stdin(Stdio::null())
        .output()
        .context(|| format!("running {description}"))?;
    if !output.status.success() {
        bail!(
            "{description} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What a test compares before a node starts and after it stops: wider than what [`restore`]
/// undoes, so that a change it does not know of shows up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSnapshot {
    pub mount_points: BTreeSet<String>,
    pub links: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    /// `iptables-save` and `ip6tables-save` lines, packet counters left out.
    pub iptables: BTreeSet<String>,
    pub nft_tables: BTreeSet<String>,
    /// Every directory below the cgroup hierarchies' roots, two levels deep.
    pub cgroups: BTreeSet<String>,
    /// Writable kernel tunables that do not change by themselves.
    pub sysctls: BTreeMap<String, String>,
    /// Entries of the directories where the node's parts would leave files.
    pub files: BTreeSet<String>,
}

/// Tunables that change by themselves, left out of [`MachineSnapshot::sysctls`].
const VOLATILE_SYSCTLS: [&str; 4] = [
    "kernel/ns_last_pid",
    "kernel/perf_event_max_sample_rate",
    "kernel/tainted",
    "kernel/random",
];

/// Where to look for tunables: the subtrees any of the node's parts could touch.
const SYSCTL_TREES: [&str; 8] = [
    "kernel",
    "vm",
    "net/ipv4",
    "net/ipv6/conf/all",
    "net/ipv6/conf/default",
    "net/bridge",
    "net/netfilter",
    "net/core",
];

/// Directories whose entries are compared.
const WATCHED_DIRS: [&str; 5] = ["/run", "/var/lib", "/var/log", "/opt", "/etc/cni"];

impl MachineSnapshot {
    pub fn take() -> Result<MachineSnapshot> {
        let lines = |text: String| -> BTreeSet<String> {
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(str::to_string)
                .collect()
        };
        let mut iptables = BTreeSet::new();
        for (save, _) in IPTABLES {
            for line in run(&mut Command::new(save))?.lines() {
                if line.starts_with('#') {
                    continue;
                }
                // `:CHAIN POLICY [packets:bytes]`: the counters move with any traffic.
                let line = match line.rsplit_once(" [") {
                    Some((declaration, _)) if line.starts_with(':') => declaration,
                    _ => line,
                };
                iptables.insert(format!("{save}: {line}"));
            }
        }
        let mut cgroups = BTreeSet::new();
        for root in cgroup_roots()? {
            let mut dirs = Vec::new();
            collect_dirs(&root, &mut dirs);
            cgroups.extend(
                dirs.iter()
                    .filter(|dir| dir.components().count() <= root.components().count() + 2)
                    .map(|dir| dir.display().to_string()),
            );
        }
        let mut sysctls = BTreeMap::new();
        for tree in SYSCTL_TREES {
            collect_sysctls(&Path::new("/proc/sys").join(tree), &mut sysctls);
        }
        let mut files = BTreeSet::new();
        for dir in WATCHED_DIRS {
            if let Ok(entries) = fs::read_dir(dir) {
                files.extend(
                    entries
                        .flatten()
                        .map(|entry| entry.path().display().to_string()),
                );
            }
        }
        files.extend(
            FIXED_PATHS
                .iter()
                .filter(|path| fs::symlink_metadata(path).is_ok())
                .map(|path| path.to_string()),
        );
        Ok(MachineSnapshot {
            mount_points: mount_points()?
                .iter()
                .map(|point| point.display().to_string())
                .collect(),
            links: lines(run(Command::new("ip").args(["-o", "link", "show"]))?)
                .iter()
                .filter_map(|line| line.split(": ").nth(1))
                .map(|name| name.split('@').next().unwrap_or(name).to_string())
                .collect(),
            routes: lines(run(
                Command::new("ip").args(["route", "show", "table", "all"])
            )?),
            iptables,
            nft_tables: nft_tables()?,
            cgroups,
            sysctls,
            files,
        })
    }

    /// What differs from `before`, one line each: `+` what is new, `-` what is gone.
    pub fn differences_from(&self, before: &MachineSnapshot) -> Vec<String> {
        fn sets(what: &str, before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
            let gone = before
                .difference(after)
                .map(|item| format!("{what} - {item}"));
            let new = after
                .difference(before)
                .map(|item| format!("{what} + {item}"));
            gone.chain(new).collect()
        }
        let mut differences = Vec::new();
        differences.extend(sets("mount", &before.mount_points, &self.mount_points));
        differences.extend(sets("link", &before.links, &self.links));
        differences.extend(sets("route", &before.routes, &self.routes));
        differences.extend(sets("iptables", &before.iptables, &self.iptables));
        differences.extend(sets("nft table", &before.nft_tables, &self.nft_tables));
        differences.extend(sets("cgroup", &before.cgroups, &self.cgroups));
        differences.extend(sets("file", &before.files, &self.files));
        for (name, value) in &before.sysctls {
            match self.sysctls.get(name) {
                Some(now) if now == value => {}
                now => differences.push(format!("sysctl {name}: {value} -> {now:?}")),
            }
        }
        differences
    }
}

fn collect_sysctls(path: &Path, into: &mut BTreeMap<String, String>) {
    let name = path
        .strip_prefix("/proc/sys")
        .unwrap_or(path)
        .display()
        .to_string();
    if VOLATILE_SYSCTLS
        .iter()
        .any(|volatile| name == *volatile || name.starts_with(&format!("{volatile}/")))
    {
        return;
    }
    let Ok(metadata) = fs::metadata(path) else {
        return;
    };
    if metadata.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                collect_sysctls(&entry.path(), into);
            }
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        // Read-only ones are the kernel's state, not settings; write-only ones cannot be read.
        if metadata.permissions().mode() & 0o200 != 0
            && let Ok(value) = fs::read_to_string(path)
        {
            into.insert(name, value.trim().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_chains_and_jumps_to_them_are_removed_others_kept() {
        let saved = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n\
                     :FORWARD DROP [3:180]\n:KUBE-FORWARD - [0:0]\n:OUTRIGGER-NODE-GUARD - [0:0]\n\
                     :MINE - [0:0]\n\
                     -A FORWARD -j OUTRIGGER-NODE-GUARD\n\
                     -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
                     -A FORWARD -j MINE\n-A KUBE-FORWARD -j ACCEPT\n\
                     -A OUTRIGGER-NODE-GUARD -i cni0 -o cni0 -j RETURN\nCOMMIT\n\
                     *raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MINE2\nCOMMIT\n";
        let (script, chains) = node_chain_removal(saved);
        assert_eq!(chains, 2);
        assert_eq!(
            script,
            "*filter\n-D FORWARD -j OUTRIGGER-NODE-GUARD\n\
             -D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -F KUBE-FORWARD\n-F OUTRIGGER-NODE-GUARD\n-X KUBE-FORWARD\n-X OUTRIGGER-NODE-GUARD\n\
             COMMIT\n"
        );
    }

    #[test]
    fn records_round_trip() {
        let path = std::env::temp_dir().join(format!("outrigger-record-{}", std::process::id()));
        let record = Record {
            sysctls: vec![("net/ipv4/ip_forward".into(), "0".into())],
            absent_paths: vec![PathBuf::from("/var/lib/cni")],
            nft_tables: BTreeSet::from(["ip filter".to_string()]),
        };
        record.save(&path).unwrap();
        assert_eq!(Record::load(&path).unwrap(), Some(record));
        fs::remove_file(&path).unwrap();
        assert_eq!(Record::load(&path).unwrap(), None);
    }

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape_mount_field("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
    }

    #[test]
    fn a_snapshot_of_this_machine_equals_itself() {
        let snapshot = MachineSnapshot::take().unwrap();
        assert!(snapshot.sysctls.contains_key("net/ipv4/ip_forward"));
        assert!(snapshot.mount_points.contains("/"));
        assert!(snapshot.differences_from(&snapshot).is_empty());
    }
}
