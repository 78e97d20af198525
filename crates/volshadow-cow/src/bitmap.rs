//! A fixed-size lock-free bitmap over `AtomicU64` words: one bit per chunk.
//!
//! Written by hand: `bitvec` is dormant and not atomic; this is thirty lines.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub(crate) struct AtomicBitmap {
    words: Box<[AtomicU64]>,
}

impl AtomicBitmap {
    pub(crate) fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        AtomicBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Acquire pairs with the Release in `set`: a thread that sees the bit
    /// also sees everything done before it was set (the preserved copy).
    pub(crate) fn get(&self, bit: u64) -> bool {
        let w = &self.words[(bit / 64) as usize];
        w.load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    pub(crate) fn set(&self, bit: u64) {
        self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
    }

    pub(crate) fn clear(&self, bit: u64) {
        self.words[(bit / 64) as usize].fetch_and(!(1 << (bit % 64)), Ordering::Release);
    }

    /// Clears every bit. Callers make sure no one sets bits meanwhile.
    pub(crate) fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Bytes of memory held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear() {
        let b = AtomicBitmap::new(130);
        for i in [0u64, 63, 64, 129] {
            assert!(!b.get(i));
            b.set(i);
            assert!(b.get(i));
            b.clear(i);
            assert!(!b.get(i));
            b.set(i);
        }
        assert!(!b.get(1) && !b.get(65));
        b.clear_all();
        assert!((0..130).all(|i| !b.get(i)));
        assert_eq!(b.heap_bytes(), 24);
    }
}
