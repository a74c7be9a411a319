//! The bridge from a blocking archiver (tar into zstd, on a blocking thread) to an async
//! consumer (an upload, a response body): a `Write` that hands the archive over in pieces of
//! [`PIECE`] bytes through a bounded channel, blocking, and so slowing the archiver, while the
//! consumer is behind. Snapshots use it here; the client's `save` uses it for directories.

use bytes::{Bytes, BytesMut};
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// Size of the pieces: large enough that the channel's cost per byte is nothing, small enough
/// that a few queued pieces are little memory.
pub const PIECE: usize = 1 << 20;

/// The writing end; the channel's receiver is the consumer's.
pub struct PieceWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    sent: Arc<AtomicU64>,
    /// The error's text when the consumer has gone before the end.
    consumer_gone: &'static str,
}

impl PieceWriter {
    /// Must be written from a blocking thread (it uses `blocking_send`).
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>, consumer_gone: &'static str) -> PieceWriter {
        PieceWriter {
            tx,
            buf: BytesMut::with_capacity(PIECE),
            sent: Arc::default(),
            consumer_gone,
        }
    }

    /// Bytes handed over so far, readable while the writer is in use (progress display).
    pub fn sent(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.sent)
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = self.buf.split().freeze();
        self.sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, self.consumer_gone))?;
        self.buf.reserve(PIECE);
        Ok(())
    }
}

impl Write for PieceWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_whole_in_pieces_and_a_gone_consumer_is_an_error() {
        let (tx, mut rx) = mpsc::channel(64);
        let mut w = PieceWriter::new(tx, "consumer gone");
        let data: Vec<u8> = (0..3 * PIECE + 5).map(|i| i as u8).collect();
        for part in data.chunks(100_000) {
            w.write_all(part).unwrap();
        }
        w.flush().unwrap();
        assert_eq!(w.sent().load(Ordering::Relaxed), data.len() as u64);
        let mut got = Vec::new();
        while let Ok(piece) = rx.try_recv() {
            let piece = piece.unwrap();
            assert!(piece.len() <= PIECE + 100_000);
            got.extend_from_slice(&piece);
        }
        assert!(got == data, "the pieces are the bytes written");
        drop(rx);
        let err = w.write_all(&vec![0; PIECE]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(err.to_string(), "consumer gone");
    }
}
