use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use outrigger_controller::distribute::{DiscoveryService, Snapshots};
use outrigger_controller::metrics::Metrics;

#[derive(Parser)]
#[command(
    name = "outrigger-controller",
    version,
    about = "The Outrigger control plane"
)]
struct Cli {
    /// Configuration stream to proxies.
    #[arg(long, env = "OUTRIGGER_GRPC_ADDR", default_value = "0.0.0.0:8090")]
    grpc_addr: SocketAddr,
    /// `/metrics`, `/live`, `/ready`.
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    admin_addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let metrics = Metrics::default();
    let snapshots = Snapshots::default();
    // No source of cluster state is wired in yet: every destination is unknown.
    snapshots.mark_synced();
    let hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| "outrigger-controller".into());
    let discovery = DiscoveryService::new(snapshots, metrics.clone(), hostname);
    let admin = tokio::net::TcpListener::bind(cli.admin_addr)
        .await
        .with_context(|| format!("binding the admin listener on {}", cli.admin_addr))?;
    tokio::spawn(outrigger_controller::admin::serve(admin, metrics));
    tracing::info!(grpc = %cli.grpc_addr, admin = %cli.admin_addr, "controller listening");
    tonic::transport::Server::builder()
        .add_service(discovery.into_server())
        .serve_with_shutdown(cli.grpc_addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .with_context(|| format!("serving gRPC on {}", cli.grpc_addr))?;
    Ok(())
}
