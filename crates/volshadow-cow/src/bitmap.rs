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

    /// Bytes of memory held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

/// Chunks per bit of a [`CopyHint`].
const HINT_GROUP: u64 = 64;

/// One bit per group of 64 chunks: set once any chunk of the group gets a
/// preserved copy, never cleared while the volume is open. A clear bit
/// proves that no snapshot holds a copy of those chunks, so snapshot reads
/// of regions never written since the first snapshot skip the index. At
/// 1/64 bit per origin chunk it keeps the fixed cost of a volume at about
/// one bit per origin chunk (the `preserved` bitmap).
#[derive(Debug)]
pub(crate) struct CopyHint(AtomicBitmap);

impl CopyHint {
    pub(crate) fn new(chunks: u64) -> Self {
        CopyHint(AtomicBitmap::new(chunks.div_ceil(HINT_GROUP)))
    }

    pub(crate) fn set(&self, chunk: u64) {
        self.0.set(chunk / HINT_GROUP);
    }

    /// False only if no chunk of `chunk`'s group was ever copied.
    pub(crate) fn may_have_copy(&self, chunk: u64) -> bool {
        self.0.get(chunk / HINT_GROUP)
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_hint_covers_its_group() {
        let h = CopyHint::new(64 * 64 * 3);
        assert!(!h.may_have_copy(200));
        h.set(200);
        assert!(h.may_have_copy(192) && h.may_have_copy(255));
        assert!(!h.may_have_copy(191) && !h.may_have_copy(256));
        assert_eq!(h.heap_bytes(), 24);
    }

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
        assert_eq!(b.heap_bytes(), 24);
    }
}

/// Words per stamped block: 4096 bits.
const BLOCK_WORDS: usize = 64;
/// A block's stamp while one thread clears it.
const BUSY: u32 = u32::MAX;

/// A bitmap that clears in O(1): each block of 4096 bits carries the epoch
/// in which its words were last valid; `clear_all` moves to a new epoch and
/// a block from an older one reads as all zeros until its first `set`
/// clears it for real. This is what makes snapshot creation independent of
/// the volume's size (a 1 TiB volume has 64 Mi chunks: 8 MiB of bits).
#[derive(Debug)]
pub(crate) struct EpochBitmap {
    words: Box<[AtomicU64]>,
    stamps: Box<[std::sync::atomic::AtomicU32]>,
    epoch: std::sync::atomic::AtomicU32,
}

impl EpochBitmap {
    pub(crate) fn new(bits: u64) -> Self {
        let words = bits.div_ceil(64) as usize;
        let blocks = words.div_ceil(BLOCK_WORDS);
        EpochBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            stamps: (0..blocks)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            epoch: std::sync::atomic::AtomicU32::new(1),
        }
    }

    pub(crate) fn get(&self, bit: u64) -> bool {
        let w = (bit / 64) as usize;
        let b = w / BLOCK_WORDS;
        if self.stamps[b].load(Ordering::Acquire) != self.epoch.load(Ordering::Acquire) {
            return false;
        }
        self.words[w].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    pub(crate) fn set(&self, bit: u64) {
        let w = (bit / 64) as usize;
        let b = w / BLOCK_WORDS;
        loop {
            let epoch = self.epoch.load(Ordering::Acquire);
            let stamp = self.stamps[b].load(Ordering::Acquire);
            if stamp == epoch {
                self.words[w].fetch_or(1 << (bit % 64), Ordering::Release);
                return;
            }
            if stamp == BUSY {
                std::hint::spin_loop();
                continue;
            }
            if self.stamps[b]
                .compare_exchange(stamp, BUSY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let end = ((b + 1) * BLOCK_WORDS).min(self.words.len());
                for word in &self.words[b * BLOCK_WORDS..end] {
                    word.store(0, Ordering::Relaxed);
                }
                self.stamps[b].store(epoch, Ordering::Release);
            }
        }
    }

    /// Clears every bit in O(1). Callers make sure no one sets bits
    /// meanwhile (the write gate is closed).
    pub(crate) fn clear_all(&self) {
        let next = self.epoch.load(Ordering::Acquire) + 1;
        if next == BUSY {
            // Once per 4 billion snapshots: restart the epochs.
            for s in self.stamps.iter() {
                s.store(0, Ordering::Relaxed);
            }
            self.epoch.store(1, Ordering::Release);
        } else {
            self.epoch.store(next, Ordering::Release);
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.len() * 8 + self.stamps.len() * 4
    }
}

#[cfg(test)]
mod epoch_tests {
    use super::*;

    #[test]
    fn clear_is_lazy_and_exact() {
        let b = EpochBitmap::new(10_000);
        for i in [0u64, 63, 4095, 4096, 9999] {
            b.set(i);
        }
        assert!(b.get(4095) && b.get(4096) && !b.get(4097));
        b.clear_all();
        assert!((0..10_000).all(|i| !b.get(i)));
        b.set(5);
        assert!(b.get(5) && !b.get(0) && !b.get(63));
        // A block untouched since two epochs ago still reads zero.
        b.clear_all();
        b.clear_all();
        assert!(!b.get(9999) && !b.get(5));
        b.set(9999);
        assert!(b.get(9999) && !b.get(9998));
    }

    #[test]
    fn concurrent_sets_in_one_block_all_land() {
        let b = std::sync::Arc::new(EpochBitmap::new(8192));
        b.set(1);
        b.clear_all();
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in (t..4096).step_by(4) {
                        b.set(i);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!((0..4096).all(|i| b.get(i)));
        assert!(!b.get(4096));
    }
}
