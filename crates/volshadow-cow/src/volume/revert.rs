//! Revert: the origin rolled back to a snapshot through the normal
//! copy-on-write path, journaled so a crash resumes it.

use std::sync::Arc;

use tracing::info;
use uuid::Uuid;
use volshadow_block::BlockDevice;

use crate::error::{Error, Result};
use crate::format::{FullPolicy, Record, RevertState};
use crate::gate::Closed;

use super::{DEFAULT_HOLD, Inner, Payload, Volume};

/// Revert journals its progress every this many chunks.
const REVERT_STEP: u64 = 1024;

impl Volume {
    /// Rolls the origin back to snapshot `id` (persistent snapshots only,
    /// as VSS). Newer snapshots stay valid: the revert writes through the
    /// normal copy-on-write path. Journaled; a crash mid-way resumes at open.
    ///
    /// # Example
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use volshadow_block::{BlockDevice, MemDevice};
    /// # use volshadow_cow::{SnapshotOptions, Target, Volume, VolumeOptions};
    /// # let vol = Volume::create(
    /// #     Arc::new(MemDevice::new(1 << 20)),
    /// #     Arc::new(MemDevice::new(8 << 20)),
    /// #     VolumeOptions::default(),
    /// # )?;
    /// vol.write_at(b"good", 0)?;
    /// let snap = vol.create_snapshot(SnapshotOptions { persistent: true, ..Default::default() })?;
    /// vol.write_at(b"oops", 0)?;
    ///
    /// vol.revert(snap.id)?;
    /// let mut buf = [0u8; 4];
    /// vol.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf, b"good");
    /// # Ok::<(), volshadow_cow::Error>(())
    /// ```
    pub fn revert(&self, id: Uuid) -> Result<()> {
        self.inner.check_ok()?;
        let closed = self.inner.gate.close(DEFAULT_HOLD)?;
        let inner = &self.inner;
        let seq = {
            let mut st = inner.state_write();
            let seq = st.find(id)?;
            if !st.snapshots[&seq].persistent {
                return Err(Error::InvalidOptions(format!(
                    "snapshot {id} is not persistent; only persistent snapshots can be reverted to"
                )));
            }
            // Every chunk the revert rewrites that the newest snapshot has
            // not copied yet needs a slot. Refuse now rather than stop half
            // way (a journaled revert must be able to finish).
            if let Some(newest) = st.newest().filter(|&n| n != seq) {
                let needed = (0..inner.geo.chunks)
                    .filter(|&c| inner.copied.may_have_copy(c))
                    .filter(|&c| {
                        st.index.lookup(c as u32, seq).is_some()
                            && !st.index.contains(c as u32, newest)
                    })
                    .count() as u64;
                let room = match st.policy {
                    FullPolicy::Grow { max } => {
                        (max / inner.geo.chunk).min(st.slots.total() as u64)
                    }
                    _ => st.max_slots,
                }
                .saturating_sub(st.slots.used());
                if needed > room {
                    return Err(Error::DiffAreaFull {
                        used: st.slots.used() * inner.geo.chunk,
                        max: st.max_slots * inner.geo.chunk,
                    });
                }
            }
            st.log(Record::RevertBegin { seq })
                .map_err(|e| inner.fail(e))?;
            st.revert = Some(RevertState { seq, next_chunk: 0 });
            inner.flush_diff(&mut st)?;
            seq
        };
        inner.run_revert(&closed, seq, 0)
    }
}

impl Inner {
    /// Writes snapshot `seq`'s contents over the origin from chunk `start`.
    pub(super) fn run_revert(
        self: &Arc<Self>,
        _closed: &Closed<'_>,
        seq: u64,
        start: u64,
    ) -> Result<()> {
        let id = {
            let st = self.state_read();
            Uuid::from_bytes(st.snapshots.get(&seq).map(|s| s.id).ok_or(Error::Corrupt {
                device: self.diff.name(),
                offset: 0,
                reason: format!("revert target {seq} is gone"),
            })?)
        };
        let mut buf = vec![0u8; self.geo.chunk as usize];
        let mut live = vec![0u8; self.geo.chunk as usize];
        for c in start..self.geo.chunks {
            if self.copied.may_have_copy(c) {
                let (off, len) = self.geo.chunk_range(c);
                let copied = self.state_read().index.lookup(c as u32, seq).is_some();
                if copied {
                    self.read_snapshot(id, seq, off, &mut buf[..len])?;
                    // A chunk written back to the target's bytes is left
                    // alone: rewriting it would copy it again for newer
                    // snapshots and show it as changed in every diff.
                    self.origin.read_at(&mut live[..len], off)?;
                    if live[..len] != buf[..len] {
                        self.write_locked(Payload::Data(&buf[..len]), off, false)?;
                    }
                }
            }
            if (c + 1) % REVERT_STEP == 0 && c + 1 < self.geo.chunks {
                // Progress may only claim chunks whose writes are durable.
                self.origin.flush()?;
                let mut st = self.state_write();
                let next_chunk = (c + 1) as u32;
                st.log(Record::RevertProgress { next_chunk })
                    .map_err(|e| self.fail(e))?;
                st.revert = Some(RevertState { seq, next_chunk });
            }
        }
        self.origin.flush()?;
        let mut st = self.state_write();
        st.log(Record::RevertEnd).map_err(|e| self.fail(e))?;
        st.revert = None;
        self.flush_diff(&mut st)?;
        info!(seq, "revert finished");
        Ok(())
    }
}
