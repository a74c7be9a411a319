//! Strong content-digest ETags and the entity-tag lists of `If-Match` / `If-None-Match` /
//! `If-Range` (RFC 9110 §8.8.3, §13.1).
//!
//! larder's ETag is the BLAKE3 digest of the body, so identical bytes get identical tags on every
//! tier and replica, and a client can verify what it reassembled.

/// A strong larder ETag: the lowercase hex BLAKE3 digest of the body (64 hex digits).
/// `Display` renders the quoted header form `"<hex>"`; `as_str` is the bare opaque tag.
///
/// Held in its quoted form and shared: an ETag is cloned into every read's metadata and written
/// into every response and access line, and a string of its own cost an allocation each time.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ETag(std::sync::Arc<str>);

const HEX: &[u8; 16] = b"0123456789abcdef";

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        // The constructor only admits lowercase hex, so no other byte reaches here.
        _ => unreachable!("ETag holds only lowercase hex"),
    }
}

/// Optional whitespace (RFC 9110 §5.6.3): spaces and horizontal tabs only.
pub(crate) fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

impl ETag {
    /// The ETag of finished digest.
    pub fn from_digest(hash: &blake3::Hash) -> ETag {
        ETag::from_bytes(*hash.as_bytes())
    }

    /// The bare 32-byte digest, for compact binary headers.
    pub fn from_bytes(bytes: [u8; 32]) -> ETag {
        let mut quoted = [b'"'; 66];
        for (pair, b) in quoted[1..65].chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 0x0f)];
        }
        ETag::from_quoted(&quoted)
    }

    /// The raw 32-byte digest; the inverse of [`ETag::from_bytes`].
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(self.as_str().as_bytes().chunks_exact(2)) {
            *o = (hex_value(pair[0]) << 4) | hex_value(pair[1]);
        }
        out
    }

    /// Parses either the quoted header form or the bare form; only 64 lowercase hex digits are
    /// accepted (a weak `W/` tag is not a larder ETag).
    pub fn parse(s: &str) -> Option<ETag> {
        let s = trim_ows(s);
        let bare = match s.strip_prefix('"') {
            Some(rest) => rest.strip_suffix('"')?,
            None => s,
        };
        // Uppercase hex is refused rather than normalised: entity tags compare octet by octet,
        // so accepting it here would produce a tag that never matches what we send out.
        if bare.len() == 64 && bare.bytes().all(is_lower_hex) {
            let mut quoted = [b'"'; 66];
            quoted[1..65].copy_from_slice(bare.as_bytes());
            Some(ETag::from_quoted(&quoted))
        } else {
            None
        }
    }

    /// `quoted` holds only quotes and lowercase hex digits.
    fn from_quoted(quoted: &[u8; 66]) -> ETag {
        ETag(std::str::from_utf8(quoted).unwrap_or_default().into())
    }

    /// The opaque tag without quotes.
    pub fn as_str(&self) -> &str {
        &self.quoted()[1..65]
    }

    /// The header form, with quotes.
    pub fn quoted(&self) -> &str {
        &self.0
    }

    /// The header value, with quotes, owned.
    pub fn header_value(&self) -> String {
        self.quoted().to_string()
    }

    /// The digest of `data` (for tests and small bodies).
    pub fn of(data: &[u8]) -> ETag {
        ETag::from_digest(&blake3::hash(data))
    }
}

impl std::fmt::Display for ETag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.quoted())
    }
}

impl std::fmt::Debug for ETag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ETag").field(&self.as_str()).finish()
    }
}

impl std::str::FromStr for ETag {
    type Err = InvalidETag;

    fn from_str(s: &str) -> Result<ETag, InvalidETag> {
        ETag::parse(s).ok_or(InvalidETag)
    }
}

/// The error of `"...".parse::<ETag>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid ETag: expected 64 lowercase hex digits, optionally quoted")]
pub struct InvalidETag;

/// One entity tag as it appears in a request header: `"abc"` or `W/"abc"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityTag {
    /// True for a weak tag (`W/"..."`), which never matches in a strong comparison.
    pub weak: bool,
    /// The opaque tag without quotes.
    pub tag: String,
}

/// `etagc = %x21 / %x23-7E / obs-text`: any visible character but `"`, plus bytes >= 0x80
/// (which in a `&str` are exactly the bytes of non-ASCII characters).
fn is_etagc(b: u8) -> bool {
    b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80
}

/// Parses one entity-tag at the start of `s`; returns it and the number of bytes consumed.
/// Scanning (rather than splitting on commas first) matters because `,` is a legal etagc, so
/// `"a,b"` is one tag.
fn parse_entity_tag_prefix(s: &str) -> Option<(EntityTag, usize)> {
    let bytes = s.as_bytes();
    // `W/` is case-sensitive in the grammar (%s"W/").
    let (weak, open) = if bytes.starts_with(b"W/") {
        (true, 2)
    } else {
        (false, 0)
    };
    if bytes.get(open) != Some(&b'"') {
        return None;
    }
    let body_start = open + 1;
    let len = bytes[body_start..]
        .iter()
        .position(|&b| !is_etagc(b))
        .unwrap_or(bytes.len() - body_start);
    let close = body_start + len;
    if bytes.get(close) != Some(&b'"') {
        return None;
    }
    let tag = s[body_start..close].to_owned();
    Some((EntityTag { weak, tag }, close + 1))
}

impl EntityTag {
    /// Parses one entity-tag (`"x"`, `W/"x"`); None when malformed.
    pub fn parse(s: &str) -> Option<EntityTag> {
        let s = trim_ows(s);
        match parse_entity_tag_prefix(s) {
            Some((tag, used)) if used == s.len() => Some(tag),
            _ => None,
        }
    }

    /// RFC 9110 §8.8.3.2 strong comparison against our (always strong) ETag.
    pub fn strong_eq(&self, etag: &ETag) -> bool {
        !self.weak && self.tag == etag.as_str()
    }

    /// Weak comparison: opaque tags equal, weakness ignored.
    pub fn weak_eq(&self, etag: &ETag) -> bool {
        self.tag == etag.as_str()
    }
}

impl std::fmt::Display for EntityTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.weak {
            f.write_str("W/")?;
        }
        write!(f, "\"{}\"", self.tag)
    }
}

/// The value of `If-Match` or `If-None-Match`: `*` or a comma-separated list of entity tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagList {
    /// `*`: matches any current revision, and none when the key does not exist.
    Any,
    /// Malformed members are dropped while parsing, so a header made only of garbage becomes an
    /// empty list, which matches nothing.
    Tags(Vec<EntityTag>),
}

impl TagList {
    /// Parses a header value; never fails: malformed members are dropped (see [`TagList::Tags`]).
    pub fn parse(header: &str) -> TagList {
        if trim_ows(header) == "*" {
            return TagList::Any;
        }
        let mut tags = Vec::new();
        let mut rest = header;
        loop {
            // Empty list elements (`a, , b`) are legal and skipped (RFC 9110 §5.6.1.2).
            rest = rest.trim_start_matches([' ', '\t', ',']);
            if rest.is_empty() {
                break;
            }
            // A malformed member runs to the next comma; the members after it still count. When
            // the member starts with a well-formed tag, the search starts after it, because a
            // comma inside the quotes does not separate members.
            let mut resume = 0;
            if let Some((tag, used)) = parse_entity_tag_prefix(rest) {
                let after = rest[used..].trim_start_matches([' ', '\t']);
                if after.is_empty() || after.starts_with(',') {
                    tags.push(tag);
                    rest = after;
                    continue;
                }
                resume = used;
            }
            rest = match rest[resume..].find(',') {
                Some(i) => &rest[resume + i..],
                None => "",
            };
        }
        TagList::Tags(tags)
    }

    /// `If-Match` semantics: `*` matches any current representation; otherwise strong comparison.
    pub fn matches_strong(&self, etag: &ETag) -> bool {
        match self {
            TagList::Any => true,
            TagList::Tags(tags) => tags.iter().any(|t| t.strong_eq(etag)),
        }
    }

    /// `If-None-Match` semantics: `*` matches any current representation; otherwise weak comparison.
    pub fn matches_weak(&self, etag: &ETag) -> bool {
        match self {
            TagList::Any => true,
            TagList::Tags(tags) => tags.iter().any(|t| t.weak_eq(etag)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_HEX: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    fn strong(tag: &str) -> EntityTag {
        EntityTag {
            weak: false,
            tag: tag.to_owned(),
        }
    }

    fn weak(tag: &str) -> EntityTag {
        EntityTag {
            weak: true,
            tag: tag.to_owned(),
        }
    }

    #[test]
    fn etag_is_blake3_hex() {
        // Known BLAKE3 digest of the empty input.
        assert_eq!(ETag::of(b"").as_str(), EMPTY_HEX);
        assert_eq!(ETag::of(b"abc"), ETag::from_digest(&blake3::hash(b"abc")));
        assert_ne!(ETag::of(b"abc"), ETag::of(b"abd"));
        let e = ETag::of(b"hello");
        assert_eq!(e.as_str().len(), 64);
        assert!(e.as_str().bytes().all(is_lower_hex));
    }

    #[test]
    fn etag_forms() {
        let e = ETag::of(b"");
        assert_eq!(e.to_string(), format!("\"{EMPTY_HEX}\""));
        assert_eq!(e.header_value(), e.to_string());
        assert_eq!(e.as_str(), EMPTY_HEX);
    }

    #[test]
    fn etag_bytes_round_trip() {
        for data in [&b""[..], b"a", b"hello world", &[0xff; 100]] {
            let e = ETag::of(data);
            assert_eq!(e.to_bytes(), *blake3::hash(data).as_bytes());
            assert_eq!(ETag::from_bytes(e.to_bytes()), e);
        }
        let mut bytes = [0u8; 32];
        bytes[0] = 0x0f;
        bytes[31] = 0xa0;
        let e = ETag::from_bytes(bytes);
        assert!(e.as_str().starts_with("0f00"));
        assert!(e.as_str().ends_with("00a0"));
        assert_eq!(e.to_bytes(), bytes);
    }

    #[test]
    fn etag_parse_table() {
        let upper = EMPTY_HEX.to_ascii_uppercase();
        let cases: Vec<(String, bool)> = vec![
            (EMPTY_HEX.to_owned(), true),
            (format!("\"{EMPTY_HEX}\""), true),
            (format!(" \"{EMPTY_HEX}\"\t"), true),
            (format!("W/\"{EMPTY_HEX}\""), false),
            (format!("\"{EMPTY_HEX}"), false),
            (format!("{EMPTY_HEX}\""), false),
            (format!("\"\"{EMPTY_HEX}\"\""), false),
            (upper.clone(), false),
            (format!("\"{upper}\""), false),
            (EMPTY_HEX[..63].to_owned(), false),
            (format!("{EMPTY_HEX}0"), false),
            (format!("{}g", &EMPTY_HEX[..63]), false),
            (String::new(), false),
            ("\"\"".to_owned(), false),
            ("*".to_owned(), false),
        ];
        for (input, ok) in cases {
            let parsed = ETag::parse(&input);
            assert_eq!(parsed.is_some(), ok, "ETag::parse({input:?})");
            if ok {
                assert_eq!(parsed.unwrap().as_str(), EMPTY_HEX);
            }
            assert_eq!(input.parse::<ETag>().is_ok(), ok, "FromStr({input:?})");
        }
        let e = ETag::of(b"x");
        assert_eq!(ETag::parse(&e.to_string()), Some(e.clone()));
        assert_eq!(ETag::parse(e.as_str()), Some(e));
    }

    #[test]
    fn entity_tag_parse_table() {
        let cases: &[(&str, Option<EntityTag>)] = &[
            ("\"abc\"", Some(strong("abc"))),
            ("W/\"abc\"", Some(weak("abc"))),
            ("\"\"", Some(strong(""))),
            ("W/\"\"", Some(weak(""))),
            ("  \"abc\"  ", Some(strong("abc"))),
            // `,` and `/` are etagc; obs-text is allowed too.
            ("\"a,b\"", Some(strong("a,b"))),
            ("\"a/b!#~\"", Some(strong("a/b!#~"))),
            ("\"caf\u{e9}\"", Some(strong("caf\u{e9}"))),
            ("abc", None),
            ("\"abc", None),
            ("abc\"", None),
            ("w/\"abc\"", None),
            ("W/abc", None),
            ("W/ \"abc\"", None),
            ("W\"abc\"", None),
            ("\"a b\"", None),
            ("\"a\"b\"", None),
            ("\"a\u{7f}\"", None),
            ("\"a\tb\"", None),
            ("\"abc\" x", None),
            ("\"a\", \"b\"", None),
            ("*", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                &EntityTag::parse(input),
                want,
                "EntityTag::parse({input:?})"
            );
            if let Some(t) = want {
                assert_eq!(EntityTag::parse(&t.to_string()).as_ref(), Some(t));
            }
        }
    }

    #[test]
    fn entity_tag_comparison() {
        // RFC 9110 §8.8.3.2 table, transposed onto our always-strong ETag.
        let e = ETag::of(b"x");
        let other = ETag::of(b"y");
        assert!(strong(e.as_str()).strong_eq(&e));
        assert!(strong(e.as_str()).weak_eq(&e));
        assert!(!weak(e.as_str()).strong_eq(&e));
        assert!(weak(e.as_str()).weak_eq(&e));
        assert!(!strong(e.as_str()).strong_eq(&other));
        assert!(!strong(e.as_str()).weak_eq(&other));
        assert!(!weak(e.as_str()).weak_eq(&other));
        // Opaque tags compare octet by octet: case matters.
        let upper = e.as_str().to_ascii_uppercase();
        assert!(!strong(&upper).strong_eq(&e));
        assert!(!strong(&upper).weak_eq(&e));
    }

    #[test]
    fn tag_list_parse_table() {
        let cases: &[(&str, TagList)] = &[
            ("*", TagList::Any),
            (" * ", TagList::Any),
            ("\t*", TagList::Any),
            ("\"a\"", TagList::Tags(vec![strong("a")])),
            ("\"a\",\"b\"", TagList::Tags(vec![strong("a"), strong("b")])),
            (
                "\"a\" , \"b\"",
                TagList::Tags(vec![strong("a"), strong("b")]),
            ),
            (
                "\"a\"\t,\tW/\"b\"",
                TagList::Tags(vec![strong("a"), weak("b")]),
            ),
            (
                "  \"a\",  \"b\"  ",
                TagList::Tags(vec![strong("a"), strong("b")]),
            ),
            // Empty list elements are skipped.
            (
                ",\"a\",,  ,\"b\",",
                TagList::Tags(vec![strong("a"), strong("b")]),
            ),
            (
                "W/\"a\", W/\"b\"",
                TagList::Tags(vec![weak("a"), weak("b")]),
            ),
            // A comma inside quotes belongs to the tag.
            (
                "\"a,b\", \"c\"",
                TagList::Tags(vec![strong("a,b"), strong("c")]),
            ),
            // Garbage members are dropped, the rest survive.
            ("garbage, \"a\"", TagList::Tags(vec![strong("a")])),
            ("\"a\", garbage", TagList::Tags(vec![strong("a")])),
            (
                "\"a\", garbage, \"b\"",
                TagList::Tags(vec![strong("a"), strong("b")]),
            ),
            ("\"a\"junk, \"b\"", TagList::Tags(vec![strong("b")])),
            ("\"a,b\"junk, \"c\"", TagList::Tags(vec![strong("c")])),
            ("w/\"a\", \"b\"", TagList::Tags(vec![strong("b")])),
            ("\"a\" \"b\", \"c\"", TagList::Tags(vec![strong("c")])),
            ("*, \"a\"", TagList::Tags(vec![strong("a")])),
            ("\"a\", *", TagList::Tags(vec![strong("a")])),
            ("**", TagList::Tags(vec![])),
            // Unterminated quotes.
            ("\"a", TagList::Tags(vec![])),
            ("\"a\", \"b", TagList::Tags(vec![strong("a")])),
            // SP is not an etagc, so the first member ends at the space and `"b"` survives...
            ("\"a, \"b\"", TagList::Tags(vec![strong("b")])),
            // ...but without it the quotes pair up as `"a,"` followed by junk.
            ("\"a,\"b\"", TagList::Tags(vec![])),
            ("W/\"", TagList::Tags(vec![])),
            ("garbage", TagList::Tags(vec![])),
            ("", TagList::Tags(vec![])),
            ("   ", TagList::Tags(vec![])),
            (",", TagList::Tags(vec![])),
        ];
        for (input, want) in cases {
            assert_eq!(&TagList::parse(input), want, "TagList::parse({input:?})");
        }
    }

    #[test]
    fn tag_list_matching() {
        let e = ETag::of(b"x");
        let other = ETag::of(b"y");
        let hv = e.header_value();
        let ov = other.header_value();
        // (header, matches_strong, matches_weak)
        let cases: Vec<(String, bool, bool)> = vec![
            ("*".into(), true, true),
            (hv.clone(), true, true),
            (format!("W/{hv}"), false, true),
            (ov.clone(), false, false),
            (format!("W/{ov}"), false, false),
            (format!("{ov}, {hv}"), true, true),
            (format!("{ov}, W/{hv}"), false, true),
            (format!("W/{hv}, {hv}"), true, true),
            (format!("garbage, {hv}"), true, true),
            ("garbage".into(), false, false),
            (String::new(), false, false),
            (e.as_str().to_owned(), false, false),
            (hv.to_ascii_uppercase(), false, false),
        ];
        for (header, want_strong, want_weak) in cases {
            let list = TagList::parse(&header);
            assert_eq!(list.matches_strong(&e), want_strong, "strong {header:?}");
            assert_eq!(list.matches_weak(&e), want_weak, "weak {header:?}");
        }
    }
}
