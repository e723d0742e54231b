use std::path::PathBuf;

use clap::{Parser, Subcommand};
use outrigger_api::logging::LogArgs;
use outrigger_controller::{Controller, Settings, crds};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "outrigger-controller",
    version,
    about = "The Outrigger control plane",
    long_about = "The Outrigger control plane: turns Services, EndpointSlices, Pod labels and \
        DestinationPolicies into configuration streamed to proxies.\n\n\
        Cluster state comes from one source: the Kubernetes API (the default: in a cluster, or \
        --kubeconfig PATH), where the leader replica also writes DestinationPolicy status; or \
        --manifests DIR, a directory of YAML files, for running without a cluster.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    logging: LogArgs,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Writes the CustomResourceDefinitions generated from the policy types.
    Crds {
        /// Where the CRD files go.
        #[arg(long, default_value = "crds")]
        dir: PathBuf,
        /// Only compare: fail, naming the files, when DIR is not what would be written.
        #[arg(long)]
        check: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    outrigger_api::logging::init(cli.logging.log_format);
    match cli.command {
        Some(Command::Crds { dir, check: true }) => crds::check(&dir),
        Some(Command::Crds { dir, check: false }) => crds::write(&dir),
        None => {
            let controller = Controller::bind(cli.settings).await?;
            let (stop, shutdown) = tokio::sync::watch::channel(false);
            let mut terminate = signal(SignalKind::terminate())?;
            tokio::spawn(async move {
                // Ctrl-C by hand, SIGTERM from Kubernetes: either way a leader hands its Lease
                // over before exiting.
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
                let _ = stop.send(true);
            });
            controller.run(shutdown).await
        }
    }
}
