//! Starting and stopping the cluster's processes, and making sure none outlives its owner.
//!
//! A cluster is either tied to the process that started it (tests) or detached (`cargo xtask
//! cluster up`). A tied process gets a watchdog: a `sh` whose stdin is a pipe from us. However we
//! exit, even killed by SIGKILL before any destructor runs, the kernel closes that pipe, the
//! watchdog's `read` returns and it kills the process it guards.

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Result, bail};
use crate::tail_of_file;

/// Whether the cluster's processes end with the process that started them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Stopped when the starting process stops the cluster, drops it, or exits in any way.
    TiedToThisProcess,
    /// Left running, in a process group of their own, until `cargo xtask cluster down`.
    Detached,
}

/// One running component (etcd, kube-apiserver, ...), started by us.
pub(crate) struct Process {
    pub(crate) name: &'static str,
    binary: PathBuf,
    pub(crate) log_path: PathBuf,
    child: Child,
    watchdog: Option<Watchdog>,
}

struct Watchdog {
    child: Child,
    /// Held only so that it closes when we go away; never written to.
    _pipe: ChildStdin,
}

impl Process {
    /// Starts `binary args...`, with `env` added to its environment and stdout and stderr
    /// appended to `log_path`.
    pub(crate) fn spawn(
        name: &'static str,
        binary: &Path,
        args: Vec<OsString>,
        env: Vec<(&'static str, OsString)>,
        log_path: &Path,
        lifetime: Lifetime,
    ) -> Result<Process> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .context(|| format!("opening {name}'s log {}", log_path.display()))?;
        let log_for_stderr = log
            .try_clone()
            .context(|| format!("duplicating the handle of {}", log_path.display()))?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);
        if lifetime == Lifetime::Detached {
            // Out of the terminal's foreground group, so a later Ctrl-C there does not stop it.
            command.process_group(0);
        }
        let child = command
            .spawn()
            .context(|| format!("starting {name} ({})", binary.display()))?;
        let mut process = Process {
            name,
            binary: binary.to_path_buf(),
            log_path: log_path.to_path_buf(),
            child,
            watchdog: None,
        };
        if lifetime == Lifetime::TiedToThisProcess {
            match Watchdog::guard(process.pid()) {
                Ok(watchdog) => process.watchdog = Some(watchdog),
                Err(err) => {
                    process.stop(Duration::ZERO);
                    return Err(err);
                }
            }
        }
        Ok(process)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }

    /// The exit status if it has already exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails, with the tail of its log, if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.exit_status() {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited with {status}; last lines of {}:\n{}",
                self.name,
                self.log_path.display(),
                tail_of_file(&self.log_path, 30)
            ),
        }
    }

    /// Asks the process to stop (SIGTERM), kills it after `grace`, and reaps it; then retires
    /// its watchdog. Safe to call when it has already exited.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if self.exit_status().is_none() {
            // Our own child: the pid cannot have been reused since we have not reaped it.
            let _ = send_signal(self.pid(), "TERM");
            let deadline = Instant::now() + grace;
            while self.exit_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.exit_status().is_none() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            // Killed before its pipe closes, so it never signals the (now reusable) pid.
            let _ = watchdog.child.kill();
            let _ = watchdog.child.wait();
        }
    }
}

impl Watchdog {
    fn guard(pid: u32) -> Result<Watchdog> {
        // `read` returns when the pipe closes, that is when every copy of its write end is gone:
        // ours is not inherited by other children (std opens pipes close-on-exec).
        // SIGTERM first for a clean shutdown; SIGKILL only if it is still there 5 s later.
        let script = r#"read -r _ignored
kill -TERM "$1" 2>/dev/null
tries=0
while kill -0 "$1" 2>/dev/null && [ "$tries" -lt 50 ]; do sleep 0.1; tries=$((tries + 1)); done
kill -0 "$1" 2>/dev/null && kill -KILL "$1" 2>/dev/null
exit 0"#;
        let mut child = Command::new("sh")
            .args(["-c", script, "outrigger-cluster-watchdog", &pid.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(|| format!("starting the watchdog (sh) for pid {pid}"))?;
        let pipe = child.stdin.take().expect("stdin was piped");
        Ok(Watchdog { child, _pipe: pipe })
    }
}

/// Sends `signal` (`TERM`, `KILL`) to `pid` with the shell's `kill`, std having no such call.
pub(crate) fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let output = Command::new("sh")
        .args(["-c", r#"kill -s "$1" "$2""#, "sh", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .output()
        .context(|| format!("running kill -s {signal} {pid}"))?;
    if !output.status.success() {
        bail!(
            "kill -s {signal} {pid} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Whether `pid` is a live process (a zombie, exited but not yet reaped, counts as gone).
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
        {
            Some(state) => state != "Z" && state != "X",
            None => true,
        },
        Err(_) => false,
    }
}

/// The program `pid` runs, as it was started (argv[0]); `None` if there is no such process.
pub(crate) fn program_of(pid: u32) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // A process that is in the middle of exec shows an empty command line for an instant.
    for _ in 0..50 {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        if let Some(argv0) = cmdline
            .split(|&byte| byte == 0)
            .next()
            .filter(|arg| !arg.is_empty())
        {
            return Some(PathBuf::from(std::ffi::OsStr::from_bytes(argv0)));
        }
        if !is_alive(pid) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// The kernel's start time of `pid` (clock ticks since boot), which tells a process apart from a
/// later one that reuses its pid.
pub(crate) fn start_time_of(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); the start time is field 22.
    after_name.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Stops a process we did not start ourselves (a detached cluster's, recorded by pid), but only
/// if it still runs `binary`, so that a reused pid is never signalled.
/// Returns whether it was running.
pub(crate) fn stop_recorded(pid: u32, binary: &Path, grace: Duration) -> Result<bool> {
    if !is_alive(pid) || program_of(pid).as_deref() != Some(binary) {
        return Ok(false);
    }
    send_signal(pid, "TERM")?;
    let deadline = Instant::now() + grace;
    while is_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_alive(pid) {
        send_signal(pid, "KILL")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_alive(pid) {
            bail!(
                "{} (pid {pid}) is still alive after SIGKILL",
                binary.display()
            );
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_has_a_start_time() {
        let pid = std::process::id();
        assert!(is_alive(pid));
        assert!(start_time_of(pid).is_some());
        assert!(program_of(pid).is_some());
    }

    #[test]
    fn a_reaped_child_is_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!is_alive(pid));
    }

    #[test]
    fn the_watchdog_kills_its_process_when_the_owner_goes_away() {
        let mut guarded = Command::new("sleep").arg("60").spawn().unwrap();
        let mut watchdog = Watchdog::guard(guarded.id()).unwrap();
        // Closing the pipe is what the kernel does when the owning process dies.
        drop(watchdog._pipe);
        let status = guarded.wait().unwrap();
        assert!(!status.success(), "sleep 60 was cut short: {status}");
        watchdog.child.wait().unwrap();
    }

    #[test]
    fn recorded_processes_are_only_stopped_when_they_run_the_recorded_binary() {
        let sleep = PathBuf::from("/bin/sleep");
        let mut child = Command::new(&sleep).arg("60").spawn().unwrap();
        let pid = child.id();
        assert!(!stop_recorded(pid, Path::new("/bin/not-sleep"), Duration::from_secs(1)).unwrap());
        assert!(is_alive(pid));
        // stop_recorded waits until the process is no longer alive; a zombie counts as gone.
        let reaper = std::thread::spawn(move || child.wait());
        assert!(stop_recorded(pid, &sleep, Duration::from_secs(5)).unwrap());
        assert!(!reaper.join().unwrap().unwrap().success());
    }
}
