//! References read moments ago, so that a caller who has just decided a read against a revision
//! (the tiered cache's miss: decide, then fill) can open that revision's body without reading
//! its reference a second time. On a cold miss that second reference read was a whole S3 round
//! trip before the first byte. Also the keys whose reference was read or written lately: a
//! write asks, to choose between a create-only PUT at once and reading the reference first.
//!
//! What is remembered only ever names a body: bodies are immutable and their names used once,
//! so a remembered reference can be out of date (the key moved on) but never wrong about the
//! bytes of the revision it names. Entries are kept for [`LIFETIME`], at most [`CAPACITY`] of
//! them and at most [`INLINE_BYTES`] of inline bodies (a reference that carries its body: the
//! fill after the decision then needs no S3 request at all), which bounds the memory whatever
//! the number of keys.

use super::layout::RefDoc;
use larder_proto::ETag;
use object_store::path::Path;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a reference read is remembered: far longer than a miss takes from its decision to
/// its fill, far shorter than the grace period before a replaced body is reaped.
const LIFETIME: Duration = Duration::from_secs(10);

/// References remembered at most.
const CAPACITY: usize = 1024;

/// Bytes of inline bodies remembered at most.
const INLINE_BYTES: usize = 16 << 20;

#[derive(Default)]
pub(super) struct RecentRefs {
    remembered: Mutex<Remembered>,
}

#[derive(Default)]
struct Remembered {
    by_path: HashMap<Path, (RefDoc, Instant)>,
    inline_bytes: usize,
    /// When this replica last committed a reference of each key (not what it wrote: a read
    /// decided moments ago may still be filling the revision it replaced).
    written: HashMap<Path, Instant>,
}

fn inline_len(doc: &RefDoc) -> usize {
    doc.inline.as_ref().map_or(0, |b| b.len())
}

impl RecentRefs {
    pub(super) fn remember(&self, path: &Path, doc: &RefDoc) {
        let now = Instant::now();
        let mut r = self.remembered.lock().unwrap();
        let full = |r: &Remembered| {
            (r.by_path.len() >= CAPACITY && !r.by_path.contains_key(path))
                || r.inline_bytes + inline_len(doc) > INLINE_BYTES
        };
        if full(&r) {
            r.by_path
                .retain(|_, (_, read)| now.duration_since(*read) < LIFETIME);
            r.inline_bytes = r.by_path.values().map(|(d, _)| inline_len(d)).sum();
            if full(&r) {
                // Over a thousand keys (or 16 MiB of small bodies) read within the lifetime:
                // forgetting them costs each of their fills one reference read, as before this
                // memory existed.
                r.by_path.clear();
                r.inline_bytes = 0;
            }
        }
        r.inline_bytes += inline_len(doc);
        if let Some((old, _)) = r.by_path.insert(path.clone(), (doc.clone(), now)) {
            r.inline_bytes -= inline_len(&old);
        }
    }

    /// Notes that this replica committed a reference of the key at `path`.
    pub(super) fn wrote(&self, path: &Path) {
        let now = Instant::now();
        let mut r = self.remembered.lock().unwrap();
        if r.written.len() >= CAPACITY && !r.written.contains_key(path) {
            r.written.retain(|_, at| now.duration_since(*at) < LIFETIME);
            if r.written.len() >= CAPACITY {
                r.written.clear();
            }
        }
        r.written.insert(path.clone(), now);
    }

    /// Whether a reference of the key at `path` was read or written recently: the key most
    /// likely exists.
    pub(super) fn knows(&self, path: &Path) -> bool {
        let r = self.remembered.lock().unwrap();
        let recent = |at: &Instant| at.elapsed() < LIFETIME;
        r.by_path.get(path).is_some_and(|(_, read)| recent(read))
            || r.written.get(path).is_some_and(recent)
    }

    /// The reference of revision `etag` of the key at `path`, if it was read recently.
    pub(super) fn revision(&self, path: &Path, etag: &ETag) -> Option<RefDoc> {
        let r = self.remembered.lock().unwrap();
        let (doc, read) = r.by_path.get(path)?;
        (read.elapsed() < LIFETIME && doc.etag == etag.as_str()).then(|| doc.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::layout::Layout;
    use std::time::SystemTime;

    fn doc(etag: &ETag) -> RefDoc {
        RefDoc::new(
            etag,
            3,
            SystemTime::now(),
            Duration::from_secs(60),
            Vec::new(),
            Layout::new_body_name("ns"),
            None,
        )
    }

    fn etag(n: u8) -> ETag {
        ETag::parse(&format!("{n:02x}").repeat(32)).unwrap()
    }

    #[test]
    fn only_the_revision_read_is_answered() {
        let recent = RecentRefs::default();
        let path = Path::from("refs/ns/k");
        recent.remember(&path, &doc(&etag(1)));
        assert_eq!(
            recent.revision(&path, &etag(1)).unwrap().etag,
            etag(1).as_str()
        );
        assert!(
            recent.revision(&path, &etag(2)).is_none(),
            "another revision"
        );
        assert!(
            recent
                .revision(&Path::from("refs/ns/other"), &etag(1))
                .is_none()
        );
        recent.remember(&path, &doc(&etag(2)));
        assert!(
            recent.revision(&path, &etag(1)).is_none(),
            "replaced by a later read"
        );
    }

    #[test]
    fn memory_stays_bounded_whatever_the_number_of_keys() {
        let recent = RecentRefs::default();
        for i in 0..CAPACITY * 3 {
            recent.remember(&Path::from(format!("refs/ns/k{i}")), &doc(&etag(1)));
            assert!(recent.remembered.lock().unwrap().by_path.len() <= CAPACITY);
        }
        let last = Path::from(format!("refs/ns/k{}", CAPACITY * 3 - 1));
        assert!(
            recent.revision(&last, &etag(1)).is_some(),
            "the newest is kept"
        );
    }

    #[test]
    fn inline_bodies_held_stay_bounded() {
        let recent = RecentRefs::default();
        let body = bytes::Bytes::from(vec![7u8; 1 << 20]);
        for i in 0..40 {
            let doc = doc(&etag(1)).with_inline_body(body.clone());
            recent.remember(&Path::from(format!("refs/ns/k{i}")), &doc);
            let r = recent.remembered.lock().unwrap();
            assert!(r.inline_bytes <= INLINE_BYTES, "{} bytes", r.inline_bytes);
            let counted: usize = r.by_path.values().map(|(d, _)| inline_len(d)).sum();
            assert_eq!(r.inline_bytes, counted);
        }
        let newest = recent
            .revision(&Path::from("refs/ns/k39"), &etag(1))
            .unwrap();
        assert_eq!(newest.inline.unwrap().len(), 1 << 20);
        // Remembering a key again replaces its body in the count instead of adding to it.
        let doc = doc(&etag(2)).with_inline_body(bytes::Bytes::from_static(b"x"));
        recent.remember(&Path::from("refs/ns/k39"), &doc);
        let r = recent.remembered.lock().unwrap();
        let counted: usize = r.by_path.values().map(|(d, _)| inline_len(d)).sum();
        assert_eq!(r.inline_bytes, counted);
    }

    #[test]
    fn keys_written_here_are_known_and_stay_bounded() {
        let recent = RecentRefs::default();
        let path = Path::from("refs/ns/written");
        assert!(!recent.knows(&path));
        recent.wrote(&path);
        assert!(recent.knows(&path));
        assert!(
            recent.revision(&path, &etag(1)).is_none(),
            "a write says nothing about which revision a read may open"
        );
        for i in 0..CAPACITY * 3 {
            recent.wrote(&Path::from(format!("refs/ns/k{i}")));
            assert!(recent.remembered.lock().unwrap().written.len() <= CAPACITY);
        }
        assert!(recent.knows(&Path::from(format!("refs/ns/k{}", CAPACITY * 3 - 1))));
    }
}
