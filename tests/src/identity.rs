//! The controller's certificate authority as the identity Secret holds it, for suites that run
//! the controller with `--identity-dir`.

use std::path::Path;
use std::process::Command;

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
