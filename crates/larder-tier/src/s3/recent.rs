//! References read moments ago, so that a caller who has just decided a read against a revision
//! (the tiered cache's miss: decide, then fill) can open that revision's body without reading
//! its reference a second time. On a cold miss that second reference read was a whole S3 round
//! trip before the first byte.
//!
//! What is remembered only ever names a body: bodies are immutable and their names used once,
//! so a remembered reference can be out of date (the key moved on) but never wrong about the
//! bytes of the revision it names. Entries are kept for [`LIFETIME`] and at most [`CAPACITY`]
//! of them, which bounds the memory whatever the number of keys.

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

#[derive(Default)]
pub(super) struct RecentRefs {
    by_path: Mutex<HashMap<Path, (RefDoc, Instant)>>,
}

impl RecentRefs {
    pub(super) fn remember(&self, path: &Path, doc: &RefDoc) {
        let now = Instant::now();
        let mut map = self.by_path.lock().unwrap();
        if map.len() >= CAPACITY && !map.contains_key(path) {
            map.retain(|_, (_, read)| now.duration_since(*read) < LIFETIME);
            if map.len() >= CAPACITY {
                // Over a thousand keys read within the lifetime: forgetting them costs each of
                // their fills one reference read, as before this memory existed.
                map.clear();
            }
        }
        map.insert(path.clone(), (doc.clone(), now));
    }

    /// The reference of revision `etag` of the key at `path`, if it was read recently.
    pub(super) fn revision(&self, path: &Path, etag: &ETag) -> Option<RefDoc> {
        let map = self.by_path.lock().unwrap();
        let (doc, read) = map.get(path)?;
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
            assert!(recent.by_path.lock().unwrap().len() <= CAPACITY);
        }
        let last = Path::from(format!("refs/ns/k{}", CAPACITY * 3 - 1));
        assert!(
            recent.revision(&last, &etag(1)).is_some(),
            "the newest is kept"
        );
    }
}
