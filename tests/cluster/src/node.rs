//! The node: containerd with Debian's runc, the CNI bridge, the kubelet, kube-proxy (iptables
//! mode) and CoreDNS, beside the API server, on one bridge of this machine.
//!
//! Pods live on the bridge `cni0` (10.88.0.1/16, which is also the node's and the API server's
//! address); forwarding anywhere but bridge to bridge is dropped, and DNS answers `cluster.local`
//! only, so no pod traffic leaves the machine. The bridge, the CIDRs and the ports are fixed, so
//! there is one node per machine: [`NodeLock`] makes users of it take turns, and a start first
//! undoes what a crashed run left (see `machine`).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::binaries::{Binaries, cache_dir};
use crate::certs::Certificates;
use crate::error::{Context, Result};
use crate::image::Image;
use crate::json_string;
use crate::machine::{self, BRIDGE, GUARD_CHAIN, NodeFootprint, Record, run};
use crate::progress;

/// The node's address on the bridge: the kubelet's, the API server's and CoreDNS's.
pub(crate) const NODE_IP: &str = "10.88.0.1";
const POD_SUBNET: &str = "10.88.0.0/16";
/// Services' ClusterIPs; 10.0.0.1 is the `kubernetes` Service.
pub(crate) const SERVICE_SUBNET: &str = "10.0.0.0/24";
pub(crate) const NODE_NAME: &str = "outrigger-node";
pub(crate) const APISERVER_PORT: u16 = 6443;
const KUBELET_PORT: u16 = 10250;
/// The pod sandbox image, built from `tests/cluster/go/pause`; containerd pins it.
pub const PAUSE_IMAGE: &str = "localhost/outrigger/pause:1";

pub(crate) const CONTAINERD: &str = "containerd";
pub(crate) const KUBELET: &str = "kubelet";
pub(crate) const KUBE_PROXY: &str = "kube-proxy";
pub(crate) const SCHEDULER: &str = "kube-scheduler";
pub(crate) const COREDNS: &str = "coredns";

/// The identities of the node's components, as Kubernetes' default RBAC and the Node authorizer
/// know them.
pub(crate) const COMPONENT_IDENTITIES: [(&str, &str); 4] = [
    (KUBELET, "O = system:nodes\nCN = system:node:outrigger-node"),
    (KUBE_PROXY, "CN = system:kube-proxy"),
    (SCHEDULER, "CN = system:kube-scheduler"),
    (
        "kube-controller-manager",
        "CN = system:kube-controller-manager",
    ),
];

/// `<cache>/cluster/node`: the one node's state (certificates, kubeconfigs, containerd's images
/// and snapshots, the kubelet's pods, logs).
pub fn node_state_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("cluster").join("node"))
}

/// The node's containerd, as crictl's `--runtime-endpoint` or `CONTAINER_RUNTIME_ENDPOINT` takes it.
pub fn node_runtime_endpoint() -> Result<String> {
    Ok(format!(
        "unix://{}",
        NodePaths::new(&node_state_dir()?)
            .containerd_socket
            .display()
    ))
}

/// Where the node keeps what: all of it below its state directory.
#[derive(Debug, Clone)]
pub(crate) struct NodePaths {
    pub(crate) state_dir: PathBuf,
    pub(crate) containerd_config: PathBuf,
    containerd_root: PathBuf,
    containerd_state: PathBuf,
    pub(crate) containerd_socket: PathBuf,
    runc_root: PathBuf,
    cni_config_dir: PathBuf,
    cni_ipam_dir: PathBuf,
    pub(crate) kubelet_root: PathBuf,
    pub(crate) kubelet_config: PathBuf,
    pod_logs: PathBuf,
    pub(crate) kube_proxy_config: PathBuf,
    pub(crate) corefile: PathBuf,
    resolv_conf: PathBuf,
    pub(crate) record: PathBuf,
    images: PathBuf,
}

impl NodePaths {
    pub(crate) fn new(state_dir: &Path) -> NodePaths {
        let containerd = state_dir.join("containerd");
        NodePaths {
            state_dir: state_dir.to_path_buf(),
            containerd_config: containerd.join("config.toml"),
            containerd_root: containerd.join("root"),
            containerd_socket: containerd.join("state").join("containerd.sock"),
            containerd_state: containerd.join("state"),
            runc_root: containerd.join("runc"),
            cni_config_dir: state_dir.join("cni").join("net.d"),
            cni_ipam_dir: state_dir.join("cni").join("ipam"),
            kubelet_root: state_dir.join("kubelet"),
            kubelet_config: state_dir.join("kubelet.yaml"),
            pod_logs: state_dir.join("pod-logs"),
            kube_proxy_config: state_dir.join("kube-proxy.yaml"),
            corefile: state_dir.join("Corefile"),
            resolv_conf: state_dir.join("resolv.conf"),
            record: state_dir.join("machine.record"),
            images: state_dir.join("images"),
        }
    }

    /// The kubeconfig of one component (`kubelet`, `kube-proxy`, ...).
    pub(crate) fn kubeconfig_of(&self, component: &str) -> PathBuf {
        self.state_dir.join(format!("{component}.kubeconfig"))
    }
}

/// Exclusive use of this machine's node: held by whoever starts, uses or stops it, released
/// when dropped (or when the process dies).
pub struct NodeLock {
    _file: File,
}

impl NodeLock {
    /// Waits until no other process uses the node, then takes it.
    pub fn acquire() -> Result<NodeLock> {
        let path = cache_dir()?.join("cluster").join("node.lock");
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .context(|| format!("opening the node lock {}", path.display()))?;
        if file.try_lock().is_err() {
            progress(&format!(
                "waiting for another process to be done with the node (lock {})",
                path.display()
            ));
            file.lock()
                .context(|| format!("locking {}", path.display()))?;
        }
        Ok(NodeLock { _file: file })
    }
}

/// Records the machine as it is, then makes the changes the node needs before anything starts:
/// the bridge with the node's address, a route to the Services through it, forwarding, and the
/// guard that keeps forwarded traffic on the bridge. The guard is in the mangle table, which
/// comes before the filter table where kube-proxy and the kubelet put their chains and accept
/// rules, so nothing they add can let pod traffic out.
pub(crate) fn prepare_machine(paths: &NodePaths) -> Result<()> {
    Record::take()?.save(&paths.record)?;
    let ip = |args: &[&str]| run(Command::new("ip").args(args));
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{NODE_IP}/16"), "dev", BRIDGE])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    ip(&[
        "route",
        "replace",
        SERVICE_SUBNET,
        "dev",
        BRIDGE,
        "src",
        NODE_IP,
    ])?;
    machine::write_sysctl("net/ipv4/ip_forward", "1")?;
    let iptables = |args: &[&str]| {
        run(Command::new("iptables")
            .args(["-w", "-t", "mangle"])
            .args(args))
    };
    iptables(&["-N", GUARD_CHAIN])?;
    iptables(&[
        "-A",
        GUARD_CHAIN,
        "-i",
        BRIDGE,
        "-o",
        BRIDGE,
        "-j",
        "RETURN",
    ])?;
    iptables(&[
        "-A",
        GUARD_CHAIN,
        "-m",
        "comment",
        "--comment",
        "the test node forwards only from its bridge to its bridge",
        "-j",
        "DROP",
    ])?;
    iptables(&["-I", "FORWARD", "1", "-j", GUARD_CHAIN])?;
    Ok(())
}

/// Undoes what a node changed on the machine, from the record [`prepare_machine`] saved (after
/// its processes are stopped). Returns what it did; nothing when there is no record.
pub(crate) fn restore_machine(paths: &NodePaths, binaries: &Binaries) -> Result<Vec<String>> {
    let Some(record) = Record::load(&paths.record)? else {
        return Ok(Vec::new());
    };
    let done = machine::restore(
        &record,
        &NodeFootprint {
            state_dir: &paths.state_dir,
            shim: &binaries.program("containerd-shim-runc-v2"),
        },
    )?;
    fs::remove_file(&paths.record).context(|| format!("removing {}", paths.record.display()))?;
    Ok(done)
}

/// Stops and removes every pod sandbox, with their containers and networks, while containerd
/// still runs (and the kubelet no longer does), so that no shim outlives containerd.
pub(crate) fn remove_pods(paths: &NodePaths, binaries: &Binaries) -> Result<()> {
    if !paths.containerd_socket.exists() {
        return Ok(());
    }
    run(crictl(paths, binaries).args(["rmp", "--all", "--force"]))?;
    Ok(())
}

/// `crictl` pointed at the node's containerd.
pub(crate) fn crictl(paths: &NodePaths, binaries: &Binaries) -> Command {
    let mut command = Command::new(binaries.program("crictl"));
    command
        .arg("--runtime-endpoint")
        .arg(format!("unix://{}", paths.containerd_socket.display()))
        .arg("--image-endpoint")
        .arg(format!("unix://{}", paths.containerd_socket.display()))
        .arg("--timeout=60s");
    command
}

/// `ctr` pointed at the node's containerd, in the namespace the kubelet's images live in.
pub(crate) fn ctr(paths: &NodePaths, binaries: &Binaries) -> Command {
    let mut command = Command::new(binaries.program("ctr"));
    command
        .arg("--address")
        .arg(&paths.containerd_socket)
        .args(["--namespace", "k8s.io"]);
    command
}

/// Loads a `docker save` or OCI archive into the node's containerd.
pub(crate) fn import_image(paths: &NodePaths, binaries: &Binaries, archive: &Path) -> Result<()> {
    run(ctr(paths, binaries)
        .args(["images", "import", "--platform", "linux/amd64"])
        .arg(archive))
    .map(drop)
    .map_err(|err| {
        crate::error::Error::new(format!(
            "importing {} into the node: {err}",
            archive.display()
        ))
    })
}

/// The pod sandbox image, from the pause program of `binaries`.
pub(crate) fn write_pause_image(paths: &NodePaths, binaries: &Binaries) -> Result<PathBuf> {
    fs::create_dir_all(&paths.images).context(|| format!("creating {}", paths.images.display()))?;
    let archive = paths.images.join("pause.tar");
    let mut image = Image::new(PAUSE_IMAGE);
    image
        .add_file("/pause", &binaries.program("outrigger-pause"))?
        .set_entrypoint(&["/pause"])
        .set_user("65535:65535");
    image.write_docker_archive(&archive)?;
    Ok(archive)
}

/// Waits until containerd answers on its socket.
pub(crate) fn containerd_answers(paths: &NodePaths, binaries: &Binaries) -> bool {
    paths.containerd_socket.exists()
        && ctr(paths, binaries)
            .arg("version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
}

/// Every configuration file of the node's components.
pub(crate) fn write_configs(
    paths: &NodePaths,
    binaries: &Binaries,
    certs: &Certificates,
    admin_kubeconfig: &Path,
    coredns_ready_port: u16,
) -> Result<()> {
    for dir in [
        &paths.containerd_root,
        &paths.containerd_state,
        &paths.runc_root,
        &paths.cni_config_dir,
        &paths.cni_ipam_dir,
        &paths.kubelet_root,
        &paths.pod_logs,
    ] {
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    }
    let path_string = |path: &Path| json_string(&path.to_string_lossy());
    let runc = find_on_path("runc").context(|| {
        "runc is not installed: the node runs containers with Debian's runc \
         (apt-get install --no-install-recommends runc; cargo xtask ci installs it)"
            .to_string()
    })?;

    write(
        &paths.containerd_config,
        &format!(
            r#"# Written by outrigger-cluster for the test node.
version = 4
root = {root}
state = {state}
# Nothing from /etc/containerd/conf.d: this node is configured here only.
imports = []
# The /opt plugin would create /opt/containerd; NRI would listen on /var/run/nri.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri"]

[plugins.'io.containerd.server.v1.grpc']
  address = {socket}

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = {pause}

[plugins.'io.containerd.cri.v1.runtime']
  # This machine's bounding set lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = {runc}
        Root = {runc_root}
        # There is no systemd: cgroupfs, as the kubelet.
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [{cni_bin}]
    conf_dir = {cni_conf}

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
"#,
            root = path_string(&paths.containerd_root),
            state = path_string(&paths.containerd_state),
            socket = path_string(&paths.containerd_socket),
            pause = json_string(PAUSE_IMAGE),
            runc = path_string(&runc),
            runc_root = path_string(&paths.runc_root),
            cni_bin = path_string(&binaries.cni_dir()),
            cni_conf = path_string(&paths.cni_config_dir),
        ),
    )?;

    write(
        &paths.cni_config_dir.join("10-outrigger.conflist"),
        &format!(
            r#"{{
  "cniVersion": "1.0.0",
  "name": "outrigger-node",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{POD_SUBNET}", "gateway": "{NODE_IP}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}],
        "dataDir": {ipam}
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#,
            ipam = path_string(&paths.cni_ipam_dir),
        ),
    )?;

    // Nothing outside the cluster resolves: pods get CoreDNS, CoreDNS forwards nowhere.
    write(
        &paths.resolv_conf,
        "# Written by outrigger-cluster: the test node resolves nothing outside the cluster.\n\
         nameserver 127.0.0.1\n",
    )?;

    write(
        &paths.kubelet_config,
        &format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
# There is no systemd, and this machine has cgroup v1 controllers.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: {runtime}
clusterDomain: cluster.local
clusterDNS: [{NODE_IP}]
resolvConf: {resolv}
podLogsDir: {pod_logs}
# Images are imported, never pulled: nothing may collect them, nor evict pods for a full disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}}
serializeImagePulls: false
rotateCertificates: false
oomScoreAdj: 0
shutdownGracePeriod: 0s
"#,
            ca = path_string(&certs.ca_cert),
            runtime = json_string(&format!("unix://{}", paths.containerd_socket.display())),
            resolv = path_string(&paths.resolv_conf),
            pod_logs = path_string(&paths.pod_logs),
        ),
    )?;

    write(
        &paths.kube_proxy_config,
        &format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig}}}
hostnameOverride: {NODE_NAME}
mode: iptables
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [{NODE_IP}/32]
clusterCIDR: {POD_SUBNET}
oomScoreAdj: 0
iptables:
  # Otherwise it sets route_localnet.
  localhostNodePorts: false
  syncPeriod: 30s
  minSyncPeriod: 0s
# Zeros leave the machine's conntrack settings as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
            kubeconfig = path_string(&paths.kubeconfig_of(KUBE_PROXY)),
        ),
    )?;

    write(
        &paths.corefile,
        &format!(
            r#"# Written by outrigger-cluster: cluster.local and reverse lookups, nothing else.
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{coredns_ready_port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        ttl 5
    }}
}}
"#,
            kubeconfig = path_string(admin_kubeconfig),
        ),
    )
}

/// Arguments of each of the node's components, by name.
pub(crate) fn args_of(component: &str, paths: &NodePaths) -> Vec<std::ffi::OsString> {
    let flag = |name: &str, value: &dyn AsRef<std::ffi::OsStr>| {
        let mut flag = std::ffi::OsString::from(format!("--{name}="));
        flag.push(value.as_ref());
        flag
    };
    match component {
        CONTAINERD => vec![flag("config", &paths.containerd_config)],
        KUBELET => vec![
            flag("config", &paths.kubelet_config),
            flag("kubeconfig", &paths.kubeconfig_of(KUBELET)),
            flag("root-dir", &paths.kubelet_root),
            flag("cert-dir", &paths.kubelet_root.join("pki")),
            flag("hostname-override", &NODE_NAME),
            flag("node-ip", &NODE_IP),
        ],
        KUBE_PROXY => vec![flag("config", &paths.kube_proxy_config)],
        SCHEDULER => vec![
            flag("kubeconfig", &paths.kubeconfig_of(SCHEDULER)),
            flag("leader-elect", &"false"),
            // No HTTPS endpoint: nothing scrapes it.
            flag("secure-port", &"0"),
        ],
        COREDNS => vec!["-conf".into(), paths.corefile.clone().into_os_string()],
        other => unreachable!("{other} is not one of the node's components"),
    }
}

/// `GET http://127.0.0.1:<port>/ready` answers 200 (CoreDNS's `ready` plugin).
pub(crate) fn http_ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, text).context(|| format!("writing {}", path.display()))
}
