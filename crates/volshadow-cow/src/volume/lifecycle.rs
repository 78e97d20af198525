//! Snapshots made, listed, settled, deleted; the full policy; limits.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};
use uuid::Uuid;
use volshadow_block::BlockDevice;

use crate::error::{Error, Result};
use crate::format::{FullPolicy, InDoubtRecord, Record, SetMemberRecord, SnapshotRecord};
use crate::gate::Closed;
use crate::layout::runs;
use crate::state::State;
use crate::types::{InDoubtSet, SnapshotInfo, SnapshotOptions, Target, Usage, attributes};
use crate::view::SnapshotView;
use volshadow_block::Extent;

use super::{AUTO_DELETED_KEPT, DEFAULT_HOLD, Inner, Volume};

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Volume {
    /// Takes a snapshot: every write that completed before this call is in
    /// it, no write that starts after it returns is.
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
    /// vol.write_at(b"v1", 0)?;
    /// let snap = vol.create_snapshot(SnapshotOptions { persistent: true, ..Default::default() })?;
    /// assert_eq!(snap.seq, 1);
    /// assert_eq!(vol.snapshots(), vec![snap]);
    /// # Ok::<(), volshadow_cow::Error>(())
    /// ```
    pub fn create_snapshot(&self, options: SnapshotOptions) -> Result<SnapshotInfo> {
        let closed = self.inner.gate.close(DEFAULT_HOLD)?;
        self.inner.create_held(&closed, &options, None, None)
    }

    /// [`create_snapshot`](Self::create_snapshot) under a given id instead
    /// of a new random one: a replica's copy of another volume's snapshot
    /// keeps the source's id, so the two can be matched. Refused when a
    /// live snapshot of this volume already has that id.
    pub fn create_snapshot_with_id(
        &self,
        options: SnapshotOptions,
        id: Uuid,
    ) -> Result<SnapshotInfo> {
        let closed = self.inner.gate.close(DEFAULT_HOLD)?;
        self.inner.create_held(&closed, &options, None, Some(id))
    }

    /// Live snapshots, oldest first.
    ///
    /// Snapshots of a set whose creation was cut by a crash are not listed
    /// until the set is resolved (see [`Volume::in_doubt_sets`]).
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.inner
            .state_read()
            .usable()
            .map(SnapshotInfo::from_record)
            .collect()
    }

    /// Snapshots of sets whose creation a crash cut before this member
    /// learnt the outcome. Each is hidden until resolved: the set's
    /// decider (its first member) has its snapshot exactly when the set
    /// committed; see [`SnapshotSet::resolve`](crate::SnapshotSet::resolve).
    pub fn in_doubt_sets(&self) -> Vec<InDoubtSet> {
        let st = self.inner.state_read();
        st.in_doubt
            .values()
            .filter_map(|d| {
                let snap = st.snapshots.get(&d.seq)?;
                Some(InDoubtSet {
                    snapshot: SnapshotInfo::from_record(snap),
                    set_id: Uuid::from_bytes(d.set_id),
                    members: d
                        .members
                        .iter()
                        .map(|m| (Uuid::from_bytes(m.volume), m.locator.clone()))
                        .collect(),
                })
            })
            .collect()
    }

    /// Settles this member's snapshot of in-doubt set `set_id`: kept when
    /// `committed`, deleted otherwise. Journaled and flushed.
    pub fn resolve_in_doubt(&self, set_id: Uuid, committed: bool) -> Result<()> {
        self.inner.check_ok()?;
        let closed = self.inner.gate.close(DEFAULT_HOLD)?;
        let seq = self
            .inner
            .state_read()
            .in_doubt
            .values()
            .find(|d| d.set_id == *set_id.as_bytes())
            .map(|d| d.seq)
            .ok_or_else(|| {
                Error::InvalidOptions(format!("no snapshot of set {set_id} is in doubt here"))
            })?;
        // The gate stays closed, so nothing changes the state in between.
        if committed {
            self.inner.commit_held(&closed, seq)?;
            info!(%set_id, seq, "in-doubt set member kept: the set committed");
        } else {
            warn!(%set_id, seq, "in-doubt set member discarded: the set did not commit");
            self.inner.delete_held(&closed, seq)?;
        }
        Ok(())
    }

    /// A read-only device showing snapshot `id`.
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
    /// vol.write_at(b"old", 0)?;
    /// let snap = vol.create_snapshot(SnapshotOptions::default())?;
    /// vol.write_at(b"new", 0)?;
    ///
    /// let view = vol.snapshot(snap.id)?;
    /// let mut buf = [0u8; 3];
    /// view.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf, b"old");
    /// assert!(view.write_at(b"no", 0).is_err()); // read-only
    /// # Ok::<(), volshadow_cow::Error>(())
    /// ```
    pub fn snapshot(&self, id: Uuid) -> Result<SnapshotView> {
        let seq = self.inner.state_read().find(id)?;
        Ok(SnapshotView::new(self.inner.clone(), id, seq))
    }

    /// Deletes snapshot `id`, freeing exactly the versions no other live
    /// snapshot reads.
    pub fn delete_snapshot(&self, id: Uuid) -> Result<()> {
        let closed = self.inner.gate.close(DEFAULT_HOLD)?;
        let seq = self.inner.state_read().find_any(id)?;
        self.inner.delete_held(&closed, seq)
    }

    /// Deletes the oldest snapshot; returns it, or `None` if there is none.
    pub fn delete_oldest(&self) -> Result<Option<SnapshotInfo>> {
        let closed = self.inner.gate.close(DEFAULT_HOLD)?;
        let oldest = self
            .inner
            .state_read()
            .snapshots
            .values()
            .next()
            .map(SnapshotInfo::from_record);
        if let Some(s) = &oldest {
            self.inner.delete_held(&closed, s.seq)?;
        }
        Ok(oldest)
    }

    /// Changes the limit (and optionally the policy). Shrinking below what
    /// is used deletes the oldest snapshots under `DeleteOldest`, and fails
    /// under the other policies.
    pub fn resize(&self, max_bytes: u64, policy: Option<FullPolicy>) -> Result<Usage> {
        self.inner.check_ok()?;
        let closed = self.inner.gate.close(DEFAULT_HOLD)?;
        {
            let inner = &self.inner;
            let chunk = inner.geo.chunk;
            let capacity = inner.geo.slots as u64 * chunk;
            if max_bytes > capacity || max_bytes < chunk {
                return Err(Error::InvalidOptions(format!(
                    "maximum {max_bytes} must lie between one chunk ({chunk}) and the capacity ({capacity})"
                )));
            }
            let mut st = inner.state_write();
            let policy = policy.unwrap_or(st.policy);
            if let FullPolicy::Grow { max } = policy
                && (max > capacity || max < max_bytes)
            {
                return Err(Error::InvalidOptions(format!(
                    "grow limit {max} must lie between the maximum {max_bytes} and the capacity {capacity}"
                )));
            }
            let max_slots = max_bytes / chunk;
            while st.slots.used() > max_slots {
                let Some(oldest) = st.snapshots.keys().next().copied() else {
                    break;
                };
                if st.policy != FullPolicy::DeleteOldest {
                    return Err(Error::InvalidOptions(format!(
                        "{} bytes are in use, more than {max_bytes}; delete snapshots first",
                        st.slots.used() * chunk
                    )));
                }
                warn!(
                    seq = oldest,
                    "shrinking shadow storage deletes the oldest snapshot"
                );
                let info = SnapshotInfo::from_record(&st.snapshots[&oldest]);
                inner.delete_in_state(&mut st, oldest, Some(&closed))?;
                inner.tell_auto_deleted(info);
            }
            st.log(Record::Limits {
                max_bytes: max_slots * chunk,
                policy,
            })
            .map_err(|e| inner.fail(e))?;
            inner.flush_diff(&mut st)?;
            st.max_slots = max_slots;
            st.policy = policy;
        }
        drop(closed);
        Ok(self.usage())
    }

    /// Chunks changed between snapshot `from` and `to` (a later snapshot or
    /// the live volume), as merged byte extents. Exact at chunk granularity,
    /// also after deleting snapshots in between and after recovery.
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
    /// let a = vol.create_snapshot(SnapshotOptions::default())?;
    /// vol.write_at(&[9; 10], 100 << 10)?; // inside the chunk at 96 KiB
    /// let b = vol.create_snapshot(SnapshotOptions::default())?;
    ///
    /// let changed = vol.changed_extents(a.id, Target::Snapshot(b.id))?;
    /// assert_eq!((changed[0].offset, changed[0].len), (96 << 10, 16 << 10));
    /// assert!(vol.changed_extents(b.id, Target::Live)?.is_empty());
    /// # Ok::<(), volshadow_cow::Error>(())
    /// ```
    pub fn changed_extents(&self, from: Uuid, to: Target) -> Result<Vec<Extent>> {
        self.changed_extents_in(from, to, 0, self.inner.geo.origin_len)
    }

    /// `changed_extents` within `offset..offset+len` only (extents clipped
    /// to it): what an NBD BLOCK_STATUS request asks, at the cost of that
    /// window, not of the whole volume.
    pub fn changed_extents_in(
        &self,
        from: Uuid,
        to: Target,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        let geo = &self.inner.geo;
        let end = offset.saturating_add(len).min(geo.origin_len);
        if offset >= end {
            return Ok(Vec::new());
        }
        let window = (offset >> geo.shift) as u32..=((end - 1) >> geo.shift) as u32;
        let st = self.inner.state_read();
        let a = st.find(from)?;
        let b = match to {
            Target::Live => u64::MAX,
            Target::Snapshot(id) => st.find(id)?,
        };
        if b < a {
            return Err(Error::InvalidOptions(format!(
                "snapshot {from} is newer than the target; give the older one first"
            )));
        }
        let chunks = st.index.chunks_tagged(a, b, window);
        drop(st);
        let mut out = self.inner.merge_extents(chunks.into_iter().map(u64::from));
        // Clip the first and last extents to the window.
        if let Some(first) = out.first_mut()
            && first.offset < offset
        {
            first.len -= offset - first.offset;
            first.offset = offset;
        }
        if let Some(last) = out.last_mut()
            && last.offset + last.len > end
        {
            last.len = end - last.offset;
        }
        Ok(out)
    }

    /// Extents of snapshot `id` that may hold data: everything except
    /// ranges the snapshot reads from origin holes (which read as zeros).
    /// Preserved chunks always count as data.
    pub fn allocated_extents(&self, id: Uuid) -> Result<Vec<Extent>> {
        let view = self.snapshot(id)?;
        let len = self.inner.geo.origin_len;
        let map = view
            .allocation(0, len)
            .map_err(Error::Block)?
            .unwrap_or_else(|| vec![Extent { offset: 0, len }]);
        Ok(map)
    }
}

impl Inner {
    pub(super) fn merge_extents(&self, chunks: impl Iterator<Item = u64>) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for c in chunks {
            let (offset, len) = self.geo.chunk_range(c);
            volshadow_block::push_extent(
                &mut out,
                Extent {
                    offset,
                    len: len as u64,
                },
            );
        }
        out
    }

    /// Creates a snapshot; the gate is held closed by the caller.
    pub(crate) fn create_held(
        &self,
        _closed: &Closed<'_>,
        options: &SnapshotOptions,
        pending: Option<(Uuid, &[(Uuid, String)])>,
        id: Option<Uuid>,
    ) -> Result<SnapshotInfo> {
        self.check_ok()?;
        // A persistent snapshot's contents include writes still in the
        // origin's cache; make them durable before it counts.
        if options.persistent {
            self.origin.flush()?;
        }
        let mut st = self.state_write();
        let limit = self.max_snapshots.load(Ordering::Relaxed) as usize;
        if st.snapshots.len() >= limit {
            return Err(Error::TooManySnapshots(limit));
        }
        let mut attrs = options.attributes & !attributes::PERSISTENT;
        if options.persistent {
            attrs |= attributes::PERSISTENT | attributes::NO_AUTO_RELEASE;
        }
        if let Some(id) = id
            && st.find_any(id).is_ok()
        {
            return Err(Error::InvalidOptions(format!(
                "a snapshot with id {id} already exists"
            )));
        }
        if options.persistent && st.unjournaled {
            st.compact().map_err(|e| self.fail(e))?;
        }
        let rec = SnapshotRecord {
            seq: st.next_seq,
            id: *id.unwrap_or_else(Uuid::new_v4).as_bytes(),
            set_id: options.set_id.map(|u| *u.as_bytes()),
            created_ns: now_ns(),
            attributes: attrs,
            persistent: options.persistent,
        };
        let doubt = pending.map(|(set, members)| InDoubtRecord {
            seq: rec.seq,
            set_id: *set.as_bytes(),
            members: members
                .iter()
                .map(|(v, l)| SetMemberRecord {
                    volume: *v.as_bytes(),
                    locator: l.clone(),
                })
                .collect(),
        });
        let mut records = vec![Record::SnapshotCreate(rec.clone())];
        records.extend(doubt.clone().map(Record::SetPending));
        st.log_batch(&records, |_, _| {})
            .map_err(|e| self.fail(e))?;
        if options.persistent {
            self.flush_diff(&mut st)?;
        }
        st.next_seq += 1;
        st.snapshots.insert(rec.seq, rec.clone());
        if let Some(d) = doubt {
            st.in_doubt.insert(rec.seq, d);
        }
        // Older tags take no more inserts: store them compactly.
        st.index.freeze_older_than(rec.seq);
        // No writer is inside the gate, so nobody sets bits meanwhile.
        self.preserved.clear_all();
        self.newest.store(rec.seq, Ordering::Release);
        info!(
            seq = rec.seq,
            persistent = rec.persistent,
            "snapshot created"
        );
        Ok(SnapshotInfo::from_record(&rec))
    }

    /// Marks in-doubt snapshot `seq` committed (phase two of a set).
    pub(crate) fn commit_held(&self, _closed: &Closed<'_>, seq: u64) -> Result<()> {
        self.check_ok()?;
        let mut st = self.state_write();
        st.log(Record::SetCommit { seq })
            .map_err(|e| self.fail(e))?;
        self.flush_diff(&mut st)?;
        st.in_doubt.remove(&seq);
        Ok(())
    }

    /// Deletes a snapshot with the gate held closed.
    pub(crate) fn delete_held(&self, closed: &Closed<'_>, seq: u64) -> Result<()> {
        self.check_ok()?;
        let mut st = self.state_write();
        self.delete_in_state(&mut st, seq, Some(closed))
    }

    /// Journals the delete, makes it durable, then releases and discards the
    /// freed slots: a slot is never reused while a crash could bring back
    /// the snapshot that read it. Rebuilding the "preserved since newest"
    /// bitmap needs the gate closed (`closed`); without it (a writer's
    /// delete-oldest) the deleted snapshot is never the newest unless it is
    /// the only one, and then no bitmap is needed.
    pub(super) fn delete_in_state(
        &self,
        st: &mut State,
        seq: u64,
        closed: Option<&Closed<'_>>,
    ) -> Result<()> {
        let was_newest = st.newest() == Some(seq);
        st.log(Record::SnapshotDelete { seq })
            .map_err(|e| self.fail(e))?;
        let freed = st.forget(seq);
        self.flush_diff(st)?;
        self.discard_slots(&freed);
        // Highest first: the allocator hands out the last released first,
        // so new copies take the freed slots in ascending runs.
        for s in freed.iter().rev() {
            st.slots.release(*s);
        }
        let newest = st.newest();
        self.newest.store(newest.unwrap_or(0), Ordering::Release);
        if was_newest && let Some(n) = newest {
            debug_assert!(closed.is_some(), "bitmap rebuilt with writers inside");
            self.preserved.clear_all();
            for c in st.index.chunks_of(n) {
                self.preserved.set(c as u64);
            }
        }
        info!(seq, freed = freed.len(), "snapshot deleted");
        Ok(())
    }

    /// Punches freed slots, merged into runs. Best effort: a device that
    /// cannot discard keeps the old bytes, which nothing references.
    pub(super) fn discard_slots(&self, freed: &[u32]) {
        let mut sorted = freed.to_vec();
        sorted.sort_unstable();
        for (i, j) in runs(&sorted) {
            let off = self.geo.slot_offset(sorted[i]);
            let len = (j - i) as u64 * self.geo.chunk;
            if let Err(e) = self.diff.discard(off, len) {
                warn!(error = %e, "could not discard freed diff-area slots");
            }
        }
    }

    /// Records a snapshot the delete-oldest policy removed, for
    /// `take_auto_deleted`.
    pub(super) fn tell_auto_deleted(&self, info: SnapshotInfo) {
        self.auto_deleted_total.fetch_add(1, Ordering::Relaxed);
        let mut told = self
            .auto_deleted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Bounded: a caller that never asks keeps the newest.
        if told.len() >= AUTO_DELETED_KEPT {
            told.remove(0);
        }
        told.push(info);
    }

    /// Finds a free slot under the full policy. `None`: no snapshot needs
    /// the chunk any more (the last one was deleted to make room).
    pub(super) fn alloc_slot(&self, st: &mut State) -> Result<Option<u32>> {
        loop {
            if st.newest().is_none() {
                return Ok(None);
            }
            if st.slots.used() < st.max_slots
                && let Some(s) = st.slots.alloc()
            {
                return Ok(Some(s));
            }
            let chunk = self.geo.chunk;
            match st.policy {
                FullPolicy::DeleteOldest => {
                    let Some(oldest) = st.snapshots.values().next() else {
                        return Ok(None);
                    };
                    let info = SnapshotInfo::from_record(oldest);
                    warn!(id = %info.id, seq = info.seq, "diff area full: deleting the oldest snapshot");
                    self.delete_in_state(st, info.seq, None)?;
                    self.tell_auto_deleted(info);
                }
                FullPolicy::FailWrites => {
                    return Err(Error::DiffAreaFull {
                        used: st.slots.used() * chunk,
                        max: st.max_slots * chunk,
                    });
                }
                FullPolicy::Grow { max } => {
                    let cap = (max / chunk).min(st.slots.total() as u64);
                    if st.max_slots >= cap {
                        return Err(Error::DiffAreaFull {
                            used: st.slots.used() * chunk,
                            max: st.max_slots * chunk,
                        });
                    }
                    let grown = (st.max_slots + (st.max_slots / 4).max(16)).min(cap);
                    info!(
                        from = st.max_slots * chunk,
                        to = grown * chunk,
                        "growing diff area"
                    );
                    let policy = st.policy;
                    st.log(Record::Limits {
                        max_bytes: grown * chunk,
                        policy,
                    })
                    .map_err(|e| self.fail(e))?;
                    st.max_slots = grown;
                }
            }
        }
    }
}
