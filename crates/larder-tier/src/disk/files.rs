//! File-level helpers of the disk tier: temp files that remove themselves, positioned reads,
//! writing a revision file, and the directory fsyncs that make renames and unlinks durable.

use super::block_writer::BlockWriter;
use super::*;
use tokio::sync::mpsc;

/// A temp file that removes itself unless it was renamed into place.
pub(super) struct TempFile {
    pub(super) path: PathBuf,
    pub(super) armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Reads what the page cache already holds at `offset` without blocking (`RWF_NOWAIT`), up to
/// `buf.len()` bytes; returns how many it got (0 when nothing was cached or on any error, which
/// the caller then meets again on the blocking path).
pub(super) fn read_cached_at(file: &File, buf: &mut [u8], offset: u64) -> usize {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        // SAFETY: `iov` points into `buf`, which outlives the call; the descriptor is open.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
    done
}

pub(super) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes the temp file from the upload channel, hashing on the way, then patches the header,
/// fsyncs, and hands back the still-armed temp file.
pub(super) fn write_temp(
    temp: TempFile,
    file: File,
    header: Vec<u8>,
    mut rx: mpsc::Receiver<Upload>,
    progress: Option<watch::Sender<u64>>,
    direct: bool,
) -> Result<(TempFile, Fixed), TierError> {
    let mut out = BlockWriter::new(file, &temp.path, direct);
    let failed = |e: io::Error| TierError::io("write temp file", &e);
    out.write_all(&header).map_err(failed)?;
    let header_len = header.len() as u64;
    let mut hasher = blake3::Hasher::new();
    let mut body_len = 0u64;
    let mut finished = false;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Upload::Chunk(chunk) => {
                hasher.update(&chunk);
                body_len += chunk.len() as u64;
                out.write_all(&chunk).map_err(failed)?;
                if let Some(p) = &progress {
                    let in_file = out.in_file().saturating_sub(header_len);
                    // Only a change wakes the readers that follow the file.
                    p.send_if_modified(|seen| std::mem::replace(seen, in_file) != in_file);
                }
            }
            Upload::Finish => {
                finished = true;
                break;
            }
        }
    }
    if !finished {
        return Err(TierError::new(ErrorKind::BodyAborted, "upload aborted"));
    }
    let file = out.finish().map_err(failed)?;
    if let Some(p) = &progress {
        p.send_replace(body_len);
    }
    let etag = *hasher.finalize().as_bytes();
    file.write_all_at(&body_len.to_le_bytes(), format::BODY_LEN_OFFSET)
        .and_then(|_| file.write_all_at(&etag, format::ETAG_OFFSET))
        .and_then(|_| file.sync_all())
        .map_err(failed)?;
    let mut fixed = Fixed::decode(&header).map_err(|e| TierError::internal("encode header", e))?;
    fixed.body_len = body_len;
    fixed.etag = etag;
    Ok((temp, fixed))
}

/// fsyncs a directory, which makes the creation, rename or removal of its entries durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Whether `path` names `file` (without following a symlink).
pub(super) fn names(path: &Path, file: FileId) -> bool {
    fs::symlink_metadata(path).is_ok_and(|md| FileId::of(&md) == file)
}

/// `fs::create_dir_all` that also fsyncs the parent of each directory it creates.
pub(super) fn create_dir_all_synced(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir_all_synced(parent)?;
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}
