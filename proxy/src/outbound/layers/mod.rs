//! The policy layers of a destination's stack, each a `Step`, in the order a request meets them:
//! `ratelimit`, `fault`, `deadline` (request), `retry` (with `replay`), `deadline` (per try),
//! `pool`.

pub mod deadline;
pub mod fault;
pub mod pool;
pub mod ratelimit;
pub mod replay;
pub mod retry;
