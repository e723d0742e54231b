//! Durations in the Gateway API form (GEP-2257): one or more `<number><unit>` parts with units
//! `h`, `m`, `s`, `ms`, e.g. `250ms`, `10s`, `1m30s`.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a duration (expected e.g. 250ms, 10s, 1m, 1h30m)")]
pub struct DurationError(pub String);

/// The pattern the CRD schema enforces, identical to Gateway API's.
pub const PATTERN: &str = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$";

pub fn parse(value: &str) -> Result<Duration, DurationError> {
    let error = || DurationError(value.to_string());
    let mut rest = value;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(error());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| error())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(error());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(number).map_err(|_| error())?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(error());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gateway_api_durations() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("1h30m5s20ms"), Ok(Duration::from_millis(5_405_020)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_other_forms() {
        for bad in [
            "",
            "10",
            "1.5s",
            "-1s",
            "10S",
            "1d",
            "s",
            "123456s",
            "1h1m1s1ms1h",
            " 1s",
        ] {
            assert_eq!(parse(bad), Err(DurationError(bad.to_string())), "{bad}");
        }
    }
}
