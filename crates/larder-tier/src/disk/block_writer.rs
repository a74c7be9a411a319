//! Writing a new revision's temp file mostly past the page cache.
//!
//! A fill or an upload writes a big body once and may not read it again for a long time, yet
//! copying every byte into the page cache (and writing it back later) costs the writer more CPU
//! than hashing it: CPU that, on a small machine, the client and the S3 server beside larderd
//! need. So the file is written through a block-aligned buffer that takes the place of a
//! `BufWriter`, whole buffers go out with `O_DIRECT` (the device copies them), and only the
//! unaligned tail and the header patch go through the page cache. On a filesystem that refuses
//! `O_DIRECT` (some tmpfs, ext4 with `data=journal`) everything goes through the page cache, as
//! with any file. Small bodies never fill a buffer, so they stay in the page cache, hot.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment `O_DIRECT` needs of buffers, offsets and lengths: the largest logical block size
/// in common use, so it suits any device.
const BLOCK: usize = 4096;

/// How much is gathered before a write: large enough that a direct write's fixed cost is small
/// against its copy, small enough to be one of the disk tier's read chunks.
pub(super) const BUFFER: usize = 1 << 20;

pub(super) struct BlockWriter {
    /// The file as created: the tail, the header patch and the fsync go through it.
    file: File,
    /// The same file opened with `O_DIRECT`, when the filesystem allows it.
    direct: Option<File>,
    /// `BUFFER + BLOCK` bytes, of which the aligned `BUFFER` bytes from `start` are used.
    storage: Vec<u8>,
    start: usize,
    filled: usize,
    /// File offset of the buffer's first byte; everything before it is written.
    flushed: u64,
}

impl BlockWriter {
    /// Writes `file` (new and empty, at `path`) from its start; with `O_DIRECT` if `direct`
    /// and the filesystem allows it.
    pub(super) fn new(file: File, path: &Path, direct: bool) -> BlockWriter {
        let direct = direct
            .then(|| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten();
        let storage = vec![0u8; BUFFER + BLOCK];
        let start = storage.as_ptr().align_offset(BLOCK);
        BlockWriter {
            file,
            direct,
            storage,
            start,
            filled: 0,
            flushed: 0,
        }
    }

    /// Bytes that have reached the file (readers of the file may rely on them).
    pub(super) fn in_file(&self) -> u64 {
        self.flushed
    }

    pub(super) fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(BUFFER - self.filled);
            let at = self.start + self.filled;
            self.storage[at..at + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BUFFER {
                self.flush_full()?;
            }
        }
        Ok(())
    }

    fn flush_full(&mut self) -> io::Result<()> {
        let block = &self.storage[self.start..self.start + BUFFER];
        let written = match &self.direct {
            Some(direct) => direct.write_all_at(block, self.flushed),
            None => self.file.write_all_at(block, self.flushed),
        };
        match written {
            // A filesystem may accept the open and refuse the write: from then on, the page
            // cache (nothing of this block reached the file).
            Err(e) if self.direct.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct = None;
                self.file.write_all_at(block, self.flushed)?;
            }
            other => other?,
        }
        self.flushed += BUFFER as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what the buffer still holds and hands back the file (through the page cache, so
    /// positioned writes of any alignment work on it).
    pub(super) fn finish(mut self) -> io::Result<File> {
        let tail = &self.storage[self.start..self.start + self.filled];
        self.file.write_all_at(tail, self.flushed)?;
        self.flushed += self.filled as u64;
        self.filled = 0;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    /// Writes `pieces` and checks the file holds exactly their concatenation, whatever mix of
    /// direct and page-cache writes it took.
    fn round_trip(pieces: &[usize]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let file = File::create_new(&path).unwrap();
        let mut writer = BlockWriter::new(file, &path, true);
        let mut expected = Vec::new();
        for &len in pieces {
            let piece = pattern(len);
            writer.write_all(&piece).unwrap();
            expected.extend_from_slice(&piece);
            assert_eq!(writer.in_file(), (expected.len() / BUFFER * BUFFER) as u64);
        }
        // A misaligned direct write fails with EINVAL and silently falls back to the page
        // cache: where this filesystem takes O_DIRECT, whole buffers must have gone out with it.
        let probe = dir.path().join("probe");
        let direct_supported = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok();
        if direct_supported {
            assert!(
                writer.direct.is_some(),
                "the writer fell back to the page cache"
            );
        } else {
            println!(
                "note: {:?} refuses O_DIRECT; only the page-cache path ran",
                dir.path()
            );
        }
        let file = writer.finish().unwrap();
        file.write_all_at(b"patched", 3).unwrap();
        expected[3..10].copy_from_slice(b"patched");
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        assert!(got == expected, "file differs from what was written");
    }

    #[test]
    fn a_body_smaller_than_the_buffer_is_written_whole() {
        round_trip(&[10, 4000, 200]);
    }

    #[test]
    fn whole_buffers_and_an_unaligned_tail_land_where_they_belong() {
        round_trip(&[100, BUFFER, 3 * BUFFER + 17, 5, BUFFER - 122]);
    }

    #[test]
    fn a_body_of_exactly_whole_buffers_has_no_tail() {
        round_trip(&[BUFFER, BUFFER]);
    }

    #[test]
    fn a_refused_direct_write_goes_through_the_page_cache_without_losing_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let mut writer = BlockWriter::new(File::create_new(&path).unwrap(), &path, true);
        if writer.direct.is_none() {
            println!(
                "note: {:?} refuses O_DIRECT; the fallback ran from the start",
                dir.path()
            );
        }
        // A buffer off its alignment gets EINVAL, the answer of a filesystem that takes the
        // O_DIRECT open but not the write.
        writer.start += 1;
        let body = pattern(2 * BUFFER + 999);
        writer.write_all(&body).unwrap();
        assert!(writer.direct.is_none(), "no longer tries O_DIRECT");
        assert_eq!(writer.in_file(), 2 * BUFFER as u64);
        writer.finish().unwrap();
        assert!(
            std::fs::read(&path).unwrap() == body,
            "file differs from what was written"
        );
    }

    #[test]
    fn with_direct_writes_off_everything_goes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let mut writer = BlockWriter::new(File::create_new(&path).unwrap(), &path, false);
        assert!(writer.direct.is_none());
        let body = pattern(BUFFER + 3);
        writer.write_all(&body).unwrap();
        writer.finish().unwrap();
        assert!(
            std::fs::read(&path).unwrap() == body,
            "file differs from what was written"
        );
    }
}
