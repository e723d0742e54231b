//! Policy resources -> the protocol's policy, checked on the way: one file per resource kind
//! (`destination_policy`, `authorization_policy`; a route gets a file of its own).
//!
//! The API server enforces the CRD's schema and CEL rules, but a manifests directory has no API
//! server in front of it, and a cluster may run an older CRD; so every rule the proxies rely on is
//! checked again here, with the field named as `kubectl` would name it. Values arrive complete:
//! the policy types carry SPEC.md's defaults, so the proxies get explicit numbers.

mod authorization_policy;
mod destination_policy;
mod route;

use std::time::Duration;

use outrigger_api::policy;
use outrigger_api::rules::FieldError;

pub use self::authorization_policy::{Authorization, translate_authorization};
pub use self::destination_policy::{Translated, translate};
pub use self::route::{Route, RouteOrder, table};

/// A field of a spec that cannot be used, named as `kubectl` would name it (`spec.…`).
pub type PolicyError = FieldError;

fn millis(duration: &policy::Duration) -> u64 {
    duration_ms(duration.get())
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
