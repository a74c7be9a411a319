//! Fuzzes `Range`, `Content-Range` and conditional-header parsing together with the decision
//! functions, asserting the invariants the server relies on rather than only "no panic".
//!
//! The input is text, one header value per line, so seeds stay readable:
//! `If-Match`, `If-None-Match`, `If-Modified-Since`, `If-Unmodified-Since`, `If-Range`, `Range`,
//! then the representation size (decimal) and `missing` for an absent key. A line that is
//! exactly `~` (or a missing line) is an absent header. `{E}` expands to the current ETag's
//! opaque tag and `{LM}` to its Last-Modified date, so the fuzzer reaches the matching branches.

#![no_main]

use larder_proto::range::{ByteRange, RangeSpec, parse_content_range};
use larder_proto::{
    ETag, EntityTag, ReadConditions, ReadOutcome, TagList, Validators, WriteOutcome,
    WritePrecondition, decide_read, decide_write,
};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, UNIX_EPOCH};

const LM: u64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let etag = ETag::of(b"current revision");
    let lm = UNIX_EPOCH + Duration::new(LM, 250_000_000);
    let lm_date = httpdate::fmt_http_date(lm);
    let lines: Vec<String> = text
        .split('\n')
        .map(|l| l.replace("{E}", etag.as_str()).replace("{LM}", &lm_date))
        .collect();
    let header = |i: usize| lines.get(i).map(String::as_str).filter(|l| *l != "~");

    for value in lines.iter() {
        check_range(value);
        check_content_range(value);
        check_tag_list(value);
    }

    let size = header(6).and_then(|s| s.parse::<u64>().ok()).unwrap_or(20);
    let present = header(7) != Some("missing");
    let cur = Validators {
        etag: etag.clone(),
        size,
        last_modified: lm,
    };
    let current = present.then_some(&cur);

    let cond = ReadConditions::from_headers(
        header(0),
        header(1),
        header(2),
        header(3),
        header(4),
        header(5),
    );
    let outcome = decide_read(&cond, current);
    assert_eq!(outcome, decide_read(&cond, current), "decide_read is pure");
    match outcome {
        ReadOutcome::NotFound => assert!(!present, "404 only for a missing key"),
        _ if !present => panic!("a missing key must be 404, got {outcome:?}"),
        ReadOutcome::PreconditionFailed => assert!(
            cond.if_match.is_some() || cond.if_unmodified_since.is_some(),
            "412 without If-Match or If-Unmodified-Since"
        ),
        ReadOutcome::NotModified => assert!(
            cond.if_none_match.is_some() || cond.if_modified_since.is_some(),
            "304 without If-None-Match or If-Modified-Since"
        ),
        ReadOutcome::Partial(r) => {
            assert!(cond.range.is_some(), "206 without a Range");
            assert_inside(r, size);
            // The 206's Content-Range must be what a client (ours) accepts for this range.
            assert_eq!(parse_content_range(&r.content_range(size)), Some((r, size)));
            // Under If-Range only a strongly matching entity-tag lets a range through: a date
            // cannot tell two revisions of one second apart.
            if let Some(if_range) = &cond.if_range {
                assert!(
                    EntityTag::parse(if_range).is_some_and(|t| t.strong_eq(&etag)),
                    "206 under If-Range {if_range:?}"
                );
            }
        }
        ReadOutcome::RangeNotSatisfiable => {
            let spec = cond.range.expect("416 without a Range");
            assert_eq!(spec.resolve(size), Err(()), "416 for a satisfiable range");
        }
        ReadOutcome::Full => {}
    }
    // An If-Match that names the current tag strongly never fails, whatever else is sent.
    if let Some(list) = &cond.if_match
        && list.matches_strong(&etag)
    {
        assert_ne!(
            outcome,
            ReadOutcome::PreconditionFailed,
            "If-Match {list:?} holds"
        );
    }
    if let Some(pinned) = cond.pinned_etag() {
        match &cond.if_match {
            Some(TagList::Tags(tags)) => {
                assert_eq!(tags.len(), 1);
                assert!(!tags[0].weak && tags[0].tag == pinned);
            }
            other => panic!("pinned_etag {pinned:?} from {other:?}"),
        }
    }

    let pre = WritePrecondition::from_headers(header(0), header(1));
    let write = decide_write(&pre, current);
    if pre.if_match.is_none() && pre.if_none_match.is_none() {
        assert_eq!(
            write,
            WriteOutcome::Proceed,
            "an unconditional write proceeds"
        );
    }
    if !present && pre.if_match.is_some() {
        assert_eq!(
            write,
            WriteOutcome::PreconditionFailed,
            "If-Match on a missing key"
        );
    }
    if present && pre.if_none_match == Some(TagList::Any) {
        assert_eq!(
            write,
            WriteOutcome::PreconditionFailed,
            "create-only on a present key"
        );
    }
});

fn assert_inside(r: ByteRange, size: u64) {
    assert!(r.len >= 1, "empty range {r:?}");
    let end = r.start.checked_add(r.len).expect("range end overflows");
    assert!(end <= size, "{r:?} beyond {size}");
    assert!(r.last() < size);
}

/// A parsed range renders back to a header that parses to the same range, and resolving it
/// either yields a range inside the object that round-trips through `Content-Range`, or is
/// unsatisfiable exactly when RFC 9110 §14.1.2 says so.
fn check_range(value: &str) {
    let Some(spec) = RangeSpec::parse(value) else {
        return;
    };
    let rendered = match spec {
        RangeSpec::FromTo(first, last) => {
            assert!(first <= last, "{value:?} parsed to {spec:?}");
            format!("bytes={first}-{last}")
        }
        RangeSpec::From(first) => format!("bytes={first}-"),
        RangeSpec::Suffix(n) => format!("bytes=-{n}"),
    };
    assert_eq!(RangeSpec::parse(&rendered), Some(spec), "{value:?}");
    let totals = [0, 1, 2, 20, 1 << 32, u64::MAX - 1, u64::MAX];
    for total in totals {
        match spec.resolve(total) {
            Ok(Some(r)) => {
                assert_inside(r, total);
                let cr = r.content_range(total);
                assert_eq!(parse_content_range(&cr), Some((r, total)), "{cr}");
                assert_eq!(
                    RangeSpec::parse(&r.to_header()).map(|s| s.resolve(total)),
                    Some(Ok(Some(r)))
                );
            }
            Ok(None) => assert!(
                total == 0 && matches!(spec, RangeSpec::Suffix(n) if n > 0),
                "{spec:?} against {total} gave the whole body"
            ),
            Err(()) => {
                let unsatisfiable = match spec {
                    RangeSpec::FromTo(first, _) | RangeSpec::From(first) => first >= total,
                    RangeSpec::Suffix(n) => n == 0,
                };
                assert!(unsatisfiable, "{spec:?} against {total} refused");
            }
        }
    }
}

/// Whatever `parse_content_range` accepts is a valid non-empty range inside its total and
/// renders back canonically.
fn check_content_range(value: &str) {
    if let Some((r, total)) = parse_content_range(value) {
        assert_inside(r, total);
        assert_eq!(
            parse_content_range(&r.content_range(total)),
            Some((r, total))
        );
    }
}

/// Every tag kept from a list re-parses on its own to the same tag.
fn check_tag_list(value: &str) {
    if let TagList::Tags(tags) = TagList::parse(value) {
        for tag in tags {
            let text = tag.to_string();
            assert_eq!(EntityTag::parse(&text), Some(tag), "{value:?}");
        }
    }
}
