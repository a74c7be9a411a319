//! Streaming a request body into a new, immutable body object while hashing it.
//!
//! Bodies of at most `inline_max` bytes are only buffered: they go up inside the reference, with
//! no body object at all. Bodies smaller than one part are buffered and sent with a single PUT
//! (one request instead of three); larger ones switch to a multipart upload as soon as the first
//! part is full, so memory stays at about `upload_concurrency` parts whatever the object size.
//! The BLAKE3 digest — the revision's ETag — is computed on the way. Any failure aborts the
//! multipart upload, and so does dropping the upload half-way (the client went away), so no
//! half-written body lingers beyond what S3 itself keeps of an aborted upload.

use super::error::{s3_error, timed_out};
use crate::error::{ErrorKind, TierError};
use crate::tier::UploadStream;
use bytes::Bytes;
use futures_util::StreamExt;
use larder_proto::ETag;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct UploadedBody {
    pub etag: ETag,
    pub size: u64,
    /// S3's ETag of the body object, when the server told us one.
    pub s3_etag: Option<String>,
    /// The whole body, when it is small enough to travel inside the reference; nothing was
    /// written to the body object's path then.
    pub inline: Option<Bytes>,
}

pub(crate) struct Uploader<'a> {
    pub store: &'a Arc<dyn ObjectStore>,
    pub path: &'a Path,
    pub part_size: usize,
    pub concurrency: usize,
    pub max_size: Option<u64>,
    pub metadata_timeout: Duration,
    /// Bodies of at most this many bytes are returned inline instead of uploaded.
    pub inline_max: usize,
}

/// A multipart upload that aborts itself unless it was finished.
struct Multipart(Option<WriteMultipart>);

impl Multipart {
    fn writer(&mut self) -> &mut WriteMultipart {
        self.0.as_mut().expect("multipart upload already finished")
    }

    async fn abort(mut self) {
        if let Some(w) = self.0.take()
            && let Err(e) = w.abort().await
        {
            tracing::warn!(error = %e, "could not abort S3 multipart upload");
        }
    }
}

impl Drop for Multipart {
    fn drop(&mut self) {
        // Dropped mid-upload: the request future was cancelled. Abort in the background so the
        // server discards the parts already sent.
        if let Some(w) = self.0.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                let _ = w.abort().await;
            });
        }
    }
}

impl Uploader<'_> {
    pub(crate) async fn run(self, mut body: UploadStream) -> Result<UploadedBody, TierError> {
        let max = self.max_size.unwrap_or(u64::MAX);
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut pending: Vec<Bytes> = Vec::new();
        let mut pending_len = 0usize;
        let mut multipart: Option<Multipart> = None;
        let mut failure = None;
        while let Some(item) = body.next().await {
            let chunk = match item {
                Ok(chunk) => chunk,
                Err(e) => {
                    failure = Some(TierError::new(
                        ErrorKind::BodyAborted,
                        format!("request body failed: {e}"),
                    ));
                    break;
                }
            };
            size += chunk.len() as u64;
            if size > max {
                failure = Some(TierError::new(
                    ErrorKind::TooLarge,
                    format!("body exceeds the maximum object size of {max} bytes"),
                ));
                break;
            }
            hasher.update(&chunk);
            if let Some(mp) = multipart.as_mut() {
                if let Err(e) = mp.writer().wait_for_capacity(self.concurrency).await {
                    failure = Some(s3_error("body part upload", e));
                    break;
                }
                mp.writer().put(chunk);
                continue;
            }
            pending_len += chunk.len();
            pending.push(chunk);
            if pending_len >= self.part_size {
                match self.store.put_multipart(self.path).await {
                    Ok(upload) => {
                        let mut w = WriteMultipart::new_with_chunk_size(upload, self.part_size);
                        for c in pending.drain(..) {
                            w.put(c);
                        }
                        multipart = Some(Multipart(Some(w)));
                    }
                    Err(e) => {
                        failure = Some(s3_error("multipart upload start", e));
                        break;
                    }
                }
            }
        }
        if let Some(failure) = failure {
            if let Some(mp) = multipart {
                mp.abort().await;
            }
            return Err(failure);
        }
        let etag = ETag::from_digest(&hasher.finalize());
        // `inline_max` 0 turns inline bodies off, for the empty body too: a replica that only
        // knows references of format version 1 must be able to read every one.
        if multipart.is_none() && self.inline_max > 0 && size <= self.inline_max as u64 {
            let inline = match pending.len() {
                1 => pending.pop().expect("one chunk"),
                _ => pending.concat().into(),
            };
            return Ok(UploadedBody {
                etag,
                size,
                s3_etag: None,
                inline: Some(inline),
            });
        }
        let s3_etag = match multipart {
            None => {
                let payload: PutPayload = pending.into_iter().collect();
                // A fresh, unique name: a retried PUT can only write the same bytes again.
                let put = self.store.put(self.path, payload).await;
                put.map_err(|e| s3_error("body upload", e))?.e_tag
            }
            Some(mut mp) => {
                let w = mp.0.take().expect("multipart upload present");
                let result = w
                    .finish()
                    .await
                    .map_err(|e| s3_error("multipart upload", e))?;
                self.check_multipart(result.e_tag, size).await?
            }
        };
        Ok(UploadedBody {
            etag,
            size,
            s3_etag: s3_etag.filter(|e| !e.is_empty()),
            inline: None,
        })
    }

    /// Ceph RGW answers CompleteMultipartUpload with an empty ETag, so ask with a HEAD; the
    /// same HEAD confirms that the object holds as many bytes as were hashed.
    async fn check_multipart(
        &self,
        e_tag: Option<String>,
        size: u64,
    ) -> Result<Option<String>, TierError> {
        if e_tag.as_deref().is_some_and(|e| !e.is_empty()) {
            return Ok(e_tag);
        }
        let head = tokio::time::timeout(self.metadata_timeout, self.store.head(self.path))
            .await
            .map_err(|_| timed_out("body check"))?
            .map_err(|e| s3_error("body check", e))?;
        if head.size != size {
            return Err(TierError::new(
                ErrorKind::Upstream,
                format!(
                    "S3 stored {} bytes of a {size}-byte multipart upload",
                    head.size
                ),
            ));
        }
        Ok(head.e_tag)
    }
}
