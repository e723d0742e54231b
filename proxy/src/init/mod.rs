//! `outrigger-proxy init`: iptables rules that send a pod's TCP traffic through its proxy, so the
//! app needs no change. Outbound connections are REDIRECTed to the outbound listener, which reads
//! where they were going from SO_ORIGINAL_DST; inbound ones to the inbound listener. The proxy's
//! own connections (by uid) are left alone, or they would loop.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

const INBOUND_CHAIN: &str = "OUTRIGGER_INBOUND";
const OUTBOUND_CHAIN: &str = "OUTRIGGER_OUTBOUND";

#[derive(clap::Args, Clone, Debug)]
pub struct RedirectSettings {
    /// The uid the proxy runs as: its own traffic is not redirected.
    #[arg(long, env = "OUTRIGGER_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,
    #[arg(long, env = "OUTRIGGER_OUTBOUND_PORT", default_value_t = 4140)]
    pub outbound_port: u16,
    #[arg(long, env = "OUTRIGGER_INBOUND_PORT", default_value_t = 4143)]
    pub inbound_port: u16,
    /// Reached directly (probes, Prometheus), never through the proxy.
    #[arg(long, env = "OUTRIGGER_ADMIN_PORT", default_value_t = 4191)]
    pub admin_port: u16,
    /// Inbound ports that bypass the proxy (comma-separated).
    #[arg(long, env = "OUTRIGGER_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound ports that bypass the proxy (comma-separated).
    #[arg(long, env = "OUTRIGGER_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destinations (CIDRs, comma-separated) that bypass the proxy.
    #[arg(long, env = "OUTRIGGER_SKIP_OUTBOUND_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub skip_outbound_cidrs: Vec<String>,
    /// Print the rules instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_cidr(value: &str) -> Result<String, String> {
    let (ip, prefix) = value.split_once('/').unwrap_or((value, "32"));
    let ip: IpAddr = ip.parse().map_err(|_| format!("`{value}` is not a CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(prefix) if prefix <= max => Ok(format!("{ip}/{prefix}")),
        _ => Err(format!("`{value}` has an invalid prefix length")),
    }
}

/// The ruleset, in `iptables-restore` form. `hook` adds the jumps from the built-in chains; it is
/// left out when they are already there, so running init twice changes nothing.
pub fn rules(settings: &RedirectSettings, hook: bool) -> String {
    let mut lines = vec![
        "*nat".to_string(),
        // Declaring a chain creates it, or empties it when it exists.
        format!(":{INBOUND_CHAIN} - [0:0]"),
        format!(":{OUTBOUND_CHAIN} - [0:0]"),
    ];
    if hook {
        lines.push(format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"));
        lines.push(format!("-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}"));
    }
    let ports = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    // None of the proxy's own ports is redirected: through the inbound listener, the outbound
    // one would route anyone's request to any Service as this pod.
    let mut inbound_skip = vec![
        settings.inbound_port,
        settings.admin_port,
        settings.outbound_port,
    ];
    inbound_skip.extend(&settings.skip_inbound_ports);
    lines.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -m multiport --dports {} -j RETURN",
        ports(&inbound_skip)
    ));
    // Only connections to this pod: one routed through it to another address must not become
    // the proxy's connection there.
    lines.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports {}",
        settings.inbound_port
    ));
    lines.push(format!(
        "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN",
        settings.proxy_uid
    ));
    // The app talking to itself, or to the proxy's listeners directly.
    lines.push(format!(
        "-A {OUTBOUND_CHAIN} -o lo -d 127.0.0.1/32 -j RETURN"
    ));
    for cidr in &settings.skip_outbound_cidrs {
        lines.push(format!("-A {OUTBOUND_CHAIN} -d {cidr} -j RETURN"));
    }
    if !settings.skip_outbound_ports.is_empty() {
        lines.push(format!(
            "-A {OUTBOUND_CHAIN} -p tcp -m multiport --dports {} -j RETURN",
            ports(&settings.skip_outbound_ports)
        ));
    }
    lines.push(format!(
        "-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        settings.outbound_port
    ));
    lines.push("COMMIT".to_string());
    lines.join("\n") + "\n"
}

/// Installs the rules in the current network namespace.
pub fn install(settings: &RedirectSettings) -> anyhow::Result<()> {
    let current = Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .context("running iptables-save (is iptables installed?)")?;
    if !current.status.success() {
        bail!(
            "iptables-save failed: {}",
            String::from_utf8_lossy(&current.stderr).trim()
        );
    }
    let hooked = String::from_utf8_lossy(&current.stdout).contains(&format!("-j {INBOUND_CHAIN}"));
    let rules = rules(settings, !hooked);
    if settings.dry_run {
        print!("{rules}");
        return Ok(());
    }
    let mut restore = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    restore
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(rules.as_bytes())
        .context("writing the rules to iptables-restore")?;
    let output = restore
        .wait_with_output()
        .context("waiting for iptables-restore")?;
    if !output.status.success() {
        bail!(
            "iptables-restore refused the rules: {}\n{rules}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: RedirectSettings,
    }

    fn settings(args: &[&str]) -> RedirectSettings {
        Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied()))
            .unwrap()
            .settings
    }

    #[test]
    fn redirects_both_ways_and_skips_the_proxy_and_what_was_asked() {
        let rules = rules(
            &settings(&[
                "--proxy-uid=7",
                "--skip-inbound-ports=22",
                "--skip-outbound-ports=5432,6379",
                "--skip-outbound-cidrs=10.0.0.0/8,192.168.1.1",
            ]),
            true,
        );
        assert_eq!(
            rules,
            "*nat
:OUTRIGGER_INBOUND - [0:0]
:OUTRIGGER_OUTBOUND - [0:0]
-A PREROUTING -p tcp -j OUTRIGGER_INBOUND
-A OUTPUT -p tcp -j OUTRIGGER_OUTBOUND
-A OUTRIGGER_INBOUND -p tcp -m multiport --dports 4143,4191,4140,22 -j RETURN
-A OUTRIGGER_INBOUND -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 4143
-A OUTRIGGER_OUTBOUND -m owner --uid-owner 7 -j RETURN
-A OUTRIGGER_OUTBOUND -o lo -d 127.0.0.1/32 -j RETURN
-A OUTRIGGER_OUTBOUND -d 10.0.0.0/8 -j RETURN
-A OUTRIGGER_OUTBOUND -d 192.168.1.1/32 -j RETURN
-A OUTRIGGER_OUTBOUND -p tcp -m multiport --dports 5432,6379 -j RETURN
-A OUTRIGGER_OUTBOUND -p tcp -j REDIRECT --to-ports 4140
COMMIT
"
        );
        assert!(!super::rules(&settings(&[]), false).contains("PREROUTING"));
    }

    #[test]
    fn bad_cidrs_are_refused() {
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0/8"] {
            assert!(
                Cli::try_parse_from(["init", "--skip-outbound-cidrs", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
