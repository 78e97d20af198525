//! Sector-aligned bounce buffers for unbuffered I/O (O_DIRECT,
//! `FILE_FLAG_NO_BUFFERING`), which needs the buffer address, the offset and
//! the length all aligned to the logical sector size.
//!
//! Written by hand rather than pulled from a crate: it is a dozen lines of
//! safe code (over-allocate a `Vec`, start at the first aligned byte).

/// A zeroed byte buffer whose start address is a multiple of `align`.
#[derive(Debug)]
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `align` must be a power of two.
    pub(crate) fn new(len: usize, align: usize) -> Self {
        debug_assert!(align.is_power_of_two());
        let storage = vec![0u8; len + align];
        let addr = storage.as_ptr() as usize;
        let start = addr.next_multiple_of(align) - addr;
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
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
