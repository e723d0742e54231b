//! The proxy under test as a child process, and what `/proc` says about its cost.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::runtime::Handle;

pub struct Proxy {
    child: Child,
    pub outbound: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    /// Starts `bin` as workload `bench-client` in namespace `default` and waits until its admin
    /// server reports ready.
    pub fn start(
        runtime: &Handle,
        bin: &Path,
        control_plane: &str,
        app: SocketAddr,
    ) -> Result<Self> {
        let [outbound, inbound, admin] = [free_port()?, free_port()?, free_port()?];
        let log =
            std::env::temp_dir().join(format!("outrigger-bench-proxy-{}.log", std::process::id()));
        let output = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .arg("--control-plane")
            .arg(control_plane)
            .args(["--namespace", "default", "--workload", "bench-client"])
            .arg("--outbound-addr")
            .arg(outbound.to_string())
            .arg("--inbound-addr")
            .arg(inbound.to_string())
            .arg("--app-addr")
            .arg(app.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            // One open file for both, so that their lines interleave instead of overwriting.
            .stdout(output.try_clone().context("sharing the proxy's log file")?)
            .stderr(output)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut proxy = Self {
            child,
            outbound,
            log,
        };
        proxy.wait_ready(runtime, admin)?;
        Ok(proxy)
    }

    fn wait_ready(&mut self, runtime: &Handle, admin: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            self.check_running()?;
            match runtime.block_on(get(admin, "/ready", "localhost")) {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(error) => last = format!("{error:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "the proxy was not ready within 30s (GET http://{admin}/ready: {last}){}",
            self.log_tail()
        )
    }

    /// Fails, with the end of the proxy's log, if the proxy has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait().context("checking on the proxy")? {
            None => Ok(()),
            Some(status) => bail!("the proxy exited: {status}{}", self.log_tail()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    pub fn memory(&self) -> Result<Memory> {
        memory(self.pid())
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("\nlast lines of {}:\n{tail}", self.log.display())
    }

    /// Asks the proxy to stop (SIGTERM) and waits a little for it; kills it if it lingers. The log
    /// goes once the proxy has stopped cleanly: it is only needed to explain failures.
    pub fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("proxy pid")?;
        // SAFETY: kill has no memory effects; the pid is our own unreaped child, so it names it.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                // Best effort: a leftover log in the temporary directory harms nothing.
                let _ = std::fs::remove_file(&self.log);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "the proxy did not stop within 5s of SIGTERM; killed it{}",
            self.log_tail()
        )
    }
}

impl Drop for Proxy {
    /// Never leaves a proxy behind, whichever way the bench ends.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port that was free a moment ago; the proxy binds it right after.
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
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
