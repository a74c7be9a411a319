//! The per-repository head record: which snapshot a CI job should restore now, and the one rule
//! for when a new record may replace the stored one.
//!
//! Snapshots are immutable and keyed by commit; only this small JSON object moves, replaced
//! with compare-and-swap (`If-Match` on the ETag of the record read), so two replicas racing
//! cannot both win. Compare-and-swap alone does not stop a replica whose mirror lags from
//! swapping an older commit over a newer one, so a replica first asks [`decide`] whether its
//! record is an improvement, with the ancestry answer taken from its mirror ([`lineage`]):
//!
//! - a commit that descends from the recorded one moves the head forward;
//! - an ancestor of the recorded commit never replaces it (a lagging replica);
//! - a commit unrelated to the recorded one, or one the mirror does not know any more (the
//!   branch was force-pushed, and the old commit may be gone), replaces it only if its tip was
//!   *observed* later. Observation time (when a clean fetch saw the commit as the tip) rather
//!   than creation time: a slow replica may finish a snapshot of the pre-force-push tip after a
//!   fast one published the new tip, and must not put the old history back. Creation time only
//!   breaks ties within one second;
//! - a change of the upstream's default branch is judged by observation time the same way.
//!
//! The decision is a pure function of its inputs, so it is tested exhaustively here, and the
//! server only translates its answer into "swap" or "leave it".

use crate::CommitId;
use crate::mirror::{Mirror, MirrorError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The format version written by this code.
pub const VERSION: u32 = 1;

/// The head record, stored as JSON (`head.json` under the repository's key prefix).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadRecord {
    /// Format version of the record; a reader refuses versions newer than [`VERSION`].
    pub version: u32,
    /// The snapshot's commit: the tip of `ref` when it was observed.
    pub commit: CommitId,
    /// The branch, `refs/heads/<default branch>`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// Key of the snapshot object (in the same namespace).
    pub snapshot_key: String,
    /// The snapshot's strong ETag (bare 64 hex digits), for pinned downloads.
    pub etag: String,
    /// The snapshot's size in bytes.
    pub size: u64,
    /// Unix seconds when a clean fetch saw `commit` as the tip of `ref`.
    pub observed_at: u64,
    /// Unix seconds when the snapshot was stored.
    pub created_at: u64,
}

/// Why a stored head record was refused by [`HeadRecord::from_json`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeadError {
    /// Not JSON, or a required field is missing or has the wrong type.
    #[error("invalid head record: {0}")]
    Json(String),
    /// Written by a newer larder, in a format version this one does not know.
    #[error("head record version {0} is newer than this larder understands ({VERSION})")]
    Version(u32),
    /// A field parsed but holds an invalid value (the text says which).
    #[error("invalid head record: {0}")]
    Field(&'static str),
}

impl HeadRecord {
    /// The record as pretty-printed JSON, as it is stored.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a head record serialises")
    }

    /// Parses and checks a stored record; unknown fields are ignored, so that a later version
    /// can add some without breaking older readers.
    pub fn from_json(data: &[u8]) -> Result<HeadRecord, HeadError> {
        let record: HeadRecord =
            serde_json::from_slice(data).map_err(|e| HeadError::Json(e.to_string()))?;
        if record.version > VERSION {
            return Err(HeadError::Version(record.version));
        }
        if !record.git_ref.starts_with("refs/heads/") || record.git_ref.len() <= 11 {
            return Err(HeadError::Field("ref is not refs/heads/<branch>"));
        }
        if larder_proto::ETag::parse(&record.etag).is_none() {
            return Err(HeadError::Field("etag is not a larder ETag"));
        }
        if larder_proto::Key::parse(&record.snapshot_key).is_err() {
            return Err(HeadError::Field("snapshot_key is not a valid key"));
        }
        Ok(record)
    }
}

/// How the new record's commit relates to the stored one, as the mirror sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lineage {
    /// The stored commit is an ancestor of the new one.
    Descendant,
    /// The new commit is an ancestor of the stored one.
    Ancestor,
    /// Neither is an ancestor of the other (history was rewritten).
    Unrelated,
    /// The mirror does not hold the stored commit (rewritten and pruned, or never fetched).
    CurrentUnknown,
}

/// Whether to swap, and why (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is no head record yet.
    First,
    /// The new commit descends from the stored one.
    FastForward,
    /// History was rewritten and the new tip was observed later.
    Rewritten,
    /// The default branch changed and the new one was observed later.
    BranchChanged,
    /// Same commit and branch: nothing to do.
    Unchanged,
    /// The new commit is behind the stored one.
    Behind,
    /// Rewritten history or another branch, but observed no later than the stored record.
    Stale,
}

impl Decision {
    /// Whether the new record replaces the stored one (`First`, `FastForward`, `Rewritten`,
    /// `BranchChanged`); every other decision leaves the stored record in place.
    pub fn replaces(self) -> bool {
        matches!(
            self,
            Decision::First | Decision::FastForward | Decision::Rewritten | Decision::BranchChanged
        )
    }
}

/// May `new` replace `current`? `lineage` is how `new.commit` relates to `current.commit` (it is
/// not consulted when there is no current record or the commits are equal).
pub fn decide(current: Option<&HeadRecord>, new: &HeadRecord, lineage: Lineage) -> Decision {
    let Some(current) = current else {
        return Decision::First;
    };
    let later = (new.observed_at, new.created_at) > (current.observed_at, current.created_at);
    if new.git_ref != current.git_ref {
        return if later {
            Decision::BranchChanged
        } else {
            Decision::Stale
        };
    }
    if new.commit == current.commit {
        return Decision::Unchanged;
    }
    match lineage {
        Lineage::Descendant => Decision::FastForward,
        Lineage::Ancestor => Decision::Behind,
        Lineage::Unrelated | Lineage::CurrentUnknown if later => Decision::Rewritten,
        Lineage::Unrelated | Lineage::CurrentUnknown => Decision::Stale,
    }
}

/// The [`Lineage`] of `new` relative to `current`, from the mirror.
pub async fn lineage(
    mirror: &Mirror,
    current: &CommitId,
    new: &CommitId,
) -> Result<Lineage, MirrorError> {
    if !mirror.has_commit(current).await? {
        return Ok(Lineage::CurrentUnknown);
    }
    if mirror.is_ancestor(current, new).await? {
        return Ok(Lineage::Descendant);
    }
    if mirror.is_ancestor(new, current).await? {
        return Ok(Lineage::Ancestor);
    }
    Ok(Lineage::Unrelated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(commit: char, branch: &str, observed_at: u64, created_at: u64) -> HeadRecord {
        let commit = CommitId::parse(&commit.to_string().repeat(40)).unwrap();
        HeadRecord {
            version: VERSION,
            snapshot_key: format!("https/h/r/~/snapshots/{commit}.tar.zst"),
            commit,
            git_ref: format!("refs/heads/{branch}"),
            etag: "ab".repeat(32),
            size: 1234,
            observed_at,
            created_at,
        }
    }

    #[test]
    fn the_json_form_has_stable_field_names_and_round_trips() {
        let r = record('a', "main", 100, 105);
        let json: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        let mut names: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "commit",
                "created_at",
                "etag",
                "observed_at",
                "ref",
                "size",
                "snapshot_key",
                "version"
            ]
        );
        assert_eq!(HeadRecord::from_json(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn unknown_fields_are_ignored_and_bad_ones_refused() {
        let mut json: serde_json::Value =
            serde_json::from_slice(&record('a', "main", 1, 1).to_json()).unwrap();
        json["generator"] = "replica-7".into();
        assert!(HeadRecord::from_json(json.to_string().as_bytes()).is_ok());
        for (field, value) in [
            ("commit", serde_json::json!("not-a-commit")),
            ("ref", serde_json::json!("main")),
            ("ref", serde_json::json!("refs/heads/")),
            ("etag", serde_json::json!("\"weak\"")),
            ("snapshot_key", serde_json::json!("../x")),
            ("size", serde_json::json!(-1)),
            ("version", serde_json::json!(VERSION + 1)),
        ] {
            let mut bad = json.clone();
            bad[field] = value;
            assert!(
                HeadRecord::from_json(bad.to_string().as_bytes()).is_err(),
                "{field} accepted"
            );
        }
        assert!(HeadRecord::from_json(b"{").is_err());
    }

    #[test]
    fn decision_table() {
        use Decision::*;
        use Lineage::*;
        let cur = record('a', "main", 100, 110);
        let cases: &[(Option<&HeadRecord>, HeadRecord, Lineage, Decision)] = &[
            (None, record('b', "main", 1, 1), Unrelated, First),
            (
                Some(&cur),
                record('a', "main", 200, 210),
                Descendant,
                Unchanged,
            ),
            (
                Some(&cur),
                record('b', "main", 50, 50),
                Descendant,
                FastForward,
            ),
            (
                Some(&cur),
                record('b', "main", 200, 200),
                Descendant,
                FastForward,
            ),
            (Some(&cur), record('b', "main", 200, 200), Ancestor, Behind),
            (
                Some(&cur),
                record('b', "main", 200, 200),
                Unrelated,
                Rewritten,
            ),
            (
                Some(&cur),
                record('b', "main", 200, 200),
                CurrentUnknown,
                Rewritten,
            ),
            // A slow replica that saw the old history before the force-push was observed.
            (Some(&cur), record('b', "main", 90, 300), Unrelated, Stale),
            (
                Some(&cur),
                record('b', "main", 90, 300),
                CurrentUnknown,
                Stale,
            ),
            // Same second: creation time breaks the tie.
            (
                Some(&cur),
                record('b', "main", 100, 111),
                Unrelated,
                Rewritten,
            ),
            (Some(&cur), record('b', "main", 100, 110), Unrelated, Stale),
            (
                Some(&cur),
                record('a', "trunk", 200, 200),
                Descendant,
                BranchChanged,
            ),
            (Some(&cur), record('b', "trunk", 99, 200), Descendant, Stale),
        ];
        for (i, (current, new, lineage, want)) in cases.iter().enumerate() {
            assert_eq!(decide(*current, new, *lineage), *want, "case {i}");
        }
    }

    fn any_record() -> impl Strategy<Value = HeadRecord> {
        (
            prop::sample::select(vec!['a', 'b', 'c']),
            prop::sample::select(vec!["main", "trunk"]),
            0u64..4,
            0u64..4,
        )
            .prop_map(|(c, b, o, t)| record(c, b, o, t))
    }

    proptest! {
        /// The head never moves to an ancestor of what it names.
        #[test]
        fn never_moves_back_to_an_ancestor(cur in any_record(), new in any_record()) {
            prop_assert!(!decide(Some(&cur), &new, Lineage::Ancestor).replaces()
                || new.git_ref != cur.git_ref);
        }

        /// Of two records with rewritten histories, at most one may replace the other, so
        /// replicas cannot flip the head back and forth.
        #[test]
        fn rewritten_histories_cannot_flip_flop(a in any_record(), b in any_record()) {
            for lineage in [Lineage::Unrelated, Lineage::CurrentUnknown] {
                let ab = decide(Some(&a), &b, lineage).replaces();
                let ba = decide(Some(&b), &a, lineage).replaces();
                prop_assert!(!(ab && ba));
            }
        }
    }
}
