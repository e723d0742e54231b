//! The controller and the proxy started in the test process the way their binaries start them
//! (from flags), on loopback ports of their own: for suites that check what the real binaries
//! expose (dashboards, the reference).

use std::net::SocketAddr;
use std::path::Path;

use clap::Parser;
use tokio::sync::watch;

#[derive(Parser)]
struct ControllerFlags {
    #[command(flatten)]
    settings: outrigger_controller::Settings,
}

#[derive(Parser)]
struct ProxyFlags {
    #[command(flatten)]
    settings: outrigger_proxy::Settings,
}

const ANY: &str = "127.0.0.1:0";

/// A running controller; it stops when dropped.
pub struct LiveController {
    /// For the proxies' `--control-plane`.
    pub url: String,
    pub admin: SocketAddr,
    _stop: watch::Sender<bool>,
}

/// A controller fed by the manifests directory `manifests`.
pub async fn start_controller(manifests: &Path) -> LiveController {
    let flags = ControllerFlags::parse_from([
        "outrigger-controller",
        "--manifests",
        manifests.to_str().expect("a UTF-8 path"),
        "--grpc-addr",
        ANY,
        "--admin-addr",
        ANY,
    ]);
    let controller = outrigger_controller::Controller::bind(flags.settings)
        .await
        .expect("bind controller");
    let url = format!("http://{}", controller.grpc_addr());
    let admin = controller.admin_addr();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(controller.run(stopped));
    LiveController {
        url,
        admin,
        _stop: stop,
    }
}

/// A running proxy; it stops when dropped.
pub struct LiveProxy {
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    _stop: watch::Sender<bool>,
}

/// A proxy of `control_plane` for the app at `app`, with `identity` (`--namespace`, `--workload`
/// and the like) and endpoints allowed on loopback, where the tests' backends listen.
pub async fn start_proxy(control_plane: &str, app: SocketAddr, identity: &[&str]) -> LiveProxy {
    let app = app.to_string();
    let mut args = vec![
        "outrigger-proxy",
        "--control-plane",
        control_plane,
        "--outbound-addr",
        ANY,
        "--inbound-addr",
        ANY,
        "--admin-addr",
        ANY,
        "--app-addr",
        &app,
        "--allow-loopback-endpoints",
    ];
    args.extend(identity);
    let proxy = outrigger_proxy::Proxy::bind(ProxyFlags::parse_from(args).settings)
        .await
        .expect("bind proxy");
    let (outbound, admin) = (proxy.outbound_addr(), proxy.admin_addr());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(proxy.run(stopped));
    LiveProxy {
        outbound,
        admin,
        _stop: stop,
    }
}
