//! Single byte ranges (RFC 9110 §14): parsing `Range: bytes=…` in its three forms, resolving it
//! against a representation length, and formatting `Content-Range`.
//!
//! larder serves one range per request; anything else (several ranges, another unit, bad syntax)
//! is "unsupported" and ignored, which RFC 9110 allows and which answers 200 with the whole body.

/// A syntactically valid single range, not yet resolved against a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=first-last` (last inclusive, last >= first)
    FromTo(u64, u64),
    /// `bytes=first-`
    From(u64),
    /// `bytes=-suffix_len`
    Suffix(u64),
}

/// A satisfiable range resolved against a length: `start..start+len`, `len >= 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// Offset of the first byte.
    pub start: u64,
    /// Number of bytes, at least 1.
    pub len: u64,
}

impl RangeSpec {
    /// Parses a `Range` header value. Returns None for anything larder ignores: other units,
    /// several ranges, bad syntax, `last < first`, numbers that overflow u64. Whitespace around
    /// the value and around `-` is not allowed by the grammar and makes it None too, except
    /// optional whitespace around the whole value.
    pub fn parse(header: &str) -> Option<RangeSpec> {
        let value = crate::etag::trim_ows(header);
        let (unit, set) = value.split_once('=')?;
        if !unit.eq_ignore_ascii_case("bytes") {
            return None;
        }
        let (first, last) = set.split_once('-')?;
        match (first.is_empty(), last.is_empty()) {
            (true, true) => None,
            (true, false) => Some(RangeSpec::Suffix(parse_digits(last)?)),
            (false, true) => Some(RangeSpec::From(parse_digits(first)?)),
            (false, false) => {
                let (first, last) = (parse_digits(first)?, parse_digits(last)?);
                (last >= first).then_some(RangeSpec::FromTo(first, last))
            }
        }
    }

    /// Resolves against a representation of `total` bytes. `Err(())` means unsatisfiable (416):
    /// `first >= total`, or a zero-length suffix. `last` beyond the end is clamped. A suffix
    /// longer than the body selects the whole body. For `total == 0` every form is unsatisfiable
    /// except a non-zero suffix, which resolves to `Ok(None)`: the whole (empty) body, answered 200.
    #[allow(clippy::result_unit_err)] // the signature is shared API; `()` is the only reason
    pub fn resolve(&self, total: u64) -> Result<Option<ByteRange>, ()> {
        match *self {
            RangeSpec::FromTo(first, last) => {
                if first >= total {
                    return Err(());
                }
                let last = last.min(total - 1);
                Ok(Some(ByteRange {
                    start: first,
                    len: last - first + 1,
                }))
            }
            RangeSpec::From(first) => {
                if first >= total {
                    return Err(());
                }
                Ok(Some(ByteRange {
                    start: first,
                    len: total - first,
                }))
            }
            RangeSpec::Suffix(0) => Err(()),
            // RFC 9110 §14.1.1: a positive suffix is satisfiable even against an empty
            // representation; there is no byte to put in a 206, so the whole (empty) body it is.
            RangeSpec::Suffix(_) if total == 0 => Ok(None),
            RangeSpec::Suffix(n) => {
                let len = n.min(total);
                Ok(Some(ByteRange {
                    start: total - len,
                    len,
                }))
            }
        }
    }
}

impl ByteRange {
    /// Inclusive last byte position.
    pub fn last(&self) -> u64 {
        // Saturating so that a hand-built empty range cannot panic a server; it is never
        // produced by `resolve`.
        self.start.saturating_add(self.len.saturating_sub(1))
    }
    /// The `Content-Range` value for a 206: `bytes first-last/total`.
    pub fn content_range(&self, total: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.last(), total)
    }
    /// The `Range` request value that asks for exactly this range.
    pub fn to_header(&self) -> String {
        format!("bytes={}-{}", self.start, self.last())
    }
}

/// The `Content-Range` value for a 416: `bytes */total`.
pub fn unsatisfied_content_range(total: u64) -> String {
    format!("bytes */{total}")
}

/// Parses a 206 response's `Content-Range: bytes first-last/total` (the client checks every
/// response against what it asked). None when malformed or `total` is `*`.
pub fn parse_content_range(header: &str) -> Option<(ByteRange, u64)> {
    let value = crate::etag::trim_ows(header);
    let (unit, resp) = value.split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, total) = resp.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total) = (
        parse_digits(first)?,
        parse_digits(last)?,
        parse_digits(total)?,
    );
    // RFC 9110 §14.4: a range with last < first or last >= complete-length is invalid.
    if last < first || last >= total {
        return None;
    }
    Some((
        ByteRange {
            start: first,
            len: last - first + 1,
        },
        total,
    ))
}

/// `1*DIGIT` as a u64. `u64::from_str` alone would also take a leading `+`.
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeSpec::{From, FromTo, Suffix};

    fn br(start: u64, len: u64) -> ByteRange {
        ByteRange { start, len }
    }

    #[test]
    fn parse_table() {
        let max = u64::MAX;
        let over = "18446744073709551616"; // u64::MAX + 1
        let cases: Vec<(String, Option<RangeSpec>)> = vec![
            ("bytes=0-0".into(), Some(FromTo(0, 0))),
            ("bytes=0-499".into(), Some(FromTo(0, 499))),
            ("bytes=500-999".into(), Some(FromTo(500, 999))),
            ("bytes=5-5".into(), Some(FromTo(5, 5))),
            ("bytes=9500-".into(), Some(From(9500))),
            ("bytes=0-".into(), Some(From(0))),
            ("bytes=-500".into(), Some(Suffix(500))),
            ("bytes=-0".into(), Some(Suffix(0))),
            ("bytes=007-010".into(), Some(FromTo(7, 10))),
            ("BYTES=1-2".into(), Some(FromTo(1, 2))),
            ("Bytes=1-".into(), Some(From(1))),
            ("  bytes=1-2  ".into(), Some(FromTo(1, 2))),
            ("\tbytes=-3\t".into(), Some(Suffix(3))),
            (format!("bytes=0-{max}"), Some(FromTo(0, max))),
            (format!("bytes={max}-"), Some(From(max))),
            (format!("bytes=-{max}"), Some(Suffix(max))),
            // last < first is invalid, not unsatisfiable.
            ("bytes=5-2".into(), None),
            ("bytes=1-0".into(), None),
            // Overflow.
            (format!("bytes=0-{over}"), None),
            (format!("bytes={over}-"), None),
            (format!("bytes=-{over}"), None),
            // Several ranges, even overlapping or with an empty element, are unsupported.
            ("bytes=0-1,2-3".into(), None),
            ("bytes=0-1, 2-3".into(), None),
            ("bytes=0-1,".into(), None),
            ("bytes=-1,-2".into(), None),
            // Other units and missing pieces.
            ("items=0-1".into(), None),
            ("byte=0-1".into(), None),
            ("bytesx=0-1".into(), None),
            ("0-1".into(), None),
            ("bytes".into(), None),
            ("bytes=".into(), None),
            ("bytes=-".into(), None),
            ("bytes=1".into(), None),
            ("bytes=--1".into(), None),
            ("bytes=1--2".into(), None),
            ("bytes=1-2-3".into(), None),
            ("bytes==1-2".into(), None),
            ("".into(), None),
            // Whitespace inside the value.
            ("bytes = 0-1".into(), None),
            ("bytes =0-1".into(), None),
            ("bytes= 0-1".into(), None),
            ("bytes=0 -1".into(), None),
            ("bytes=0- 1".into(), None),
            ("bytes=- 1".into(), None),
            // Digits only.
            ("bytes=+1-2".into(), None),
            ("bytes=1-+2".into(), None),
            ("bytes=-+2".into(), None),
            ("bytes=0x10-0x20".into(), None),
            ("bytes=1.5-2".into(), None),
            ("bytes=a-b".into(), None),
            ("bytes=\u{661}-2".into(), None), // Arabic-Indic digit one
        ];
        for (input, want) in cases {
            assert_eq!(
                RangeSpec::parse(&input),
                want,
                "RangeSpec::parse({input:?})"
            );
        }
    }

    #[test]
    fn resolve_table() {
        let max = u64::MAX;
        type Resolved = Result<Option<ByteRange>, ()>;
        let cases: &[(RangeSpec, u64, Resolved)] = &[
            // first-last
            (FromTo(0, 0), 10, Ok(Some(br(0, 1)))),
            (FromTo(0, 9), 10, Ok(Some(br(0, 10)))),
            (FromTo(2, 5), 10, Ok(Some(br(2, 4)))),
            (FromTo(9, 9), 10, Ok(Some(br(9, 1)))),
            (FromTo(5, 100), 10, Ok(Some(br(5, 5)))),
            (FromTo(0, max), 10, Ok(Some(br(0, 10)))),
            (FromTo(10, 10), 10, Err(())),
            (FromTo(10, 20), 10, Err(())),
            (FromTo(max, max), 10, Err(())),
            (FromTo(0, 0), 0, Err(())),
            (FromTo(0, max), max, Ok(Some(br(0, max)))),
            // first-
            (From(0), 10, Ok(Some(br(0, 10)))),
            (From(3), 10, Ok(Some(br(3, 7)))),
            (From(9), 10, Ok(Some(br(9, 1)))),
            (From(10), 10, Err(())),
            (From(11), 10, Err(())),
            (From(0), 0, Err(())),
            (From(max - 1), max, Ok(Some(br(max - 1, 1)))),
            // -suffix
            (Suffix(1), 10, Ok(Some(br(9, 1)))),
            (Suffix(4), 10, Ok(Some(br(6, 4)))),
            (Suffix(10), 10, Ok(Some(br(0, 10)))),
            (Suffix(11), 10, Ok(Some(br(0, 10)))),
            (Suffix(max), 10, Ok(Some(br(0, 10)))),
            (Suffix(0), 10, Err(())),
            (Suffix(0), 0, Err(())),
            (Suffix(1), 0, Ok(None)),
            (Suffix(max), 0, Ok(None)),
            (Suffix(1), 1, Ok(Some(br(0, 1)))),
        ];
        for (spec, total, want) in cases {
            let got = spec.resolve(*total);
            assert_eq!(&got, want, "{spec:?}.resolve({total})");
            if let Ok(Some(r)) = got {
                assert!(r.len >= 1 && r.last() < *total, "{r:?} within {total}");
            }
        }
    }

    #[test]
    fn parse_then_resolve() {
        // (header, total, outcome); None = header ignored.
        type Resolved = Option<Result<Option<ByteRange>, ()>>;
        let cases: &[(&str, u64, Resolved)] = &[
            ("bytes=0-499", 10_000, Some(Ok(Some(br(0, 500))))),
            ("bytes=-500", 10_000, Some(Ok(Some(br(9500, 500))))),
            ("bytes=9500-", 10_000, Some(Ok(Some(br(9500, 500))))),
            ("bytes=10000-", 10_000, Some(Err(()))),
            ("bytes=-0", 10_000, Some(Err(()))),
            ("bytes=5-2", 10_000, None),
            ("bytes=0-", 0, Some(Err(()))),
            ("bytes=-5", 0, Some(Ok(None))),
        ];
        for (header, total, want) in cases {
            let got = RangeSpec::parse(header).map(|s| s.resolve(*total));
            assert_eq!(&got, want, "{header:?} against {total}");
        }
    }

    #[test]
    fn byte_range_formatting() {
        let cases: &[(ByteRange, u64, u64, &str, &str)] = &[
            (br(0, 1), 1, 0, "bytes 0-0/1", "bytes=0-0"),
            (br(0, 500), 10_000, 499, "bytes 0-499/10000", "bytes=0-499"),
            (
                br(9500, 500),
                10_000,
                9999,
                "bytes 9500-9999/10000",
                "bytes=9500-9999",
            ),
            (
                br(0, u64::MAX),
                u64::MAX,
                u64::MAX - 1,
                "bytes 0-18446744073709551614/18446744073709551615",
                "bytes=0-18446744073709551614",
            ),
        ];
        for (r, total, last, content_range, header) in cases {
            assert_eq!(r.last(), *last);
            assert_eq!(r.content_range(*total), *content_range);
            assert_eq!(r.to_header(), *header);
            // to_header asks for exactly this range again.
            assert_eq!(
                RangeSpec::parse(header).unwrap().resolve(*total),
                Ok(Some(*r))
            );
        }
        assert_eq!(unsatisfied_content_range(0), "bytes */0");
        assert_eq!(unsatisfied_content_range(10_000), "bytes */10000");
        // An empty range, which resolve never yields, must not panic.
        assert_eq!(br(0, 0).last(), 0);
    }

    #[test]
    fn parse_content_range_table() {
        let cases: &[(&str, Option<(ByteRange, u64)>)] = &[
            ("bytes 0-499/10000", Some((br(0, 500), 10_000))),
            ("bytes 0-0/1", Some((br(0, 1), 1))),
            ("bytes 9999-9999/10000", Some((br(9999, 1), 10_000))),
            ("Bytes 1-2/3", Some((br(1, 2), 3))),
            (" bytes 1-2/3 ", Some((br(1, 2), 3))),
            ("bytes 0-499/*", None),
            ("bytes */10000", None),
            ("bytes 500-499/10000", None),
            ("bytes 0-10000/10000", None),
            ("bytes 0-0/0", None),
            ("bytes=0-499/10000", None),
            ("bytes  0-499/10000", None),
            ("bytes 0-499 /10000", None),
            ("bytes 0 -499/10000", None),
            ("items 0-499/10000", None),
            ("bytes 0-499", None),
            ("bytes 0/10000", None),
            ("bytes -499/10000", None),
            ("bytes 0-/10000", None),
            ("bytes 0-1/2/3", None),
            ("bytes +0-1/2", None),
            ("bytes 0-18446744073709551616/18446744073709551617", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                &parse_content_range(input),
                want,
                "parse_content_range({input:?})"
            );
        }
    }

    #[test]
    fn content_range_round_trips() {
        let totals = [1u64, 2, 10, 1000, 1 << 40, u64::MAX];
        for total in totals {
            let specs = [
                FromTo(0, 0),
                FromTo(0, total - 1),
                FromTo(total / 2, total / 2 + 7),
                From(0),
                From(total - 1),
                From(total / 3),
                Suffix(1),
                Suffix(total),
                Suffix(total / 2 + 1),
            ];
            for spec in specs {
                let r = spec.resolve(total).unwrap().unwrap();
                let value = r.content_range(total);
                assert_eq!(parse_content_range(&value), Some((r, total)), "{value}");
            }
        }
    }
}
