use std::path::PathBuf;

use clap::{Parser, Subcommand};
use outrigger_controller::{Controller, Settings, crds};

#[derive(Parser)]
#[command(
    name = "outrigger-controller",
    version,
    about = "The Outrigger control plane",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crds { dir, check: true }) => crds::check(&dir),
        Some(Command::Crds { dir, check: false }) => crds::write(&dir),
        None => {
            let controller = Controller::bind(cli.settings).await?;
            let (stop, shutdown) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                let _ = stop.send(true);
            });
            controller.run(shutdown).await
        }
    }
}
