//! Chunk buffers, recycled between ranges so a long download does not allocate and fault in a
//! fresh chunk for every range.

use super::*;

/// Chunk buffers handed back by the verifier for the next ranges. Reusing them keeps the
/// process at its working set: fresh multi-MiB allocations would be page-faulted in again for
/// every chunk, and the allocator would keep freed ones around anyway, so peak RSS would drift
/// well past `2 × concurrency × chunk`.
pub(super) struct BufferPool {
    pub(super) free: Mutex<Vec<BytesMut>>,
    pub(super) keep: usize,
}

impl BufferPool {
    pub(super) fn take(&self, len: usize) -> BytesMut {
        match lock(&self.free).pop() {
            Some(buf) if buf.capacity() >= len => buf,
            _ => {
                let mut buf = BytesMut::with_capacity(len);
                advise_huge_pages(buf.spare_capacity_mut());
                buf
            }
        }
    }

    /// Takes the buffer back if nobody else holds a reference to it.
    pub(super) fn recycle(&self, data: Bytes) {
        if let Ok(mut buf) = data.try_into_mut() {
            buf.clear();
            let mut free = lock(&self.free);
            if free.len() < self.keep {
                free.push(buf);
            }
        }
    }
}

/// Asks for transparent huge pages on a fresh chunk buffer: filling 8 MiB through 4 KiB page
/// faults costs 2048 faults per buffer, a measurable share of a loopback download's CPU time.
/// Only advice; the kernel may ignore it.
pub(super) fn advise_huge_pages(buf: &mut [std::mem::MaybeUninit<u8>]) {
    const HUGE: usize = 2 << 20;
    const PAGE: usize = 4096;
    if buf.len() < HUGE {
        return;
    }
    let start = (buf.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (buf.as_ptr() as usize + buf.len()) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies within an allocation this function has exclusive access to;
        // MADV_HUGEPAGE changes no contents and cannot invalidate memory.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}
