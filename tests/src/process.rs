//! The project's binaries as child processes, for the demo and the benchmarks: output goes to a
//! log file (quoted when something fails), and a dropped process is stopped and reaped. Also the
//! machine's ports and address as tests use them.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

pub struct ChildProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildProcess {
    pub fn spawn(name: &str, command: &mut Command) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("outrigger-{name}-{}.log", std::process::id()));
        let output = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            // One open file for both, so their lines interleave instead of overwriting.
            .stdout(output.try_clone().context("sharing the log file")?)
            .stderr(output)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of the process's log, if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait().context("checking the child")? {
            None => Ok(()),
            Some(status) => bail!("{} exited ({status}):\n{}", self.name, self.log_tail()),
        }
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines the process wrote, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Asks the process to stop (SIGTERM, as Kubernetes does) and waits up to `grace` for it,
    /// then kills it. Fails when it had to be killed, or when it ended with an error.
    pub fn terminate(mut self, grace: Duration) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("a pid fits pid_t")?;
        // SAFETY: kill(2) with a pid this value owns and has not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().context("checking the child")? {
                if !status.success() {
                    bail!("{} ended with {status}:\n{}", self.name, self.log_tail());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} did not stop within {grace:?} of SIGTERM:\n{}",
            self.name,
            self.log_tail()
        )
    }

    /// Waits until `GET http://{addr}{path}` answers 200, or fails with the process's log.
    pub async fn wait_ready(
        &mut self,
        addr: SocketAddr,
        path: &str,
        deadline: Duration,
    ) -> Result<()> {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().context("checking the child")? {
                bail!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if http_get_status(addr, path).await == Some(200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} was not ready within {deadline:?}:\n{}",
            self.name,
            self.log_tail()
        )
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A loopback port nothing listens on (a moment ago).
pub fn free_port() -> Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .context("finding a free port")
}

/// The status of `GET http://{addr}{path}`, `None` when there is no answer.
pub async fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .ok()?;
    let response = send.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Some(status)
}

/// A binary built next to the running one (all land in the same target directory; test
/// executables one level down, in `deps`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("finding this executable")?;
    let mut dir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir.join(name);
    if !binary.is_file() {
        bail!("{} is not built (expected at {})", name, binary.display());
    }
    Ok(binary)
}

/// This machine's first IPv4 address outside the loopback and link-local ranges, for what an
/// EndpointSlice names (they refuse loopback addresses).
pub fn host_address() -> IpAddr {
    static ADDRESS: OnceLock<IpAddr> = OnceLock::new();
    *ADDRESS.get_or_init(|| {
        let mut interfaces: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills a list that freeifaddrs releases; it is only read in between.
        assert_eq!(
            unsafe { libc::getifaddrs(&mut interfaces) },
            0,
            "getifaddrs failed"
        );
        let mut found = None;
        let mut cursor = interfaces;
        // SAFETY (each dereference): the list's pointers are null or valid until freeifaddrs.
        while let Some(interface) = unsafe { cursor.as_ref() } {
            cursor = interface.ifa_next;
            let Some(address) = (unsafe { interface.ifa_addr.as_ref() }) else {
                continue;
            };
            if i32::from(address.sa_family) != libc::AF_INET {
                continue;
            }
            // SAFETY: an AF_INET address is a sockaddr_in.
            let address = unsafe { &*(interface.ifa_addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr));
            if !ip.is_loopback() && !ip.is_link_local() {
                found = Some(IpAddr::V4(ip));
                break;
            }
        }
        unsafe { libc::freeifaddrs(interfaces) };
        found.expect(
            "the cluster tests need an IPv4 address outside 127.0.0.0/8: \
             EndpointSlices refuse loopback ones",
        )
    })
}
