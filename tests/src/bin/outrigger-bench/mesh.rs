//! The two-proxy path: the load generator calls a client proxy, which calls a server proxy over
//! mutual TLS, in front of the backend. Both proxies are certified by the real controller (the
//! release binary), which checks their ServiceAccount tokens with a real API server (the test
//! cluster's etcd and kube-apiserver on loopback) and tells the client proxy the server's
//! identity, as for meshed pods. Also the server proxy's mutual TLS handshakes per second, from
//! callers holding certificates of the same authority.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outrigger_api::identity::SpiffeId;
use outrigger_cluster::Cluster;
use outrigger_proxy::CertifiedIdentity;
use outrigger_tests::dashboards::series_sum;
use outrigger_tests::identity::{certified_pod_flags, meshed_service, write_authority};
use outrigger_tests::process::{ChildProcess, free_port, host_address};
use tokio::runtime::Handle;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, RootCertStore};

use crate::proxy::{self, Proxy};
use crate::report::Cost;

/// The Service the client proxy calls; its one endpoint is the server proxy.
pub const MESH_AUTHORITY: &str = "bench-mesh.default.svc.cluster.local:9080";
const NAMESPACE: &str = "default";
const CLIENT: &str = "bench-client";
const SERVER: &str = "bench-server";
/// The server name a caller of the mesh sends to the server proxy.
const SERVER_NAME: &str = "bench-server.default.serviceaccount.outrigger.internal";
const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds");
const PATIENCE: Duration = Duration::from_secs(60);

pub struct Mesh {
    pub client: Proxy,
    pub server: Proxy,
    /// The server proxy's inbound listener, on this machine's address.
    server_inbound: SocketAddr,
    controller: ChildProcess,
    // Fields drop in order: the processes stop before the cluster, the directory goes last.
    _cluster: Cluster,
    dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts the cluster, the controller and both proxies, and checks that the path answers
    /// over mutual TLS.
    pub fn start(
        runtime: &Handle,
        proxy_bin: &Path,
        controller_bin: &Path,
        backend: SocketAddr,
    ) -> Result<Self> {
        let cluster = Cluster::start().context("starting the test cluster's API server")?;
        for account in [CLIENT, SERVER] {
            cluster.kubectl(&["create", "serviceaccount", account, "-n", NAMESPACE])?;
        }
        cluster.kubectl(&["apply", "-f", CRDS])?;
        let dir = tempfile::tempdir().context("a directory for the authority")?;
        let authority = dir.path().join("identity");
        std::fs::create_dir_all(&authority)?;
        write_authority(&authority);

        let [grpc, admin] = [free_port()?, free_port()?];
        let mut controller = ChildProcess::spawn(
            "bench-controller",
            Command::new(controller_bin)
                .arg("--kubeconfig")
                .arg(cluster.kubeconfig())
                .arg("--identity-dir")
                .arg(&authority)
                .args(["--leader-namespace", NAMESPACE])
                .args(["--grpc-addr", &grpc.to_string()])
                .args(["--admin-addr", &admin.to_string()]),
        )?;
        runtime.block_on(controller.wait_ready(admin, "/ready", PATIENCE))?;
        let control_plane = format!("http://{grpc}");

        let certified = |account: &str| {
            certified_pod_flags(
                &cluster,
                dir.path(),
                (NAMESPACE, account, &format!("{account}-0")),
            )
        };
        let server_inbound = TcpListener::bind((host_address(), 0))
            .and_then(|listener| listener.local_addr())
            .context("a free port on this machine's address")?;
        let server = Proxy::start(
            runtime,
            proxy_bin,
            &control_plane,
            (backend, server_inbound),
            &certified(SERVER)?,
        )?;
        // The client proxy's own app is never called.
        let unused = SocketAddr::from(([127, 0, 0, 1], 1));
        let client = Proxy::start(
            runtime,
            proxy_bin,
            &control_plane,
            (unused, free_port()?),
            &certified(CLIENT)?,
        )?;
        let manifest = dir.path().join("bench-mesh.yaml");
        std::fs::write(
            &manifest,
            meshed_service(NAMESPACE, "bench-mesh", server_inbound, SERVER),
        )?;
        cluster.kubectl(&["apply", "-f", manifest.to_str().context("a UTF-8 path")?])?;

        let mesh = Self {
            client,
            server,
            server_inbound,
            controller,
            _cluster: cluster,
            dir,
        };
        mesh.check_mutual_tls(runtime)?;
        Ok(mesh)
    }

    /// Waits for the client proxy to answer `bench` through the server proxy, then checks that
    /// the server proxy took the call over mutual TLS from the client's identity.
    fn check_mutual_tls(&self, runtime: &Handle) -> Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let answer = runtime.block_on(proxy::get(self.client.outbound, "/", MESH_AUTHORITY));
            match answer {
                Ok((200, body)) if body == "bench" => break,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                other => bail!("the two-proxy path did not answer 200 \"bench\": {other:?}"),
            }
        }
        let metrics = runtime
            .block_on(proxy::get(self.server.admin, "/metrics", "admin"))?
            .1;
        let served = series_sum(
            &metrics,
            "outrigger_requests_total",
            &format!(r#"tls="true",client_id="{NAMESPACE}/{CLIENT}""#),
        );
        ensure!(
            served.is_some_and(|served| served >= 1.0),
            "the server proxy did not serve the client over mutual TLS:\n{metrics}"
        );
        Ok(())
    }

    /// Fails, with the end of its log, if a process of the path has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.client.check_running()?;
        self.server.check_running()?;
        self.controller.check_running()
    }

    /// New connections to the server proxy from `callers` callers at once for `duration`, each
    /// a full mutual TLS handshake as the client proxy's identity, then closed: how many the server
    /// proxy accepted (its own count), and what they cost it.
    pub fn handshakes(
        &mut self,
        runtime: &Handle,
        callers: usize,
        duration: Duration,
    ) -> Result<(u64, Cost)> {
        let identity = caller_identity(&self.dir.path().join("identity"))?;
        // Full handshakes only: a resumed session would skip the certificates and signatures.
        let mut config = (*identity.client).clone();
        config.resumption = rustls::client::Resumption::disabled();
        let connector = TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(SERVER_NAME)?;
        let admin = self.server.admin;
        let accepted = || -> Result<f64> {
            let metrics = runtime.block_on(proxy::get(admin, "/metrics", "admin"))?.1;
            series_sum(
                &metrics,
                "outrigger_inbound_connections_total",
                r#"tls="true",result="accepted""#,
            )
            .context("no outrigger_inbound_connections_total{tls=\"true\"} series")
        };
        self.check_running()?;
        let (accepted_before, cpu_before) = (accepted()?, self.server.cpu_time()?);
        let started = Instant::now();
        let until = tokio::time::Instant::now() + duration;
        let addr = self.server_inbound;
        let failures = runtime.block_on(async {
            let tasks: Vec<_> = (0..callers)
                .map(|_| {
                    let (connector, name) = (connector.clone(), name.clone());
                    tokio::spawn(async move {
                        let mut failures = 0u64;
                        while tokio::time::Instant::now() < until {
                            let opened = async {
                                let tcp = tokio::net::TcpStream::connect(addr).await?;
                                tcp.set_nodelay(true)?;
                                connector.connect(name.clone(), tcp).await
                            };
                            if opened.await.is_err() {
                                failures += 1;
                            }
                        }
                        failures
                    })
                })
                .collect();
            let mut failures = 0;
            for task in tasks {
                failures += task.await.unwrap_or(1);
            }
            failures
        });
        let wall = started.elapsed();
        // The last connections' handshakes finish on the server after the callers close them.
        std::thread::sleep(Duration::from_millis(200));
        let (accepted_after, cpu_after) = (accepted()?, self.server.cpu_time()?);
        self.check_running()?;
        ensure!(
            failures == 0,
            "{failures} handshakes with the server proxy failed"
        );
        let handshakes = (accepted_after - accepted_before) as u64;
        let cost = Cost {
            cpu: cpu_after.saturating_sub(cpu_before),
            wall,
            requests: handshakes,
            rss: self.server.memory()?.rss,
        };
        Ok((handshakes, cost))
    }
}

/// An identity as the client proxy's, certified by the authority in `dir` (as `write_authority`
/// wrote it) here rather than by the controller, so the handshake bench needs no token.
fn caller_identity(dir: &Path) -> Result<CertifiedIdentity> {
    let anchor_pem = std::fs::read_to_string(dir.join("ca.crt"))?;
    let issuer_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("tls.key"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(dir.join("tls.crt"))?,
        issuer_key,
    )?;
    let id = SpiffeId {
        trust_domain: outrigger_api::identity::DEFAULT_TRUST_DOMAIN.into(),
        namespace: NAMESPACE.into(),
        service_account: CLIENT.into(),
    };
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let key = rcgen::KeyPair::generate()?;
    let leaf = params.signed_by(&key, &issuer)?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        key.serialize_der().into(),
    ))?;
    let certified_key = CertifiedKey::new(vec![leaf.der().clone()], signing_key);
    let mut anchors = RootCertStore::empty();
    anchors.add(CertificateDer::from_pem_slice(anchor_pem.as_bytes())?)?;
    CertifiedIdentity::new(id, Arc::new(certified_key), Arc::new(anchors), u64::MAX)
}
