//! Test support shared by the proxy's integration tests, the end-to-end suites and the benchmarks:
//! a control plane speaking the real protocol, and backends that misbehave on command.

pub mod backend;
pub mod control_plane;
pub mod e2e;
pub mod process;

pub use backend::{Backend, Behaviour};
pub use control_plane::{Configuration, ControlPlane, destination};
pub use outrigger_controller::distribute::ProxyEvent;
