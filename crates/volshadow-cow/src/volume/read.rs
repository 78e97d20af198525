//! Snapshot reads: from the diff area where a chunk was preserved (each
//! chunk checked against its slot entry), else from the origin.

use uuid::Uuid;
use volshadow_block::BlockDevice;

use crate::error::{Error, Result};
use crate::format::HASH_LEN;
use crate::recovery::entry_holds;

use super::Inner;

impl Inner {
    /// Allocation of `offset..offset+len` as snapshot `seq` sees it:
    /// chunks it reads from the diff area are data, the rest is whatever
    /// the origin reports.
    pub(crate) fn snapshot_allocation(
        &self,
        seq: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<volshadow_block::Extent>>> {
        use volshadow_block::{Extent, push_extent};
        let mut out = Vec::new();
        if len == 0 {
            return Ok(Some(out));
        }
        let end = offset + len;
        let first = offset >> self.geo.shift;
        let last = (end - 1) >> self.geo.shift;
        let mut c = first;
        while c <= last {
            let preserved = |c: u64| {
                self.copied.may_have_copy(c)
                    && self.state_read().index.lookup(c as u32, seq).is_some()
            };
            let kind = preserved(c);
            let mut d = c + 1;
            while d <= last && preserved(d) == kind {
                d += 1;
            }
            let lo = (c << self.geo.shift).max(offset);
            let hi = (d << self.geo.shift).min(end);
            let run = Extent {
                offset: lo,
                len: hi - lo,
            };
            if kind {
                push_extent(&mut out, run);
            } else {
                let Some(exts) = self.origin.allocation(lo, hi - lo)? else {
                    return Ok(None);
                };
                // A writer may have preserved a chunk of the run and then
                // discarded it in the origin since the lookup; it indexes
                // the copy first, so looking again catches it, and the
                // run is reported as data (always safe).
                if (c..d).any(preserved) {
                    push_extent(&mut out, run);
                } else {
                    for e in exts {
                        push_extent(&mut out, e);
                    }
                }
            }
            c = d;
        }
        Ok(Some(out))
    }

    /// Reads `buf.len()` bytes at `offset` as snapshot `seq` sees them.
    /// The stripe locks of every chunk touched are held (in the order
    /// writers take them) so no writer can preserve and overwrite a chunk
    /// between the lookup and the read. Runs of chunks that sit next to
    /// each other in the same place go out as one request.
    pub(crate) fn read_snapshot(
        &self,
        id: Uuid,
        seq: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        if buf.is_empty() {
            return Ok(());
        }
        let shift = self.geo.shift;
        let first = offset >> shift;
        let last = (end - 1) >> shift;
        let _guards = self.lock_stripes(first..=last);
        // Where each chunk lives: a diff-area slot, or the origin (None).
        let places: Vec<Option<u32>> = {
            let st = self.state_read();
            if !st.snapshots.contains_key(&seq) {
                return Err(Error::SnapshotNotFound(id));
            }
            (first..=last)
                .map(|c| {
                    if self.copied.may_have_copy(c) {
                        st.index.lookup(c as u32, seq).map(|(_, s)| s)
                    } else {
                        None
                    }
                })
                .collect()
        };
        let mut k = 0;
        while k < places.len() {
            let mut e = k + 1;
            while e < places.len()
                && match (places[e - 1], places[e]) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.checked_add(1) == Some(b),
                    _ => false,
                }
            {
                e += 1;
            }
            let c0 = first + k as u64;
            let lo = (c0 << shift).max(offset);
            let hi = ((first + e as u64) << shift).min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match places[k] {
                Some(s) => self.read_slots(id, c0, s, lo, dst)?,
                None => {
                    if self.doubts.as_ref().is_some_and(|d| d.all_origin_reads) {
                        return Err(self.damaged(
                            id,
                            c0,
                            "salvage of a damaged journal cannot vouch for the origin's bytes",
                        ));
                    }
                    self.origin.read_at(dst, lo)?
                }
            }
            k = e;
        }
        Ok(())
    }

    pub(super) fn damaged(&self, snapshot: Uuid, chunk: u64, reason: &str) -> Error {
        Error::Damaged {
            snapshot,
            chunk,
            offset: chunk << self.geo.shift,
            reason: reason.into(),
        }
    }

    /// Reads `dst` (from byte `lo`) out of consecutive slots starting at
    /// `s0`, which hold consecutive chunks from `c0`, and checks every
    /// chunk touched against its slot entry before returning: a mismatch
    /// is an error naming the chunk, never the bytes. A chunk read in part
    /// is read whole into a scratch buffer to be checked.
    pub(super) fn read_slots(
        &self,
        id: Uuid,
        c0: u64,
        s0: u32,
        lo: u64,
        dst: &mut [u8],
    ) -> Result<()> {
        let shift = self.geo.shift;
        let run_start = c0 << shift;
        let hi = lo + dst.len() as u64;
        let (a, b) = (lo >> shift, (hi - 1) >> shift);
        let n = (b - a + 1) as usize;
        let first_slot = s0 + (a - c0) as u32;
        let mut entries = vec![0u8; n * HASH_LEN as usize];
        self.diff
            .read_at(&mut entries, self.geo.entry_offset(first_slot))?;
        self.diff
            .read_at(dst, self.geo.slot_offset(s0) + (lo - run_start))?;
        let mut scratch = Vec::new();
        for c in a..=b {
            let k = (c - a) as usize;
            let slot = first_slot + k as u32;
            let (off, len) = self.geo.chunk_range(c);
            let whole = off >= lo && off + len as u64 <= hi;
            let bytes: &[u8] = if whole {
                &dst[(off - lo) as usize..(off - lo) as usize + len]
            } else {
                scratch.resize(len, 0);
                self.diff
                    .read_at(&mut scratch, self.geo.slot_offset(slot))?;
                let from = lo.max(off);
                let to = hi.min(off + len as u64);
                dst[(from - lo) as usize..(to - lo) as usize]
                    .copy_from_slice(&scratch[(from - off) as usize..(to - off) as usize]);
                &scratch
            };
            let mut entry = [0u8; HASH_LEN as usize];
            entry.copy_from_slice(&entries[k * HASH_LEN as usize..(k + 1) * HASH_LEN as usize]);
            if !entry_holds(self.format, &entry, c as u32, bytes) {
                return Err(self.damaged(id, c, "the preserved copy fails its checksum"));
            }
            if self
                .doubts
                .as_ref()
                .is_some_and(|d| d.versions.contains(&(c as u32, slot)))
            {
                return Err(self.damaged(id, c, "recovery found this preserved copy damaged"));
            }
        }
        Ok(())
    }
}
