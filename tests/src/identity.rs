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

/// The flags that make a proxy trust the controller: its identity (the default ServiceAccount of
/// a controller, in `namespace`, where the test runs it) and the trust anchors of the authority
/// `write_authority` wrote in `dir`.
pub fn control_plane_trust(dir: &Path, namespace: &str) -> [String; 4] {
    let anchors = std::fs::read_to_string(dir.join("ca.crt")).expect("the trust anchors");
    [
        "--control-plane-identity".into(),
        format!("spiffe://cluster.local/ns/{namespace}/sa/outrigger-controller"),
        "--trust-anchors".into(),
        anchors,
    ]
}
