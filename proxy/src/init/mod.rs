//! `outrigger-proxy init`: iptables and ip6tables rules that send a pod's TCP traffic through its
//! proxy, so the app needs no change. Outbound connections are REDIRECTed to the outbound
//! listener, which reads where they were going from SO_ORIGINAL_DST; inbound ones to the inbound
//! listener. The proxy's own connections (by uid) are left alone, or they would loop.

use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

const INBOUND_CHAIN: &str = "OUTRIGGER_INBOUND";
const OUTBOUND_CHAIN: &str = "OUTRIGGER_OUTBOUND";
/// The most ports one `multiport` match takes.
const MULTIPORT_MAX: usize = 15;

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
    /// Outbound destinations (IPv4 and IPv6 CIDRs, comma-separated) that bypass the proxy.
    #[arg(long, env = "OUTRIGGER_SKIP_OUTBOUND_CIDRS", value_delimiter = ',', value_parser = Cidr::parse)]
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Print the rules a new pod gets, for both families, and run nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// An address block; a bare address is a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    ip: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(value: &str) -> Result<Self, String> {
        let (ip, prefix) = match value.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (value, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| format!("`{value}` is not a CIDR"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match prefix.map(str::parse::<u8>) {
            None => Ok(Self { ip, prefix: max }),
            Some(Ok(prefix)) if prefix <= max => Ok(Self { ip, prefix }),
            Some(_) => Err(format!("`{value}` has an invalid prefix length")),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// IPv4 and IPv6 have separate tables: a family without rules bypasses the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn tool(self, action: &str) -> String {
        match self {
            Self::V4 => format!("iptables-{action}"),
            Self::V6 => format!("ip6tables-{action}"),
        }
    }

    /// The whole loopback range: the app talking to itself, or to the proxy's listeners directly.
    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }

    fn holds(self, cidr: &Cidr) -> bool {
        cidr.ip.is_ipv4() == (self == Self::V4)
    }
}

/// One family's ruleset, in `iptables-restore` form. `hook` adds the jumps from the built-in
/// chains; it is left out when they are already there, so running init twice changes nothing.
pub fn rules(settings: &RedirectSettings, family: Family, hook: bool) -> String {
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
    // None of the proxy's own ports is redirected: reached through the inbound listener, the
    // outbound one would route anyone's request to any Service as this pod.
    let mut inbound_skip = vec![
        settings.inbound_port,
        settings.admin_port,
        settings.outbound_port,
    ];
    inbound_skip.extend(&settings.skip_inbound_ports);
    lines.extend(skip_ports(INBOUND_CHAIN, &inbound_skip));
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
    lines.push(format!(
        "-A {OUTBOUND_CHAIN} -o lo -d {} -j RETURN",
        family.loopback()
    ));
    for cidr in settings
        .skip_outbound_cidrs
        .iter()
        .filter(|c| family.holds(c))
    {
        lines.push(format!("-A {OUTBOUND_CHAIN} -d {cidr} -j RETURN"));
    }
    lines.extend(skip_ports(OUTBOUND_CHAIN, &settings.skip_outbound_ports));
    lines.push(format!(
        "-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        settings.outbound_port
    ));
    lines.push("COMMIT".to_string());
    lines.join("\n") + "\n"
}

/// RETURN rules for `ports`, as many as `multiport` needs.
fn skip_ports<'a>(chain: &'a str, ports: &'a [u16]) -> impl Iterator<Item = String> + 'a {
    ports.chunks(MULTIPORT_MAX).map(move |chunk| {
        let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
        format!(
            "-A {chain} -p tcp -m multiport --dports {} -j RETURN",
            list.join(",")
        )
    })
}

/// Both families' rules as a new pod gets them, each under the command that would load it.
pub fn dry_run(settings: &RedirectSettings) -> String {
    Family::BOTH
        .iter()
        .map(|family| {
            format!(
                "# {} --noflush\n{}",
                family.tool("restore"),
                rules(settings, *family, true)
            )
        })
        .collect()
}

/// Installs the rules of both families in the current network namespace; with `--dry-run`,
/// prints them instead and runs nothing (not even `iptables-save`).
pub fn install(settings: &RedirectSettings) -> anyhow::Result<()> {
    if settings.dry_run {
        print!("{}", dry_run(settings));
        return Ok(());
    }
    for family in Family::BOTH {
        // A kernel without IPv6 carries no IPv6 traffic to redirect.
        if family == Family::V6 && !std::path::Path::new("/proc/net/if_inet6").exists() {
            tracing::warn!("this kernel has no IPv6: installing IPv4 rules only");
            continue;
        }
        install_family(settings, family)?;
    }
    Ok(())
}

fn install_family(settings: &RedirectSettings, family: Family) -> anyhow::Result<()> {
    let (save, restore) = (family.tool("save"), family.tool("restore"));
    let current = Command::new(&save)
        .args(["-t", "nat"])
        .output()
        .with_context(|| format!("running {save} (is it installed?)"))?;
    if !current.status.success() {
        bail!(
            "{save} failed: {}",
            String::from_utf8_lossy(&current.stderr).trim()
        );
    }
    let hooked = String::from_utf8_lossy(&current.stdout).contains(&format!("-j {INBOUND_CHAIN}"));
    let rules = rules(settings, family, !hooked);
    let mut child = Command::new(&restore)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {restore}"))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(rules.as_bytes())
        .with_context(|| format!("writing the rules to {restore}"))?;
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {restore}"))?;
    if !output.status.success() {
        bail!(
            "{restore} refused the rules: {}\n{rules}",
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
        let settings = settings(&[
            "--proxy-uid=7",
            "--skip-inbound-ports=22",
            "--skip-outbound-ports=5432,6379",
            "--skip-outbound-cidrs=10.0.0.0/8,192.168.1.1,fd00::/8",
        ]);
        assert_eq!(
            rules(&settings, Family::V4, true),
            "*nat
:OUTRIGGER_INBOUND - [0:0]
:OUTRIGGER_OUTBOUND - [0:0]
-A PREROUTING -p tcp -j OUTRIGGER_INBOUND
-A OUTPUT -p tcp -j OUTRIGGER_OUTBOUND
-A OUTRIGGER_INBOUND -p tcp -m multiport --dports 4143,4191,4140,22 -j RETURN
-A OUTRIGGER_INBOUND -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 4143
-A OUTRIGGER_OUTBOUND -m owner --uid-owner 7 -j RETURN
-A OUTRIGGER_OUTBOUND -o lo -d 127.0.0.0/8 -j RETURN
-A OUTRIGGER_OUTBOUND -d 10.0.0.0/8 -j RETURN
-A OUTRIGGER_OUTBOUND -d 192.168.1.1/32 -j RETURN
-A OUTRIGGER_OUTBOUND -p tcp -m multiport --dports 5432,6379 -j RETURN
-A OUTRIGGER_OUTBOUND -p tcp -j REDIRECT --to-ports 4140
COMMIT
"
        );
        assert_eq!(
            rules(&settings, Family::V6, false),
            "*nat
:OUTRIGGER_INBOUND - [0:0]
:OUTRIGGER_OUTBOUND - [0:0]
-A OUTRIGGER_INBOUND -p tcp -m multiport --dports 4143,4191,4140,22 -j RETURN
-A OUTRIGGER_INBOUND -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 4143
-A OUTRIGGER_OUTBOUND -m owner --uid-owner 7 -j RETURN
-A OUTRIGGER_OUTBOUND -o lo -d ::1/128 -j RETURN
-A OUTRIGGER_OUTBOUND -d fd00::/8 -j RETURN
-A OUTRIGGER_OUTBOUND -p tcp -m multiport --dports 5432,6379 -j RETURN
-A OUTRIGGER_OUTBOUND -p tcp -j REDIRECT --to-ports 4140
COMMIT
"
        );
    }

    #[test]
    fn long_port_lists_take_one_multiport_match_per_fifteen() {
        let ports: Vec<String> = (1..=31).map(|p| p.to_string()).collect();
        let rules = rules(
            &settings(&[format!("--skip-outbound-ports={}", ports.join(",")).as_str()]),
            Family::V4,
            true,
        );
        let lists: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A OUTRIGGER_OUTBOUND -p tcp -m multiport"))
            .map(|l| l.split(' ').nth(7).unwrap())
            .collect();
        assert_eq!(
            lists,
            [
                ports[..15].join(","),
                ports[15..30].join(","),
                ports[30..].join(",")
            ]
        );
    }

    #[test]
    fn bad_cidrs_are_refused() {
        for bad in [
            "10.0.0.0/33",
            "nonsense",
            "10.0.0/8",
            "fd00::/129",
            "10.0.0.0/x",
        ] {
            assert!(
                Cli::try_parse_from(["init", "--skip-outbound-cidrs", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
