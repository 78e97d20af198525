//! Sector-aligned buffers for unbuffered I/O (O_DIRECT,
//! `FILE_FLAG_NO_BUFFERING`), which needs the buffer address, the offset and
//! the length all aligned to the logical sector size, and a small pool that
//! reuses them so hot paths neither allocate nor zero a buffer per request.
//!
//! Written by hand rather than pulled from a crate: it is a few dozen lines
//! of safe code (over-allocate a `Vec`, start at the first aligned byte).

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, PoisonError};

/// A byte buffer whose start address is a multiple of its alignment
/// (4096 covers every sector and file-system block size in use). New bytes
/// are zeroed; a reused buffer keeps what it held.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    align: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        debug_assert!(align.is_power_of_two());
        let storage = vec![0u8; len + align];
        let addr = storage.as_ptr() as usize;
        let start = addr.next_multiple_of(align) - addr;
        AlignedBuf {
            storage,
            start,
            len,
            align,
        }
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        // The storage has `align` bytes of slack for the aligned start.
        self.storage.len() - self.align
    }

    /// Sets the length. Bytes within the capacity keep their old contents
    /// (a reused buffer is overwritten by its next use); growing past it
    /// reallocates with the same alignment, zeroed.
    pub fn resize(&mut self, len: usize) {
        if len > self.capacity() {
            *self = AlignedBuf::new(len, self.align);
        }
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

/// A bounded pool of 4096-aligned buffers: at most `keep` buffers of at
/// most `max_len` bytes are kept for reuse; others are freed when given
/// back, so the pool never holds more than `keep * max_len` bytes.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<AlignedBuf>>,
    keep: usize,
    max_len: usize,
}

/// Alignment of pooled buffers.
const POOL_ALIGN: usize = 4096;

impl BufferPool {
    pub fn new(keep: usize, max_len: usize) -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
            max_len,
        }
    }

    /// A buffer of `len` bytes; its contents are unspecified (zeros or what
    /// an earlier user left), so the caller overwrites all of it.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match reused {
            Some(mut b) => {
                b.resize(len);
                b
            }
            None => AlignedBuf::new(len, POOL_ALIGN),
        }
    }

    /// Returns a buffer for reuse (dropped if the pool is full or it is
    /// larger than the pool keeps).
    pub fn give(&self, buf: AlignedBuf) {
        if buf.capacity() > self.max_len {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

/// Writes `buf` at `offset` of an unbuffered `file`, where `offset` and
/// the length are multiples of `align` already: straight from `buf` when
/// its address is aligned too, else through an aligned copy (whole
/// sectors, so nothing needs reading first).
pub(crate) fn write_whole_sectors(
    file: &std::fs::File,
    buf: &[u8],
    offset: u64,
    align: u32,
) -> std::io::Result<()> {
    if is_aligned(buf.as_ptr() as usize, offset, buf.len(), align) {
        return crate::sys::write_all_at(file, buf, offset);
    }
    let mut bounce = AlignedBuf::new(buf.len(), align as usize);
    bounce.as_mut_slice().copy_from_slice(buf);
    crate::sys::write_all_at(file, bounce.as_slice(), offset)
}

/// True when `addr`, `offset` and `len` are all multiples of `align`.
pub(crate) fn is_aligned(addr: usize, offset: u64, len: usize, align: u32) -> bool {
    let a = align as u64;
    (addr as u64).is_multiple_of(a) && offset.is_multiple_of(a) && (len as u64).is_multiple_of(a)
}

/// The smallest aligned window `[start, end)` covering `offset..offset+len`.
pub(crate) fn widen(offset: u64, len: usize, align: u32) -> (u64, u64) {
    let a = align as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).next_multiple_of(a);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_aligned_and_sized() {
        for align in [512usize, 4096] {
            for len in [0usize, 1, 512, 4096, 10_000] {
                let mut b = AlignedBuf::new(len, align);
                assert_eq!(b.as_slice().as_ptr() as usize % align, 0);
                assert_eq!(b.as_mut_slice().len(), len);
                assert!(b.as_slice().iter().all(|&x| x == 0));
            }
        }
    }

    #[test]
    fn pooled_buffers_are_aligned_reused_and_bounded() {
        let pool = BufferPool::new(2, 1 << 20);
        let mut a = pool.take(4096);
        a.fill(7);
        let addr = a.as_ptr() as usize;
        pool.give(a);
        // Reused: same storage, old contents kept within the length.
        let b = pool.take(100);
        assert_eq!(b.as_ptr() as usize, addr);
        assert!(b.iter().all(|&x| x == 7));
        // Grown past its capacity: reallocated, still aligned.
        let mut b = b;
        b.resize(1 << 20);
        assert_eq!(b.as_ptr() as usize % POOL_ALIGN, 0);
        assert_eq!(b.len(), 1 << 20);
        pool.give(b);
        // Too large to keep.
        pool.give(AlignedBuf::new(2 << 20, POOL_ALIGN));
        assert_eq!(pool.free.lock().unwrap().len(), 1);
    }

    #[test]
    fn widen_covers_request() {
        assert_eq!(widen(0, 512, 512), (0, 512));
        assert_eq!(widen(1, 1, 512), (0, 512));
        assert_eq!(widen(511, 2, 512), (0, 1024));
        assert_eq!(widen(4096, 0, 4096), (4096, 4096));
        assert!(is_aligned(4096, 512, 1024, 512));
        assert!(!is_aligned(4096, 1, 1024, 512));
        assert!(!is_aligned(4097, 512, 1024, 512));
    }
}
