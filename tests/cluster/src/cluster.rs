//! Starting, using and stopping one test cluster: etcd + kube-apiserver (+ kube-controller-manager),
//! or all of that and the node (see `node`).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::binaries::{Binaries, cache_dir, format_duration};
use crate::certs::Certificates;
use crate::error::{Context, Error, Result, bail};
use crate::node::{self, NodeLock, NodePaths};
use crate::process::{self, Lifetime, Process};
use crate::{json_string, progress};

/// How long the API server may take to answer `/readyz` after it starts (4 s is usual; a loaded
/// 2-core CI machine is much slower).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long each process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Start attempts with fresh ports, when another process took a port between our choosing it and
/// the component binding it.
const START_ATTEMPTS: u32 = 3;
const ADDRESS_IN_USE: &str = "address already in use";

/// The ServiceAccount token issuer and audience, the in-cluster API address as a real cluster has.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How long the node may take to be Ready, and CoreDNS to serve, after they start.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Configures a [`Cluster`] before starting it.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    state_dir: Option<PathBuf>,
    controller_manager: bool,
    lifetime: Lifetime,
    node: bool,
    /// The caller holds the node's lock itself.
    caller_holds_node_lock: bool,
    images: Vec<PathBuf>,
}

/// A running etcd + kube-apiserver (+ kube-controller-manager) on 127.0.0.1, or a whole
/// single-node cluster on the node's bridge.
///
/// Dropping it stops every process it started and, unless the thread is panicking (when its logs
/// are worth keeping), removes its state directory; [`Cluster::stop`] does the same and reports.
pub struct Cluster {
    state_dir: PathBuf,
    /// Whether the state directory is ours to delete (a throwaway one made for this cluster).
    owns_state_dir: bool,
    binaries: Binaries,
    certificates: Certificates,
    kubeconfig: PathBuf,
    server_url: String,
    etcd_port: u16,
    apiserver_address: SocketAddr,
    lifetime: Lifetime,
    /// Set for a cluster with a node.
    node: Option<NodeState>,
    /// In start order; stopped in reverse.
    processes: Vec<Process>,
    startup_time: Duration,
    /// Set once the processes have been stopped or deliberately left running.
    released: bool,
}

/// What a cluster with a node has besides the API server's.
struct NodeState {
    paths: NodePaths,
    /// Archives imported into containerd when the node starts.
    images: Vec<PathBuf>,
    /// Held while this cluster runs the node, unless its starter holds it.
    _lock: Option<NodeLock>,
}

/// A process that [`Cluster::stop`] or [`stop_in`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppedProcess {
    pub name: String,
    pub pid: u32,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            state_dir: None,
            controller_manager: false,
            lifetime: Lifetime::TiedToThisProcess,
            node: false,
            caller_holds_node_lock: false,
            images: Vec::new(),
        }
    }
}

impl ClusterBuilder {
    /// Keeps certificates, etcd data, logs and the kubeconfig in `dir` (kept after the cluster
    /// stops) instead of a fresh directory under `<cache>/cluster/runs/` (removed when it stops).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Also runs kube-controller-manager: default ServiceAccounts (so Pods can be created),
    /// namespace deletion, garbage collection, EndpointSlices for Services, the root CA
    /// ConfigMap. Costs about 120 MiB and a second or two of start-up.
    pub fn controller_manager(mut self, enabled: bool) -> Self {
        self.controller_manager = enabled;
        self
    }

    /// Whether the processes end with this process (the default) or keep running.
    pub fn lifetime(mut self, lifetime: Lifetime) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Runs the node too: kube-controller-manager, kube-scheduler, the kubelet with containerd,
    /// the CNI bridge, kube-proxy and CoreDNS, so that pods run. Needs root; there is one node
    /// per machine, so this waits while another process uses it, fails while `cargo xtask
    /// cluster up` runs one, and first undoes what a crashed run left. Its state is in
    /// [`node_state_dir`](crate::node_state_dir).
    pub fn node(mut self, enabled: bool) -> Self {
        self.node = enabled;
        self
    }

    /// [`ClusterBuilder::node`], for a caller that holds the node's lock already: one that looks
    /// at the machine before the node starts and after it stops, with no other node in between.
    pub fn node_under(mut self, _held: &NodeLock) -> Self {
        self.node = true;
        self.caller_holds_node_lock = true;
        self
    }

    /// Image archives (`docker save` or OCI) to import into the node's containerd when it starts.
    pub fn images(mut self, archives: impl IntoIterator<Item = PathBuf>) -> Self {
        self.images.extend(archives);
        self
    }

    /// Builds the binaries if needed, then starts the cluster and waits until it is ready.
    pub fn start(self) -> Result<Cluster> {
        if self.node && self.state_dir.is_some() {
            bail!("a node's state is always in node_state_dir(); state_dir() does not apply");
        }
        let binaries = if self.node {
            Binaries::ensure_node_built()?
        } else {
            Binaries::ensure_built()?
        };
        let started = Instant::now();
        let node = if self.node {
            Some(take_node(
                &binaries,
                self.images.clone(),
                self.caller_holds_node_lock,
            )?)
        } else {
            None
        };
        let (state_dir, owns_state_dir) = match (&node, &self.state_dir) {
            (Some(node), _) => (node.paths.state_dir.clone(), false),
            (None, Some(dir)) => {
                prepare_named_state_dir(dir)?;
                (dir.clone(), false)
            }
            (None, None) => (new_run_dir()?, true),
        };
        let certificates_dir = state_dir.join("certs");
        let certificates = match node {
            Some(_) => Certificates::generate_for_node(
                &certificates_dir,
                node::NODE_IP,
                &node::COMPONENT_IDENTITIES,
            ),
            None => Certificates::generate(&certificates_dir),
        };
        let mut cluster = Cluster {
            kubeconfig: kubeconfig_in(&state_dir),
            state_dir: state_dir.clone(),
            owns_state_dir,
            binaries,
            certificates: certificates?,
            server_url: String::new(),
            etcd_port: 0,
            apiserver_address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            lifetime: self.lifetime,
            node,
            processes: Vec::new(),
            startup_time: Duration::ZERO,
            released: false,
        };
        let certificates_time = started.elapsed();

        let mut attempt = 1;
        loop {
            cluster.released = false;
            match cluster.start_processes(self.controller_manager || self.node) {
                Ok(phase_times) => {
                    cluster.startup_time = started.elapsed();
                    progress(&format!(
                        "cluster ready at {} in {} (certificates {}, {phase_times}); kubeconfig {}",
                        cluster.server_url,
                        format_duration(cluster.startup_time),
                        format_duration(certificates_time),
                        cluster.kubeconfig.display()
                    ));
                    return Ok(cluster);
                }
                // The node's ports are fixed: no other ports to try.
                Err(err)
                    if attempt < START_ATTEMPTS
                        && cluster.node.is_none()
                        && err.to_string().contains(ADDRESS_IN_USE) =>
                {
                    let first_line = err
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    progress(&format!(
                        "a port was taken meanwhile; retrying with others ({first_line})"
                    ));
                    // Stop what did start, but keep the state directory for the next attempt.
                    cluster.stop_processes();
                    cluster.released = true;
                    attempt += 1;
                }
                Err(err) => {
                    let shut_down = cluster.shut_down();
                    cluster.released = true;
                    let also = match shut_down {
                        Ok(_) => String::new(),
                        Err(shut_down_err) => format!("; then, shutting down: {shut_down_err}"),
                    };
                    return Err(Error::new(format!(
                        "starting the test cluster (state and logs in {}): {err}{also}",
                        state_dir.display()
                    )));
                }
            }
        }
    }
}

impl Cluster {
    /// Starts etcd and kube-apiserver with the defaults: a throwaway state directory, no
    /// controller manager, processes tied to this one.
    pub fn start() -> Result<Cluster> {
        ClusterBuilder::default().start()
    }

    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The admin kubeconfig (client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`, or `https://10.88.0.1:6443` for a cluster with a node.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// Whether this cluster has a node, so that its pods run.
    pub fn has_node(&self) -> bool {
        self.node.is_some()
    }

    /// The node's name, as `kubectl get nodes` shows it.
    pub fn node_name(&self) -> &'static str {
        node::NODE_NAME
    }

    /// Loads an image archive (`docker save` or OCI) into the node's containerd; pods use it with
    /// `imagePullPolicy: Never` or `IfNotPresent`.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let node = self.node_state("importing an image")?;
        node::import_image(&node.paths, &self.binaries, archive)
    }

    /// `crictl` pointed at the node's containerd, for looking at containers directly.
    pub fn crictl_command(&self) -> Result<Command> {
        let node = self.node_state("running crictl")?;
        Ok(node::crictl(&node.paths, &self.binaries))
    }

    fn node_state(&self, doing: &str) -> Result<&NodeState> {
        self.node.as_ref().context(|| {
            format!(
                "{doing}: this cluster has no node (start it with Cluster::builder().node(true))"
            )
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// The CA, serving, admin and ServiceAccount signing keys and certificates.
    pub fn certificates(&self) -> &Certificates {
        &self.certificates
    }

    /// From starting the processes (certificates included) to `/readyz` answering `ok`.
    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// Pids of the running processes, by component name (`etcd`, `kube-apiserver`, ...).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.processes
            .iter()
            .map(|process| (process.name, process.pid()))
            .collect()
    }

    /// `kubectl --kubeconfig <admin kubeconfig>`, to add arguments to.
    pub fn kubectl_command(&self) -> Command {
        let mut command = Command::new(self.binaries.kubectl());
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// Runs kubectl and returns its stdout; fails with the command and its stderr unless it
    /// succeeds.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let output = self.kubectl_with_input(args, "")?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs kubectl with `input` on stdin (e.g. `apply -f -`) and returns whatever happened, for
    /// tests that expect it to fail.
    pub fn kubectl_with_input(&self, args: &[&str], input: &str) -> Result<Output> {
        let mut child = self
            .kubectl_command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context(|| {
                format!(
                    "starting {} {}",
                    self.binaries.kubectl().display(),
                    args.join(" ")
                )
            })?;
        let mut stdin = child.stdin.take().expect("stdin was piped");
        // Written from a thread so that a large input cannot deadlock against unread output.
        let input = input.to_string();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let output = child
            .wait_with_output()
            .context(|| format!("waiting for kubectl {}", args.join(" ")))?;
        match writer.join() {
            Ok(Ok(())) => {}
            // kubectl may exit without reading its input, e.g. on a usage error.
            Ok(Err(err)) if err.kind() == io::ErrorKind::BrokenPipe => {}
            Ok(Err(err)) => {
                return Err(err).context(|| format!("writing to kubectl {}", args.join(" ")));
            }
            Err(_) => bail!("the thread writing to kubectl {} panicked", args.join(" ")),
        }
        Ok(output)
    }

    /// `helm` pointed at this cluster, with its cache, config and data inside the state
    /// directory so that it never touches the user's.
    pub fn helm_command(&self) -> Command {
        let mut command = Command::new(self.binaries.helm());
        for (name, value) in helm_environment(&self.state_dir, &self.kubeconfig) {
            command.env(name, value);
        }
        command
    }

    /// Stops kube-apiserver, leaving etcd and its data, for tests of what clients do while the
    /// API is away. [`Cluster::start_apiserver`] brings it back on the same address.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        let index = self
            .processes
            .iter()
            .position(|process| process.name == APISERVER)
            .context(|| "stopping kube-apiserver: it is not running".into())?;
        let mut apiserver = self.processes.remove(index);
        apiserver.stop(STOP_GRACE);
        self.write_pids()
    }

    /// Starts kube-apiserver again after [`Cluster::stop_apiserver`], with the same port and
    /// certificates, and waits until it is ready.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self
            .processes
            .iter()
            .any(|process| process.name == APISERVER)
        {
            bail!("starting kube-apiserver: it is already running");
        }
        let started = Instant::now();
        self.spawn(
            APISERVER,
            &self.binaries.kube_apiserver(),
            self.apiserver_args(),
        )?;
        self.wait_until_apiserver_ready()
            .map_err(|err| Error::new(format!("restarting kube-apiserver: {err}")))?;
        progress(&format!(
            "kube-apiserver ready again in {}",
            format_duration(started.elapsed())
        ));
        Ok(())
    }

    /// [`Cluster::stop_apiserver`] then [`Cluster::start_apiserver`].
    pub fn restart_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver()?;
        self.start_apiserver()
    }

    /// Stops every process and reports which, and for a node undoes what it changed on the
    /// machine; fails if a process is still alive afterwards or something could not be undone.
    pub fn stop(mut self) -> Result<Vec<StoppedProcess>> {
        let stopped = self.shut_down()?;
        self.released = true;
        let survivors: Vec<String> = stopped
            .iter()
            .filter(|process| process::is_alive(process.pid))
            .map(|process| format!("{} (pid {})", process.name, process.pid))
            .collect();
        if !survivors.is_empty() {
            bail!(
                "still running after being stopped: {}",
                survivors.join(", ")
            );
        }
        self.remove_state_dir_if_owned();
        Ok(stopped)
    }

    /// Stops every process; for a node, the kubelet first (so that it recreates nothing), then
    /// its pods while containerd still runs, then the rest, and then undoes what the node
    /// changed on the machine.
    fn shut_down(&mut self) -> Result<Vec<StoppedProcess>> {
        let Some(node) = &self.node else {
            return Ok(self.stop_processes());
        };
        let mut stopped = Vec::new();
        let mut problems = Vec::new();
        if let Some(index) = self
            .processes
            .iter()
            .position(|process| process.name == node::KUBELET)
        {
            let mut kubelet = self.processes.remove(index);
            kubelet.stop(STOP_GRACE);
            stopped.push(StoppedProcess {
                name: kubelet.name.to_string(),
                pid: kubelet.pid(),
            });
        }
        if node::containerd_answers(&node.paths, &self.binaries)
            && let Err(err) = node::remove_pods(&node.paths, &self.binaries)
        {
            problems.push(err.to_string());
        }
        let paths = node.paths.clone();
        stopped.extend(self.stop_processes());
        match node::restore_machine(&paths, &self.binaries) {
            Ok(done) if !done.is_empty() => {
                progress(&format!("node teardown: {}", done.join("; ")))
            }
            Ok(_) => {}
            Err(err) => problems.push(err.to_string()),
        }
        if !problems.is_empty() {
            bail!(
                "stopping the node (state in {}): {}",
                paths.state_dir.display(),
                problems.join("; ")
            );
        }
        Ok(stopped)
    }

    /// Leaves the processes running after this value is gone (for `cargo xtask cluster up`);
    /// [`stop_in`] stops them later from the pids recorded in the state directory.
    pub fn leave_running(mut self) {
        self.released = true;
    }

    /// Starts the processes and waits for each to be ready; returns how long each took.
    fn start_processes(&mut self, controller_manager: bool) -> Result<String> {
        let [
            etcd_port,
            etcd_peer_port,
            apiserver_port,
            coredns_ready_port,
        ] = free_loopback_ports()?;
        self.etcd_port = etcd_port;
        self.apiserver_address = match &self.node {
            Some(_) => SocketAddr::new(
                node::NODE_IP.parse().expect("the node IP is an address"),
                node::APISERVER_PORT,
            ),
            None => SocketAddr::from((Ipv4Addr::LOCALHOST, apiserver_port)),
        };
        self.server_url = format!("https://{}", self.apiserver_address);
        let certs = &self.certificates;
        write_kubeconfig(
            &self.kubeconfig,
            &self.server_url,
            &certs.ca_cert,
            &certs.admin_cert,
            &certs.admin_key,
        )?;
        let logs = self.state_dir.join("logs");
        // Fresh logs and data for each attempt, so that readiness is judged on this attempt's.
        for dir in [&logs, &self.state_dir.join("etcd-data")] {
            remove_dir_if_exists(dir)?;
        }
        fs::create_dir_all(&logs).context(|| format!("creating {}", logs.display()))?;
        if let Some(node) = &self.node {
            node::prepare_machine(&node.paths)?;
            for client in &certs.components {
                write_kubeconfig(
                    &node.paths.kubeconfig_of(client.component),
                    &self.server_url,
                    &certs.ca_cert,
                    &client.cert,
                    &client.key,
                )?;
            }
            node::write_configs(
                &node.paths,
                &self.binaries,
                certs,
                &self.kubeconfig,
                coredns_ready_port,
            )?;
        }

        let etcd_args: Vec<OsString> = vec![
            flag("data-dir", self.state_dir.join("etcd-data")),
            flag("listen-client-url", format!("http://127.0.0.1:{etcd_port}")),
            flag(
                "listen-peer-url",
                format!("http://127.0.0.1:{etcd_peer_port}"),
            ),
        ];
        let mut phase_started = Instant::now();
        let mut phases = Vec::new();
        let mut phase_done = |name: &str| {
            phases.push(format!(
                "{name} {}",
                format_duration(phase_started.elapsed())
            ));
            phase_started = Instant::now();
        };
        self.spawn(ETCD, &self.binaries.etcd(), etcd_args)?;
        if self.node.is_some() {
            self.spawn_node_component(node::CONTAINERD)?;
        }
        self.wait_until_etcd_ready()?;
        phase_done(ETCD);

        self.spawn(
            APISERVER,
            &self.binaries.kube_apiserver(),
            self.apiserver_args(),
        )?;
        if self.node.is_some() {
            self.import_node_images()?;
            phase_done("containerd and images");
        }
        self.wait_until_apiserver_ready()?;
        phase_done(APISERVER);

        if controller_manager {
            let args = self.controller_manager_args();
            self.spawn(
                CONTROLLER_MANAGER,
                &self.binaries.kube_controller_manager(),
                args,
            )?;
        }
        if self.node.is_some() {
            for component in [
                node::SCHEDULER,
                node::KUBELET,
                node::KUBE_PROXY,
                node::COREDNS,
            ] {
                self.spawn_node_component(component)?;
            }
        }
        if controller_manager {
            self.wait_until_controllers_work()?;
            phase_done(CONTROLLER_MANAGER);
        }
        if self.node.is_some() {
            self.wait_until_node_serves(coredns_ready_port)?;
            phase_done("node Ready and CoreDNS serving");
        }
        Ok(phases.join(", "))
    }

    /// Starts one of the node's components with its arguments; containerd with the directory of
    /// its shim on `PATH`, where it looks for it.
    fn spawn_node_component(&mut self, component: &'static str) -> Result<()> {
        let node = self.node_state("starting a node component")?;
        let args = node::args_of(component, &node.paths);
        let binary = self.binaries.program(component);
        let mut env = Vec::new();
        if component == node::CONTAINERD {
            let mut path = self.binaries.dir().as_os_str().to_os_string();
            if let Some(inherited) = std::env::var_os("PATH") {
                path.push(":");
                path.push(inherited);
            }
            env.push(("PATH", path));
        }
        self.spawn_with_env(component, &binary, args, env)
    }

    /// The pod sandbox image and the images asked for, once containerd answers.
    fn import_node_images(&mut self) -> Result<()> {
        let node = self.node_state("importing images")?;
        let paths = node.paths.clone();
        let mut archives = vec![node::write_pause_image(&paths, &self.binaries)?];
        archives.extend(node.images.iter().cloned());
        wait_until("containerd to answer", READY_TIMEOUT, || {
            self.check_all_running()?;
            Ok(node::containerd_answers(&paths, &self.binaries))
        })?;
        for archive in archives {
            node::import_image(&paths, &self.binaries, &archive)?;
        }
        Ok(())
    }

    /// The node is Ready (the kubelet registered it and its runtime and network work) and
    /// CoreDNS has synced with the API server.
    fn wait_until_node_serves(&mut self, coredns_ready_port: u16) -> Result<()> {
        let mut last_answer = String::new();
        let ready_condition = r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#;
        wait_until("the node to be Ready", NODE_READY_TIMEOUT, || {
            self.check_all_running()?;
            let output = self
                .kubectl_command()
                .args(["get", "node", node::NODE_NAME, "-o", ready_condition])
                .stdin(Stdio::null())
                .output()
                .context(|| "running kubectl get node".into())?;
            last_answer = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
            Ok(output.status.success() && last_answer == "True")
        })
        .map_err(|err| Error::new(format!("{err}; last answer: {last_answer}")))?;
        wait_until("CoreDNS to be ready", NODE_READY_TIMEOUT, || {
            self.check_all_running()?;
            Ok(node::http_ready(coredns_ready_port))
        })
    }

    fn apiserver_args(&self) -> Vec<OsString> {
        let certs = &self.certificates;
        let address = self.apiserver_address.ip().to_string();
        let mut args = vec![
            flag(
                "etcd-servers",
                format!("http://127.0.0.1:{}", self.etcd_port),
            ),
            flag("bind-address", &address),
            flag("advertise-address", &address),
            flag("secure-port", self.apiserver_address.port().to_string()),
            // Where it would write self-signed certificates: never the default /var/run/kubernetes.
            flag("cert-dir", self.state_dir.join("certs")),
            flag("tls-cert-file", &certs.apiserver_cert),
            flag("tls-private-key-file", &certs.apiserver_key),
            flag("client-ca-file", &certs.ca_cert),
            // Real authorization, so that tests of least-privilege RBAC mean something.
            flag(
                "authorization-mode",
                if self.node.is_some() {
                    "Node,RBAC"
                } else {
                    "RBAC"
                },
            ),
            // ServiceAccount tokens (`kubectl create token`, projected tokens) as in a real cluster.
            flag(
                "service-account-key-file",
                &certs.service_account_public_key,
            ),
            flag(
                "service-account-signing-key-file",
                &certs.service_account_key,
            ),
            flag("service-account-issuer", SERVICE_ACCOUNT_ISSUER),
            flag("api-audiences", SERVICE_ACCOUNT_ISSUER),
            flag("service-cluster-ip-range", node::SERVICE_SUBNET),
            flag("allow-privileged", "true"),
            flag("profiling", "false"),
        ];
        if self.node.is_some() {
            args.extend([
                // The node can change only itself and its pods.
                flag("enable-admission-plugins", "NodeRestriction"),
                // For logs, exec and port-forward: the kubelet authenticates the API server.
                flag("kubelet-client-certificate", &certs.admin_cert),
                flag("kubelet-client-key", &certs.admin_key),
                // The node's hostname resolves nowhere; its address is on the bridge.
                flag("kubelet-preferred-address-types", "InternalIP"),
            ]);
        } else {
            // Otherwise it publishes 127.0.0.1 as the `kubernetes` Endpoints and logs errors.
            args.push(flag("endpoint-reconciler-type", "none"));
        }
        args
    }

    fn controller_manager_args(&self) -> Vec<OsString> {
        let certs = &self.certificates;
        let mut args = vec![
            flag("leader-elect", "false"),
            flag(
                "service-account-private-key-file",
                &certs.service_account_key,
            ),
            flag("root-ca-file", &certs.ca_cert),
            // No HTTPS endpoint: nothing scrapes it, and a fixed port would clash between clusters.
            flag("secure-port", "0"),
            flag(
                "cert-dir",
                self.state_dir.join("certs").join("controller-manager"),
            ),
            flag("cluster-name", "outrigger-test"),
        ];
        match &self.node {
            // Its own identity, and each controller's ServiceAccount, as in a real cluster.
            Some(node) => args.extend([
                flag("kubeconfig", node.paths.kubeconfig_of(CONTROLLER_MANAGER)),
                flag("use-service-account-credentials", "true"),
            ]),
            None => args.push(flag("kubeconfig", &self.kubeconfig)),
        }
        args
    }

    fn spawn(&mut self, name: &'static str, binary: &Path, args: Vec<OsString>) -> Result<()> {
        self.spawn_with_env(name, binary, args, Vec::new())
    }

    fn spawn_with_env(
        &mut self,
        name: &'static str,
        binary: &Path,
        args: Vec<OsString>,
        env: Vec<(&'static str, OsString)>,
    ) -> Result<()> {
        let log_path = self.state_dir.join("logs").join(format!("{name}.log"));
        let process = Process::spawn(name, binary, args, env, &log_path, self.lifetime)?;
        self.processes.push(process);
        self.write_pids()
    }

    fn process(&mut self, name: &str) -> &mut Process {
        self.processes
            .iter_mut()
            .find(|process| process.name == name)
            .expect("the process was started")
    }

    fn wait_until_etcd_ready(&mut self) -> Result<()> {
        let log_path = self.process(ETCD).log_path.clone();
        wait_until("etcd to be ready", Duration::from_secs(60), || {
            self.process(ETCD).check_running()?;
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            Ok(log.contains("outrigger-etcd: ready"))
        })
    }

    fn wait_until_apiserver_ready(&mut self) -> Result<()> {
        let address = self.apiserver_address;
        // Until it listens, a cheap connect attempt is enough; kubectl costs a process each time.
        wait_until("kube-apiserver to listen", READY_TIMEOUT, || {
            self.check_all_running()?;
            Ok(TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok())
        })?;
        let mut last_answer = String::new();
        wait_until("kube-apiserver's /readyz", READY_TIMEOUT, || {
            self.check_all_running()?;
            let output = self
                .kubectl_command()
                .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
                .stdin(Stdio::null())
                .output()
                .context(|| {
                    format!(
                        "running {} get --raw /readyz",
                        self.binaries.kubectl().display()
                    )
                })?;
            last_answer = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
            Ok(output.status.success() && output.stdout.starts_with(b"ok"))
        })
        .map_err(|err| Error::new(format!("{err}; last answer: {last_answer}")))
    }

    /// The controller manager is working once it has created the `default` ServiceAccount, which
    /// Pods need before they can be created.
    fn wait_until_controllers_work(&mut self) -> Result<()> {
        wait_until(
            "kube-controller-manager to create the default ServiceAccount",
            READY_TIMEOUT,
            || {
                self.check_all_running()?;
                let output = self
                    .kubectl_command()
                    .args([
                        "get",
                        "serviceaccount",
                        "default",
                        "--namespace",
                        "default",
                        "-o",
                        "name",
                    ])
                    .stdin(Stdio::null())
                    .output()
                    .context(|| "running kubectl get serviceaccount default".into())?;
                Ok(output.status.success())
            },
        )
    }

    fn check_all_running(&mut self) -> Result<()> {
        self.processes
            .iter_mut()
            .try_for_each(Process::check_running)
    }

    fn stop_processes(&mut self) -> Vec<StoppedProcess> {
        let mut stopped = Vec::new();
        while let Some(mut process) = self.processes.pop() {
            process.stop(STOP_GRACE);
            stopped.push(StoppedProcess {
                name: process.name.to_string(),
                pid: process.pid(),
            });
        }
        let _ = fs::remove_file(self.state_dir.join(PIDS_FILE));
        stopped
    }

    fn remove_state_dir_if_owned(&self) {
        if self.owns_state_dir {
            let _ = fs::remove_dir_all(&self.state_dir);
        }
    }

    /// Records the running processes, for [`stop_in`] (`cargo xtask cluster down`) and for the
    /// clean-up of runs whose owner died.
    fn write_pids(&self) -> Result<()> {
        let mut text = String::new();
        for process in &self.processes {
            text.push_str(&format!(
                "{} {} {}\n",
                process.name,
                process.pid(),
                process.binary().display()
            ));
        }
        let path = self.state_dir.join(PIDS_FILE);
        fs::write(&path, text).context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(err) = self.shut_down() {
            progress(&err.to_string());
        }
        if std::thread::panicking() {
            progress(&format!(
                "stopped the test cluster; its state and logs are kept in {}",
                self.state_dir.display()
            ));
        } else {
            self.remove_state_dir_if_owned();
        }
    }
}

const ETCD: &str = "etcd";
const APISERVER: &str = "kube-apiserver";
const CONTROLLER_MANAGER: &str = "kube-controller-manager";
const PIDS_FILE: &str = "pids";
const OWNER_FILE: &str = "owner";

/// The state directory `cargo xtask cluster up` uses: `<cache>/cluster/dev`.
pub fn dev_state_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("cluster").join("dev"))
}

/// Takes this machine's node for a new cluster: waits for its lock, makes sure no detached node
/// (`cargo xtask cluster up`) runs, undoes what a crashed run left, and starts from an empty
/// state directory.
fn take_node(
    binaries: &Binaries,
    images: Vec<PathBuf>,
    caller_holds_lock: bool,
) -> Result<NodeState> {
    let lock = if caller_holds_lock {
        None
    } else {
        Some(NodeLock::acquire()?)
    };
    let paths = NodePaths::new(&node::node_state_dir()?);
    if is_running_in(&paths.state_dir)? {
        bail!(
            "the node is in use by a cluster `cargo xtask cluster up` started (state in {}); \
             `cargo xtask cluster down` stops it",
            paths.state_dir.display()
        );
    }
    let undone = clean_up_node(&paths, binaries)?;
    if !undone.is_empty() {
        progress(&format!(
            "undid what an earlier node left: {}",
            undone.join("; ")
        ));
    }
    remove_dir_if_exists(&paths.state_dir)?;
    fs::create_dir_all(&paths.state_dir)
        .context(|| format!("creating {}", paths.state_dir.display()))?;
    Ok(NodeState {
        paths,
        images,
        _lock: lock,
    })
}

/// Stops a node recorded in `paths` (the kubelet first, then its pods, then the rest) and undoes
/// what it changed on the machine; returns what was done. Safe when nothing is left.
fn clean_up_node(paths: &NodePaths, binaries: &Binaries) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if let Some(kubelet) = read_pids(&paths.state_dir)?
        .into_iter()
        .find(|recorded| recorded.name == node::KUBELET)
        && process::stop_recorded(kubelet.pid, &kubelet.binary, STOP_GRACE)?
    {
        done.push(format!("stopped kubelet {}", kubelet.pid));
    }
    if node::containerd_answers(paths, binaries) {
        node::remove_pods(paths, binaries)?;
        done.push("removed the pods".to_string());
    }
    for stopped in stop_in(&paths.state_dir)? {
        done.push(format!("stopped {} {}", stopped.name, stopped.pid));
    }
    done.extend(node::restore_machine(paths, binaries)?);
    Ok(done)
}

/// Stops this machine's node (one `cargo xtask cluster up` started, or what a crashed run left)
/// and undoes what it changed; returns what was done. Waits while a test uses the node.
pub fn stop_node() -> Result<Vec<String>> {
    stop_node_under(&NodeLock::acquire()?)
}

/// [`stop_node`] for a caller that already holds the node's lock.
pub fn stop_node_under(_held: &NodeLock) -> Result<Vec<String>> {
    let binaries = Binaries::locate()?;
    clean_up_node(&NodePaths::new(&node::node_state_dir()?), &binaries)
}

/// Whether a cluster recorded in `state_dir` still has a running process.
pub fn is_running_in(state_dir: &Path) -> Result<bool> {
    Ok(read_pids(state_dir)?
        .iter()
        .any(is_recorded_process_running))
}

/// Stops the processes recorded in `state_dir` (latest started first), checking that each pid
/// still runs the recorded binary so that a reused pid is never signalled. Returns those that were
/// running; safe to call when nothing is.
pub fn stop_in(state_dir: &Path) -> Result<Vec<StoppedProcess>> {
    let mut stopped = Vec::new();
    for recorded in read_pids(state_dir)?.iter().rev() {
        let was_running = process::stop_recorded(recorded.pid, &recorded.binary, STOP_GRACE)
            .context(|| format!("stopping {} (pid {})", recorded.name, recorded.pid))?;
        if was_running {
            stopped.push(StoppedProcess {
                name: recorded.name.clone(),
                pid: recorded.pid,
            });
        }
    }
    let pids_path = state_dir.join(PIDS_FILE);
    match fs::remove_file(&pids_path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(err).context(|| format!("removing {}", pids_path.display()))
        }
        _ => Ok(stopped),
    }
}

/// The admin kubeconfig of the cluster whose state is in `state_dir`.
pub fn kubeconfig_in(state_dir: &Path) -> PathBuf {
    state_dir.join("kubeconfig")
}

/// Environment for helm: this kubeconfig, and helm's own files inside the state directory so that
/// it never touches the user's.
pub fn helm_environment(state_dir: &Path, kubeconfig: &Path) -> Vec<(&'static str, PathBuf)> {
    let helm = state_dir.join("helm");
    vec![
        ("KUBECONFIG", kubeconfig.to_path_buf()),
        ("HELM_CACHE_HOME", helm.join("cache")),
        ("HELM_CONFIG_HOME", helm.join("config")),
        ("HELM_DATA_HOME", helm.join("data")),
    ]
}

struct RecordedProcess {
    name: String,
    pid: u32,
    binary: PathBuf,
}

fn read_pids(state_dir: &Path) -> Result<Vec<RecordedProcess>> {
    let path = state_dir.join(PIDS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut fields = line.splitn(3, ' ');
            let parsed = (|| {
                let name = fields.next()?.to_string();
                let pid = fields.next()?.parse().ok()?;
                let binary = PathBuf::from(fields.next()?);
                Some(RecordedProcess { name, pid, binary })
            })();
            parsed.context(|| format!("{}: malformed line {line:?}", path.display()))
        })
        .collect()
}

fn is_recorded_process_running(recorded: &RecordedProcess) -> bool {
    process::is_alive(recorded.pid)
        && process::program_of(recorded.pid).as_deref() == Some(recorded.binary.as_path())
}

/// A caller-chosen state directory may be reused, but not while a cluster runs in it.
fn prepare_named_state_dir(dir: &Path) -> Result<()> {
    if is_running_in(dir)? {
        bail!(
            "a cluster is already running with state in {}; stop it first (cargo xtask cluster down)",
            dir.display()
        );
    }
    stop_in(dir)?;
    fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    // Certificates are made anew: nothing from an earlier cluster should be trusted by this one.
    remove_dir_if_exists(&dir.join("certs"))
}

/// A fresh directory under `<cache>/cluster/runs/`, marked with its owner (this process) so that
/// a later run can clean up after a process that died without doing so.
fn new_run_dir() -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let runs = cache_dir()?.join("cluster").join("runs");
    fs::create_dir_all(&runs).context(|| format!("creating {}", runs.display()))?;
    clean_up_abandoned_runs(&runs);
    let pid = std::process::id();
    let start_time = process::start_time_of(pid).unwrap_or(0);
    loop {
        let dir = runs.join(format!(
            "{pid}-{start_time}-{}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                let owner = dir.join(OWNER_FILE);
                fs::write(&owner, format!("{pid} {start_time}\n"))
                    .context(|| format!("writing {}", owner.display()))?;
                return Ok(dir);
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err).context(|| format!("creating {}", dir.display())),
        }
    }
}

/// Removes run directories whose owning process is gone, stopping anything they still record
/// (the watchdogs normally have already). Best effort: another process may be doing the same.
fn clean_up_abandoned_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|text| {
                let mut fields = text.split_whitespace();
                Some((
                    fields.next()?.parse::<u32>().ok()?,
                    fields.next()?.parse::<u64>().ok()?,
                ))
            });
        let abandoned = match owner {
            Some((pid, start_time)) => {
                !process::is_alive(pid) || process::start_time_of(pid) != Some(start_time)
            }
            // Not yet marked: being created right now, unless it is old.
            None => entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60)),
        };
        if abandoned {
            if let Err(err) = stop_in(&dir) {
                progress(&format!(
                    "cleaning up abandoned run {}: {err}",
                    dir.display()
                ));
            }
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Distinct free ports on 127.0.0.1, found by binding port 0 (all at once, so they differ).
fn free_loopback_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .context(|| "binding 127.0.0.1:0 to find free ports".into())?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .context(|| "reading a listener's port".into())?
            .port();
    }
    Ok(ports)
}

/// Polls `ready` every 100 ms until it returns true, fails, or `timeout` passes.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready().map_err(|err| Error::new(format!("waiting for {what}: {err}")))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {} waiting for {what}",
                format_duration(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A kubeconfig for `server`: the CA, and a client certificate.
fn write_kubeconfig(path: &Path, server: &str, ca: &Path, cert: &Path, key: &Path) -> Result<()> {
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: outrigger-test\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n\
         - name: outrigger-admin\n  user:\n    client-certificate: {}\n    client-key: {}\n\
         contexts:\n\
         - name: outrigger-test\n  context:\n    cluster: outrigger-test\n    user: outrigger-admin\n\
         current-context: outrigger-test\n",
        json_string(server),
        json_string(&ca.to_string_lossy()),
        json_string(&cert.to_string_lossy()),
        json_string(&key.to_string_lossy()),
    );
    fs::write(path, text).context(|| format!("writing {}", path.display()))
}

fn flag(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut flag = OsString::from(format!("--{name}="));
    flag.push(value.as_ref());
    flag
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(err).context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_and_escaped() {
        assert_eq!(json_string("/a b/c"), "\"/a b/c\"");
        assert_eq!(json_string("q\"\\"), "\"q\\\"\\\\\"");
        assert_eq!(json_string("\n"), "\"\\u000a\"");
    }

    #[test]
    fn free_ports_are_distinct() {
        let [a, b, c] = free_loopback_ports().unwrap();
        assert!(a != b && b != c && a != c);
    }

    #[test]
    fn pids_files_round_trip_and_stopping_nothing_is_fine() {
        let dir = std::env::temp_dir().join(format!("outrigger-pids-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(stop_in(&dir).unwrap().is_empty());
        fs::write(
            dir.join(PIDS_FILE),
            "etcd 4000000 /no/such/outrigger-etcd\n",
        )
        .unwrap();
        let recorded = read_pids(&dir).unwrap();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].name, "etcd");
        assert!(!is_running_in(&dir).unwrap());
        assert!(stop_in(&dir).unwrap().is_empty());
        assert!(!dir.join(PIDS_FILE).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
