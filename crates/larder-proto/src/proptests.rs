//! Property tests on random inputs: the decision functions agree with the RFC 9110 reference in
//! `rfc_reference`, ranges round-trip through `Range` and `Content-Range`, and accepted names
//! survive Display → parse.
//!
//! Each header strategy yields a header value *and* what it means (does a tag match strongly?
//! which bytes does the range select?), computed from the generated parts rather than by
//! parsing the value, so the reference and the implementation share no parsing code. The
//! values include what clients really send and what they should not: weak tags, lists with
//! empty elements and stray whitespace, `*`, malformed members, all three HTTP-date forms,
//! garbage dates, several ranges, other units, overflowing numbers and leading zeros.

use crate::decide::{ReadConditions, Validators, WritePrecondition, decide_read, decide_write};
use crate::etag::ETag;
use crate::name::{Key, Namespace};
use crate::range::{ByteRange, RangeSpec, parse_content_range};
use crate::rfc_reference::{self as rfc, DateCond, IfRangeCond, RangeCond, TagCond};
use proptest::prelude::*;
use proptest::sample::select;
use std::time::{Duration, UNIX_EPOCH};

/// Last-Modified of the current revision in whole seconds; the stored time has a fraction too.
const LM: u64 = 1_700_000_000;

fn current() -> ETag {
    ETag::of(b"the current revision")
}

fn validators(size: u64) -> Validators {
    Validators {
        etag: current(),
        size,
        last_modified: UNIX_EPOCH + Duration::new(LM, 700_000_000),
    }
}

/// Optional whitespace as clients send it: none, spaces or tabs.
fn ows() -> impl Strategy<Value = &'static str> {
    select(vec!["", "", " ", "  ", "\t", " \t"])
}

// ---- Entity tags ----

#[derive(Clone, Debug)]
enum Member {
    Tag {
        weak: bool,
        tag: String,
    },
    /// Not an entity-tag; no `"` or `,`, so it cannot swallow its neighbours.
    Garbage(String),
}

fn member() -> impl Strategy<Value = Member> {
    let hex = current().as_str().to_owned();
    // Opaque tags may hold any etagc, including `,` and non-ASCII, but never `"` or a space
    // (SP is not an etagc): a quoted member with a space in it is malformed, and where such a
    // member ends is the parser's choice, not something a meaning can be computed for.
    let other = "[!#-~\u{e9}]{0,12}";
    prop_oneof![
        3 => any::<bool>().prop_map(move |weak| Member::Tag { weak, tag: hex.clone() }),
        3 => (any::<bool>(), other).prop_map(|(weak, tag)| Member::Tag { weak, tag }),
        1 => "[A-Za-z0-9/*.:;=+-]{1,10}".prop_map(Member::Garbage),
        1 => select(vec!["W/", "w/\"x\"", "W/x", "*", "W/*"]).prop_map(|g| Member::Garbage(g.into())),
    ]
}

/// An `If-Match` / `If-None-Match` value and its meaning; None = header absent.
fn tag_header() -> impl Strategy<Value = (Option<String>, TagCond)> {
    let list = (
        proptest::collection::vec(member(), 0..5),
        proptest::collection::vec(select(vec![",", ", ", " ,", ",,", " , ,\t", ",\t"]), 5),
        ows(),
        ows(),
        select(vec!["", "", ",", ", "]),
    )
        .prop_map(|(members, seps, lead, trail, extra)| {
            let hex = current().as_str().to_owned();
            let mut value = format!("{lead}{extra}");
            let (mut strong, mut weak_match) = (false, false);
            for (i, m) in members.iter().enumerate() {
                if i > 0 {
                    value.push_str(seps[i]);
                }
                match m {
                    Member::Tag { weak, tag } => {
                        value.push_str(&format!("{}\"{tag}\"", if *weak { "W/" } else { "" }));
                        weak_match |= *tag == hex;
                        strong |= *tag == hex && !weak;
                    }
                    Member::Garbage(g) => value.push_str(g),
                }
            }
            value.push_str(trail);
            // The whole value `*` (OWS aside) is the wildcard, not a one-member list.
            let meaning = if value.trim_matches([' ', '\t']) == "*" {
                TagCond::Star
            } else {
                TagCond::List {
                    strong,
                    weak: weak_match,
                }
            };
            (Some(value), meaning)
        });
    prop_oneof![
        2 => Just((None, TagCond::Absent)),
        1 => (ows(), ows()).prop_map(|(a, b)| (Some(format!("{a}*{b}")), TagCond::Star)),
        5 => list,
    ]
}

// ---- Dates ----

/// An HTTP-date `offset` seconds from Last-Modified, in one of the three forms RFC 9110 §5.6.7
/// requires recipients to accept.
fn http_date(offset: i64, form: u8) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(LM.checked_add_signed(offset).unwrap());
    let imf = httpdate::fmt_http_date(t); // "Tue, 14 Nov 2023 22:13:20 GMT"
    let parts: Vec<&str> = imf.split([' ', ',']).filter(|p| !p.is_empty()).collect();
    let (wday, day, mon, year, time) = (parts[0], parts[1], parts[2], parts[3], parts[4]);
    match form {
        0 => imf.clone(),
        1 => {
            let weekday = match wday {
                "Mon" => "Monday",
                "Tue" => "Tuesday",
                "Wed" => "Wednesday",
                "Thu" => "Thursday",
                "Fri" => "Friday",
                "Sat" => "Saturday",
                _ => "Sunday",
            };
            format!("{weekday}, {day}-{mon}-{} {time} GMT", &year[2..])
        }
        _ => format!(
            "{wday} {mon} {:>2} {time} {year}",
            day.trim_start_matches('0')
        ),
    }
}

fn offset() -> impl Strategy<Value = i64> {
    prop_oneof![-2i64..=2, -400 * 86_400i64..=400 * 86_400]
}

/// An `If-Modified-Since` / `If-Unmodified-Since` value and its meaning.
fn date_header() -> impl Strategy<Value = (Option<String>, DateCond)> {
    let valid = (offset(), 0u8..3, ows(), ows()).prop_map(|(off, form, a, b)| {
        let meaning = match off.cmp(&0) {
            std::cmp::Ordering::Less => DateCond::Before,
            std::cmp::Ordering::Equal => DateCond::Equal,
            std::cmp::Ordering::Greater => DateCond::After,
        };
        (Some(format!("{a}{}{b}", http_date(off, form))), meaning)
    });
    let invalid = prop_oneof![
        "[a-z ]{0,12}",
        Just("2023-11-14T22:13:20Z".to_owned()),
        Just("1700000000".to_owned()),
        Just("Tue, 14 Nov 2023 22:13:20".to_owned()),
        Just("Tue, 14 Nov 2023 25:13:20 GMT".to_owned()),
    ]
    .prop_map(|s| (Some(s), DateCond::Invalid));
    prop_oneof![2 => Just((None, DateCond::Absent)), 4 => valid, 1 => invalid]
}

// ---- If-Range ----

fn if_range_header() -> impl Strategy<Value = (Option<String>, IfRangeCond)> {
    let hex = current().as_str().to_owned();
    let tag = (any::<bool>(), any::<bool>(), "[!#-~]{0,8}", ows(), ows()).prop_map(
        move |(weak, is_current, other, a, b)| {
            let tag = if is_current { hex.clone() } else { other };
            let holds = !weak && tag == hex;
            let w = if weak { "W/" } else { "" };
            let meaning = if holds {
                IfRangeCond::Holds
            } else {
                IfRangeCond::Fails
            };
            (Some(format!("{a}{w}\"{tag}\"{b}")), meaning)
        },
    );
    let date = (offset(), 0u8..3, ows(), ows()).prop_map(|(off, form, a, b)| {
        let meaning = IfRangeCond::Date { equal: off == 0 };
        (Some(format!("{a}{}{b}", http_date(off, form))), meaning)
    });
    let hex2 = current().as_str().to_owned();
    let garbage = prop_oneof![
        "[a-z ]{0,12}".boxed(),
        // A bare tag or a list is not an entity-tag: the condition cannot hold.
        Just(hex2.clone()).boxed(),
        Just(format!("\"{hex2}\", \"{hex2}\"")).boxed(),
        Just("*".to_owned()).boxed(),
    ]
    .prop_map(|s| (Some(s), IfRangeCond::Fails));
    prop_oneof![
        3 => Just((None, IfRangeCond::Absent)),
        3 => tag,
        2 => date,
        1 => garbage,
    ]
}

// ---- Ranges ----

/// Range positions: small ones near typical sizes, any u64, and values just past u64::MAX.
fn position() -> impl Strategy<Value = u128> {
    prop_oneof![
        4 => 0u128..70,
        2 => any::<u64>().prop_map(u128::from),
        1 => (u128::from(u64::MAX) - 2)..=(u128::from(u64::MAX) + 2),
    ]
}

#[derive(Clone, Debug)]
enum RangeForm {
    FromTo(u128, u128),
    From(u128),
    Suffix(u128),
    /// Not a single byte range; ignored.
    Malformed(String),
}

fn digits(n: u128, zeros: usize) -> String {
    format!("{}{n}", "0".repeat(zeros))
}

fn range_header() -> impl Strategy<Value = (Option<String>, RangeForm)> {
    let unit = select(vec!["bytes", "bytes", "Bytes", "BYTES"]);
    let form = prop_oneof![
        (position(), position()).prop_map(|(a, b)| RangeForm::FromTo(a, b)),
        position().prop_map(RangeForm::From),
        position().prop_map(RangeForm::Suffix),
        select(vec![
            "bytes=0-1,2-3",
            "bytes=0-1,",
            "bytes=-1,-2",
            "items=0-1",
            "bytes 0-1",
            "bytes= 0-1",
            "bytes=0 -1",
            "bytes=-",
            "bytes=5",
            "bytes=",
            "bytes=+1-2",
            "bytes=1--2",
            "bytes=0x1-2",
            "",
        ])
        .prop_map(|s| RangeForm::Malformed(s.into())),
        // Random text is malformed only when it is not, by chance, a valid single range
        // ("bytes=0-" was once generated as "malformed").
        "[ -~]{0,12}"
            .prop_filter("a valid single range", |s| !is_single_range(s))
            .prop_map(|s| RangeForm::Malformed(format!("bytes={s}"))),
    ];
    let rendered = (form, unit, 0usize..3, ows(), ows()).prop_map(|(form, unit, zeros, a, b)| {
        let value = match &form {
            RangeForm::FromTo(x, y) => format!("{unit}={}-{}", digits(*x, zeros), digits(*y, 0)),
            RangeForm::From(x) => format!("{unit}={}-", digits(*x, zeros)),
            RangeForm::Suffix(n) => format!("{unit}=-{}", digits(*n, zeros)),
            RangeForm::Malformed(s) => s.clone(),
        };
        (Some(format!("{a}{value}{b}")), form)
    });
    prop_oneof![1 => Just((None, RangeForm::Malformed(String::new()))), 5 => rendered]
}

/// Whether `spec` (what follows `bytes=`) is one range of RFC 9110 §14.1.1, `first-[last]` or
/// `-suffix`, with the optional whitespace a header value may end with. Independent of the
/// parser under test.
fn is_single_range(spec: &str) -> bool {
    let spec = spec.trim_end_matches([' ', '\t']);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match spec.split_once('-') {
        Some(("", suffix)) => digits(suffix),
        Some((first, last)) => digits(first) && (last.is_empty() || digits(last)),
        None => false,
    }
}

/// §14.1.1–§14.1.2 on the generated numbers: what the range means for a representation of
/// `total` bytes.
fn range_meaning(header: &Option<String>, form: &RangeForm, total: u64) -> RangeCond {
    if header.is_none() {
        return RangeCond::Absent;
    }
    let max = u128::from(u64::MAX);
    let total = u128::from(total);
    let select = |first: u128, last: u128| {
        RangeCond::Selects(ByteRange {
            start: first as u64,
            len: (last - first + 1) as u64,
        })
    };
    match *form {
        RangeForm::Malformed(_) => RangeCond::Ignored,
        // A position that does not fit the server's integers is treated as invalid syntax.
        RangeForm::FromTo(a, b) if a > max || b > max || b < a => RangeCond::Ignored,
        RangeForm::From(a) | RangeForm::Suffix(a) if a > max => RangeCond::Ignored,
        RangeForm::FromTo(a, _) | RangeForm::From(a) if a >= total => RangeCond::Unsatisfiable,
        RangeForm::FromTo(a, b) => select(a, b.min(total - 1)),
        RangeForm::From(a) => select(a, total - 1),
        RangeForm::Suffix(0) => RangeCond::Unsatisfiable,
        RangeForm::Suffix(_) if total == 0 => RangeCond::SelectsEmpty,
        RangeForm::Suffix(n) => select(total - n.min(total), total - 1),
    }
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..64, 1 => any::<u64>(), 1 => Just(u64::MAX)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn decide_read_agrees_with_rfc_9110(
        present in any::<bool>(),
        size in size(),
        (im, im_cond) in tag_header(),
        (inm, inm_cond) in tag_header(),
        (ims, ims_cond) in date_header(),
        (ius, ius_cond) in date_header(),
        (ir, ir_cond) in if_range_header(),
        (range, range_form) in range_header(),
    ) {
        let cond = ReadConditions::from_headers(
            im.as_deref(),
            inm.as_deref(),
            ims.as_deref(),
            ius.as_deref(),
            ir.as_deref(),
            range.as_deref(),
        );
        let cur = validators(size);
        let want = rfc::read(&rfc::Request {
            present,
            if_match: im_cond,
            if_none_match: inm_cond,
            if_modified_since: ims_cond,
            if_unmodified_since: ius_cond,
            if_range: ir_cond,
            range: range_meaning(&range, &range_form, size),
        });
        prop_assert_eq!(decide_read(&cond, present.then_some(&cur)), want);
    }

    #[test]
    fn decide_write_agrees_with_rfc_9110(
        present in any::<bool>(),
        (im, im_cond) in tag_header(),
        (inm, inm_cond) in tag_header(),
    ) {
        let pre = WritePrecondition::from_headers(im.as_deref(), inm.as_deref());
        let cur = validators(20);
        prop_assert_eq!(
            decide_write(&pre, present.then_some(&cur)),
            rfc::write(present, im_cond, inm_cond)
        );
    }

    /// A resolved range is inside the object, its `Content-Range` parses back to it, and the
    /// `Range` header that asks for exactly it resolves to it again.
    #[test]
    fn resolved_ranges_round_trip(
        (header, form) in range_header(),
        total in size(),
    ) {
        let Some(header) = header else { return Ok(()) };
        let Some(spec) = RangeSpec::parse(&header) else {
            prop_assert_eq!(range_meaning(&Some(header), &form, total), RangeCond::Ignored);
            return Ok(());
        };
        match spec.resolve(total) {
            Ok(Some(r)) => {
                prop_assert!(r.len >= 1);
                prop_assert!(r.start.checked_add(r.len).is_some_and(|end| end <= total));
                prop_assert_eq!(parse_content_range(&r.content_range(total)), Some((r, total)));
                prop_assert_eq!(RangeSpec::parse(&r.to_header()).map(|s| s.resolve(total)),
                    Some(Ok(Some(r))));
            }
            Ok(None) => prop_assert!(total == 0),
            Err(()) => prop_assert_eq!(range_meaning(&Some(header), &form, total),
                RangeCond::Unsatisfiable),
        }
    }

    /// `parse_content_range` accepts exactly the valid `bytes first-last/total` values.
    #[test]
    fn content_range_parses_exactly_valid_values(
        first in position(), last in position(), total in position(), unit in select(vec!["bytes", "Bytes"]),
    ) {
        let value = format!("{unit} {first}-{last}/{total}");
        let max = u128::from(u64::MAX);
        let valid = first <= last && last < total && total <= max;
        let want = valid.then(|| (ByteRange { start: first as u64, len: (last - first + 1) as u64 }, total as u64));
        prop_assert_eq!(parse_content_range(&value), want);
    }

    #[test]
    fn accepted_namespaces_display_and_reparse(s in prop_oneof![
        "[a-z0-9][a-z0-9_-]{0,70}",
        "[ -~]{0,10}",
        "\\PC{0,8}",
    ]) {
        if let Ok(ns) = Namespace::parse(&s) {
            prop_assert!(s.len() <= 64);
            prop_assert_eq!(ns.to_string(), s.clone());
            prop_assert_eq!(Namespace::parse(&ns.to_string()), Ok(ns));
        } else {
            prop_assert!(s.len() > 64 || !s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-') || s.is_empty() || s.starts_with(['_', '-']));
        }
    }

    #[test]
    fn accepted_keys_display_and_reparse(s in prop_oneof![
        "[A-Za-z0-9._~/-]{1,20}",
        "([A-Za-z0-9._~-]{1,8}/){0,4}[A-Za-z0-9._~-]{1,8}",
        "[A-Za-z0-9._~%/\\\\-]{0,20}",
        "(%[0-9A-Fa-f]{2}|[a-z./]){1,12}",
        "k{500,520}",
        "\\PC{0,10}",
    ]) {
        if let Ok(key) = Key::parse(&s) {
            prop_assert_eq!(key.to_string(), s.clone());
            prop_assert_eq!(Key::parse(&key.to_string()), Ok(key.clone()));
            prop_assert_eq!(Key::from_url_path(&key.to_string()), Ok(key));
        }
        if let Ok(key) = Key::from_url_path(&s) {
            let shown = key.to_string();
            prop_assert!(!shown.split('/').any(|seg| seg.is_empty() || seg == "." || seg == ".."));
            prop_assert!(shown.len() <= 512 && !shown.contains(['%', '\0', '\\']));
            prop_assert_eq!(Key::parse(&shown), Ok(key.clone()));
            prop_assert_eq!(Key::from_url_path(&shown), Ok(key));
        }
    }
}
