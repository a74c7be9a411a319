//! The reaper: the only place bodies, expired references and retirement markers are deleted
//! (see the module comment of `s3` for why deletion waits for a grace period).

use super::*;

/// What one [`S3Tier::reap`] pass removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Unreferenced body objects deleted because their grace period had passed.
    pub bodies_deleted: u64,
    /// Total size in bytes of the deleted bodies.
    pub bytes_freed: u64,
    /// Reference objects deleted because their revision had expired (and was not replaced
    /// meanwhile).
    pub expired_refs_deleted: u64,
    /// Retirement markers deleted: those of deleted bodies, and stale ones whose body no longer
    /// exists.
    pub markers_deleted: u64,
    /// Unreferenced bodies kept because their grace period has not passed yet.
    pub bodies_in_grace: u64,
}

impl S3Tier {
    /// Removes unreferenced bodies whose grace period has passed, expired references, and
    /// stale retirement markers. A body's grace starts when it stopped being current (its
    /// retirement marker, or its reference's expiry), or for a body that was never referenced
    /// (an upload that lost its race or died) when it was written. `grace` must exceed the
    /// longest download of one response and the longest upload.
    ///
    /// Cost: lists every body, marker and reference under the prefix and reads every reference.
    pub async fn reap(&self, grace: Duration) -> Result<ReapReport, TierError> {
        let inner = &self.inner;
        let mut report = ReapReport::default();
        // Bodies first: a body committed after this listing is not in it, and one committed
        // before the reference listing below is seen as referenced.
        let bodies = inner.list(BODIES).await?;
        let markers: HashMap<String, SystemTime> = inner
            .list(RETIRED)
            .await?
            .into_iter()
            .filter_map(|m| {
                let rel = inner.layout.relative(&m.location)?;
                Some((rel.to_string(), modified(&m)))
            })
            .collect();
        let refs = inner.scan_refs().await?;
        let now = SystemTime::now();
        let mut referenced = HashSet::new();
        // When each body of an expired reference stopped being current.
        let mut expired_at: HashMap<String, SystemTime> = HashMap::new();
        for (path, current) in &refs {
            let Some(current) = current else { continue };
            if !current.doc.expired_at(now) {
                referenced.insert(current.doc.body.clone());
                continue;
            }
            let expires = UNIX_EPOCH + Duration::from_millis(current.doc.expires_ms);
            expired_at.insert(current.doc.body.clone(), expires);
            if inner
                .delete_ref_if_unchanged(path, &current.s3_etag)
                .await?
            {
                report.expired_refs_deleted += 1;
                inner.expirations.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("larder_s3_expirations_total").increment(1);
            }
        }
        let mut existing = HashSet::new();
        let mut doomed = Vec::new();
        for body in bodies {
            let Some(rel) = inner.layout.relative(&body.location) else {
                continue;
            };
            existing.insert(rel.to_string());
            if referenced.contains(rel) {
                continue;
            }
            let marker = Layout::retired_name(rel).unwrap_or_default();
            // The latest of the dates we know is when the body can last have been current.
            let mut unreferenced_since = modified(&body);
            for t in [markers.get(&marker), expired_at.get(rel)]
                .into_iter()
                .flatten()
            {
                unreferenced_since = unreferenced_since.max(*t);
            }
            if now.duration_since(unreferenced_since).unwrap_or_default() < grace {
                report.bodies_in_grace += 1;
                continue;
            }
            doomed.push((body.location.clone(), body.size, marker));
        }
        let markers = &markers;
        let deleted: Vec<(u64, bool)> = futures_util::stream::iter(doomed)
            .map(|(location, size, marker)| async move {
                inner.delete_object(&location, "body delete").await?;
                let had_marker = if markers.contains_key(&marker) {
                    inner
                        .delete_object(&inner.layout.path(&marker)?, "marker delete")
                        .await?;
                    true
                } else {
                    false
                };
                Ok::<_, TierError>((size, had_marker))
            })
            .buffer_unordered(LIST_READ_CONCURRENCY)
            .try_collect()
            .await?;
        for (size, had_marker) in deleted {
            report.bodies_deleted += 1;
            report.bytes_freed += size;
            report.markers_deleted += u64::from(had_marker);
        }
        // Markers whose body is gone (deleted above, or by an earlier pass that died half-way).
        for (marker, at) in markers {
            let body = Layout::body_of_retired(marker).unwrap_or_default();
            let stale = now.duration_since(*at).unwrap_or_default() >= grace;
            if !existing.contains(&body) && stale {
                inner
                    .delete_object(&inner.layout.path(marker)?, "marker delete")
                    .await?;
                report.markers_deleted += 1;
            }
        }
        metrics::counter!("larder_s3_reaped_bodies_total").increment(report.bodies_deleted);
        tracing::info!(?report, grace_s = grace.as_secs(), "S3 reaper pass");
        Ok(report)
    }
}
