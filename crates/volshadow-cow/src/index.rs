//! Where each preserved chunk version lives, and which slots are free.
//!
//! Versions are grouped by tag: `by_tag[t]` maps chunk -> slot for every
//! chunk whose old contents were preserved while `t` was the newest
//! snapshot. Invariant: every tag is the sequence number of a live
//! snapshot. Snapshot `s` reads chunk `c` from the version with the
//! smallest tag >= `s`, or from the origin if there is none.
//!
//! Deleting snapshot `S` with live predecessor `P` (the newest live
//! snapshot older than `S`): each version tagged `S` still serves `P` if
//! `P` has no version of that chunk, and is retagged to `P`; otherwise no
//! live snapshot needs it and its slot is freed. This keeps the invariant,
//! frees exactly what nobody needs, and keeps changed-block tracking exact:
//! a chunk changed in `[a, b)` keeps a tag in `[a, b)` after any delete of a
//! snapshot strictly between `a` and `b`.
//!
//! Chunks and slots are `u32` (64 TiB at 16 KiB chunks) so an entry costs
//! 8 bytes plus the hash table's control byte and slack.

use std::collections::{BTreeMap, HashMap};

use crate::format::VersionRecord;

/// The versions of one tag. The newest snapshot's tag takes inserts and is
/// a hash map; older tags only change when a snapshot is deleted and are
/// frozen into a sorted vector: exactly 8 bytes a version.
#[derive(Debug)]
enum TagMap {
    Hot(HashMap<u32, u32>),
    Frozen(Vec<(u32, u32)>),
}

impl Default for TagMap {
    fn default() -> Self {
        TagMap::Hot(HashMap::new())
    }
}

impl TagMap {
    fn get(&self, chunk: u32) -> Option<u32> {
        match self {
            TagMap::Hot(m) => m.get(&chunk).copied(),
            TagMap::Frozen(v) => v.binary_search_by_key(&chunk, |e| e.0).ok().map(|i| v[i].1),
        }
    }

    fn len(&self) -> usize {
        match self {
            TagMap::Hot(m) => m.len(),
            TagMap::Frozen(v) => v.len(),
        }
    }

    fn thaw(&mut self) -> &mut HashMap<u32, u32> {
        if let TagMap::Frozen(v) = self {
            *self = TagMap::Hot(v.iter().copied().collect());
        }
        match self {
            TagMap::Hot(m) => m,
            TagMap::Frozen(_) => unreachable!("thawed above"),
        }
    }

    fn freeze(&mut self) {
        if let TagMap::Hot(m) = self {
            let mut v: Vec<(u32, u32)> = m.iter().map(|(&c, &s)| (c, s)).collect();
            v.sort_unstable();
            v.shrink_to_fit();
            *self = TagMap::Frozen(v);
        }
    }

    fn remove(&mut self, chunk: u32) -> Option<u32> {
        match self {
            TagMap::Hot(m) => m.remove(&chunk),
            TagMap::Frozen(v) => v
                .binary_search_by_key(&chunk, |e| e.0)
                .ok()
                .map(|i| v.remove(i).1),
        }
    }

    fn entries(&self) -> Box<dyn Iterator<Item = (u32, u32)> + '_> {
        match self {
            TagMap::Hot(m) => Box::new(m.iter().map(|(&c, &s)| (c, s))),
            TagMap::Frozen(v) => Box::new(v.iter().copied()),
        }
    }

    /// Heap bytes: a hash map's buckets (8 bytes of entry and one control
    /// byte each, buckets a power of two at most 7/8 full), or the vector.
    fn heap_bytes(&self) -> usize {
        match self {
            TagMap::Hot(m) if m.capacity() == 0 => 0,
            TagMap::Hot(m) => {
                let buckets = (m.capacity() * 8 / 7).next_power_of_two();
                buckets * 9 + 16
            }
            TagMap::Frozen(v) => v.capacity() * 8,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct VersionIndex {
    by_tag: BTreeMap<u64, TagMap>,
    len: u64,
}

impl VersionIndex {
    /// The version snapshot `seq` reads for `chunk`: (tag, slot).
    pub(crate) fn lookup(&self, chunk: u32, seq: u64) -> Option<(u64, u32)> {
        self.by_tag
            .range(seq..)
            .find_map(|(&tag, m)| m.get(chunk).map(|slot| (tag, slot)))
    }

    pub(crate) fn contains(&self, chunk: u32, tag: u64) -> bool {
        self.by_tag
            .get(&tag)
            .is_some_and(|m| m.get(chunk).is_some())
    }

    /// Adds a version; false (and no change) if `(chunk, tag)` exists.
    pub(crate) fn insert(&mut self, chunk: u32, tag: u64, slot: u32) -> bool {
        let m = self.by_tag.entry(tag).or_default().thaw();
        if m.contains_key(&chunk) {
            return false;
        }
        m.insert(chunk, slot);
        self.len += 1;
        true
    }

    /// Freezes every tag but `newest` (called when a snapshot is taken and
    /// after recovery): their versions change only on deletes.
    pub(crate) fn freeze_older_than(&mut self, newest: u64) {
        for m in self.by_tag.range_mut(..newest).map(|(_, m)| m) {
            m.freeze();
        }
    }

    /// Removes the version of `chunk` stored in `slot`, whatever its tag.
    pub(crate) fn remove_slot(&mut self, chunk: u32, slot: u32) -> bool {
        let tag = self
            .by_tag
            .iter()
            .find_map(|(&t, m)| (m.get(chunk) == Some(slot)).then_some(t));
        let Some(tag) = tag else {
            return false;
        };
        if let Some(m) = self.by_tag.get_mut(&tag) {
            m.remove(chunk);
            if m.len() == 0 {
                self.by_tag.remove(&tag);
            }
        }
        self.len -= 1;
        true
    }

    /// Removes tag `seq` (a deleted snapshot) as described in the module
    /// docs and returns the freed slots.
    pub(crate) fn drop_tag(&mut self, seq: u64, pred: Option<u64>) -> Vec<u32> {
        let Some(versions) = self.by_tag.remove(&seq) else {
            return Vec::new();
        };
        let mut freed = Vec::new();
        match pred {
            None => freed.extend(versions.entries().map(|(_, s)| s)),
            Some(p) => {
                let target = self.by_tag.entry(p).or_default();
                let mut moved: Vec<(u32, u32)> = Vec::new();
                for (chunk, slot) in versions.entries() {
                    if target.get(chunk).is_some() {
                        freed.push(slot);
                    } else {
                        moved.push((chunk, slot));
                    }
                }
                match target {
                    TagMap::Hot(m) => m.extend(moved),
                    TagMap::Frozen(v) => {
                        // Both sorted by chunk and disjoint: merge.
                        moved.sort_unstable();
                        let old = std::mem::take(v);
                        let mut merged = Vec::with_capacity(old.len() + moved.len());
                        let (mut a, mut b) =
                            (old.into_iter().peekable(), moved.into_iter().peekable());
                        loop {
                            let next = match (a.peek(), b.peek()) {
                                (Some(x), Some(y)) if x.0 < y.0 => a.next(),
                                (Some(_), Some(_)) => b.next(),
                                (Some(_), None) => a.next(),
                                (None, Some(_)) => b.next(),
                                (None, None) => break,
                            };
                            merged.extend(next);
                        }
                        *v = merged;
                    }
                }
                if target.len() == 0 {
                    self.by_tag.remove(&p);
                }
            }
        }
        self.len -= freed.len() as u64;
        // Sorted: slots are handed out again in a fixed order (runs of them
        // merge into single writes, and crash tests replay exactly).
        freed.sort_unstable();
        freed
    }

    /// Chunks in `chunks` with a version tagged in `from..to`, sorted.
    /// Frozen tags are searched by range, so a small window of a large
    /// index costs little.
    pub(crate) fn chunks_tagged(
        &self,
        from: u64,
        to: u64,
        chunks: std::ops::RangeInclusive<u32>,
    ) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for m in self.by_tag.range(from..to).map(|(_, m)| m) {
            match m {
                TagMap::Hot(h) => out.extend(h.keys().filter(|c| chunks.contains(c))),
                TagMap::Frozen(v) => {
                    let lo = v.partition_point(|e| e.0 < *chunks.start());
                    let hi = v.partition_point(|e| e.0 <= *chunks.end());
                    out.extend(v[lo..hi].iter().map(|e| e.0));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Chunks with a version tagged exactly `tag`.
    pub(crate) fn chunks_of(&self, tag: u64) -> impl Iterator<Item = u32> + '_ {
        self.by_tag
            .get(&tag)
            .into_iter()
            .flat_map(|m| m.entries().map(|(c, _)| c))
    }

    /// The tag just below `tag` among versions of `chunk`.
    pub(crate) fn prev_tag(&self, chunk: u32, tag: u64) -> Option<u64> {
        self.by_tag
            .range(..tag)
            .rev()
            .find_map(|(&t, m)| m.get(chunk).is_some().then_some(t))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = VersionRecord> + '_ {
        self.by_tag.iter().flat_map(|(&tag, m)| {
            m.entries()
                .map(move |(chunk, slot)| VersionRecord { chunk, tag, slot })
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Heap bytes held by the tables, plus 64 bytes a tag for the B-tree.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.by_tag.values().map(|m| m.heap_bytes() + 64).sum()
    }
}

/// Slot allocation: a free list of reusable slots plus a high-water mark,
/// so a fresh diff area is filled front to back.
#[derive(Debug, Default)]
pub(crate) struct SlotAllocator {
    free: Vec<u32>,
    next: u32,
    total: u32,
    used: u64,
}

impl SlotAllocator {
    pub(crate) fn new(total: u32) -> Self {
        SlotAllocator {
            total,
            ..Default::default()
        }
    }

    /// Rebuilds from the set of slots in use (recovery).
    pub(crate) fn from_used(total: u32, used: impl Iterator<Item = u32>) -> Self {
        let mut in_use = vec![false; total as usize];
        let mut count = 0;
        let mut next = 0;
        for s in used {
            if !in_use[s as usize] {
                in_use[s as usize] = true;
                count += 1;
                next = next.max(s + 1);
            }
        }
        let free = (0..next).rev().filter(|&s| !in_use[s as usize]).collect();
        SlotAllocator {
            free,
            next,
            total,
            used: count,
        }
    }

    pub(crate) fn alloc(&mut self) -> Option<u32> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.next < self.total => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.used += 1;
        Some(slot)
    }

    pub(crate) fn release(&mut self, slot: u32) {
        self.used -= 1;
        self.free.push(slot);
    }

    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    pub(crate) fn total(&self) -> u32 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_uses_smallest_tag_at_or_above() {
        let mut ix = VersionIndex::default();
        ix.insert(1, 2, 10);
        ix.insert(1, 5, 11);
        assert_eq!(ix.lookup(1, 1), Some((2, 10)));
        assert_eq!(ix.lookup(1, 2), Some((2, 10)));
        assert_eq!(ix.lookup(1, 3), Some((5, 11)));
        assert_eq!(ix.lookup(1, 6), None);
        assert!(!ix.insert(1, 5, 12));
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.prev_tag(1, 5), Some(2));
    }

    #[test]
    fn drop_tag_retags_or_frees() {
        let mut ix = VersionIndex::default();
        // Snapshots 1, 3, 4 live. Chunk 7 changed after 1 and after 3;
        // chunk 8 only after 3.
        ix.insert(7, 1, 100);
        ix.insert(7, 3, 101);
        ix.insert(8, 3, 102);
        // Delete 3: chunk 7's version is not needed by 1 (it has its own),
        // chunk 8's moves to 1.
        let freed = ix.drop_tag(3, Some(1));
        assert_eq!(freed, vec![101]);
        assert_eq!(ix.lookup(8, 1), Some((1, 102)));
        assert_eq!(ix.chunks_tagged(1, 2, 0..=u32::MAX), vec![7, 8]);
        assert_eq!(ix.chunks_tagged(1, 2, 8..=9), vec![8]);
        // The same through frozen tables.
        ix.freeze_older_than(u64::MAX);
        assert_eq!(ix.lookup(8, 1), Some((1, 102)));
        assert!(ix.contains(7, 1));
        assert_eq!(ix.heap_bytes(), 2 * 8 + 64);
        // Delete 1 with no predecessor: everything goes.
        let mut freed = ix.drop_tag(1, None);
        freed.sort();
        assert_eq!(freed, vec![100, 102]);
        assert_eq!(ix.len(), 0);
    }

    #[test]
    fn allocator_reuses_and_rebuilds() {
        let mut a = SlotAllocator::new(3);
        assert_eq!(
            (a.alloc(), a.alloc(), a.alloc(), a.alloc()),
            (Some(0), Some(1), Some(2), None)
        );
        a.release(1);
        assert_eq!(a.used(), 2);
        assert_eq!(a.alloc(), Some(1));
        let mut b = SlotAllocator::from_used(5, [3u32, 0].into_iter());
        assert_eq!(b.used(), 2);
        assert_eq!(b.alloc(), Some(1));
        assert_eq!(b.alloc(), Some(2));
        assert_eq!(b.alloc(), Some(4));
        assert_eq!(b.alloc(), None);
    }
}
