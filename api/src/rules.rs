//! The rules a policy must follow, checked by the controller when it translates a resource and by
//! the proxy when it decodes what it was sent, and the error that names the field: one place, so
//! that both refuse the same things with the same words.

use std::collections::HashSet;
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::time::Duration;

/// Retries after the first try; the retry budget bounds the load they add whatever this is.
pub const MAX_ATTEMPTS: u32 = 10;

/// A field that cannot be used, named by its path (`routes[0].retries.backoff`).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    /// The same error, its field seen from the object that holds it (`spec`).
    pub fn within(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            ..self
        }
    }
}

pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The names of a list's items (subsets, routes) are unique; `list` is the list's field.
pub fn unique_names<'a>(
    list: &str,
    kind: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), FieldError> {
    let mut seen = HashSet::new();
    for (i, name) in names.into_iter().enumerate() {
        if !seen.insert(name) {
            return Err(invalid(
                format!("{list}[{i}].name"),
                format!("duplicate {kind} `{name}`"),
            ));
        }
    }
    Ok(())
}

/// A traffic split: each subset declared and listed once, and some weight above 0.
pub fn traffic_split<'a>(
    field: &str,
    weights: impl IntoIterator<Item = (&'a str, u32)>,
    declared: impl Fn(&str) -> bool,
) -> Result<(), FieldError> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    for (i, (subset, weight)) in weights.into_iter().enumerate() {
        if !declared(subset) {
            return Err(invalid(
                format!("{field}[{i}].subset"),
                format!("subset `{subset}` is not declared in subsets"),
            ));
        }
        if !seen.insert(subset) {
            return Err(invalid(
                format!("{field}[{i}].subset"),
                format!("subset `{subset}` is listed twice"),
            ));
        }
        total += u64::from(weight);
    }
    if total == 0 {
        return Err(invalid(field, "at least one weight must be above 0"));
    }
    Ok(())
}

pub fn at_least_one(field: &str, value: u32) -> Result<(), FieldError> {
    if value == 0 {
        return Err(invalid(field, "must be at least 1"));
    }
    Ok(())
}

pub fn at_most(field: &str, value: u32, max: u32) -> Result<(), FieldError> {
    if value > max {
        return Err(invalid(field, format!("{value} is above {max}")));
    }
    Ok(())
}

/// A whole percentage, 0 to 100.
pub fn percent(field: &str, value: u32) -> Result<(), FieldError> {
    at_most(field, value, 100)
}

/// A percentage of requests, 0 to 100 with a fraction.
pub fn fraction_percent(field: &str, value: f64) -> Result<f64, FieldError> {
    if !(0.0..=100.0).contains(&value) {
        return Err(invalid(field, format!("{value} is not within 0 to 100")));
    }
    Ok(value)
}

/// Responses a retry may follow: any HTTP status.
pub const ANY_STATUS: RangeInclusive<u32> = 100..=599;
/// Responses a fault may answer with: not informational.
pub const FINAL_STATUS: RangeInclusive<u32> = 200..=599;

pub fn status_code(field: &str, code: u32, range: RangeInclusive<u32>) -> Result<u16, FieldError> {
    match u16::try_from(code) {
        Ok(status) if range.contains(&code) => Ok(status),
        _ => Err(invalid(
            field,
            format!(
                "{code} is not an HTTP status ({} to {})",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// Two durations of one block that must come in order (`baseInterval`, `maxInterval`).
pub fn in_order(
    field: &str,
    (lower_name, lower): (&str, Duration),
    (upper_name, upper): (&str, Duration),
) -> Result<(), FieldError> {
    if lower > upper {
        return Err(invalid(
            field,
            format!("{lower_name} must not exceed {upper_name}"),
        ));
    }
    Ok(())
}

/// A per-try timeout that fits in the request's timeout.
pub fn per_try_timeout(
    field: &str,
    per_try: Option<(impl Display, Duration)>,
    timeout: Option<(impl Display, Duration)>,
) -> Result<(), FieldError> {
    match (per_try, timeout) {
        (Some((per_try_text, per_try)), Some((timeout_text, timeout))) if per_try > timeout => {
            Err(invalid(
                field,
                format!("{per_try_text} exceeds the timeout {timeout_text}"),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_within_their_list() {
        assert_eq!(unique_names("routes", "route", ["a", "b"]), Ok(()));
        assert_eq!(
            unique_names("routes", "route", ["a", "b", "a"])
                .unwrap_err()
                .to_string(),
            "routes[2].name: duplicate route `a`"
        );
    }

    #[test]
    fn a_split_names_declared_subsets_once_and_sends_somewhere() {
        let declared = |s: &str| ["stable", "canary"].contains(&s);
        let check = |weights: &[(&'static str, u32)]| {
            traffic_split("trafficSplit", weights.iter().copied(), declared)
                .map_err(|e| e.to_string())
        };
        assert_eq!(check(&[("stable", 90), ("canary", 10)]), Ok(()));
        assert_eq!(check(&[("stable", 0), ("canary", 1)]), Ok(()));
        assert_eq!(
            check(&[("stable", 1), ("beta", 1)]),
            Err("trafficSplit[1].subset: subset `beta` is not declared in subsets".into())
        );
        assert_eq!(
            check(&[("stable", 1), ("stable", 1)]),
            Err("trafficSplit[1].subset: subset `stable` is listed twice".into())
        );
        assert_eq!(
            check(&[("stable", 0)]),
            Err("trafficSplit: at least one weight must be above 0".into())
        );
        assert_eq!(
            check(&[]),
            Err("trafficSplit: at least one weight must be above 0".into())
        );
    }

    #[test]
    fn numbers_within_their_ranges() {
        assert_eq!(at_least_one("x", 1), Ok(()));
        assert_eq!(
            at_least_one("x", 0).unwrap_err().problem,
            "must be at least 1"
        );
        assert_eq!(percent("p", 100), Ok(()));
        assert_eq!(percent("p", 101).unwrap_err().problem, "101 is above 100");
        assert_eq!(fraction_percent("f", 0.5), Ok(0.5));
        assert!(fraction_percent("f", -0.1).is_err());
        assert!(fraction_percent("f", f64::NAN).is_err());
        assert_eq!(status_code("s", 503, FINAL_STATUS), Ok(503));
        assert_eq!(
            status_code("s", 100, FINAL_STATUS).unwrap_err().problem,
            "100 is not an HTTP status (200 to 599)"
        );
        assert!(status_code("s", 70_000, ANY_STATUS).is_err());
    }

    #[test]
    fn durations_in_order_and_per_try_within_the_timeout() {
        let ms = Duration::from_millis;
        assert_eq!(in_order("b", ("base", ms(1)), ("max", ms(1))), Ok(()));
        assert_eq!(
            in_order("b", ("base", ms(2)), ("max", ms(1)))
                .unwrap_err()
                .to_string(),
            "b: base must not exceed max"
        );
        assert_eq!(
            per_try_timeout("r", Some(("1s", ms(1000))), None::<(&str, _)>),
            Ok(())
        );
        assert_eq!(
            per_try_timeout("r", Some(("2s", ms(2000))), Some(("1s", ms(1000))))
                .unwrap_err()
                .to_string(),
            "r: 2s exceeds the timeout 1s"
        );
    }

    #[test]
    fn an_error_is_named_from_the_object_that_holds_it() {
        assert_eq!(
            invalid("rateLimit", "bad").within("spec").to_string(),
            "spec.rateLimit: bad"
        );
    }
}
