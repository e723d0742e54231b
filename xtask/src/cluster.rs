//! `cargo xtask cluster up|down|env|build`: a real etcd + kube-apiserver (+ kube-controller-manager)
//! on 127.0.0.1 for trying Outrigger by hand, the same cluster the end-to-end tests start through
//! the `outrigger-cluster` crate. Its state (certificates, kubeconfig, logs, pids) is kept in
//! `~/.cache/outrigger/cluster/dev`.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Subcommand;
use outrigger_cluster::{
    Binaries, Cluster, Lifetime, dev_state_dir, helm_environment, is_running_in, kubeconfig_in,
    stop_in,
};

#[derive(Subcommand)]
pub enum Action {
    /// Builds the pinned binaries if needed (about 10 minutes the first time), starts the cluster
    /// and leaves it running until `cargo xtask cluster down`.
    Up {
        /// Leave out kube-controller-manager: faster and smaller, but no default ServiceAccounts,
        /// namespace deletion, garbage collection or EndpointSlices for Services.
        #[arg(long)]
        without_controller_manager: bool,
    },
    /// Stops every process `up` started; does nothing when none is running.
    Down,
    /// Prints shell exports for the cluster: `eval "$(cargo xtask cluster env)"`.
    Env,
    /// Only builds the pinned binaries into the cache (what `up` and the tests do on first use).
    Build,
}

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Up {
            without_controller_manager,
        } => up(!without_controller_manager),
        Action::Down => down(),
        Action::Env => env(),
        Action::Build => {
            let binaries = Binaries::ensure_built()?;
            eprintln!("binaries are in {}", binaries.dir().display());
            Ok(())
        }
    }
}

fn up(controller_manager: bool) -> Result<()> {
    let state_dir = dev_state_dir()?;
    if is_running_in(&state_dir)? {
        eprintln!(
            "the cluster is already running (state in {}); `cargo xtask cluster down` stops it",
            state_dir.display()
        );
    } else {
        let cluster = Cluster::builder()
            .state_dir(&state_dir)
            .controller_manager(controller_manager)
            .lifetime(Lifetime::Detached)
            .start()
            .context("starting the test cluster")?;
        let pids: Vec<String> = cluster
            .pids()
            .iter()
            .map(|(name, pid)| format!("{name} {pid}"))
            .collect();
        eprintln!(
            "cluster up at {} in {:.1}s ({}); logs in {}",
            cluster.server_url(),
            cluster.startup_time().as_secs_f64(),
            pids.join(", "),
            state_dir.join("logs").display()
        );
        cluster.leave_running();
    }
    eprintln!("use it with: eval \"$(cargo xtask cluster env)\"");
    Ok(())
}

fn down() -> Result<()> {
    let state_dir = dev_state_dir()?;
    let stopped = stop_in(&state_dir)
        .with_context(|| format!("stopping the cluster recorded in {}", state_dir.display()))?;
    if stopped.is_empty() {
        eprintln!("no cluster was running");
    } else {
        let names: Vec<String> = stopped
            .iter()
            .map(|process| format!("{} {}", process.name, process.pid))
            .collect();
        eprintln!("stopped {}", names.join(", "));
    }
    Ok(())
}

fn env() -> Result<()> {
    let state_dir = dev_state_dir()?;
    let binaries = Binaries::locate()?;
    if !is_running_in(&state_dir)? {
        eprintln!("note: no cluster is running; `cargo xtask cluster up` starts one");
    }
    let kubeconfig = kubeconfig_in(&state_dir);
    println!("export KUBECONFIG={}", shell_quote(&kubeconfig));
    println!("export PATH={}:\"$PATH\"", shell_quote(binaries.dir()));
    for (name, value) in helm_environment(&state_dir, &kubeconfig) {
        if name != "KUBECONFIG" {
            println!("export {name}={}", shell_quote(&value));
        }
    }
    println!("# kubectl: {}", binaries.kubectl().display());
    println!("# helm: {}", binaries.helm().display());
    Ok(())
}

/// `path` in single quotes for a POSIX shell.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/it's")), r"'/it'\''s'");
    }
}
