//! The one pure function that decides every read outcome, and its sibling for writes.
//!
//! Evaluation follows RFC 9110 §13.2.2: If-Match, else If-Unmodified-Since; then If-None-Match,
//! else If-Modified-Since (GET/HEAD only); then If-Range and Range. A read of a missing key is 404
//! whatever its preconditions (§13.2.1); a write with If-Match to a missing key is 412.
//! Tiers call these functions with the validators of the revision they hold, and HTTP handlers
//! only translate the outcome into a status line and headers.

use crate::etag::{ETag, EntityTag, TagList, trim_ows};
use crate::range::{ByteRange, RangeSpec};
use std::time::{SystemTime, UNIX_EPOCH};

/// The validators of the current revision of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validators {
    /// Strong ETag of the revision: the BLAKE3 digest of its bytes.
    pub etag: ETag,
    /// Length of the revision's body in bytes; ranges are resolved against it.
    pub size: u64,
    /// Whole seconds (HTTP dates have no finer resolution).
    pub last_modified: SystemTime,
}

/// The conditional and range headers of a GET or HEAD, already parsed. Unparseable date headers
/// are None (RFC 9110 says to ignore them); a malformed `Range` is None (ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadConditions {
    /// `If-Match`: the read proceeds only if the current ETag strongly matches (or `*`).
    pub if_match: Option<TagList>,
    /// `If-None-Match`: a weak match with the current ETag answers 304.
    pub if_none_match: Option<TagList>,
    /// `If-Modified-Since`; consulted only when `if_none_match` is absent.
    pub if_modified_since: Option<SystemTime>,
    /// `If-Unmodified-Since`; consulted only when `if_match` is absent.
    pub if_unmodified_since: Option<SystemTime>,
    /// Raw `If-Range` value: an entity-tag (strong comparison), or anything else, which never
    /// matches (see `if_range_holds`).
    pub if_range: Option<String>,
    /// `Range`, when it is one syntactically valid byte range.
    pub range: Option<RangeSpec>,
}

impl ReadConditions {
    /// Builds the conditions from raw header values (`None` = header absent).
    pub fn from_headers(
        if_match: Option<&str>,
        if_none_match: Option<&str>,
        if_modified_since: Option<&str>,
        if_unmodified_since: Option<&str>,
        if_range: Option<&str>,
        range: Option<&str>,
    ) -> ReadConditions {
        let date = |v: Option<&str>| v.and_then(|v| httpdate::parse_http_date(trim_ows(v)).ok());
        ReadConditions {
            if_match: if_match.map(TagList::parse),
            if_none_match: if_none_match.map(TagList::parse),
            if_modified_since: date(if_modified_since),
            if_unmodified_since: date(if_unmodified_since),
            if_range: if_range.map(|v| trim_ows(v).to_owned()),
            range: range.and_then(RangeSpec::parse),
        }
    }

    /// A read pinned to one revision, optionally ranged: what the client sends for each chunk.
    pub fn pinned(etag: &ETag, range: Option<ByteRange>) -> ReadConditions {
        ReadConditions {
            if_match: Some(strong_list(etag)),
            range: range.map(|r| RangeSpec::FromTo(r.start, r.last())),
            ..ReadConditions::default()
        }
    }

    /// The ETag this read is pinned to, if `If-Match` names exactly one strong tag.
    pub fn pinned_etag(&self) -> Option<&str> {
        match &self.if_match {
            Some(TagList::Tags(tags)) => match tags.as_slice() {
                [only] if !only.weak => Some(&only.tag),
                _ => None,
            },
            _ => None,
        }
    }
}

/// What a GET or HEAD must answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// 404: no current revision.
    NotFound,
    /// 412: carries the current ETag.
    PreconditionFailed,
    /// 304: carries ETag and Last-Modified.
    NotModified,
    /// 200 with the whole body.
    Full,
    /// 206 with this range.
    Partial(ByteRange),
    /// 416 with `Content-Range: bytes */size`.
    RangeNotSatisfiable,
}

impl ReadOutcome {
    /// The bytes of a revision of `size` bytes this outcome sends: the whole body for `Full`,
    /// the range for `Partial`, none otherwise. Every tier reads exactly this.
    pub fn body_range(&self, size: u64) -> Option<ByteRange> {
        match self {
            ReadOutcome::Full => Some(ByteRange {
                start: 0,
                len: size,
            }),
            ReadOutcome::Partial(r) => Some(*r),
            _ => None,
        }
    }
}

/// Decides a GET/HEAD against the current revision (`None` = the key does not exist).
pub fn decide_read(cond: &ReadConditions, current: Option<&Validators>) -> ReadOutcome {
    // §13.2.1: preconditions are evaluated only when the request would otherwise succeed.
    let Some(cur) = current else {
        return ReadOutcome::NotFound;
    };
    // Only the date conditions need it; most reads carry none.
    let last_modified = || whole_seconds(cur.last_modified);

    // Step 1/2: If-Match, or else If-Unmodified-Since (§13.1.4: ignored when If-Match is sent).
    if let Some(if_match) = &cond.if_match {
        if !if_match.matches_strong(&cur.etag) {
            return ReadOutcome::PreconditionFailed;
        }
    } else if cond
        .if_unmodified_since
        .is_some_and(|date| last_modified() > whole_seconds(date))
    {
        return ReadOutcome::PreconditionFailed;
    }

    // Step 3/4: If-None-Match, or else If-Modified-Since (§13.1.3: ignored when If-None-Match
    // is sent). For GET/HEAD a false condition is a 304.
    if let Some(if_none_match) = &cond.if_none_match {
        if if_none_match.matches_weak(&cur.etag) {
            return ReadOutcome::NotModified;
        }
    } else if cond
        .if_modified_since
        .is_some_and(|date| last_modified() <= whole_seconds(date))
    {
        return ReadOutcome::NotModified;
    }

    // Step 5: If-Range only matters with a Range (§13.1.5: ignored without one).
    let Some(range) = cond.range else {
        return ReadOutcome::Full;
    };
    if cond
        .if_range
        .as_deref()
        .is_some_and(|if_range| !if_range_holds(if_range, cur))
    {
        return ReadOutcome::Full;
    }
    match range.resolve(cur.size) {
        Err(()) => ReadOutcome::RangeNotSatisfiable,
        Ok(None) => ReadOutcome::Full,
        Ok(Some(r)) => ReadOutcome::Partial(r),
    }
}

/// §13.2.2 step 5 and §13.1.5: an entity-tag must strongly match (a weak tag never does). A
/// date only counts when Last-Modified is a strong validator (§8.8.2.2), which larder cannot
/// promise: two writes within one second share a Last-Modified, and replicas and tiers cannot
/// rule out that the revision changed twice in its second. So a date never holds, and the
/// client that resumes with one gets the whole current body instead of a splice of two
/// revisions. Anything that is not an entity-tag (a date, garbage) sends the whole
/// representation, which is always safe for the client.
fn if_range_holds(value: &str, cur: &Validators) -> bool {
    EntityTag::parse(value).is_some_and(|tag| tag.strong_eq(&cur.etag))
}

/// Seconds since the epoch, floored: HTTP dates carry whole seconds, so a stored sub-second
/// modification time must compare equal to the header it was rendered into.
fn whole_seconds(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::from(d.as_secs()),
        Err(e) => {
            let d = e.duration();
            -i128::from(d.as_secs()) - i128::from(d.subsec_nanos() > 0)
        }
    }
}

fn strong_list(etag: &ETag) -> TagList {
    TagList::Tags(vec![EntityTag {
        weak: false,
        tag: etag.as_str().to_owned(),
    }])
}

/// The preconditions of a PUT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WritePrecondition {
    /// `If-Match`: the write needs a current revision that strongly matches (or any, for `*`).
    pub if_match: Option<TagList>,
    /// `If-None-Match`: `*` means create only; a list fails on a weak match with the current ETag.
    pub if_none_match: Option<TagList>,
}

impl WritePrecondition {
    /// Builds the precondition from raw header values (`None` = header absent).
    pub fn from_headers(if_match: Option<&str>, if_none_match: Option<&str>) -> WritePrecondition {
        WritePrecondition {
            if_match: if_match.map(TagList::parse),
            if_none_match: if_none_match.map(TagList::parse),
        }
    }
    /// `If-None-Match: *`: create only.
    pub fn create_only() -> WritePrecondition {
        WritePrecondition {
            if_match: None,
            if_none_match: Some(TagList::Any),
        }
    }
    /// `If-Match: "etag"`: compare-and-swap.
    pub fn replace_if(etag: &ETag) -> WritePrecondition {
        WritePrecondition {
            if_match: Some(strong_list(etag)),
            if_none_match: None,
        }
    }
}

/// What [`decide_write`] says about a PUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The preconditions hold: commit the new revision.
    Proceed,
    /// 412: a precondition is false; the current revision stays.
    PreconditionFailed,
}

/// Decides a PUT against the current revision at commit time (`None` = the key does not exist).
/// If-Match: `*` needs a current revision, a list needs a strong match, missing key → 412.
/// If-None-Match: `*` needs no current revision, a list fails on a weak match.
pub fn decide_write(pre: &WritePrecondition, current: Option<&Validators>) -> WriteOutcome {
    if let Some(if_match) = &pre.if_match {
        let holds = current.is_some_and(|cur| if_match.matches_strong(&cur.etag));
        if !holds {
            return WriteOutcome::PreconditionFailed;
        }
    }
    if let Some(if_none_match) = &pre.if_none_match {
        // A list compares weakly (§13.1.2), so `W/"e"` protects against overwriting `"e"`.
        let fails = current.is_some_and(|cur| if_none_match.matches_weak(&cur.etag));
        if fails {
            return WriteOutcome::PreconditionFailed;
        }
    }
    WriteOutcome::Proceed
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_body_outcome_names_the_bytes_it_sends_and_no_other_outcome_sends_any() {
        let r = ByteRange { start: 3, len: 4 };
        assert_eq!(
            ReadOutcome::Full.body_range(10),
            Some(ByteRange { start: 0, len: 10 })
        );
        assert_eq!(ReadOutcome::Partial(r).body_range(10), Some(r));
        for o in [
            ReadOutcome::NotFound,
            ReadOutcome::PreconditionFailed,
            ReadOutcome::NotModified,
            ReadOutcome::RangeNotSatisfiable,
        ] {
            assert_eq!(o.body_range(10), None, "{o:?}");
        }
    }

    use super::*;
    use std::time::Duration;

    const BODY: &[u8] = b"0123456789abcdefghij";
    const SIZE: u64 = 20;
    /// Last-Modified, in whole seconds; the stored time carries a fraction on top.
    const LM: u64 = 1_700_000_000;

    fn lm_time() -> SystemTime {
        UNIX_EPOCH + Duration::new(LM, 700_000_000)
    }

    fn etag() -> ETag {
        ETag::of(BODY)
    }

    fn other_etag() -> ETag {
        ETag::of(b"some other revision")
    }

    fn validators() -> Validators {
        Validators {
            etag: etag(),
            size: SIZE,
            last_modified: lm_time(),
        }
    }

    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn br(start: u64, len: u64) -> ByteRange {
        ByteRange { start, len }
    }

    use ReadOutcome::{
        Full, NotFound, NotModified, Partial, PreconditionFailed, RangeNotSatisfiable,
    };

    // ---- The cross product, checked against a reference written from RFC 9110 §13.2.2 ----

    #[derive(Clone, Copy, Debug)]
    enum IfMatch {
        Absent,
        Star,
        Matching,
        NonMatching,
        WeakMatching,
        ListWithMatch,
        Garbage,
    }

    #[derive(Clone, Copy, Debug)]
    enum IfNoneMatch {
        Absent,
        Star,
        Matching,
        WeakMatching,
        NonMatching,
        ListWithMatch,
        Garbage,
    }

    #[derive(Clone, Copy, Debug)]
    enum Date {
        Absent,
        /// One second before Last-Modified.
        Before,
        /// Last-Modified as the server sent it (its fraction dropped).
        Equal,
        After,
        /// Not an HTTP-date: the header is ignored.
        Garbage,
    }

    #[derive(Clone, Copy, Debug)]
    enum IfRange {
        Absent,
        MatchingEtag,
        NonMatchingEtag,
        WeakEtag,
        MatchingDate,
        EarlierDate,
        LaterDate,
        Garbage,
    }

    #[derive(Clone, Copy, Debug)]
    enum Range {
        Absent,
        Valid,
        Suffix,
        WholeBody,
        Unsatisfiable,
        Malformed,
    }

    #[derive(Clone, Copy, Debug)]
    struct Case {
        present: bool,
        im: IfMatch,
        inm: IfNoneMatch,
        ims: Date,
        ius: Date,
        ir: IfRange,
        range: Range,
    }

    impl Case {
        fn headers(&self) -> ReadConditions {
            let e = etag().header_value();
            let o = other_etag().header_value();
            let im = match self.im {
                IfMatch::Absent => None,
                IfMatch::Star => Some("*".to_owned()),
                IfMatch::Matching => Some(e.clone()),
                IfMatch::NonMatching => Some(o.clone()),
                IfMatch::WeakMatching => Some(format!("W/{e}")),
                IfMatch::ListWithMatch => Some(format!("{o}, W/{o} ,{e}")),
                IfMatch::Garbage => Some("not-a-tag".to_owned()),
            };
            let inm = match self.inm {
                IfNoneMatch::Absent => None,
                IfNoneMatch::Star => Some("*".to_owned()),
                IfNoneMatch::Matching => Some(e.clone()),
                IfNoneMatch::WeakMatching => Some(format!("W/{e}")),
                IfNoneMatch::NonMatching => Some(format!("{o}, W/{o}")),
                IfNoneMatch::ListWithMatch => Some(format!("{o},  W/{e}")),
                IfNoneMatch::Garbage => Some("\"unterminated".to_owned()),
            };
            let date_header = |d: Date| match d {
                Date::Absent => None,
                Date::Before => Some(date(LM - 1)),
                Date::Equal => Some(date(LM)),
                Date::After => Some(date(LM + 1)),
                Date::Garbage => Some("yesterday".to_owned()),
            };
            let ir = match self.ir {
                IfRange::Absent => None,
                IfRange::MatchingEtag => Some(e.clone()),
                IfRange::NonMatchingEtag => Some(o.clone()),
                IfRange::WeakEtag => Some(format!("W/{e}")),
                IfRange::MatchingDate => Some(date(LM)),
                IfRange::EarlierDate => Some(date(LM - 1)),
                IfRange::LaterDate => Some(date(LM + 1)),
                IfRange::Garbage => Some("sometime".to_owned()),
            };
            let range = match self.range {
                Range::Absent => None,
                Range::Valid => Some("bytes=2-5"),
                Range::Suffix => Some("bytes=-5"),
                Range::WholeBody => Some("bytes=0-"),
                Range::Unsatisfiable => Some("bytes=20-"),
                Range::Malformed => Some("bytes=5-2"),
            };
            ReadConditions::from_headers(
                im.as_deref(),
                inm.as_deref(),
                date_header(self.ims).as_deref(),
                date_header(self.ius).as_deref(),
                ir.as_deref(),
                range,
            )
        }
    }

    /// What each header of the case means for the current revision, for the RFC 9110 reference
    /// in `rfc_reference` (shared with the property tests).
    fn reference(c: &Case) -> ReadOutcome {
        use crate::rfc_reference::{self as rfc, DateCond, IfRangeCond, RangeCond, TagCond};
        let list = |strong, weak| TagCond::List { strong, weak };
        let if_match = match c.im {
            IfMatch::Absent => TagCond::Absent,
            IfMatch::Star => TagCond::Star,
            IfMatch::Matching | IfMatch::ListWithMatch => list(true, true),
            IfMatch::WeakMatching => list(false, true),
            IfMatch::NonMatching | IfMatch::Garbage => list(false, false),
        };
        let if_none_match = match c.inm {
            IfNoneMatch::Absent => TagCond::Absent,
            IfNoneMatch::Star => TagCond::Star,
            IfNoneMatch::Matching => list(true, true),
            IfNoneMatch::WeakMatching | IfNoneMatch::ListWithMatch => list(false, true),
            IfNoneMatch::NonMatching | IfNoneMatch::Garbage => list(false, false),
        };
        let date = |d: Date| match d {
            Date::Absent => DateCond::Absent,
            Date::Before => DateCond::Before,
            Date::Equal => DateCond::Equal,
            Date::After => DateCond::After,
            Date::Garbage => DateCond::Invalid,
        };
        let if_range = match c.ir {
            IfRange::Absent => IfRangeCond::Absent,
            IfRange::MatchingEtag => IfRangeCond::Holds,
            IfRange::NonMatchingEtag | IfRange::WeakEtag | IfRange::Garbage => IfRangeCond::Fails,
            IfRange::MatchingDate => IfRangeCond::Date { equal: true },
            IfRange::EarlierDate | IfRange::LaterDate => IfRangeCond::Date { equal: false },
        };
        let range = match c.range {
            Range::Absent => RangeCond::Absent,
            Range::Malformed => RangeCond::Ignored,
            Range::Valid => RangeCond::Selects(br(2, 4)),
            Range::Suffix => RangeCond::Selects(br(15, 5)),
            Range::WholeBody => RangeCond::Selects(br(0, SIZE)),
            Range::Unsatisfiable => RangeCond::Unsatisfiable,
        };
        rfc::read(&rfc::Request {
            present: c.present,
            if_match,
            if_none_match,
            if_modified_since: date(c.ims),
            if_unmodified_since: date(c.ius),
            if_range,
            range,
        })
    }

    #[test]
    fn decide_read_cross_product_matches_reference() {
        use Date as D;
        use IfMatch as M;
        use IfNoneMatch as N;
        use IfRange as R;
        let ims_all = [D::Absent, D::Before, D::Equal, D::After, D::Garbage];
        let cur = validators();
        let mut checked = 0usize;
        let mut seen = std::collections::HashSet::new();
        let mut failures = Vec::new();
        for present in [false, true] {
            for im in [
                M::Absent,
                M::Star,
                M::Matching,
                M::NonMatching,
                M::WeakMatching,
                M::ListWithMatch,
                M::Garbage,
            ] {
                for inm in [
                    N::Absent,
                    N::Star,
                    N::Matching,
                    N::WeakMatching,
                    N::NonMatching,
                    N::ListWithMatch,
                    N::Garbage,
                ] {
                    for ims in ims_all {
                        for ius in ims_all {
                            for ir in [
                                R::Absent,
                                R::MatchingEtag,
                                R::NonMatchingEtag,
                                R::WeakEtag,
                                R::MatchingDate,
                                R::EarlierDate,
                                R::LaterDate,
                                R::Garbage,
                            ] {
                                for range in [
                                    Range::Absent,
                                    Range::Valid,
                                    Range::Suffix,
                                    Range::WholeBody,
                                    Range::Unsatisfiable,
                                    Range::Malformed,
                                ] {
                                    let case = Case {
                                        present,
                                        im,
                                        inm,
                                        ims,
                                        ius,
                                        ir,
                                        range,
                                    };
                                    let want = reference(&case);
                                    let got = decide_read(&case.headers(), present.then_some(&cur));
                                    if got != want {
                                        failures
                                            .push(format!("{case:?}: got {got:?}, want {want:?}"));
                                    }
                                    seen.insert(std::mem::discriminant(&want));
                                    checked += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 7 * 7 * 5 * 5 * 8 * 6);
        assert_eq!(seen.len(), 6, "every outcome is exercised");
        assert!(
            failures.is_empty(),
            "{} of {checked} cases differ, e.g.:\n{}",
            failures.len(),
            failures[..failures.len().min(20)].join("\n")
        );
    }

    // ---- Named rows with literal expectations ----

    /// Header templates: `{E}` is the current ETag's opaque tag, `{O}` another revision's,
    /// `{LM}` / `{LM-1}` / `{LM+1}` HTTP-dates around Last-Modified.
    fn expand(template: &str) -> String {
        template
            .replace("{E}", etag().as_str())
            .replace("{O}", other_etag().as_str())
            .replace("{LM-1}", &date(LM - 1))
            .replace("{LM+1}", &date(LM + 1))
            .replace("{LM}", &date(LM))
    }

    struct Row {
        name: &'static str,
        present: bool,
        if_match: Option<&'static str>,
        if_none_match: Option<&'static str>,
        if_modified_since: Option<&'static str>,
        if_unmodified_since: Option<&'static str>,
        if_range: Option<&'static str>,
        range: Option<&'static str>,
        want: ReadOutcome,
    }

    const ROW: Row = Row {
        name: "",
        present: true,
        if_match: None,
        if_none_match: None,
        if_modified_since: None,
        if_unmodified_since: None,
        if_range: None,
        range: None,
        want: Full,
    };

    #[rustfmt::skip]
    fn rows() -> Vec<Row> {
        vec![
            Row { name: "plain GET", ..ROW },
            Row { name: "missing key", present: false, want: NotFound, ..ROW },
            Row { name: "missing key ignores If-Match *", present: false, if_match: Some("*"), want: NotFound, ..ROW },
            Row { name: "missing key ignores failing If-Match", present: false, if_match: Some("\"{O}\""), want: NotFound, ..ROW },
            Row { name: "missing key ignores If-None-Match *", present: false, if_none_match: Some("*"), want: NotFound, ..ROW },
            Row { name: "missing key ignores Range", present: false, range: Some("bytes=0-1"), want: NotFound, ..ROW },
            Row { name: "missing key ignores If-Unmodified-Since", present: false, if_unmodified_since: Some("{LM-1}"), want: NotFound, ..ROW },
            Row { name: "If-Match * passes", if_match: Some("*"), ..ROW },
            Row { name: "If-Match strong match passes", if_match: Some("\"{E}\""), ..ROW },
            Row { name: "If-Match other tag fails", if_match: Some("\"{O}\""), want: PreconditionFailed, ..ROW },
            Row { name: "If-Match weak tag fails strong comparison", if_match: Some("W/\"{E}\""), want: PreconditionFailed, ..ROW },
            Row { name: "If-Match list containing the tag passes", if_match: Some("\"{O}\", \"{E}\""), ..ROW },
            Row { name: "If-Match list with only a weak match fails", if_match: Some("\"{O}\", W/\"{E}\""), want: PreconditionFailed, ..ROW },
            Row { name: "If-Match garbage fails", if_match: Some("garbage"), want: PreconditionFailed, ..ROW },
            Row { name: "If-Match empty fails", if_match: Some(""), want: PreconditionFailed, ..ROW },
            Row { name: "If-Match bare (unquoted) tag fails", if_match: Some("{E}"), want: PreconditionFailed, ..ROW },
            Row { name: "If-Match failure beats If-None-Match", if_match: Some("\"{O}\""), if_none_match: Some("*"), want: PreconditionFailed, ..ROW },
            Row { name: "If-Match failure beats Range", if_match: Some("\"{O}\""), range: Some("bytes=0-1"), want: PreconditionFailed, ..ROW },
            Row { name: "If-Match pass then If-None-Match match is 304", if_match: Some("\"{E}\""), if_none_match: Some("\"{E}\""), want: NotModified, ..ROW },
            Row { name: "If-None-Match * is 304", if_none_match: Some("*"), want: NotModified, ..ROW },
            Row { name: "If-None-Match strong match is 304", if_none_match: Some("\"{E}\""), want: NotModified, ..ROW },
            Row { name: "If-None-Match weak match is 304", if_none_match: Some("W/\"{E}\""), want: NotModified, ..ROW },
            Row { name: "If-None-Match other tag is 200", if_none_match: Some("\"{O}\""), ..ROW },
            Row { name: "If-None-Match list with a match is 304", if_none_match: Some("\"{O}\",W/\"{E}\""), want: NotModified, ..ROW },
            Row { name: "If-None-Match garbage is 200", if_none_match: Some("nope"), ..ROW },
            Row { name: "If-None-Match 304 beats Range", if_none_match: Some("\"{E}\""), range: Some("bytes=0-1"), want: NotModified, ..ROW },
            Row { name: "If-None-Match 304 beats unsatisfiable Range", if_none_match: Some("*"), range: Some("bytes=99-"), want: NotModified, ..ROW },
            Row { name: "If-None-Match miss then Range is 206", if_none_match: Some("\"{O}\""), range: Some("bytes=0-1"), want: Partial(br(0, 2)), ..ROW },
            Row { name: "If-Unmodified-Since before Last-Modified fails", if_unmodified_since: Some("{LM-1}"), want: PreconditionFailed, ..ROW },
            Row { name: "If-Unmodified-Since equal passes", if_unmodified_since: Some("{LM}"), ..ROW },
            Row { name: "If-Unmodified-Since after passes", if_unmodified_since: Some("{LM+1}"), ..ROW },
            Row { name: "If-Unmodified-Since garbage is ignored", if_unmodified_since: Some("soon"), ..ROW },
            Row { name: "If-Match present: If-Unmodified-Since ignored", if_match: Some("\"{E}\""), if_unmodified_since: Some("{LM-1}"), ..ROW },
            Row { name: "If-Match * present: If-Unmodified-Since ignored", if_match: Some("*"), if_unmodified_since: Some("{LM-1}"), ..ROW },
            Row { name: "If-Modified-Since equal is 304", if_modified_since: Some("{LM}"), want: NotModified, ..ROW },
            Row { name: "If-Modified-Since after is 304", if_modified_since: Some("{LM+1}"), want: NotModified, ..ROW },
            Row { name: "If-Modified-Since before is 200", if_modified_since: Some("{LM-1}"), ..ROW },
            Row { name: "If-Modified-Since garbage is ignored", if_modified_since: Some("recently"), ..ROW },
            Row { name: "If-None-Match present: If-Modified-Since ignored (miss)", if_none_match: Some("\"{O}\""), if_modified_since: Some("{LM+1}"), ..ROW },
            Row { name: "If-None-Match present: If-Modified-Since ignored (match)", if_none_match: Some("\"{E}\""), if_modified_since: Some("{LM-1}"), want: NotModified, ..ROW },
            Row { name: "If-Unmodified-Since failure beats If-Modified-Since", if_unmodified_since: Some("{LM-1}"), if_modified_since: Some("{LM}"), want: PreconditionFailed, ..ROW },
            Row { name: "If-Modified-Since 304 beats Range", if_modified_since: Some("{LM}"), range: Some("bytes=0-1"), want: NotModified, ..ROW },
            Row { name: "Range first-last", range: Some("bytes=2-5"), want: Partial(br(2, 4)), ..ROW },
            Row { name: "Range first-", range: Some("bytes=15-"), want: Partial(br(15, 5)), ..ROW },
            Row { name: "Range suffix", range: Some("bytes=-3"), want: Partial(br(17, 3)), ..ROW },
            Row { name: "Range suffix longer than body", range: Some("bytes=-100"), want: Partial(br(0, 20)), ..ROW },
            Row { name: "Range last clamped", range: Some("bytes=10-100"), want: Partial(br(10, 10)), ..ROW },
            Row { name: "Range whole body is still 206", range: Some("bytes=0-19"), want: Partial(br(0, 20)), ..ROW },
            Row { name: "Range first == size is 416", range: Some("bytes=20-25"), want: RangeNotSatisfiable, ..ROW },
            Row { name: "Range -0 is 416", range: Some("bytes=-0"), want: RangeNotSatisfiable, ..ROW },
            Row { name: "Range malformed is ignored", range: Some("bytes=5-2"), ..ROW },
            Row { name: "Range with several ranges is ignored", range: Some("bytes=0-1,3-4"), ..ROW },
            Row { name: "Range in another unit is ignored", range: Some("items=0-1"), ..ROW },
            Row { name: "If-Range without Range is ignored", if_range: Some("\"{O}\""), ..ROW },
            Row { name: "If-Range matching etag applies Range", if_range: Some("\"{E}\""), range: Some("bytes=2-5"), want: Partial(br(2, 4)), ..ROW },
            Row { name: "If-Range other etag sends whole body", if_range: Some("\"{O}\""), range: Some("bytes=2-5"), ..ROW },
            Row { name: "If-Range weak etag sends whole body", if_range: Some("W/\"{E}\""), range: Some("bytes=2-5"), ..ROW },
            Row { name: "If-Range matching date sends whole body (a date is a weak validator)", if_range: Some("{LM}"), range: Some("bytes=2-5"), ..ROW },
            Row { name: "If-Range matching date hides unsatisfiable Range", if_range: Some("{LM}"), range: Some("bytes=99-"), ..ROW },
            Row { name: "If-Range earlier date sends whole body", if_range: Some("{LM-1}"), range: Some("bytes=2-5"), ..ROW },
            Row { name: "If-Range later date sends whole body", if_range: Some("{LM+1}"), range: Some("bytes=2-5"), ..ROW },
            Row { name: "If-Range garbage sends whole body", if_range: Some("whenever"), range: Some("bytes=2-5"), ..ROW },
            Row { name: "If-Range bare etag is garbage", if_range: Some("{E}"), range: Some("bytes=2-5"), ..ROW },
            Row { name: "If-Range list is garbage", if_range: Some("\"{E}\", \"{O}\""), range: Some("bytes=2-5"), ..ROW },
            Row { name: "If-Range mismatch hides unsatisfiable Range", if_range: Some("\"{O}\""), range: Some("bytes=99-"), ..ROW },
            Row { name: "If-Range match then unsatisfiable Range is 416", if_range: Some("\"{E}\""), range: Some("bytes=99-"), want: RangeNotSatisfiable, ..ROW },
            Row { name: "pinned chunk", if_match: Some("\"{E}\""), range: Some("bytes=16-19"), want: Partial(br(16, 4)), ..ROW },
            Row { name: "pinned chunk of replaced object", if_match: Some("\"{O}\""), range: Some("bytes=16-19"), want: PreconditionFailed, ..ROW },
            Row { name: "everything passing", if_match: Some("\"{E}\""), if_none_match: Some("\"{O}\""), if_modified_since: Some("{LM}"), if_unmodified_since: Some("{LM-1}"), if_range: Some("\"{E}\""), range: Some("bytes=-4"), want: Partial(br(16, 4)), ..ROW },
        ]
    }

    #[test]
    fn decide_read_named_rows() {
        let cur = validators();
        let rows = rows();
        assert!(rows.len() >= 40);
        for row in &rows {
            let h = |v: Option<&str>| v.map(expand);
            let cond = ReadConditions::from_headers(
                h(row.if_match).as_deref(),
                h(row.if_none_match).as_deref(),
                h(row.if_modified_since).as_deref(),
                h(row.if_unmodified_since).as_deref(),
                h(row.if_range).as_deref(),
                h(row.range).as_deref(),
            );
            let got = decide_read(&cond, row.present.then_some(&cur));
            assert_eq!(got, row.want, "{}", row.name);
        }
    }

    // ---- Edge cases outside the matrix ----

    #[test]
    fn dates_compare_at_whole_seconds() {
        let cur = validators(); // LM + 0.7 s
        let just_before_in_same_second = UNIX_EPOCH + Duration::new(LM, 100_000_000);
        let end_of_previous_second = UNIX_EPOCH + Duration::new(LM - 1, 999_999_999);
        let with = |ims: Option<SystemTime>, ius: Option<SystemTime>| ReadConditions {
            if_modified_since: ims,
            if_unmodified_since: ius,
            ..ReadConditions::default()
        };
        let cases = [
            (with(Some(just_before_in_same_second), None), NotModified),
            (with(Some(end_of_previous_second), None), Full),
            (with(None, Some(just_before_in_same_second)), Full),
            (with(None, Some(end_of_previous_second)), PreconditionFailed),
        ];
        for (cond, want) in cases {
            assert_eq!(decide_read(&cond, Some(&cur)), want, "{cond:?}");
        }
        // If-Range with the very date the server rendered is still not a match: another revision
        // written in the same second would render the same date.
        let cond = ReadConditions {
            if_range: Some(httpdate::fmt_http_date(cur.last_modified)),
            range: Some(RangeSpec::FromTo(0, 0)),
            ..ReadConditions::default()
        };
        assert_eq!(decide_read(&cond, Some(&cur)), Full);
    }

    #[test]
    fn whole_seconds_floors() {
        let cases = [
            (UNIX_EPOCH, 0),
            (UNIX_EPOCH + Duration::new(5, 999_999_999), 5),
            (UNIX_EPOCH - Duration::new(1, 0), -1),
            (UNIX_EPOCH - Duration::new(0, 1), -1),
            (UNIX_EPOCH - Duration::new(1, 500_000_000), -2),
        ];
        for (t, want) in cases {
            assert_eq!(whole_seconds(t), want, "{t:?}");
        }
    }

    #[test]
    fn empty_body_ranges() {
        let cur = Validators {
            etag: ETag::of(b""),
            size: 0,
            last_modified: lm_time(),
        };
        let cases = [
            ("bytes=0-", RangeNotSatisfiable),
            ("bytes=0-0", RangeNotSatisfiable),
            ("bytes=-0", RangeNotSatisfiable),
            ("bytes=-1", Full),
            ("bytes=-1000", Full),
            ("bytes=1-0", Full),
        ];
        for (range, want) in cases {
            let cond = ReadConditions::from_headers(None, None, None, None, None, Some(range));
            assert_eq!(decide_read(&cond, Some(&cur)), want, "{range}");
        }
    }

    #[test]
    fn from_headers_parses_each_field() {
        let e = etag();
        let imf = "Sun, 06 Nov 1994 08:49:37 GMT";
        let t1994 = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let cond = ReadConditions::from_headers(
            Some(&e.header_value()),
            Some("*"),
            Some(imf),
            Some("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(&format!("  {}  ", e.header_value())),
            Some(" bytes=1-2 "),
        );
        assert_eq!(
            cond,
            ReadConditions {
                if_match: Some(TagList::parse(&e.header_value())),
                if_none_match: Some(TagList::Any),
                if_modified_since: Some(t1994),
                if_unmodified_since: Some(t1994),
                if_range: Some(e.header_value()),
                range: Some(RangeSpec::FromTo(1, 2)),
            }
        );
        // asctime is the third accepted date form; anything else is dropped.
        let c = ReadConditions::from_headers(
            None,
            None,
            Some("Sun Nov  6 08:49:37 1994"),
            None,
            None,
            None,
        );
        assert_eq!(c.if_modified_since, Some(t1994));
        let c = ReadConditions::from_headers(
            None,
            None,
            Some("1994-11-06T08:49:37Z"),
            Some(""),
            None,
            Some("bytes=x"),
        );
        assert_eq!(c, ReadConditions::default());
        assert_eq!(
            ReadConditions::from_headers(None, None, None, None, None, None),
            ReadConditions::default()
        );
    }

    #[test]
    fn pinned_reads() {
        let e = etag();
        let cur = validators();
        let chunk = br(4, 8);
        let pinned = ReadConditions::pinned(&e, Some(chunk));
        assert_eq!(pinned.pinned_etag(), Some(e.as_str()));
        assert_eq!(decide_read(&pinned, Some(&cur)), Partial(chunk));
        let whole = ReadConditions::pinned(&e, None);
        assert_eq!(whole.pinned_etag(), Some(e.as_str()));
        assert_eq!(decide_read(&whole, Some(&cur)), Full);
        let stale = ReadConditions::pinned(&other_etag(), Some(chunk));
        assert_eq!(decide_read(&stale, Some(&cur)), PreconditionFailed);
        assert_eq!(decide_read(&pinned, None), NotFound);
        // A chunk past the end of a shorter revision with the same tag cannot happen, but a
        // chunk reaching beyond the end is clamped like any range.
        let tail = ReadConditions::pinned(&e, Some(br(16, 100)));
        assert_eq!(decide_read(&tail, Some(&cur)), Partial(br(16, 4)));
    }

    #[test]
    fn pinned_etag_needs_exactly_one_strong_tag() {
        let e = etag().header_value();
        let cases: Vec<(Option<String>, Option<String>)> = vec![
            (None, None),
            (Some("*".into()), None),
            (Some(e.clone()), Some(etag().as_str().to_owned())),
            (Some(format!(" {e} ")), Some(etag().as_str().to_owned())),
            (Some(format!("W/{e}")), None),
            (Some(format!("{e}, {e}")), None),
            (Some("garbage".into()), None),
            (Some("\"other\"".into()), Some("other".to_owned())),
        ];
        for (if_match, want) in cases {
            let cond =
                ReadConditions::from_headers(if_match.as_deref(), None, None, None, None, None);
            assert_eq!(cond.pinned_etag(), want.as_deref(), "{if_match:?}");
        }
    }

    // ---- Writes ----

    #[derive(Clone, Copy, Debug)]
    enum WriteTag {
        Absent,
        Star,
        Matching,
        WeakMatching,
        NonMatching,
        ListWithMatch,
        Garbage,
    }

    fn write_header(t: WriteTag) -> Option<String> {
        let e = etag().header_value();
        let o = other_etag().header_value();
        match t {
            WriteTag::Absent => None,
            WriteTag::Star => Some("*".into()),
            WriteTag::Matching => Some(e),
            WriteTag::WeakMatching => Some(format!("W/{e}")),
            WriteTag::NonMatching => Some(o),
            WriteTag::ListWithMatch => Some(format!("{o}, {e}")),
            WriteTag::Garbage => Some("junk".into()),
        }
    }

    /// The meaning of each header for the shared RFC 9110 reference in `rfc_reference`.
    fn write_reference(present: bool, im: WriteTag, inm: WriteTag) -> WriteOutcome {
        use crate::rfc_reference::{self as rfc, TagCond};
        let cond = |t: WriteTag| match t {
            WriteTag::Absent => TagCond::Absent,
            WriteTag::Star => TagCond::Star,
            WriteTag::Matching | WriteTag::ListWithMatch => TagCond::List {
                strong: true,
                weak: true,
            },
            WriteTag::WeakMatching => TagCond::List {
                strong: false,
                weak: true,
            },
            WriteTag::NonMatching | WriteTag::Garbage => TagCond::List {
                strong: false,
                weak: false,
            },
        };
        rfc::write(present, cond(im), cond(inm))
    }

    #[test]
    fn decide_write_cross_product_matches_reference() {
        use WriteTag as T;
        let all = [
            T::Absent,
            T::Star,
            T::Matching,
            T::WeakMatching,
            T::NonMatching,
            T::ListWithMatch,
            T::Garbage,
        ];
        let cur = validators();
        for present in [false, true] {
            for im in all {
                for inm in all {
                    let pre = WritePrecondition::from_headers(
                        write_header(im).as_deref(),
                        write_header(inm).as_deref(),
                    );
                    assert_eq!(
                        decide_write(&pre, present.then_some(&cur)),
                        write_reference(present, im, inm),
                        "present={present} If-Match={im:?} If-None-Match={inm:?}"
                    );
                }
            }
        }
    }

    #[test]
    #[rustfmt::skip]
    fn decide_write_named_rows() {
        use WriteOutcome::{PreconditionFailed as Fail, Proceed};
        let e = etag();
        let cur = validators();
        // (name, key exists, If-Match, If-None-Match, outcome)
        type WriteRow<'a> = (&'a str, bool, Option<&'a str>, Option<&'a str>, WriteOutcome);
        let cases: &[WriteRow] = &[
            ("unconditional create", false, None, None, Proceed),
            ("unconditional replace", true, None, None, Proceed),
            ("create-only on missing key", false, None, Some("*"), Proceed),
            ("create-only on existing key", true, None, Some("*"), Fail),
            ("If-Match * on missing key", false, Some("*"), None, Fail),
            ("If-Match * on existing key", true, Some("*"), None, Proceed),
            ("CAS on missing key", false, Some("\"{E}\""), None, Fail),
            ("CAS with current tag", true, Some("\"{E}\""), None, Proceed),
            ("CAS with stale tag", true, Some("\"{O}\""), None, Fail),
            ("CAS with weak tag", true, Some("W/\"{E}\""), None, Fail),
            ("CAS with list containing current", true, Some("\"{O}\", \"{E}\""), None, Proceed),
            ("CAS with garbage", true, Some("junk"), None, Fail),
            ("If-None-Match current tag", true, None, Some("\"{E}\""), Fail),
            ("If-None-Match weak current tag", true, None, Some("W/\"{E}\""), Fail),
            ("If-None-Match other tag", true, None, Some("\"{O}\""), Proceed),
            ("If-None-Match tag on missing key", false, None, Some("\"{E}\""), Proceed),
            ("both: CAS passes, If-None-Match other", true, Some("\"{E}\""), Some("\"{O}\""), Proceed),
            ("both: CAS passes, If-None-Match *", true, Some("\"{E}\""), Some("*"), Fail),
            ("both on missing key", false, Some("*"), Some("*"), Fail),
        ];
        for (name, present, im, inm, want) in cases {
            let pre = WritePrecondition::from_headers(
                im.map(expand).as_deref(),
                inm.map(expand).as_deref(),
            );
            assert_eq!(decide_write(&pre, present.then_some(&cur)), *want, "{name}");
        }
        // The constructors mean what their names say.
        assert_eq!(decide_write(&WritePrecondition::create_only(), None), Proceed);
        assert_eq!(decide_write(&WritePrecondition::create_only(), Some(&cur)), Fail);
        assert_eq!(decide_write(&WritePrecondition::replace_if(&e), Some(&cur)), Proceed);
        assert_eq!(decide_write(&WritePrecondition::replace_if(&e), None), Fail);
        assert_eq!(decide_write(&WritePrecondition::replace_if(&other_etag()), Some(&cur)), Fail);
        assert_eq!(decide_write(&WritePrecondition::default(), None), Proceed);
        assert_eq!(
            WritePrecondition::replace_if(&e),
            WritePrecondition::from_headers(Some(&e.header_value()), None)
        );
        assert_eq!(WritePrecondition::create_only(), WritePrecondition::from_headers(None, Some("*")));
    }
}
