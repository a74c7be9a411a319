//! Where things live in the bucket, and the reference object's format.
//!
//! ```text
//! PREFIX/bodies/<ns>/<32 hex>   immutable body objects, one per upload, never overwritten
//! PREFIX/refs/<ns>/<key>        the key's current revision: a small JSON `RefDoc`
//! PREFIX/retired/<ns>/<32 hex>  empty marker: "this body stopped being current at my mtime"
//! PREFIX/probe/<32 hex>         start-up check of conditional PUT
//! ```
//!
//! A body is named by a random upload id rather than by its digest, so two uploads of identical
//! bytes never share (and never delete) each other's object, and a body name is never reused: a
//! reader that learned a body name from a reference reads exactly that revision's bytes or
//! nothing. The reference is the single point of truth for a key and is what conditional PUT
//! protects.
//!
//! A small body (up to `S3Config::inline_body_max`) is stored inside its reference instead:
//! format version 2, the reference's JSON line, a newline, then the body's bytes. Such a
//! revision still gets a body name, never used for an object: it is how a writer whose answer
//! was lost recognises its own revision. A reader that knows only version 1 refuses such a
//! reference as corrupt (bytes after its JSON) rather than misread it.

use crate::error::{ErrorKind, TierError};
use crate::tier::ObjectMeta;
use bytes::Bytes;
use larder_proto::ETag;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) const BODIES: &str = "bodies";
pub(crate) const REFS: &str = "refs";
pub(crate) const RETIRED: &str = "retired";
pub(crate) const PROBE: &str = "probe";

/// Bumped on incompatible changes; readers refuse what they do not know rather than misread it.
const FORMAT_VERSION: u32 = 1;

/// A reference that carries its body after its JSON line.
const INLINE_FORMAT_VERSION: u32 = 2;

#[derive(Clone, Debug)]
pub(crate) struct Layout {
    prefix: String,
}

impl Layout {
    pub(crate) fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.to_string(),
        }
    }

    /// The full object path of a name relative to the prefix.
    pub(crate) fn path(&self, relative: &str) -> Result<Path, TierError> {
        let full = if self.prefix.is_empty() {
            relative.to_string()
        } else {
            format!("{}/{relative}", self.prefix)
        };
        Path::parse(&full).map_err(|e| {
            TierError::new(
                ErrorKind::InvalidInput,
                format!("not a valid S3 object name {full:?}: {e}"),
            )
        })
    }

    /// The name relative to the prefix of a listed object.
    pub(crate) fn relative<'a>(&self, path: &'a Path) -> Option<&'a str> {
        let raw: &str = path.as_ref();
        if self.prefix.is_empty() {
            Some(raw)
        } else {
            raw.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }

    pub(crate) fn ref_name(ns: &str, key: &str) -> String {
        format!("{REFS}/{ns}/{key}")
    }

    pub(crate) fn new_body_name(ns: &str) -> String {
        format!("{BODIES}/{ns}/{:032x}", rand::random::<u128>())
    }

    /// `bodies/<ns>/<32 hex>`, exactly as `new_body_name` makes them.
    pub(crate) fn is_body_name(name: &str) -> bool {
        let mut parts = name.split('/');
        let (Some(BODIES), Some(ns), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        larder_proto::Namespace::parse(ns).is_ok()
            && id.len() == 32
            && id.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// The retirement marker of a body (`bodies/ns/id` → `retired/ns/id`).
    pub(crate) fn retired_name(body: &str) -> Option<String> {
        body.strip_prefix(BODIES)
            .and_then(|rest| rest.strip_prefix('/'))
            .map(|rest| format!("{RETIRED}/{rest}"))
    }

    /// The body a retirement marker stands for (`retired/ns/id` → `bodies/ns/id`).
    pub(crate) fn body_of_retired(marker: &str) -> Option<String> {
        marker
            .strip_prefix(RETIRED)
            .and_then(|rest| rest.strip_prefix('/'))
            .map(|rest| format!("{BODIES}/{rest}"))
    }

    /// The namespace of a reference object's relative name (`refs/<ns>/<key>`).
    pub(crate) fn namespace_of_ref(relative: &str) -> Option<&str> {
        let rest = relative.strip_prefix(REFS)?.strip_prefix('/')?;
        let (ns, key) = rest.split_once('/')?;
        (!key.is_empty()).then_some(ns)
    }
}

/// The reference object of a key: everything about its current revision, and the bytes too when
/// they are few.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RefDoc {
    pub v: u32,
    /// larder's ETag: the BLAKE3 hex digest of the body.
    pub etag: String,
    pub size: u64,
    /// Commit time, Unix milliseconds (served as whole seconds).
    pub last_modified_ms: u64,
    /// Expiry, Unix milliseconds.
    pub expires_ms: u64,
    /// Stored response headers, lower-case names, already allow-listed.
    pub headers: Vec<(String, String)>,
    /// The body object, relative to the prefix.
    pub body: String,
    /// S3's ETag of the body object, sent as `If-Match` on every body read so that even a body
    /// object replaced behind larder's back cannot be served under this revision's ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_etag: Option<String>,
    /// The body itself, for a reference of format version 2; `body` then names no object.
    #[serde(skip)]
    pub inline: Option<Bytes>,
}

impl RefDoc {
    pub(crate) fn new(
        etag: &ETag,
        size: u64,
        now: SystemTime,
        ttl: Duration,
        headers: Vec<(String, String)>,
        body: String,
        body_etag: Option<String>,
    ) -> RefDoc {
        let now_ms = unix_ms(now);
        RefDoc {
            v: FORMAT_VERSION,
            etag: etag.as_str().to_string(),
            size,
            last_modified_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl.as_millis().min(u64::MAX as u128) as u64),
            headers,
            body,
            body_etag,
            inline: None,
        }
    }

    /// The same revision with its body carried inside the reference.
    pub(crate) fn with_inline_body(mut self, bytes: Bytes) -> RefDoc {
        self.v = INLINE_FORMAT_VERSION;
        self.body_etag = None;
        self.inline = Some(bytes);
        self
    }

    /// The body object this revision's bytes live in, if they are not inline.
    pub(crate) fn body_object(&self) -> Option<&str> {
        self.inline.is_none().then_some(self.body.as_str())
    }

    pub(crate) fn parse(bytes: &[u8]) -> Result<RefDoc, TierError> {
        let bad = |why: String| {
            TierError::new(
                ErrorKind::Upstream,
                format!("S3 reference object is corrupt: {why}"),
            )
        };
        // Compact JSON never holds a raw newline, so the first one ends the JSON line.
        let (json, rest) = match bytes.iter().position(|&b| b == b'\n') {
            Some(at) => (&bytes[..at], Some(&bytes[at + 1..])),
            None => (bytes, None),
        };
        let mut doc: RefDoc = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        let Some(etag) = ETag::parse(&doc.etag) else {
            return Err(bad("invalid etag".into()));
        };
        if !Layout::is_body_name(&doc.body) {
            return Err(bad(format!("invalid body name {:?}", doc.body)));
        }
        match (doc.v, rest) {
            (FORMAT_VERSION, None) => {}
            (INLINE_FORMAT_VERSION, Some(body)) => {
                // Checked here, once per reference read, because nothing downstream would: an
                // inline body is served straight from this object.
                if body.len() as u64 != doc.size {
                    return Err(bad(format!(
                        "it carries {} bytes of a {}-byte body",
                        body.len(),
                        doc.size
                    )));
                }
                if ETag::of(body) != etag {
                    return Err(bad("its body does not match its etag".into()));
                }
                doc.inline = Some(Bytes::copy_from_slice(body));
            }
            (FORMAT_VERSION, Some(_)) => return Err(bad("trailing bytes after its JSON".into())),
            (INLINE_FORMAT_VERSION, None) => return Err(bad("its inline body is missing".into())),
            (v, _) => return Err(bad(format!("unknown format version {v}"))),
        }
        Ok(doc)
    }

    /// The reference object's bytes: the JSON line, and the body after it when it is inline.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("a RefDoc always serializes");
        if let Some(body) = &self.inline {
            out.reserve(1 + body.len());
            out.push(b'\n');
            out.extend_from_slice(body);
        }
        out
    }

    pub(crate) fn expired_at(&self, now: SystemTime) -> bool {
        self.expires_ms <= unix_ms(now)
    }

    pub(crate) fn etag(&self) -> ETag {
        ETag::parse(&self.etag).expect("checked in RefDoc::parse")
    }

    pub(crate) fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            etag: self.etag(),
            size: self.size,
            last_modified: UNIX_EPOCH + Duration::from_secs(self.last_modified_ms / 1000),
            expires: UNIX_EPOCH + Duration::from_millis(self.expires_ms),
            headers: self.headers.clone().into(),
        }
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let layout = Layout::new("a/b");
        let body = Layout::new_body_name("ci");
        assert!(Layout::is_body_name(&body), "{body}");
        let marker = Layout::retired_name(&body).unwrap();
        assert!(marker.starts_with("retired/ci/"));
        assert_eq!(Layout::body_of_retired(&marker).unwrap(), body);
        let path = layout.path(&Layout::ref_name("ci", "x/y.tar")).unwrap();
        assert_eq!(path.as_ref(), "a/b/refs/ci/x/y.tar");
        let rel = layout.relative(&path).unwrap();
        assert_eq!(rel, "refs/ci/x/y.tar");
        assert_eq!(Layout::namespace_of_ref(rel), Some("ci"));
        assert_eq!(Layout::namespace_of_ref("refs/ci"), None);
        assert_eq!(
            Layout::new("").path("refs/n/k").unwrap().as_ref(),
            "refs/n/k"
        );
    }

    #[test]
    fn ref_doc_round_trips_and_rejects_garbage() {
        let doc = RefDoc::new(
            &ETag::of(b"x"),
            1,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
            Duration::from_secs(60),
            vec![("content-type".into(), "text/plain".into())],
            "bodies/ci/00112233445566778899aabbccddeeff".into(),
            Some("\"abc\"".into()),
        );
        assert_eq!(RefDoc::parse(&doc.to_bytes()).unwrap(), doc);
        assert_eq!(
            doc.meta().last_modified,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            "served Last-Modified is whole seconds"
        );
        assert!(!doc.expired_at(UNIX_EPOCH + Duration::from_millis(1_700_000_060_499)));
        assert!(doc.expired_at(UNIX_EPOCH + Duration::from_millis(1_700_000_060_500)));
        for garbage in [
            &b"{}"[..],
            b"not json",
            br#"{"v":2,"etag":"x","size":1,"last_modified_ms":0,"expires_ms":0,"headers":[],"body":"bodies/a/b"}"#,
        ] {
            let err = RefDoc::parse(garbage).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Upstream, "corruption is not a 404");
        }
        for body in [
            "refs/ci/00112233445566778899aabbccddeeff",
            "bodies/ci/../00112233445566778899aabbccddeef",
            "bodies/ci/0011",
            "bodies/ci/00112233445566778899aabbccddeeff/x",
        ] {
            let mut bad_body = doc.clone();
            bad_body.body = body.into();
            assert!(RefDoc::parse(&bad_body.to_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn an_inline_body_round_trips_and_is_checked_against_its_etag() {
        let body = b"a small body\nwith a newline".to_vec();
        let doc = RefDoc::new(
            &ETag::of(&body),
            body.len() as u64,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
            Duration::from_secs(60),
            vec![("content-type".into(), "text/plain".into())],
            Layout::new_body_name("ci"),
            Some("\"abc\"".into()),
        )
        .with_inline_body(Bytes::from(body.clone()));
        let bytes = doc.to_bytes();
        assert!(bytes.ends_with(&body), "the raw bytes follow the JSON line");
        let parsed = RefDoc::parse(&bytes).unwrap();
        assert_eq!(parsed, doc);
        assert_eq!(parsed.inline.as_deref(), Some(&body[..]));
        assert_eq!(
            parsed.body_object(),
            None,
            "no body object to read or retire"
        );
        assert_eq!(parsed.body_etag, None);

        let json_line = &bytes[..bytes.len() - body.len() - 1];
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let mut longer = bytes.clone();
        longer.push(b'!');
        for (what, corrupt) in [
            ("a changed byte", flipped),
            ("a byte more", longer),
            ("a byte less", bytes[..bytes.len() - 1].to_vec()),
            ("no body", json_line.to_vec()),
        ] {
            let err = RefDoc::parse(&corrupt).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Upstream, "{what}");
            assert!(err.message.contains("corrupt"), "{what}: {err:?}");
        }
        // A version 1 reference with anything after its JSON is refused too.
        let mut v1 = RefDoc {
            inline: None,
            v: 1,
            ..doc
        }
        .to_bytes();
        assert!(RefDoc::parse(&v1).is_ok());
        v1.extend_from_slice(b"\nextra");
        assert!(RefDoc::parse(&v1).is_err());
    }
}
