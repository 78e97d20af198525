//! The write path: copy each chunk's old contents to the diff area (and
//! make the copies durable where a persistent snapshot needs them) before
//! the origin is overwritten.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};

use volshadow_block::BlockDevice;

use crate::error::Result;
use crate::format::{HASH_LEN, Record, SlotEntry, VersionRecord};
use crate::layout::runs;
use crate::state::State;

use super::durability::Owed;
use super::{Inner, STRIPES};

/// Batches at least this large are hashed on a second thread.
const PARALLEL_HASH_BYTES: usize = 256 << 10;

/// What a write does to its range.
#[derive(Clone, Copy)]
pub(super) enum Payload<'a> {
    Data(&'a [u8]),
    Discard(u64),
}

impl Payload<'_> {
    fn len(&self) -> u64 {
        match self {
            Payload::Data(d) => d.len() as u64,
            Payload::Discard(n) => *n,
        }
    }
}

impl Inner {
    /// Copies the current contents of `chunks` (sorted) to the diff area and
    /// journals them. Contiguous chunks are read from the origin in one
    /// request, copies to contiguous slots go out in one write each for data
    /// and hashes, and the batch's records in one journal write. Returns
    /// what is [`Owed`] when the copies must be made durable before the
    /// origin is overwritten (some persistent snapshot may read them).
    pub(super) fn preserve_many(&self, chunks: &[u64]) -> Result<Option<Owed>> {
        // One critical section decides what to copy and where: chunks
        // copied by an earlier write that failed before marking them are
        // skipped (copying again would journal a duplicate; only durability
        // is owed), the rest get slots under the full policy.
        let (todo, mut durable, journaled, slots) = {
            let mut st = self.state_write();
            let Some(tag) = st.newest() else {
                return Ok(None);
            };
            let todo: Vec<u64> = chunks
                .iter()
                .copied()
                .filter(|&c| !st.index.contains(c as u32, tag))
                .collect();
            let owed =
                (todo.len() < chunks.len() && st.any_persistent()).then(|| Owed::all_of(&st));
            if todo.is_empty() {
                return Ok(owed);
            }
            let mut slots = Vec::with_capacity(todo.len());
            for _ in &todo {
                match self.alloc_slot(&mut st) {
                    Ok(Some(s)) => slots.push(s),
                    other => {
                        for s in &slots {
                            st.slots.release(*s);
                        }
                        return other.map(|_| owed);
                    }
                }
            }
            // With no persistent snapshot, every snapshot these copies can
            // serve is discarded on reopen, and none can become persistent
            // (snapshots are only created with the gate closed): recovery
            // never needs their records or hashes. The next persistent
            // snapshot checkpoints the index (see `State::unjournaled`).
            // Their slot entries carry no blake3 (but the read checksum).
            (todo, owed, st.any_persistent(), slots)
        };
        let release = |st: &mut State| {
            for s in &slots {
                st.slots.release(*s);
            }
        };
        let cs = self.geo.chunk as usize;
        // A pooled, aligned buffer: no allocation or zeroing per write, and
        // an unbuffered diff area writes it without a bounce copy.
        let mut data = self.buffers.take(todo.len() * cs);
        for (i, j) in runs(&todo) {
            let (off, _) = self.geo.chunk_range(todo[i]);
            let end = ((todo[j - 1] + 1) << self.geo.shift).min(self.geo.origin_len);
            let (read, tail) = data[i * cs..j * cs].split_at_mut((end - off) as usize);
            if let Err(e) = self.origin.read_at(read, off) {
                release(&mut self.state_write());
                return Err(e.into());
            }
            // Past the origin's end (its last chunk): zeros, not what the
            // buffer's last user left.
            tail.fill(0);
        }
        // Every copy gets an entry (crc and chunk, checked on each read);
        // copies some persistent snapshot may read also get their blake3
        // (journaled, for recovery and scrub).
        let entries_of = || -> (Vec<[u8; 32]>, Vec<u8>) {
            let mut hashes = Vec::with_capacity(todo.len());
            let mut entries = Vec::with_capacity(todo.len() * HASH_LEN as usize);
            for (k, &c) in todo.iter().enumerate() {
                let (_, len) = self.geo.chunk_range(c);
                let bytes = &data[k * cs..k * cs + len];
                let hash = journaled.then(|| *blake3::hash(bytes).as_bytes());
                entries.extend_from_slice(&SlotEntry::new(c as u32, bytes, hash.as_ref()).encode());
                hashes.push(hash.unwrap_or_default());
            }
            (hashes, entries)
        };
        let write_data = || {
            runs(&slots).try_for_each(|(i, j)| {
                let (first, last) = (todo[i], todo[j - 1]);
                // Where the diff area can share the origin's extents (XFS,
                // btrfs), a run of whole chunks contiguous in both is
                // cloned, not written: the old data stays written once.
                if self.clones.load(Ordering::Relaxed)
                    && last - first == (j - i - 1) as u64
                    && (last + 1) << self.geo.shift <= self.geo.origin_len
                {
                    let (off, _) = self.geo.chunk_range(first);
                    let len = ((j - i) * cs) as u64;
                    if self.diff.clone_from(
                        &*self.origin,
                        off,
                        self.geo.slot_offset(slots[i]),
                        len,
                    )? {
                        return Ok(());
                    }
                    self.clones.store(false, Ordering::Relaxed);
                }
                self.diff
                    .write_at(&data[i * cs..j * cs], self.geo.slot_offset(slots[i]))
            })
        };
        // A large batch hashes on a second thread while its copies go out:
        // the entries only have to be ready after the data.
        let ((hashes, entries), mut written) = if data.len() >= PARALLEL_HASH_BYTES {
            std::thread::scope(|s| {
                let hasher = s.spawn(entries_of);
                let written = write_data();
                (
                    hasher
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                    written,
                )
            })
        } else {
            (entries_of(), write_data())
        };
        if written.is_ok() {
            let e = HASH_LEN as usize;
            written = runs(&slots).try_for_each(|(i, j)| {
                self.diff
                    .write_at(&entries[i * e..j * e], self.geo.entry_offset(slots[i]))
            });
        }
        self.buffers.give(data);
        let mut st = self.state_write();
        if let Err(e) = written {
            release(&mut st);
            return Err(e.into());
        }
        let Some(tag) = st.newest() else {
            release(&mut st);
            return Ok(durable);
        };
        let versions: Vec<VersionRecord> = todo
            .iter()
            .zip(&slots)
            .map(|(&c, &slot)| VersionRecord {
                chunk: c as u32,
                tag,
                slot,
            })
            .collect();
        let copied = &self.copied;
        let index = |st: &mut State, v: &VersionRecord| {
            st.index.insert(v.chunk, v.tag, v.slot);
            copied.set(v.chunk as u64);
        };
        if journaled {
            let records: Vec<Record> = versions
                .iter()
                .zip(&hashes)
                .map(|(v, hash)| Record::Preserve {
                    version: *v,
                    hash: *hash,
                    durable: 0,
                })
                .collect();
            st.log_batch(&records, |st, r| {
                if let Record::Preserve { version, .. } = r {
                    index(st, version);
                }
            })
            .map_err(|e| self.fail(e))?;
        } else {
            st.unjournaled = true;
            for v in &versions {
                index(&mut st, v);
            }
        }
        if st.any_persistent() {
            durable = Some(Owed::all_of(&st));
        }
        Ok(durable)
    }

    pub(super) fn write_origin(&self, payload: Payload<'_>, offset: u64) -> Result<()> {
        match payload {
            Payload::Data(d) => self.origin.write_at(d, offset)?,
            Payload::Discard(n) => self.origin.discard(offset, n)?,
        }
        Ok(())
    }

    /// Locks the stripes of `chunks` in ascending order (so two callers
    /// never wait on each other crosswise); held while a chunk is copied or
    /// read from its snapshot place.
    pub(super) fn lock_stripes(
        &self,
        chunks: impl Iterator<Item = u64>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = chunks.map(|c| c as usize % STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .iter()
            .map(|&i| {
                self.stripes[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            })
            .collect()
    }

    /// The write path. The caller is inside the gate (or holds it closed).
    /// With `may_hold`, a write whose copies are not durable yet is held
    /// (see `held`) instead of waiting for their flush.
    pub(super) fn write_locked(
        self: &Arc<Self>,
        payload: Payload<'_>,
        offset: u64,
        may_hold: bool,
    ) -> Result<()> {
        self.check_ok()?;
        let len = payload.len();
        if len == 0 {
            return Ok(());
        }
        if !may_hold && !self.held.is_empty() {
            // A caller that needs its write in the origin on return (revert)
            // lets every held write go first.
            self.held.wait_applied()?;
        }
        let first = offset >> self.geo.shift;
        let last = (offset + len - 1) >> self.geo.shift;
        let chunks = (first, last);
        if self.newest.load(Ordering::Acquire) == 0 {
            return self.write_behind_held(payload, offset, chunks, may_hold);
        }
        let need: Vec<u64> = (first..=last).filter(|&c| !self.preserved.get(c)).collect();
        if need.is_empty() {
            return self.write_behind_held(payload, offset, chunks, may_hold);
        }
        let _guards = self.lock_stripes(need.iter().copied());
        // Re-check under the stripe locks: another writer may have copied.
        let fresh: Vec<u64> = need
            .into_iter()
            .filter(|&c| !self.preserved.get(c))
            .collect();
        if let Some(owed) = self.preserve_many(&fresh)? {
            if may_hold {
                // Queued before the chunks are marked: a writer that sees
                // the mark finds this entry and stays behind it.
                self.hold(payload, offset, chunks, Some(owed))?;
                for c in fresh {
                    self.preserved.set(c);
                }
                return Ok(());
            }
            self.settle(owed)?;
        }
        // Only now may other writers skip these chunks: their copies are
        // durable where they must be.
        for c in fresh {
            self.preserved.set(c);
        }
        self.write_behind_held(payload, offset, chunks, may_hold)
    }

    /// Writes the origin, unless the write touches a chunk of a held write:
    /// then it is held behind it, keeping their order. (Without `may_hold`
    /// the caller waited for held writes before it started.)
    fn write_behind_held(
        self: &Arc<Self>,
        payload: Payload<'_>,
        offset: u64,
        chunks: (u64, u64),
        may_hold: bool,
    ) -> Result<()> {
        if may_hold && !self.held.is_empty() && self.hold(payload, offset, chunks, None)? {
            return Ok(());
        }
        self.write_origin(payload, offset)
    }
}
