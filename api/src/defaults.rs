//! The defaults SPEC.md gives to policy fields left out, in one place: the CRD's schema and the
//! controller fill them in, and the proxy applies them to a version that leaves a value unset.

use std::time::Duration;

use crate::proto::RetryOn;

/// Retries after the first try.
pub const RETRY_ATTEMPTS: u32 = 2;
pub const RETRY_ON: [RetryOn; 3] = [
    RetryOn::ServerError,
    RetryOn::ConnectFailure,
    RetryOn::Reset,
];
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);
pub const BUDGET_PERCENT: u32 = 20;
pub const BUDGET_MIN_RETRIES_PER_SECOND: u32 = 10;
pub const CONSECUTIVE_5XX: u32 = 5;
pub const OUTLIER_INTERVAL: Duration = Duration::from_secs(10);
pub const BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
pub const MAX_EJECTION_PERCENT: u32 = 50;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
