//! The proxy under test as a child process, and what `/proc` says about its cost.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use outrigger_tests::process::{ChildProcess, free_port};
use tokio::runtime::Handle;

pub struct Proxy {
    process: ChildProcess,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Proxy {
    /// Starts `bin` in front of `app`, its inbound listener on `inbound`, with `flags` (its
    /// namespace, workload and identity), and waits until its admin server reports ready.
    pub fn start(
        runtime: &Handle,
        bin: &Path,
        control_plane: &str,
        (app, inbound): (SocketAddr, SocketAddr),
        flags: &[String],
    ) -> Result<Self> {
        let [outbound, admin] = [free_port()?, free_port()?];
        let mut process = ChildProcess::spawn(
            "bench-proxy",
            Command::new(bin)
                .args(["--control-plane", control_plane])
                .args(["--outbound-addr", &outbound.to_string()])
                .args(["--inbound-addr", &inbound.to_string()])
                .args(["--app-addr", &app.to_string()])
                .args(["--admin-addr", &admin.to_string()])
                // The backends listen on loopback too.
                .arg("--allow-loopback-endpoints")
                .args(flags),
        )?;
        runtime.block_on(process.wait_ready(admin, "/ready", Duration::from_secs(60)))?;
        Ok(Self {
            process,
            outbound,
            admin,
        })
    }

    /// Fails, with the end of the proxy's log, if the proxy has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.process.check_running()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    pub fn memory(&self) -> Result<Memory> {
        memory(self.pid())
    }

    /// Asks the proxy to stop (SIGTERM) and fails if it does not within a few seconds.
    pub fn stop(self) -> Result<()> {
        self.process.terminate(Duration::from_secs(5))
    }
}

/// One GET on a fresh connection: status and body.
pub async fn get(addr: SocketAddr, path: &str, authority: &str) -> Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .body(Empty::<Bytes>::new())?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("no response within 5s")?
}

/// CPU time a process has used, user and system, all its threads.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = cpu_ticks(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&hz| hz > 0)
        .unwrap_or(100);
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces; count fields after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the whole line; field 3 (state) comes first here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory figures of a process, in bytes.
pub struct Memory {
    /// Now.
    pub rss: u64,
    /// The most it has held since it started.
    pub peak: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name| {
        status_kib(&status, name).with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        rss: field("VmRSS")? * 1024,
        peak: field("VmHWM")? * 1024,
    })
}

/// A `Name:   1234 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (outrigger (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    731 219 0 0 20 0 3 0 1234 5678 90 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(731 + 219));
        assert_eq!(cpu_ticks("4242 (cut) S 1"), None);
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\toutrigger-proxy\nVmHWM:\t   10240 kB\nVmRSS:\t    8192 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(8192));
        assert_eq!(status_kib(status, "VmHWM"), Some(10240));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }
}
