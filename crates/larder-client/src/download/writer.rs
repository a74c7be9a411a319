//! The positioned writer: chunks of a file download are written where they belong as soon as
//! they arrive, in any order, on a thread of their own, with early writeback hints.

use crate::Error;
use bytes::Bytes;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// The positioned writes of one attempt, on one thread in arrival order. Buffered writes to one
/// file serialize on its inode lock anyway, so more threads would only add wake-ups; and one
/// thread makes "no write of this attempt is still running" a simple join.
pub(super) struct Writer {
    pub(super) tx: std::sync::mpsc::Sender<(u64, Bytes)>,
    pub(super) done: tokio::sync::mpsc::UnboundedReceiver<Result<(u64, Bytes), Error>>,
    pub(super) thread: std::thread::JoinHandle<()>,
    pub(super) pending: usize,
}

impl Writer {
    /// `early_writeback`: start each chunk's writeback right away (for a final `fsync`).
    pub(super) fn start(
        file: Arc<File>,
        chunk: u64,
        early_writeback: bool,
    ) -> Result<Writer, Error> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Bytes)>();
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("larder-write".into())
            .spawn(move || {
                for (index, data) in rx {
                    let offset = index * chunk;
                    let result = file
                        .write_all_at(&data, offset)
                        .map(|()| {
                            if early_writeback {
                                start_writeback(&file, offset, data.len());
                            }
                            (index, data)
                        })
                        .map_err(|e| Error::io("cannot write the download to disk", e));
                    let failed = result.is_err();
                    let _ = done_tx.send(result);
                    if failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the writer thread", e))?;
        Ok(Writer {
            tx,
            done,
            thread,
            pending: 0,
        })
    }

    pub(super) fn write(&mut self, index: u64, data: Bytes) {
        // A failed send means the thread stopped after an error, which `next` reports.
        let _ = self.tx.send((index, data));
        self.pending += 1;
    }

    pub(super) fn busy(writer: &Option<Writer>) -> bool {
        writer.as_ref().is_some_and(|w| w.pending > 0)
    }

    pub(super) async fn next(writer: &mut Option<Writer>) -> Option<Result<(u64, Bytes), Error>> {
        let w = writer.as_mut()?;
        let result = w.done.recv().await;
        w.pending = w.pending.saturating_sub(1);
        Some(result.unwrap_or_else(|| {
            Err(Error::Protocol(
                "internal error: the writer thread stopped".into(),
            ))
        }))
    }

    /// Waits until no write of this attempt can still land.
    pub(super) async fn stop(self) {
        drop(self.tx);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Starts writing a chunk to the device without waiting for it, so the final `fsync` (which
/// makes the file durable before it is renamed into place) finds little left to do instead of
/// flushing the whole object at the end. Only a hint: errors surface at the `fsync`.
pub(super) fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a file descriptor this process owns; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}
