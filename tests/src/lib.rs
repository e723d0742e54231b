//! Test support shared by the proxy's integration tests, the end-to-end suites and the benchmarks:
//! a control plane speaking the real protocol, and backends that misbehave on command.

pub mod backend;
pub mod control_plane;
pub mod dashboards;
pub mod e2e;
pub mod identity;
pub mod live;
pub mod process;

pub use backend::{Backend, Behaviour};
pub use control_plane::{Configuration, ControlPlane, allowing, destination};
pub use outrigger_controller::ProxyEvent;

/// The workspace root, as cargo says when it runs a test (a test binary cached from another
/// checkout would otherwise read files from that one).
pub fn workspace() -> std::path::PathBuf {
    let tests = std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo");
    std::path::Path::new(&tests)
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}
