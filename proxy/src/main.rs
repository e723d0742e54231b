#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use outrigger_proxy::{Proxy, Settings};
use outrigger_proxy::{RedirectSettings, install_redirect};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "outrigger-proxy",
    version,
    about = "The Outrigger sidecar proxy",
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
    /// Installs the iptables rules that send the pod's traffic through the proxy, then exits.
    Init(RedirectSettings),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    if let Some(Command::Init(settings)) = cli.command {
        return install_redirect(&settings);
    }
    let proxy = Proxy::bind(cli.settings).await?;
    tracing::info!(
        outbound = %proxy.outbound_addr(),
        inbound = %proxy.inbound_addr(),
        admin = %proxy.admin_addr(),
        "proxy listening"
    );
    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("shutting down: draining in-flight requests");
        let _ = shutdown_tx.send(true);
    });
    proxy.run(shutdown).await;
    Ok(())
}
