//! `cargo xtask cluster up|down|env|build`: the test cluster the end-to-end tests start through
//! the `outrigger-cluster` crate, for trying Outrigger by hand. `up` starts a single-node cluster
//! whose pods run (state in `~/.cache/outrigger/cluster/node`), with the images `cargo xtask
//! images` built; `up --api-only` starts etcd + kube-apiserver (+ kube-controller-manager) on
//! 127.0.0.1 (state in `~/.cache/outrigger/cluster/dev`).

use std::path::Path;

use anyhow::{Context, Result};
use clap::Subcommand;
use outrigger_cluster::{
    Binaries, Cluster, Lifetime, dev_state_dir, helm_environment, is_running_in, kubeconfig_in,
    node_runtime_endpoint, node_state_dir, stop_in, stop_node,
};

use crate::images;

#[derive(Subcommand)]
pub enum Action {
    /// Builds the pinned binaries if needed (about 16 minutes the first time), starts the cluster
    /// and leaves it running until `cargo xtask cluster down`. Needs root.
    Up {
        /// Only etcd and kube-apiserver (and kube-controller-manager) on 127.0.0.1: no node, so
        /// pods stay Pending, but cheap and without root.
        #[arg(long)]
        api_only: bool,
        /// With --api-only, leave out kube-controller-manager: faster and smaller, but no default
        /// ServiceAccounts, namespace deletion, garbage collection or EndpointSlices for Services.
        #[arg(long, requires = "api_only")]
        without_controller_manager: bool,
    },
    /// Stops every process `up` started and undoes what the node changed on this machine (mounts,
    /// the bridge, iptables chains, cgroups, kernel tunables); does nothing when none is running.
    Down,
    /// Prints shell exports for the running cluster: `eval "$(cargo xtask cluster env)"`.
    Env,
    /// Only builds the pinned binaries into the cache (what `up` and the tests do on first use).
    Build,
}

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Up {
            api_only,
            without_controller_manager,
        } => up(api_only, !without_controller_manager),
        Action::Down => down(),
        Action::Env => env(),
        Action::Build => {
            let binaries = Binaries::ensure_node_built()?;
            eprintln!("binaries are in {}", binaries.dir().display());
            Ok(())
        }
    }
}

fn up(api_only: bool, controller_manager: bool) -> Result<()> {
    let (state_dir, other) = if api_only {
        (dev_state_dir()?, node_state_dir()?)
    } else {
        (node_state_dir()?, dev_state_dir()?)
    };
    if is_running_in(&other)? {
        eprintln!(
            "note: the other kind of cluster runs too (state in {}); `cargo xtask cluster env` \
             points at the node when both run",
            other.display()
        );
    }
    if is_running_in(&state_dir)? {
        eprintln!(
            "the cluster is already running (state in {}); `cargo xtask cluster down` stops it",
            state_dir.display()
        );
        eprintln!("use it with: eval \"$(cargo xtask cluster env)\"");
        return Ok(());
    }
    let builder = Cluster::builder().lifetime(Lifetime::Detached);
    let cluster = if api_only {
        builder
            .state_dir(&state_dir)
            .controller_manager(controller_manager)
    } else {
        let archives = images::built_archives()?;
        if archives.is_empty() {
            eprintln!(
                "note: no images built yet, so the chart's pods cannot start: `cargo xtask \
                 images` builds them (then `cargo xtask cluster down && cargo xtask cluster up`)"
            );
        } else {
            eprintln!(
                "importing {} images built by `cargo xtask images`",
                archives.len()
            );
        }
        builder.node(true).images(archives)
    }
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
    eprintln!("use it with: eval \"$(cargo xtask cluster env)\"");
    Ok(())
}

fn down() -> Result<()> {
    let dev = dev_state_dir()?;
    let stopped = stop_in(&dev)
        .with_context(|| format!("stopping the cluster recorded in {}", dev.display()))?;
    let mut done: Vec<String> = stopped
        .iter()
        .map(|process| format!("stopped {} {}", process.name, process.pid))
        .collect();
    done.extend(stop_node().context("stopping the node and undoing its changes")?);
    if done.is_empty() {
        eprintln!("no cluster was running");
    } else {
        eprintln!("{}", done.join("\n"));
    }
    Ok(())
}

fn env() -> Result<()> {
    let node = node_state_dir()?;
    let state_dir = if is_running_in(&node)? {
        node
    } else {
        let dev = dev_state_dir()?;
        if !is_running_in(&dev)? {
            eprintln!("note: no cluster is running; `cargo xtask cluster up` starts one");
        }
        dev
    };
    let binaries = Binaries::locate()?;
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
    // crictl reads it, for looking at the node's containers.
    println!(
        "export CONTAINER_RUNTIME_ENDPOINT={}",
        shell_quote(Path::new(&node_runtime_endpoint()?))
    );
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
