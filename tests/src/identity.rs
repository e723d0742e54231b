//! The controller's certificate authority as the identity Secret holds it, for suites that run
//! the controller with `--identity-dir`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outrigger_cluster::Cluster;

use crate::live::LiveProxy;

/// How long a certified proxy may take to be ready.
const READY_PATIENCE: Duration = Duration::from_secs(60);

/// A P-256 CA, anchor and issuer at once, as `openssl` writes it (the key in PKCS#8).
pub fn write_authority(dir: &Path) {
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=outrigger test anchor"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign"])
        .arg("-keyout")
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::copy(dir.join("tls.crt"), dir.join("ca.crt")).unwrap();
}

/// The flags of a proxy certified as `account` of `namespace`: its ServiceAccount `token` in a
/// file of `dir` (`name`d, as the kubelet would project it), and its trust in the controller,
/// whose identity is its default ServiceAccount in `default` (where the suites run it) and whose
/// anchors are those of the authority `write_authority` wrote in `dir/identity`, as they are now.
pub fn certified_proxy_flags(
    dir: &Path,
    namespace: &str,
    account: &str,
    (name, token): (&str, &str),
) -> Vec<String> {
    let file = dir.join(name);
    std::fs::write(&file, token).expect("writing the token");
    let anchors = std::fs::read_to_string(dir.join("identity/ca.crt")).expect("the trust anchors");
    [
        "--namespace",
        namespace,
        "--service-account",
        account,
        "--identity-token-file",
        file.to_str().expect("a UTF-8 path"),
        "--control-plane-identity",
        "spiffe://cluster.local/ns/default/sa/outrigger-controller",
        "--trust-anchors",
        &anchors,
    ]
    .map(String::from)
    .into()
}

/// A controller of the API server of `kubeconfig` that is the certificate authority: a new one,
/// `write_authority`'s, in `dir/identity`, where `certified_proxy_flags` finds its anchors.
pub async fn start_certifying_controller(
    kubeconfig: &Path,
    dir: &Path,
    flags: &[&str],
) -> crate::live::LiveController {
    let secret = dir.join("identity");
    std::fs::create_dir_all(&secret).expect("the identity directory");
    write_authority(&secret);
    let mut all = vec![
        "--kubeconfig",
        kubeconfig.to_str().expect("a UTF-8 path"),
        "--leader-namespace",
        "default",
        "--identity-dir",
        secret.to_str().expect("a UTF-8 path"),
    ];
    all.extend(flags);
    crate::live::start_controller_with(&all).await
}

/// The flags of a proxy for pod `workload` of `namespace`, certified as ServiceAccount `account`
/// with a token `cluster` issues for the audience `outrigger` (in a file of `dir`), trusting the
/// certifying controller whose authority is in `dir/identity`.
pub fn certified_pod_flags(
    cluster: &Cluster,
    dir: &Path,
    (namespace, account, workload): (&str, &str, &str),
) -> anyhow::Result<Vec<String>> {
    let token = cluster.kubectl(&[
        "create",
        "token",
        account,
        "-n",
        namespace,
        "--audience",
        "outrigger",
    ])?;
    let name = format!("token-{workload}");
    let mut flags = certified_proxy_flags(dir, namespace, account, (&name, &token));
    flags.extend(["--workload".to_string(), workload.to_string()]);
    Ok(flags)
}

/// A proxy for pod `workload` of `namespace` in front of `app`, certified as `certified_pod_flags`
/// says, calling the certifying controller at `control_plane`, with `flags`; once it is ready.
pub async fn start_certified_proxy(
    cluster: &Cluster,
    control_plane: &str,
    dir: &Path,
    pod: (&str, &str, &str),
    app: SocketAddr,
    flags: &[&str],
) -> LiveProxy {
    let (namespace, account, workload) = pod;
    let certified = certified_pod_flags(cluster, dir, pod)
        .unwrap_or_else(|error| panic!("a token for {namespace}/{account}: {error:#}"));
    let mut all: Vec<&str> = certified.iter().map(String::as_str).collect();
    all.extend(flags);
    let proxy = crate::live::start_proxy(control_plane, app, &all).await;
    crate::e2e::eventually_within(
        READY_PATIENCE,
        &format!("the {workload} proxy is ready"),
        || async {
            matches!(
                crate::dashboards::http_get(proxy.admin, "admin", "/ready").await,
                Ok((200, _))
            )
        },
    )
    .await;
    proxy
}

/// A Service `name` of `namespace` (port `http`, 9080) with one endpoint, `endpoint`, whose pod
/// `<name>-0` is meshed with the identity of ServiceAccount `identity`: what the controller reads
/// to tell a caller's proxy that endpoint's identity. For a proxy outside a cluster's node, whose
/// address the EndpointSlice names (not a loopback one: EndpointSlices refuse those).
pub fn meshed_service(namespace: &str, name: &str, endpoint: SocketAddr, identity: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{ports: [{{name: http, port: 9080}}]}}\n\
         ---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-0, namespace: {namespace}, \
         annotations: {{outrigger.dev/injected: \"true\", outrigger.dev/identity: {identity}}}}}\n\
         spec: {{serviceAccountName: {identity}, containers: [{{name: app, image: app}}]}}\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-0, namespace: {namespace}, \
         labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\n\
         endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}, \
         targetRef: {{kind: Pod, name: {name}-0, namespace: {namespace}}}}}]\n",
        ip = endpoint.ip(),
        port = endpoint.port(),
    )
}
