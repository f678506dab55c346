//! Durations as Go writes them (`time.ParseDuration`): `300ms`, `1.5s`, `1h2m3.5s`,
//! `250us`/`250µs`, `-` refused (a [`Duration`] is never negative). Our one addition: a
//! bare number is seconds (`2`, `0.5`), which the binaries have always accepted.

use std::time::Duration;

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not of the form `[+]<number><unit>...` or a bare number.
    #[error("invalid duration {0:?}")]
    Invalid(String),
    /// A number without a unit inside a longer duration (`1h30`).
    #[error("missing unit in duration {0:?}")]
    MissingUnit(String),
    /// A unit other than ns, us, µs, ms, s, m, h.
    #[error("unknown unit {unit:?} in duration {input:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
        /// The whole input.
        input: String,
    },
    /// A negative duration.
    #[error("negative duration {0:?}")]
    Negative(String),
    /// Longer than Go's limit (2^63-1 ns, about 292 years).
    #[error("duration {0:?} out of range")]
    OutOfRange(String),
}

/// Go's largest duration, in nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        // U+00B5 (micro sign) and U+03BC (Greek mu), as Go.
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Parses a Go duration (`1h2m3.5s`, `500ms`, `250µs`) or a bare number of seconds.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(input.to_owned());
    let s = input.trim();
    let (negative, mut s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if s.is_empty() {
        return Err(invalid());
    }
    let bare_number = s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let mut total: u128 = 0;
    let mut first = true;
    while !s.is_empty() {
        let (int, frac, rest) = leading_number(s).ok_or_else(invalid)?;
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let scale = if unit.is_empty() {
            // Go accepts "0" alone; we also take a bare number as seconds.
            if first && bare_number {
                1_000_000_000
            } else {
                return Err(DurationError::MissingUnit(input.to_owned()));
            }
        } else {
            unit_nanos(unit).ok_or_else(|| DurationError::UnknownUnit {
                unit: unit.to_owned(),
                input: input.to_owned(),
            })?
        };
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse()
                .map_err(|_| DurationError::OutOfRange(input.to_owned()))?
        };
        let frac_nanos = fraction_nanos(frac, scale);
        total = whole
            .checked_mul(scale)
            .and_then(|n| n.checked_add(frac_nanos))
            .and_then(|n| n.checked_add(total))
            .filter(|n| *n <= MAX_NANOS)
            .ok_or_else(|| DurationError::OutOfRange(input.to_owned()))?;
        s = &rest[unit_len..];
        first = false;
    }
    if negative && total != 0 {
        return Err(DurationError::Negative(input.to_owned()));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// The fraction's share of `scale` nanoseconds, computed as Go does (digits kept while they
/// fit 63 bits, then one float multiplication), so results agree to the nanosecond.
fn fraction_nanos(digits: &str, scale: u128) -> u128 {
    let mut x: u64 = 0;
    let mut divisor = 1f64;
    for d in digits.bytes() {
        if x > (i64::MAX as u64) / 10 {
            break;
        }
        let y = x * 10 + u64::from(d - b'0');
        if y > 1 << 63 {
            break;
        }
        x = y;
        divisor *= 10.0;
    }
    (x as f64 * (scale as f64 / divisor)) as u128
}

/// Splits `12.5ms` into ("12", "5", "ms"); `None` without a digit on either side of the dot.
fn leading_number(s: &str) -> Option<(&str, &str, &str)> {
    let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = s.split_at(int_len);
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let n = after.bytes().take_while(u8::is_ascii_digit).count();
            after.split_at(n)
        }
        None => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    Some((int, frac, rest))
}

/// Formats a duration in the largest unit that divides it (`2s`, `1500ms`, `250us`), which
/// [`parse_duration`] and Go both read back.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0s".into()
    } else if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_syntax() {
        let ok = [
            ("0", 0),
            ("+0", 0),
            ("-0", 0),
            ("5s", 5_000_000_000),
            ("30s", 30_000_000_000),
            ("1478s", 1_478_000_000_000),
            ("+5s", 5_000_000_000),
            ("5.0s", 5_000_000_000),
            ("5.6s", 5_600_000_000),
            ("5.s", 5_000_000_000),
            (".5s", 500_000_000),
            ("1.0s", 1_000_000_000),
            ("1.00s", 1_000_000_000),
            ("1.004s", 1_004_000_000),
            ("1.0040s", 1_004_000_000),
            ("100.00100s", 100_001_000_000),
            ("10ns", 10),
            ("11us", 11_000),
            ("12µs", 12_000),
            ("12μs", 12_000),
            ("13ms", 13_000_000),
            ("14s", 14_000_000_000),
            ("15m", 900_000_000_000),
            ("16h", 57_600_000_000_000),
            ("3h30m", 12_600_000_000_000),
            ("10.5s4m", 250_500_000_000),
            ("1h2m3.5s", 3_723_500_000_000),
            ("1h2m3s4ms5us6ns", 3_723_004_005_006),
            ("39h9m14.425s", 140_954_425_000_000),
            ("52763797000ns", 52_763_797_000),
            ("0.3333333333333333333h", 1_200_000_000_000),
            ("9007199254740993ns", 9_007_199_254_740_993),
            ("9223372036854775807ns", 9_223_372_036_854_775_807),
            ("9223372036854775.807us", 9_223_372_036_854_775_807),
            ("0.100000000000000000000h", 360_000_000_000),
            // Ours: a bare number is seconds.
            ("2", 2_000_000_000),
            ("1.5", 1_500_000_000),
            (" 3s ", 3_000_000_000),
        ];
        for (s, ns) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_nanos(ns)), "{s}");
        }
    }

    #[test]
    fn refused_as_go_refuses() {
        for s in [
            "", "3h30", "-", "s", ".", "-.", ".s", "+.s", "1d", "10x", "ms5", "1e3s",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?}");
        }
        assert!(matches!(
            parse_duration("3h30"),
            Err(DurationError::MissingUnit(_))
        ));
        assert!(matches!(
            parse_duration("1d"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("-1s"),
            Err(DurationError::Negative(_))
        ));
        for s in [
            "9223372036854775808ns",
            "9223372036854775.808us",
            "2562048h",
            "1e400",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?}");
        }
        assert!(matches!(
            parse_duration("9223372036854775808ns"),
            Err(DurationError::OutOfRange(_))
        ));
    }

    #[test]
    fn formatted_durations_read_back() {
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(2), "2s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(250), "250us"),
            (Duration::from_nanos(7), "7ns"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(s), Ok(d));
        }
    }
}
