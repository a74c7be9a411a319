//! A small pool of read buffers for body streaming.
//!
//! Each body chunk is a fresh `read_chunk`-sized buffer handed to hyper as `Bytes`. Allocating
//! and freeing megabyte buffers per chunk leaves glibc's heap fragmented and the RSS high under
//! many concurrent downloads; recycling them keeps memory at "buffers in flight" and skips the
//! page faults of fresh allocations. The pool keeps at most `max_idle` buffers.

use bytes::Bytes;
use std::sync::{Arc, Mutex};

pub struct BufferPool {
    size: usize,
    max_idle: usize,
    idle: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub fn new(size: usize, max_idle: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            size,
            max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A buffer of exactly the pool's size (contents unspecified).
    pub fn take(&self) -> Vec<u8> {
        self.idle
            .lock()
            .unwrap()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size])
    }

    /// Wraps the first `len` bytes of `buf` as `Bytes`; the buffer returns to the pool when the
    /// last clone of the `Bytes` is dropped (after hyper wrote it to the socket).
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>, len: usize) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
        .slice(..len)
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut idle = self.pool.idle.lock().unwrap();
        if idle.len() < self.pool.max_idle && buf.len() == self.pool.size {
            idle.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_after_the_bytes_are_dropped() {
        let pool = BufferPool::new(16, 1);
        let mut buf = pool.take();
        buf[..3].copy_from_slice(b"abc");
        let bytes = pool.freeze(buf, 3);
        assert_eq!(&bytes[..], b"abc");
        let clone = bytes.clone();
        drop(bytes);
        assert!(pool.idle.lock().unwrap().is_empty(), "still referenced");
        drop(clone);
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
        let second = pool.freeze(pool.take(), 16);
        drop(second);
        let third = pool.freeze(vec![0; 16], 16);
        drop(third);
        assert_eq!(
            pool.idle.lock().unwrap().len(),
            1,
            "never more than max_idle"
        );
    }
}
