//! Downloads, verified against the content-digest ETag.
//!
//! For now a download is one streaming GET (parallel pinned ranges come later, DESIGN.md
//! "Client"). The bytes are hashed as they pass through; since larder's ETag is the BLAKE3 digest
//! of the body, a match proves that exactly the announced revision arrived, whatever went on
//! between the disk or S3 tier and this process.

use crate::output::StagedFile;
use crate::{Client, Error, ObjectInfo, ObjectName, failure, object_info};
use futures_util::StreamExt;
use larder_proto::ETag;
use reqwest::{Method, Response};
use std::path::Path;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

/// Turns many small network chunks into few large writes (tokio file writes each cost a hop to
/// the blocking pool).
const WRITE_BUFFER: usize = 1024 * 1024;

impl Client {
    /// Streams the object into `out` and verifies it. On a digest mismatch the bytes have already
    /// been written, so the error says to discard them; use [`Client::get_to_file`] when that is
    /// not acceptable. `dest` names `out` in messages.
    pub async fn get_to_writer<W>(
        &self,
        name: &ObjectName,
        out: W,
        dest: &str,
    ) -> Result<ObjectInfo, Error>
    where
        W: AsyncWrite + Unpin,
    {
        let (info, resp) = self.open(name).await?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, out);
        copy_verified(
            name,
            &info,
            resp,
            &mut out,
            dest,
            &format!("discard what was written to {dest}"),
        )
        .await?;
        Ok(info)
    }

    /// Downloads the object to `path`, which is replaced only once the whole object has arrived
    /// and matched its ETag; on any failure `path` is left as it was.
    pub async fn get_to_file(&self, name: &ObjectName, path: &Path) -> Result<ObjectInfo, Error> {
        // Ask first: a missing object or a refused request must not even create a temporary file.
        let (info, resp) = self.open(name).await?;
        let staged = StagedFile::create(path)?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, staged.writer()?);
        let dest = path.display().to_string();
        let consequence = format!("{dest} was not written");
        copy_verified(name, &info, resp, &mut out, &dest, &consequence).await?;
        // Durable before visible: after a crash the target is either the old file or this one.
        out.get_mut()
            .sync_all()
            .await
            .map_err(|e| Error::io(format!("cannot sync the download of {dest}"), e))?;
        drop(out);
        staged.commit()?;
        Ok(info)
    }

    /// Sends the GET and reads the validators; the body is still to be read.
    async fn open(&self, name: &ObjectName) -> Result<(ObjectInfo, Response), Error> {
        let resp = self
            .send("GET", name, self.request(Method::GET, name))
            .await?;
        if !resp.status().is_success() {
            return Err(failure("GET", name, resp).await);
        }
        let info = object_info(resp.headers(), name)?;
        Ok((info, resp))
    }
}

async fn copy_verified<W>(
    name: &ObjectName,
    info: &ObjectInfo,
    resp: Response,
    out: &mut W,
    dest: &str,
    consequence: &str,
) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
{
    let mut hasher = blake3::Hasher::new();
    let mut received: u64 = 0;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::Transport {
            op: "GET",
            target: name.to_string(),
            cause: format!(
                "the download broke off after {received} of {} bytes ({e}); {consequence}",
                info.size
            ),
        })?;
        hasher.update(&chunk);
        received += chunk.len() as u64;
        out.write_all(&chunk)
            .await
            .map_err(|e| Error::io(format!("writing to {dest}"), e))?;
    }
    out.flush()
        .await
        .map_err(|e| Error::io(format!("writing to {dest}"), e))?;
    // hyper already refuses a body shorter than its Content-Length; this guards the digest
    // comparison below from ever blaming corruption for what is really truncation.
    if received != info.size {
        return Err(Error::Transport {
            op: "GET",
            target: name.to_string(),
            cause: format!(
                "received {received} bytes but the server announced {}; {consequence}",
                info.size
            ),
        });
    }
    let actual = ETag::from_digest(&hasher.finalize());
    if actual != info.etag {
        return Err(Error::DigestMismatch {
            target: name.to_string(),
            expected: info.etag.clone(),
            actual,
            consequence: consequence.to_string(),
        });
    }
    Ok(())
}
