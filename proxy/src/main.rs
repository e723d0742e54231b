#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use outrigger_api::logging::LogArgs;
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
    logging: LogArgs,
    /// Threads serving traffic. A sidecar's share of a node is small: one thread per core of a
    /// 64-core node would be 64 per pod.
    #[arg(long, env = "OUTRIGGER_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: u16,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Installs the iptables rules that send the pod's traffic through the proxy, then exits.
    Init(RedirectSettings),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    outrigger_api::logging::init(cli.logging.log_format);
    if let Some(Command::Init(settings)) = cli.command {
        return install_redirect(&settings);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(cli.worker_threads))
        .thread_name("proxy-worker")
        .enable_all()
        .build()?
        .block_on(serve(cli.settings))
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let proxy = Proxy::bind(settings).await?;
    tracing::info!(
        outbound = %proxy.outbound_addr(),
        inbound = %proxy.inbound_addr(),
        admin = %proxy.admin_addr(),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
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
