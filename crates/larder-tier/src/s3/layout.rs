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

use crate::error::{ErrorKind, TierError};
use crate::tier::ObjectMeta;
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

/// The reference object of a key: everything about its current revision except the bytes.
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
        }
    }

    pub(crate) fn parse(bytes: &[u8]) -> Result<RefDoc, TierError> {
        let bad = |why: String| {
            TierError::new(
                ErrorKind::Upstream,
                format!("S3 reference object is corrupt: {why}"),
            )
        };
        let doc: RefDoc = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if doc.v != FORMAT_VERSION {
            return Err(bad(format!("unknown format version {}", doc.v)));
        }
        if ETag::parse(&doc.etag).is_none() {
            return Err(bad("invalid etag".into()));
        }
        if !Layout::is_body_name(&doc.body) {
            return Err(bad(format!("invalid body name {:?}", doc.body)));
        }
        Ok(doc)
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a RefDoc always serializes")
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
        assert_eq!(RefDoc::parse(&doc.to_json()).unwrap(), doc);
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
            assert!(RefDoc::parse(&bad_body.to_json()).is_err(), "{body}");
        }
    }
}
