//! The cluster's certificates and keys, made with the `openssl` command (RSA 2048).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Context, Result, bail};

/// Paths of everything the API server, the controller manager and the admin kubeconfig need (and,
/// for a node, its components' client certificates).
#[derive(Debug, Clone)]
pub struct Certificates {
    /// The CA that signed the serving and client certificates; clients trust it.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// The API server's serving certificate (127.0.0.1, localhost, kubernetes.default.svc, ...).
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    /// A client certificate in group `system:masters`: full access, whatever RBAC says.
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// The key pair that signs and verifies ServiceAccount tokens.
    pub service_account_key: PathBuf,
    pub service_account_public_key: PathBuf,
    /// Client certificates of the node's components, each with the identity Kubernetes' default
    /// RBAC (and the Node authorizer) expects of it; none for an API server alone.
    pub components: Vec<ClientCertificate>,
}

/// A client certificate and its key, for one component's kubeconfig.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// The component (`kubelet`, `kube-proxy`, ...).
    pub component: &'static str,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Names the API server's certificate is valid for: loopback, and the in-cluster names of the
/// `kubernetes` Service (10.0.0.1 is the first address of `--service-cluster-ip-range`).
const APISERVER_NAMES: &str = "IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,\
     DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local";

const CLIENT_EXTENSIONS: &str = "basicConstraints = critical,CA:FALSE\n\
     keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = clientAuth";

impl Certificates {
    /// Generates a fresh set for an API server alone in `dir`. The key pairs are generated in
    /// parallel, since RSA key generation dominates.
    pub fn generate(dir: &Path) -> Result<Certificates> {
        Certificates::generate_with(dir, None, &[])
    }

    /// Generates a fresh set for a node whose API server also listens on `node_ip`, with client
    /// certificates for `components`: `(component, subject)`, e.g.
    /// `("kubelet", "O = system:nodes\nCN = system:node:<name>")`.
    pub(crate) fn generate_for_node(
        dir: &Path,
        node_ip: &str,
        components: &[(&'static str, &str)],
    ) -> Result<Certificates> {
        Certificates::generate_with(dir, Some(node_ip), components)
    }

    fn generate_with(
        dir: &Path,
        node_ip: Option<&str>,
        components: &[(&'static str, &str)],
    ) -> Result<Certificates> {
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
        let certs = Certificates {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            service_account_key: dir.join("service-account.key"),
            service_account_public_key: dir.join("service-account.pub"),
            components: components
                .iter()
                .map(|(component, _)| ClientCertificate {
                    component,
                    cert: dir.join(format!("{component}.crt")),
                    key: dir.join(format!("{component}.key")),
                })
                .collect(),
        };

        let ca_config = write_config(
            dir,
            "ca",
            "CN = outrigger-test-ca",
            "basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign,digitalSignature",
        )?;
        let apiserver_names = match node_ip {
            Some(ip) => format!("{APISERVER_NAMES},IP:{ip}"),
            None => APISERVER_NAMES.to_string(),
        };
        let apiserver_config = write_config(
            dir,
            "apiserver",
            "CN = kube-apiserver",
            &format!(
                "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage = serverAuth\nsubjectAltName = {apiserver_names}"
            ),
        )?;
        // Signed by the CA: (name, certificate, key, config).
        let mut signed = vec![
            (
                "apiserver",
                &certs.apiserver_cert,
                &certs.apiserver_key,
                apiserver_config,
            ),
            (
                "admin",
                &certs.admin_cert,
                &certs.admin_key,
                write_config(
                    dir,
                    "admin",
                    "O = system:masters\nCN = outrigger-admin",
                    CLIENT_EXTENSIONS,
                )?,
            ),
        ];
        for (client, (component, subject)) in certs.components.iter().zip(components) {
            signed.push((
                component,
                &client.cert,
                &client.key,
                write_config(dir, component, subject, CLIENT_EXTENSIONS)?,
            ));
        }

        let mut key_generation = vec![
            openssl(
                "req -x509 -new -newkey rsa:2048 -nodes -days 3650 -extensions ext",
                &[
                    ("-keyout", &certs.ca_key),
                    ("-out", &certs.ca_cert),
                    ("-config", &ca_config),
                ],
            )?,
            openssl(
                "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048",
                &[("-out", &certs.service_account_key)],
            )?,
        ];
        let csrs: Vec<PathBuf> = signed
            .iter()
            .map(|(name, ..)| dir.join(format!("{name}.csr")))
            .collect();
        for ((_, _, key, config), csr) in signed.iter().zip(&csrs) {
            key_generation.push(openssl(
                "req -new -newkey rsa:2048 -nodes",
                &[("-keyout", key), ("-out", csr), ("-config", config)],
            )?);
        }
        for step in key_generation {
            step.wait()?;
        }

        let mut signing = vec![openssl(
            "pkey -pubout",
            &[
                ("-in", &certs.service_account_key),
                ("-out", &certs.service_account_public_key),
            ],
        )?];
        for (serial, ((_, cert, _, config), csr)) in signed.iter().zip(&csrs).enumerate() {
            signing.push(sign(&certs, csr, config, cert, serial as u32 + 1)?);
        }
        for step in signing {
            step.wait()?;
        }
        Ok(certs)
    }
}

/// An OpenSSL config with the subject and the `ext` section of extensions for one certificate.
fn write_config(dir: &Path, name: &str, subject: &str, extensions: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.cnf"));
    let text = format!(
        "[req]\nprompt = no\ndistinguished_name = subject\nreq_extensions = ext\n\n\
         [subject]\n{subject}\n\n[ext]\n{extensions}\n"
    );
    fs::write(&path, text).context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn sign(
    certs: &Certificates,
    csr: &Path,
    config: &Path,
    out: &Path,
    serial: u32,
) -> Result<RunningOpenssl> {
    openssl(
        &format!("x509 -req -days 3650 -extensions ext -set_serial {serial}"),
        &[
            ("-in", csr),
            ("-CA", &certs.ca_cert),
            ("-CAkey", &certs.ca_key),
            ("-extfile", config),
            ("-out", out),
        ],
    )
}

struct RunningOpenssl {
    child: Child,
    description: String,
}

/// Starts `openssl <options...>` followed by `<flag> <path>` pairs.
fn openssl(options: &str, files: &[(&str, &Path)]) -> Result<RunningOpenssl> {
    let mut command = Command::new("openssl");
    command.args(options.split_whitespace());
    for (flag, path) in files {
        command.arg(flag).arg(path);
    }
    let description = format!(
        "openssl {options} {}",
        files
            .iter()
            .map(|(flag, path)| format!("{flag} {}", path.display()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(|| {
            format!(
                "running {description} (is openssl installed? the test cluster makes its certificates with it)"
            )
        })?;
    Ok(RunningOpenssl { child, description })
}

impl RunningOpenssl {
    fn wait(self) -> Result<()> {
        let output = self
            .child
            .wait_with_output()
            .context(|| format!("waiting for {}", self.description))?;
        if !output.status.success() {
            bail!(
                "{} failed ({}): {}",
                self.description,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_ca_signed_serving_cert_and_a_system_masters_client_cert() {
        let dir = std::env::temp_dir().join(format!("outrigger-certs-test-{}", std::process::id()));
        let certs = Certificates::generate(&dir).unwrap();
        let text = |cert: &Path| {
            let output = Command::new("openssl")
                .args(["x509", "-noout", "-text", "-in"])
                .arg(cert)
                .output()
                .unwrap();
            assert!(output.status.success());
            String::from_utf8(output.stdout).unwrap()
        };
        let serving = text(&certs.apiserver_cert);
        assert!(serving.contains("IP Address:127.0.0.1"), "{serving}");
        assert!(serving.contains("DNS:kubernetes.default.svc"), "{serving}");
        assert!(
            serving.contains("TLS Web Server Authentication"),
            "{serving}"
        );
        let admin = text(&certs.admin_cert);
        assert!(admin.contains("O = system:masters"), "{admin}");
        assert!(admin.contains("TLS Web Client Authentication"), "{admin}");
        for cert in [&certs.apiserver_cert, &certs.admin_cert] {
            let verify = Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(&certs.ca_cert)
                .arg(cert)
                .output()
                .unwrap();
            assert!(
                verify.status.success(),
                "{}",
                String::from_utf8_lossy(&verify.stderr)
            );
        }
        assert!(
            fs::read_to_string(&certs.service_account_public_key)
                .unwrap()
                .contains("BEGIN PUBLIC KEY")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
