//! Shutdown is a `watch` of `bool` that turns true once, shared by every task.

use tokio::sync::watch;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The `Ref` that `wait_for` returns must not live in the caller's future: it is not `Send`.
    let _ = shutdown.wait_for(|stop| *stop).await;
}
