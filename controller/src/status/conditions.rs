//! Status conditions as both kinds write them: each a verdict (holds or not, a reason, a
//! message), dated by when its status last changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::index::Problem;

/// A condition's value, before it is dated.
pub(super) struct Verdict {
    pub(super) holds: bool,
    pub(super) reason: &'static str,
    pub(super) message: String,
}

impl Verdict {
    pub(super) fn holds(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            holds: true,
            reason,
            message: message.into(),
        }
    }

    pub(super) fn fails(problem: &Problem) -> Self {
        Self {
            holds: false,
            reason: problem.reason,
            message: problem.message.clone(),
        }
    }

    pub(super) fn of(
        result: &Result<(), Problem>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        match result {
            Ok(()) => Self::holds(reason, message),
            Err(problem) => Self::fails(problem),
        }
    }
}

/// The conditions of `verdicts`, each named by its type, at `generation`; one whose status is
/// unchanged from `previous` keeps its transition time, the others changed `now`.
pub(super) fn conditions(
    verdicts: impl IntoIterator<Item = (&'static str, Verdict)>,
    previous: &[Condition],
    generation: i64,
    now: &Time,
) -> Vec<Condition> {
    verdicts
        .into_iter()
        .map(|(type_, verdict)| {
            let status = if verdict.holds { "True" } else { "False" };
            let last_transition_time = previous
                .iter()
                .find(|condition| condition.type_ == type_)
                .filter(|condition| condition.status == status)
                .map_or_else(
                    || now.clone(),
                    |condition| condition.last_transition_time.clone(),
                );
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: verdict.reason.to_string(),
                message: verdict.message,
                observed_generation: Some(generation),
                last_transition_time,
            }
        })
        .collect()
}
