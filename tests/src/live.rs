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
    start_controller_with(&["--manifests", manifests.to_str().expect("a UTF-8 path")]).await
}

/// A controller started with `flags`, its listeners on loopback ports of their own.
pub async fn start_controller_with(flags: &[&str]) -> LiveController {
    let mut args = vec![
        "outrigger-controller",
        "--grpc-addr",
        ANY,
        "--admin-addr",
        ANY,
    ];
    args.extend(flags);
    let flags = ControllerFlags::parse_from(args);
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
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    _stop: watch::Sender<bool>,
}

/// A proxy of `control_plane` for the app at `app`, with `flags` (`--namespace`, `--workload`
/// and the like) and endpoints allowed on loopback, where the tests' backends listen. Its
/// listeners are on loopback ports of their own unless `flags` say where.
pub async fn start_proxy(control_plane: &str, app: SocketAddr, flags: &[&str]) -> LiveProxy {
    let app = app.to_string();
    let mut args = vec![
        "outrigger-proxy",
        "--control-plane",
        control_plane,
        "--app-addr",
        &app,
        "--allow-loopback-endpoints",
    ];
    for listener in ["--outbound-addr", "--inbound-addr", "--admin-addr"] {
        if !flags.contains(&listener) {
            args.extend([listener, ANY]);
        }
    }
    args.extend(flags);
    let proxy = outrigger_proxy::Proxy::bind(ProxyFlags::parse_from(args).settings)
        .await
        .expect("bind proxy");
    let (outbound, inbound, admin) = (
        proxy.outbound_addr(),
        proxy.inbound_addr(),
        proxy.admin_addr(),
    );
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(proxy.run(stopped));
    LiveProxy {
        outbound,
        inbound,
        admin,
        _stop: stop,
    }
}
