//! Human units for configuration and headers: sizes (`512`, `64KiB`, `50GiB`, also `KB/MB/GB` as
//! powers of 1000) and durations (`90s`, `30m`, `12h`, `7d`), as used by `--disk-limit`,
//! `--max-ttl` and the `Time-To-Live` header.
//!
//! [`ByteSize`] and [`Interval`] carry a parsed value with its grammar: they parse from flags and
//! environment variables (`FromStr`) and from TOML (`Deserialize`; a size may also be a plain
//! number), and print back in the same grammar (`Display`), so a default shown in `--help` is
//! text the parser accepts.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A size in bytes: `512`, `64KiB`, `50GiB` (see [`parse_size`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<ByteSize, String> {
        parse_size(s).map(ByteSize)
    }
}

/// The largest binary unit that divides the size exactly: `100GiB`, `64KiB`, `1000`.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (unit, name) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{name}", self.0 / unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"50GiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {n}: negative")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ByteSize, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A positive duration in whole seconds: `90s`, `30m`, `12h`, `7d` (see [`parse_duration`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interval(pub Duration);

impl FromStr for Interval {
    type Err = String;

    fn from_str(s: &str) -> Result<Interval, String> {
        parse_duration(s).map(Interval)
    }
}

/// The largest unit that divides the duration exactly: `7d`, `10m`, `90s`.
impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        for (unit, name) in [(86_400, 'd'), (3_600, 'h'), (60, 'm')] {
            if secs >= unit && secs.is_multiple_of(unit) {
                return write!(f, "{}{name}", secs / unit);
            }
        }
        write!(f, "{secs}s")
    }
}

impl<'de> serde::Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Interval, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a size: a non-negative integer with an optional unit `B`, `KiB`, `MiB`, `GiB`, `TiB`
/// (powers of 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000); case-insensitive unit, optional
/// space between number and unit. Errors are one-line reasons.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let expected = || {
        format!(
            "invalid size {s:?}: expected a number with an optional unit B, KiB, MiB, GiB, TiB, \
             KB, MB, GB, TB"
        )
    };
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    if number.is_empty() {
        return Err(expected());
    }
    let unit = unit.trim_start_matches([' ', '\t']);
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(expected()),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Parses a duration: a positive integer followed by exactly one unit `s`, `m`, `h` or `d`
/// (no unit is an error, zero is an error). This is the `Time-To-Live` header grammar.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected =
        || format!("invalid duration {s:?}: expected a positive integer and a unit s, m, h or d");
    let t = s.trim();
    let Some(unit) = t.chars().last() else {
        return Err(expected());
    };
    let seconds_per_unit: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 60 * 60,
        'd' => 24 * 60 * 60,
        _ => return Err(expected()),
    };
    let number = &t[..t.len() - 1];
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected());
    }
    let n = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(seconds_per_unit))
        .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
    if n == 0 {
        return Err(format!("invalid duration {s:?}: must be positive"));
    }
    Ok(Duration::from_secs(n))
}

/// Formats a byte count for people: `1.5 GiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Integer tenths, rounded half up, so the output is exact and stable across platforms.
    let mut unit_index = 0;
    let mut divisor: u128 = 1024;
    loop {
        let tenths = (u128::from(bytes) * 10 + divisor / 2) / divisor;
        // 1023.97 KiB rounds to "1024.0 KiB"; show it as "1 MiB" instead.
        if tenths >= 10 * 1024 && unit_index + 1 < UNITS.len() {
            unit_index += 1;
            divisor *= 1024;
            continue;
        }
        let (whole, frac) = (tenths / 10, tenths % 10);
        return if frac == 0 {
            format!("{whole} {}", UNITS[unit_index])
        } else {
            format!("{whole}.{frac} {}", UNITS[unit_index])
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_intervals_print_what_they_parse_from() {
        for text in ["100GiB", "64KiB", "1000", "3TiB", "512"] {
            assert_eq!(text.parse::<ByteSize>().unwrap().to_string(), text);
        }
        assert_eq!(ByteSize(1536).to_string(), "1536");
        for text in ["7d", "10m", "90s", "12h", "30s"] {
            assert_eq!(text.parse::<Interval>().unwrap().to_string(), text);
        }
        assert_eq!(Interval(Duration::from_secs(600)).to_string(), "10m");
        assert!("0s".parse::<Interval>().is_err());
        assert!("5x".parse::<ByteSize>().is_err());
    }

    const KI: u64 = 1 << 10;
    const MI: u64 = 1 << 20;
    const GI: u64 = 1 << 30;
    const TI: u64 = 1 << 40;

    #[test]
    fn parse_size_accepts() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("1", 1),
            ("512", 512),
            ("0B", 0),
            ("10B", 10),
            ("10 B", 10),
            ("10b", 10),
            ("64KiB", 64 * KI),
            ("64 KiB", 64 * KI),
            ("64  KiB", 64 * KI),
            ("64kib", 64 * KI),
            ("64KIB", 64 * KI),
            ("3MiB", 3 * MI),
            ("50GiB", 50 * GI),
            ("2TiB", 2 * TI),
            ("1KB", 1_000),
            ("1kb", 1_000),
            ("5MB", 5_000_000),
            ("1GB", 1_000_000_000),
            ("7TB", 7_000_000_000_000),
            ("  50GiB  ", 50 * GI),
            ("007", 7),
            ("18446744073709551615", u64::MAX),
            ("16777215TiB", 16_777_215 * TI),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input), Ok(*want), "parse_size({input:?})");
        }
    }

    #[test]
    fn parse_size_rejects() {
        let expected =
            "expected a number with an optional unit B, KiB, MiB, GiB, TiB, KB, MB, GB, TB";
        let cases: &[(&str, &str)] = &[
            ("", expected),
            ("   ", expected),
            ("x", expected),
            ("KiB", expected),
            ("-1", expected),
            ("+1", expected),
            ("1.5GiB", expected),
            ("1,000", expected),
            ("1 000", expected),
            ("64K", expected),
            ("64Ki", expected),
            ("64KiBs", expected),
            ("64 KiB extra", expected),
            ("1PiB", expected),
            ("1iB", expected),
            ("GiB50", expected),
            ("18446744073709551616", "too large"),
            ("16777216TiB", "too large"),
            ("99999999999999999999999GiB", "too large"),
        ];
        for (input, reason) in cases {
            let err = parse_size(input).expect_err(input);
            assert_eq!(err, format!("invalid size {input:?}: {reason}"));
            assert!(!err.contains('\n'));
        }
        assert_eq!(
            parse_size("x").unwrap_err(),
            "invalid size \"x\": expected a number with an optional unit B, KiB, MiB, GiB, TiB, \
             KB, MB, GB, TB"
        );
    }

    #[test]
    fn parse_duration_accepts() {
        let cases: &[(&str, u64)] = &[
            ("1s", 1),
            ("90s", 90),
            ("30m", 30 * 60),
            ("12h", 12 * 3600),
            ("7d", 7 * 86_400),
            ("007s", 7),
            (" 5m ", 300),
            ("18446744073709551615s", u64::MAX),
            ("213503982334601d", 213_503_982_334_601 * 86_400),
        ];
        for (input, secs) in cases {
            assert_eq!(
                parse_duration(input),
                Ok(Duration::from_secs(*secs)),
                "parse_duration({input:?})"
            );
        }
    }

    #[test]
    fn parse_duration_rejects() {
        let expected = "expected a positive integer and a unit s, m, h or d";
        let cases: &[(&str, &str)] = &[
            ("", expected),
            ("s", expected),
            ("90", expected),
            ("0", expected),
            ("-5s", expected),
            ("+5s", expected),
            ("5 s", expected),
            ("1 0s", expected),
            ("1.5h", expected),
            ("5ms", expected),
            ("5sec", expected),
            ("5S", expected),
            ("5D", expected),
            ("1w", expected),
            ("1y", expected),
            ("1h30m", expected),
            ("d7", expected),
            ("5\u{e9}", expected),
            ("0s", "must be positive"),
            ("0d", "must be positive"),
            ("000m", "must be positive"),
            ("18446744073709551616s", "too large"),
            ("213503982334602d", "too large"),
            ("307445734561825861m", "too large"),
        ];
        for (input, reason) in cases {
            let err = parse_duration(input).expect_err(input);
            assert_eq!(err, format!("invalid duration {input:?}: {reason}"));
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn format_size_table() {
        let cases: &[(u64, &str)] = &[
            (0, "0 B"),
            (1, "1 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1024, "1 KiB"),
            (1536, "1.5 KiB"),
            (1075, "1 KiB"),   // 1.0498 rounds down
            (1076, "1.1 KiB"), // 1.0508 rounds up
            (10 * KI, "10 KiB"),
            (MI - 1, "1 MiB"), // would be "1024 KiB"
            (MI - 52, "1023.9 KiB"),
            (MI, "1 MiB"),
            (GI + GI / 2, "1.5 GiB"),
            (50 * GI, "50 GiB"),
            (TI, "1 TiB"),
            (1 << 50, "1 PiB"),
            (1 << 60, "1 EiB"),
            (u64::MAX, "16 EiB"),
        ];
        for (bytes, want) in cases {
            assert_eq!(format_size(*bytes), *want, "format_size({bytes})");
        }
    }

    #[test]
    fn whole_sizes_round_trip() {
        for bytes in [0, 1, 512, KI, 64 * KI, 3 * MI, 50 * GI, 2 * TI] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes), "{bytes}");
        }
    }
}
