//! An independent reference for conditional and range requests, transcribed from RFC 9110
//! §13.1–§13.2 and §14, shared by the exhaustive cross-product tests in `decide.rs` and the
//! random-input property tests in `proptests.rs`.
//!
//! It works on what each header *means* for the current revision (does a listed tag match
//! strongly? is the date before Last-Modified? which bytes does the range select?), never on the
//! header text, so it shares no parsing code with the implementation: a test builds a header
//! value and, separately, its meaning, and checks that `decide_read` / `decide_write` on the
//! value agree with this reference on the meaning.

use crate::decide::{ReadOutcome, WriteOutcome};
use crate::range::ByteRange;

/// The meaning of an `If-Match` or `If-None-Match` value for the current revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagCond {
    Absent,
    Star,
    /// A list (malformed members dropped): whether some member matches the current ETag by
    /// strong comparison, and whether some member matches by weak comparison. A strong match is
    /// also a weak match.
    List {
        strong: bool,
        weak: bool,
    },
}

/// The meaning of an `If-Modified-Since` or `If-Unmodified-Since` value: the date compared with
/// Last-Modified at whole seconds, or not a valid HTTP-date (then the header is ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DateCond {
    Absent,
    Before,
    Equal,
    After,
    Invalid,
}

/// The meaning of an `If-Range` value (§13.1.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfRangeCond {
    Absent,
    /// An entity-tag that strongly matches the current ETag.
    Holds,
    /// A weak or other entity-tag, or a value that is neither a tag nor a date.
    Fails,
    /// An HTTP-date, and whether it equals Last-Modified at whole seconds.
    Date {
        equal: bool,
    },
}

/// The meaning of a `Range` value against the current length (§14.1–§14.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeCond {
    Absent,
    /// Not a single valid byte range (bad syntax, another unit, several ranges): ignored.
    Ignored,
    /// Satisfiable, selecting these bytes.
    Selects(ByteRange),
    /// Satisfiable but with no byte to send: a positive suffix of an empty representation.
    SelectsEmpty,
    Unsatisfiable,
}

#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// Whether the key has a current revision.
    pub present: bool,
    pub if_match: TagCond,
    pub if_none_match: TagCond,
    pub if_modified_since: DateCond,
    pub if_unmodified_since: DateCond,
    pub if_range: IfRangeCond,
    pub range: RangeCond,
}

/// §13.2.2 for a GET or HEAD, step by step.
pub fn read(r: &Request) -> ReadOutcome {
    // §13.2.1: conditions are ignored when the response would otherwise not be 2xx; a missing
    // resource is a 404.
    if !r.present {
        return ReadOutcome::NotFound;
    }
    // Step 1: If-Match is true for `*` or a strongly matching listed tag. Step 2: only without
    // If-Match, If-Unmodified-Since is false when Last-Modified is later than the date.
    match r.if_match {
        TagCond::Star | TagCond::List { strong: true, .. } => {}
        TagCond::List { strong: false, .. } => return ReadOutcome::PreconditionFailed,
        TagCond::Absent => {
            if r.if_unmodified_since == DateCond::Before {
                return ReadOutcome::PreconditionFailed;
            }
        }
    }
    // Step 3: If-None-Match is false for `*` or a weakly matching listed tag, which for GET/HEAD
    // is a 304. Step 4: only without If-None-Match, If-Modified-Since is false (304) when
    // Last-Modified is not later than the date.
    match r.if_none_match {
        TagCond::Star | TagCond::List { weak: true, .. } => return ReadOutcome::NotModified,
        TagCond::List { weak: false, .. } => {}
        TagCond::Absent => {
            if matches!(r.if_modified_since, DateCond::Equal | DateCond::After) {
                return ReadOutcome::NotModified;
            }
        }
    }
    // Step 5 and §14.2: If-Range matters only with a Range; when it does not hold the Range is
    // ignored. §13.1.5: a date holds only if it is a strong validator (§8.8.2.2) equal to
    // Last-Modified. larder's Last-Modified never is one: two revisions written within one
    // second share it, and no tier or replica can rule that out, so a date never holds,
    // equal or not.
    let if_range_holds = match r.if_range {
        IfRangeCond::Absent | IfRangeCond::Holds => true,
        IfRangeCond::Fails | IfRangeCond::Date { .. } => false,
    };
    match r.range {
        RangeCond::Absent | RangeCond::Ignored => ReadOutcome::Full,
        _ if !if_range_holds => ReadOutcome::Full,
        RangeCond::Selects(b) => ReadOutcome::Partial(b),
        RangeCond::SelectsEmpty => ReadOutcome::Full,
        RangeCond::Unsatisfiable => ReadOutcome::RangeNotSatisfiable,
    }
}

/// §13.1.1–§13.1.2 for a PUT: If-Match is false without a current representation or without a
/// strong match; If-None-Match is false when a current representation exists and `*` or a
/// weakly matching tag was sent.
pub fn write(present: bool, if_match: TagCond, if_none_match: TagCond) -> WriteOutcome {
    let if_match_ok = match if_match {
        TagCond::Absent => true,
        TagCond::Star => present,
        TagCond::List { strong, .. } => present && strong,
    };
    let if_none_match_ok = match if_none_match {
        TagCond::Absent => true,
        TagCond::Star => !present,
        TagCond::List { weak, .. } => !(present && weak),
    };
    if if_match_ok && if_none_match_ok {
        WriteOutcome::Proceed
    } else {
        WriteOutcome::PreconditionFailed
    }
}
