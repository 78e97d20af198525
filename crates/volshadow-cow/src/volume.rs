//! `Volume`: the live origin behind a copy-on-write layer, and everything
//! done to its snapshots.
//!
//! Lock order (never taken the other way round): gate -> chunk stripes ->
//! state. The journal lives inside the state, so "append a record and
//! update the index" is one critical section and a checkpoint always sees
//! a state that matches the records before it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};
use uuid::Uuid;
use volshadow_block::{BlockDevice, Op, check_range};

use crate::bitmap::{CopyHint, EpochBitmap};
use crate::commit::GroupCommit;
use crate::error::{Error, Result};
use crate::format::{
    FORMAT_VERSION, FullPolicy, HASH_LEN, InDoubtRecord, Record, RevertState, SUPERBLOCK_SLOT,
    SetMemberRecord, SlotEntry, SnapshotRecord, Superblock, VersionRecord,
};
use crate::gate::{Closed, Gate};
use crate::index::{SlotAllocator, VersionIndex};
use crate::journal::Journal;
use crate::recovery::{self, Doubts, OpenMode, entry_holds, read_entry};
use crate::types::{
    DEFAULT_MAX_SNAPSHOTS, Extent, InDoubtSet, Mismatch, SnapshotInfo, SnapshotOptions, Target,
    Usage, VerifyReport, VolumeOptions, attributes,
};
use crate::view::SnapshotView;

/// Chunk-stripe locks: a write that must preserve chunk `c` holds stripe
/// `c % STRIPES` until the origin write is done; a snapshot read of `c`
/// holds it while it decides where to read from and reads.
const STRIPES: usize = 1024;

/// Batches at least this large are hashed on a second thread.
const PARALLEL_HASH_BYTES: usize = 256 << 10;

/// Versions per checkpoint record.
const CHECKPOINT_BATCH: usize = 4096;
/// Revert journals its progress every this many chunks.
const REVERT_STEP: u64 = 1024;
/// Fixed part of each journal half; the rest scales with the slot count.
const JOURNAL_BASE: u64 = 128 << 10;
/// Journal bytes per slot: a checkpoint entry is at most ~21 bytes.
const JOURNAL_PER_SLOT: u64 = 32;
/// Unreported delete-oldest deletions kept for `take_auto_deleted`.
const AUTO_DELETED_KEPT: usize = 1024;
/// How long user operations wait for in-flight writes to drain.
const DEFAULT_HOLD: Duration = Duration::from_secs(10);

/// Sizes and offsets fixed at `create`.
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub(crate) chunk: u64,
    pub(crate) shift: u32,
    pub(crate) chunks: u64,
    pub(crate) origin_len: u64,
    pub(crate) hash_offset: u64,
    pub(crate) data_offset: u64,
    pub(crate) slots: u32,
    pub(crate) uuid: Uuid,
}

impl Geometry {
    pub(crate) fn from_superblock(sb: &Superblock) -> Self {
        Geometry {
            chunk: sb.chunk_size as u64,
            shift: sb.chunk_size.trailing_zeros(),
            chunks: sb.origin_len.div_ceil(sb.chunk_size as u64),
            origin_len: sb.origin_len,
            hash_offset: sb.hash_offset,
            data_offset: sb.data_offset,
            slots: sb.slots as u32,
            uuid: Uuid::from_bytes(sb.uuid),
        }
    }

    /// Offset and length of chunk `c` in the origin (the last may be short).
    pub(crate) fn chunk_range(&self, c: u64) -> (u64, usize) {
        let off = c << self.shift;
        (off, (self.origin_len - off).min(self.chunk) as usize)
    }

    pub(crate) fn slot_offset(&self, slot: u32) -> u64 {
        self.data_offset + slot as u64 * self.chunk
    }

    /// Offset of slot `slot`'s entry.
    pub(crate) fn entry_offset(&self, slot: u32) -> u64 {
        self.hash_offset + slot as u64 * HASH_LEN
    }
}

/// Index ranges `[i, j)` of maximal runs of consecutive values.
fn runs<T>(v: &[T]) -> impl Iterator<Item = (usize, usize)> + '_
where
    T: Copy + PartialEq + std::ops::Add<Output = T> + From<u8>,
{
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= v.len() {
            return None;
        }
        let mut j = i + 1;
        while j < v.len() && v[j] == v[j - 1] + T::from(1) {
            j += 1;
        }
        let r = (i, j);
        i = j;
        Some(r)
    })
}

/// Diff areas at least this large start their data slots on a
/// [`SLOT_ALIGN`] boundary; smaller ones on a chunk boundary.
const SLOT_ALIGN_FROM: u64 = 64 << 20;
/// Runs of slots then line up with the page cache's large folios and with
/// device stripe and erase units (LVM aligns data to 1 MiB alike): 1 MiB
/// reads of a diff-area file measured 14 GiB/s aligned against 10-12 GiB/s
/// 4 KiB off.
const SLOT_ALIGN: u64 = 1 << 20;

/// Plans the diff-area layout for a device of `diff_len` bytes.
fn plan_layout(diff_len: u64, chunk: u64, half: Option<u64>) -> Option<(u64, u64, u64, u64)> {
    let align = |x: u64| x.next_multiple_of(4096);
    let slot_align = if diff_len >= SLOT_ALIGN_FROM {
        SLOT_ALIGN.max(chunk)
    } else {
        chunk
    };
    let journal_offset = 2 * SUPERBLOCK_SLOT;
    let per_slot = chunk + HASH_LEN + 2 * JOURNAL_PER_SLOT;
    let fixed = journal_offset + 2 * JOURNAL_BASE + 3 * 4096;
    let mut slots = diff_len.checked_sub(fixed)? / per_slot;
    slots = slots.min(u32::MAX as u64);
    loop {
        let half = half.map_or_else(|| align(JOURNAL_BASE + slots * JOURNAL_PER_SLOT), align);
        let hash_offset = journal_offset + 2 * half;
        let data_offset = (hash_offset + slots * HASH_LEN).next_multiple_of(slot_align);
        if data_offset + slots * chunk <= diff_len {
            return Some((half, hash_offset, data_offset, slots));
        }
        slots = slots.checked_sub(1)?;
    }
}

/// Mutable engine state, including the journal.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) snapshots: BTreeMap<u64, SnapshotRecord>,
    pub(crate) index: VersionIndex,
    pub(crate) slots: SlotAllocator,
    pub(crate) max_slots: u64,
    pub(crate) policy: FullPolicy,
    pub(crate) next_seq: u64,
    pub(crate) revert: Option<RevertState>,
    pub(crate) journal: Journal,
    pub(crate) chunk: u64,
    /// Copies made without records since the last checkpoint (no
    /// persistent snapshot existed). Replaying the journal would then
    /// rebuild an index without them, and deletes would retag and free
    /// differently than in memory; the next persistent snapshot writes a
    /// checkpoint first so that replay starts from the real index.
    pub(crate) unjournaled: bool,
    /// Snapshots of sets not known to have committed, by seq.
    pub(crate) in_doubt: BTreeMap<u64, InDoubtRecord>,
}

impl State {
    pub(crate) fn newest(&self) -> Option<u64> {
        self.snapshots.keys().next_back().copied()
    }

    fn any_persistent(&self) -> bool {
        self.snapshots.values().any(|s| s.persistent)
    }

    pub(crate) fn checkpoint_records(&self) -> Vec<Record> {
        let mut out = vec![Record::Checkpoint {
            next_seq: self.next_seq,
            max_bytes: self.max_slots * self.chunk,
            policy: self.policy,
            snapshots: self.snapshots.values().cloned().collect(),
            revert: self.revert,
        }];
        if !self.in_doubt.is_empty() {
            out.push(Record::CheckpointInDoubt(
                self.in_doubt.values().cloned().collect(),
            ));
        }
        let all: Vec<VersionRecord> = self.index.iter().collect();
        out.extend(
            all.chunks(CHECKPOINT_BATCH)
                .map(|b| Record::CheckpointVersions(b.to_vec())),
        );
        out.push(Record::CheckpointEnd {
            versions: all.len() as u64,
        });
        out
    }

    /// Compacts the journal into its other half.
    fn compact(&mut self) -> Result<()> {
        let records = self.checkpoint_records();
        let id = self.journal.superblock().origin_id;
        self.journal.checkpoint(records, id)?;
        self.unjournaled = false;
        Ok(())
    }

    /// Journals `records` in as few writes as fit, compacting whenever the
    /// active half is full. `logged` applies each record to the in-memory
    /// state right after it is appended, before any later compaction, so a
    /// checkpoint always holds every record before it: a batch of any size
    /// survives compactions in its middle.
    fn log_batch(
        &mut self,
        records: &[Record],
        mut logged: impl FnMut(&mut Self, &Record),
    ) -> Result<()> {
        let mut done = 0;
        let mut compacted = false;
        while done < records.len() {
            let n = self.journal.append_fitting(&records[done..])?;
            if n == 0 {
                if compacted {
                    return Err(Error::JournalTooSmall {
                        needed: self.journal.superblock().journal_half + 1,
                        capacity: self.journal.superblock().journal_half,
                    });
                }
                self.compact()?;
                compacted = true;
                continue;
            }
            compacted = false;
            for r in &records[done..done + n] {
                logged(self, r);
            }
            done += n;
        }
        Ok(())
    }

    /// Appends a record, compacting first if the active half is full. The
    /// caller applies it to the state.
    fn log(&mut self, rec: Record) -> Result<()> {
        self.log_batch(std::slice::from_ref(&rec), |_, _| {})
    }

    /// Removes snapshot `seq` from memory; returns the slots nobody needs.
    pub(crate) fn forget(&mut self, seq: u64) -> Vec<u32> {
        self.snapshots.remove(&seq);
        self.in_doubt.remove(&seq);
        let pred = self.snapshots.range(..seq).next_back().map(|(&s, _)| s);
        self.index.drop_tag(seq, pred)
    }

    /// A usable snapshot: live and not in doubt.
    fn find(&self, id: Uuid) -> Result<u64> {
        let seq = self.find_any(id)?;
        match self.in_doubt.get(&seq) {
            Some(d) => Err(Error::SetInDoubt {
                snapshot: id,
                set: Uuid::from_bytes(d.set_id),
            }),
            None => Ok(seq),
        }
    }

    /// A live snapshot, in doubt or not.
    fn find_any(&self, id: Uuid) -> Result<u64> {
        self.snapshots
            .values()
            .find(|s| s.id == *id.as_bytes())
            .map(|s| s.seq)
            .ok_or(Error::SnapshotNotFound(id))
    }

    fn usable(&self) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .values()
            .filter(|s| !self.in_doubt.contains_key(&s.seq))
    }
}

/// What a write does to its range.
#[derive(Clone, Copy)]
enum Payload<'a> {
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

pub(crate) struct Inner {
    pub(crate) origin: Arc<dyn BlockDevice>,
    pub(crate) diff: Arc<dyn BlockDevice>,
    pub(crate) geo: Geometry,
    gate: Gate,
    state: RwLock<State>,
    /// Chunks preserved since the newest snapshot was taken.
    preserved: EpochBitmap,
    /// Groups of chunks that have (or once had) a preserved version: lets
    /// snapshot reads of never-changed regions skip the index.
    copied: CopyHint,
    /// Newest live snapshot's seq, 0 when there is none.
    newest: AtomicU64,
    stripes: Box<[Mutex<()>]>,
    commit: GroupCommit,
    failed: AtomicBool,
    max_snapshots: AtomicU64,
    /// Snapshots the delete-oldest policy removed, not yet reported.
    auto_deleted: Mutex<Vec<SnapshotInfo>>,
    /// Snapshots the delete-oldest policy removed since open.
    auto_deleted_total: AtomicU64,
    /// Format of the slot entries (1 only in a salvage open of format 1).
    format: u32,
    /// Set by `close`: changes are refused, the journal is marked.
    closed: AtomicBool,
    /// Set in a salvage open: read-only, and what it cannot vouch for.
    pub(crate) doubts: Option<Doubts>,
    /// What recovery found at open.
    notes: Vec<String>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("origin", &self.origin.name())
            .field("diff", &self.diff.name())
            .field("uuid", &self.geo.uuid)
            .finish_non_exhaustive()
    }
}

/// A volume: the origin device behind the copy-on-write layer, with its
/// diff area. Cloning is cheap and shares the volume.
#[derive(Debug, Clone)]
pub struct Volume {
    pub(crate) inner: Arc<Inner>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Volume {
    /// The smallest diff-area device size whose default layout (journal
    /// halves sized by the slot count) holds at least `capacity` bytes of
    /// `chunk_size` slots: what to give a new diff-area file.
    pub fn diff_area_len_for(capacity: u64, chunk_size: u32) -> u64 {
        let chunk = u64::from(chunk_size.max(4096));
        let slots = capacity.div_ceil(chunk);
        let per_slot = chunk + HASH_LEN + 2 * JOURNAL_PER_SLOT;
        // Layout overhead plus rounding: two journal halves, the hash
        // region and the data start each round up once.
        let fixed = 2 * SUPERBLOCK_SLOT + 2 * JOURNAL_BASE + 4 * 4096 + SLOT_ALIGN.max(chunk);
        let mut len = slots.saturating_mul(per_slot).saturating_add(fixed);
        // Shrink while the layout still holds the slots: the estimate above
        // is an upper bound, whole chunks at a time keep this short.
        while len > chunk && plan_layout(len - chunk, chunk, None).is_some_and(|(.., n)| n >= slots)
        {
            len -= chunk;
        }
        len
    }

    /// Initialises a diff area for `origin` on `diff` and opens the volume.
    pub fn create(
        origin: Arc<dyn BlockDevice>,
        diff: Arc<dyn BlockDevice>,
        options: VolumeOptions,
    ) -> Result<Self> {
        let cs = options.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(Error::InvalidOptions(format!(
                "chunk size {cs} is not a power of two between 4 KiB and 1 MiB"
            )));
        }
        let chunk = cs as u64;
        let origin_len = origin.len();
        if origin_len == 0 || origin_len.div_ceil(chunk) > u32::MAX as u64 {
            return Err(Error::InvalidOptions(format!(
                "origin of {origin_len} bytes cannot be split into at most 2^32 chunks of {cs}"
            )));
        }
        let holds_one =
            (0..2).any(|c| Journal::read_superblock_copy(&*diff, c).is_ok_and(|r| r.is_ok()));
        if !options.overwrite && holds_one {
            return Err(Error::InvalidOptions(format!(
                "{} already holds a diff area; refusing to overwrite it",
                diff.name()
            )));
        }
        if options.journal_half.is_some_and(|h| h < 8192) {
            return Err(Error::InvalidOptions(
                "a journal half needs at least 8 KiB".into(),
            ));
        }
        let (half, hash_offset, data_offset, slots) =
            plan_layout(diff.len(), chunk, options.journal_half)
                .filter(|l| l.3 > 0)
                .ok_or_else(|| {
                    Error::InvalidOptions(format!(
                        "diff area of {} bytes is too small for even one {cs}-byte chunk",
                        diff.len()
                    ))
                })?;
        let capacity = slots * chunk;
        let max_bytes = match (options.max_bytes, options.policy) {
            (_, FullPolicy::Grow { max }) if max > capacity => {
                return Err(Error::InvalidOptions(format!(
                    "grow limit {max} exceeds the diff area's capacity of {capacity} bytes"
                )));
            }
            (Some(m), _) if m > capacity => {
                return Err(Error::InvalidOptions(format!(
                    "maximum {m} exceeds the diff area's capacity of {capacity} bytes"
                )));
            }
            (Some(m), _) => m,
            (None, _) => capacity,
        };
        let sb = Superblock {
            version: FORMAT_VERSION,
            incompat: 0,
            compat: 0,
            generation: 0,
            uuid: *Uuid::new_v4().as_bytes(),
            chunk_size: cs,
            origin_len,
            diff_len: diff.len(),
            journal_offset: 2 * SUPERBLOCK_SLOT,
            journal_half: half,
            hash_offset,
            data_offset,
            slots,
            active_half: 0,
            epoch: 1,
            origin_id: origin.identity().unwrap_or_default(),
        };
        let checkpoint = vec![
            Record::Checkpoint {
                next_seq: 1,
                max_bytes,
                policy: options.policy,
                snapshots: Vec::new(),
                revert: None,
            },
            Record::CheckpointEnd { versions: 0 },
        ];
        let journal = Journal::create(diff.clone(), sb.clone(), checkpoint)?;
        let mut state = State::empty(journal, chunk);
        state.slots = SlotAllocator::new(slots as u32);
        state.max_slots = max_bytes / chunk;
        state.policy = options.policy;
        info!(origin = %origin.name(), diff = %diff.name(), slots, "created diff area");
        Self::assemble(origin, diff, &sb, state, None, Vec::new())
    }

    /// Opens an existing volume, running recovery: the journal is replayed
    /// (a torn tail is cut off; damage is an error naming what and where),
    /// non-persistent snapshots are discarded, a fresh checkpoint is
    /// written, and an interrupted revert is finished. The origin must be
    /// the one the diff area was made for (same size and identity).
    pub fn open(origin: Arc<dyn BlockDevice>, diff: Arc<dyn BlockDevice>) -> Result<Self> {
        Self::open_with(origin, diff, OpenMode::Normal)
    }

    /// `open` with a mode: [`OpenMode::Rebind`] accepts and records a new
    /// origin identity (the pair was moved or copied together);
    /// [`OpenMode::Salvage`] opens a damaged diff area read-only, writing
    /// nothing, and serves only what it can vouch for (other reads fail).
    pub fn open_with(
        origin: Arc<dyn BlockDevice>,
        diff: Arc<dyn BlockDevice>,
        mode: OpenMode,
    ) -> Result<Self> {
        let r = recovery::recover(&origin, &diff, mode)?;
        let vol = Self::assemble(origin, diff, &r.sb, r.state, r.doubts, r.notes)?;
        if let Some(rv) = r.resume_revert {
            info!(
                seq = rv.seq,
                from_chunk = rv.next_chunk,
                "resuming interrupted revert"
            );
            let closed = vol.inner.gate.close(Duration::MAX)?;
            vol.inner
                .run_revert(&closed, rv.seq, rv.next_chunk as u64)?;
        }
        Ok(vol)
    }

    /// The diff area's superblock generation now. It grows with every
    /// open and compaction, so a caller that remembers it can tell an
    /// older copy of the diff area put back in its place (whose snapshots
    /// would read chunks overwritten since from the origin).
    pub fn generation(&self) -> u64 {
        self.inner.state_read().journal.superblock().generation
    }

    /// The highest generation of a valid superblock copy on `diff`, read
    /// without opening it.
    pub fn peek_generation(diff: &dyn BlockDevice) -> Result<u64> {
        let mut best = None;
        for copy in 0..2 {
            if let Ok(sb) = Journal::read_superblock_copy(diff, copy)? {
                best = best.max(Some(sb.generation));
            }
        }
        best.ok_or_else(|| Error::NotADiffArea {
            device: diff.name(),
            reason: "no valid superblock copy".into(),
        })
    }

    /// Closes the volume cleanly while clones of it may still exist (a
    /// server stopping on a signal): holds new writes, waits for those in
    /// flight, flushes the origin and marks the journal committed (as a
    /// last drop would). Later writes and changes fail; reads still work.
    pub fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.doubts.is_some() || inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _closed = inner.gate.close(DEFAULT_HOLD)?;
        inner.origin.flush()?;
        if !inner.failed.load(Ordering::Acquire) {
            inner.state_write().journal.close()?;
        }
        info!(diff = %inner.diff.name(), "volume closed");
        Ok(())
    }

    /// True if opened with [`OpenMode::Salvage`]: read-only, and reads it
    /// cannot vouch for fail.
    pub fn is_salvage(&self) -> bool {
        self.inner.doubts.is_some()
    }

    /// What recovery found and repaired at open (damaged superblock copy,
    /// torn-tail cut, salvage findings), one line each.
    pub fn recovery_notes(&self) -> Vec<String> {
        self.inner.notes.clone()
    }

    fn assemble(
        origin: Arc<dyn BlockDevice>,
        diff: Arc<dyn BlockDevice>,
        sb: &Superblock,
        state: State,
        doubts: Option<Doubts>,
        notes: Vec<String>,
    ) -> Result<Self> {
        let geo = Geometry::from_superblock(sb);
        let preserved = EpochBitmap::new(geo.chunks);
        let copied = CopyHint::new(geo.chunks);
        for v in state.index.iter() {
            copied.set(v.chunk as u64);
        }
        let newest = state.newest().unwrap_or(0);
        for c in state.index.chunks_of(newest) {
            preserved.set(c as u64);
        }
        let commit = GroupCommit::new(diff.clone());
        Ok(Volume {
            inner: Arc::new(Inner {
                origin,
                diff,
                geo,
                gate: Gate::default(),
                state: RwLock::new(state),
                preserved,
                copied,
                newest: AtomicU64::new(newest),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                commit,
                failed: AtomicBool::new(false),
                max_snapshots: AtomicU64::new(DEFAULT_MAX_SNAPSHOTS as u64),
                auto_deleted: Mutex::new(Vec::new()),
                auto_deleted_total: AtomicU64::new(0),
                format: sb.version,
                closed: AtomicBool::new(false),
                doubts,
                notes,
            }),
        })
    }

    /// The volume's id (recorded in the diff area).
    pub fn id(&self) -> Uuid {
        self.inner.geo.uuid
    }

    pub fn chunk_size(&self) -> u32 {
        self.inner.geo.chunk as u32
    }

    /// Sets the most snapshots this volume keeps (VSS: 512).
    pub fn set_snapshot_limit(&self, limit: usize) {
        self.inner
            .max_snapshots
            .store(limit as u64, Ordering::Relaxed);
    }

    /// Takes a snapshot: every write that completed before this call is in
    /// it, no write that starts after it returns is.
    pub fn create_snapshot(&self, options: SnapshotOptions) -> Result<SnapshotInfo> {
        let closed = self.inner.gate.close(DEFAULT_HOLD)?;
        self.inner.create_held(&closed, &options, None)
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
        let inner = &self.inner;
        let mut st = inner.state_write();
        let seq = st
            .in_doubt
            .values()
            .find(|d| d.set_id == *set_id.as_bytes())
            .map(|d| d.seq)
            .ok_or_else(|| {
                Error::InvalidOptions(format!("no snapshot of set {set_id} is in doubt here"))
            })?;
        if committed {
            st.log(Record::SetCommit { seq })
                .map_err(|e| inner.fail(e))?;
            inner.flush_diff(&mut st)?;
            st.in_doubt.remove(&seq);
            info!(%set_id, seq, "in-doubt set member kept: the set committed");
        } else {
            warn!(%set_id, seq, "in-doubt set member discarded: the set did not commit");
            inner.delete_in_state(&mut st, seq, Some(&closed))?;
        }
        Ok(())
    }

    /// A read-only device showing snapshot `id`.
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

    /// Diff-area usage.
    pub fn usage(&self) -> Usage {
        let st = self.inner.state_read();
        let chunk = self.inner.geo.chunk;
        Usage {
            used_bytes: st.slots.used() * chunk,
            max_bytes: st.max_slots * chunk,
            capacity_bytes: st.slots.total() as u64 * chunk,
            chunk_size: chunk as u32,
            preserved_chunks: st.index.len(),
            snapshots: st.snapshots.len(),
            policy: st.policy,
        }
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
    pub fn changed_extents(&self, from: Uuid, to: Target) -> Result<Vec<Extent>> {
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
        let chunks = st.index.chunks_tagged(a, b);
        drop(st);
        Ok(self.inner.merge_extents(chunks.into_iter().map(u64::from)))
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
            .unwrap_or_else(|| {
                vec![volshadow_block::Extent {
                    offset: 0,
                    len,
                    data: true,
                }]
            });
        Ok(map
            .into_iter()
            .filter(|e| e.data)
            .map(|e| Extent {
                offset: e.offset,
                len: e.len,
            })
            .collect())
    }

    /// Rolls the origin back to snapshot `id` (persistent snapshots only,
    /// as VSS). Newer snapshots stay valid: the revert writes through the
    /// normal copy-on-write path. Journaled; a crash mid-way resumes at open.
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
            seq
        };
        inner.diff.flush().map_err(|e| inner.fail(e.into()))?;
        inner.run_revert(&closed, seq, 0)
    }

    /// Rereads every preserved chunk and checks it against its hash.
    pub fn verify(&self) -> Result<VerifyReport> {
        self.verify_with_progress(|_, _| {})
    }

    /// `verify`, calling `progress(done, total)` as it goes. Checks every
    /// preserved copy against its slot entry (chunk, crc32c, and blake3
    /// where recorded), both superblock copies, and that the journal's
    /// active half replays every record written to it.
    pub fn verify_with_progress(&self, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport> {
        let inner = &self.inner;
        let versions: Vec<VersionRecord> = inner.state_read().index.iter().collect();
        let total = versions.len() as u64;
        let mut mismatches = Vec::new();
        let mut buf = vec![0u8; inner.geo.chunk as usize];
        let (mut checked, mut unhashed) = (0, 0);
        for (i, v) in versions.into_iter().enumerate() {
            let _stripe = inner.stripe(v.chunk as u64);
            let st = inner.state_read();
            // Skip versions freed since the list was taken.
            if st.index.lookup(v.chunk, v.tag) != Some((v.tag, v.slot)) {
                continue;
            }
            let (offset, len) = inner.geo.chunk_range(v.chunk as u64);
            inner
                .diff
                .read_at(&mut buf[..len], inner.geo.slot_offset(v.slot))?;
            let entry = read_entry(&*inner.diff, &inner.geo, v.slot)?;
            let bytes = &buf[..len];
            let good = if inner.format == 1 {
                entry_holds(1, &entry, v.chunk, bytes)
            } else {
                match SlotEntry::decode(&entry) {
                    Some(e) if e.hash.is_none() => {
                        unhashed += 1;
                        e.holds(v.chunk, bytes)
                    }
                    Some(e) => {
                        e.holds(v.chunk, bytes) && e.hash_matches(blake3::hash(bytes).as_bytes())
                    }
                    None => false,
                }
            };
            checked += 1;
            let damaged = inner
                .doubts
                .as_ref()
                .is_some_and(|d| d.versions.contains(&(v.chunk, v.slot)));
            if !good || damaged {
                let low = st.index.prev_tag(v.chunk, v.tag).unwrap_or(0);
                let snapshots = st
                    .snapshots
                    .range(low + 1..=v.tag)
                    .map(|(_, s)| Uuid::from_bytes(s.id))
                    .collect();
                warn!(
                    chunk = v.chunk,
                    slot = v.slot,
                    "preserved chunk fails its checksum"
                );
                mismatches.push(Mismatch {
                    chunk: v.chunk as u64,
                    offset,
                    slot: v.slot,
                    snapshots,
                });
            }
            progress(i as u64 + 1, total);
        }
        let problems = inner.check_structure()?;
        Ok(VerifyReport {
            checked,
            unhashed,
            mismatches,
            problems,
        })
    }

    /// Snapshots the delete-oldest policy removed to make room since the
    /// last call (oldest first). Each is returned once, so a caller that
    /// reports them (a CLI line, a server log, a reply field) tells of each
    /// deletion exactly once.
    pub fn take_auto_deleted(&self) -> Vec<SnapshotInfo> {
        std::mem::take(
            &mut *self
                .inner
                .auto_deleted
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// How many snapshots the delete-oldest policy removed since open.
    pub fn auto_deleted_count(&self) -> u64 {
        self.inner.auto_deleted_total.load(Ordering::Relaxed)
    }

    /// Diff-area flushes issued by group commit (one may cover many writes).
    pub fn group_commit_flushes(&self) -> u64 {
        self.inner.commit.flush_count()
    }

    /// Heap bytes of the in-memory metadata: the version index, the
    /// per-chunk `preserved` bitmap and the per-group copy hint.
    pub fn metadata_bytes(&self) -> usize {
        self.inner.state_read().index.heap_bytes()
            + self.inner.preserved.heap_bytes()
            + self.inner.copied.heap_bytes()
    }

    /// True after an I/O failure that needs a reopen.
    pub fn needs_recovery(&self) -> bool {
        self.inner.failed.load(Ordering::Acquire)
    }

    /// Holds new writes and drains in-flight ones (bounded by `timeout`);
    /// used by snapshot sets.
    pub(crate) fn hold(&self, timeout: Duration) -> Result<Closed<'_>> {
        self.inner.gate.close(timeout)
    }
}

impl Inner {
    pub(crate) fn state_read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stripe(&self, chunk: u64) -> MutexGuard<'_, ()> {
        self.stripes[chunk as usize % STRIPES]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Damage outside the copies: superblock copies, the journal's active
    /// half, and what a salvage open could not vouch for.
    fn check_structure(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for copy in 0..2 {
            if let Err(e) = Journal::read_superblock_copy(&*self.diff, copy)? {
                problems.push(format!("superblock copy {copy} is damaged ({e})"));
            }
        }
        let st = self.state_read();
        if self.doubts.is_none() {
            let replay = st.journal.replay()?;
            let written = st.journal.next_seq();
            if (replay.records.len() as u64) < written {
                let at = replay.cut.as_ref().map_or(0, |c| c.offset);
                problems.push(format!(
                    "journal record {} at offset {at} is damaged: {} of {written} records replay",
                    replay.records.len(),
                    replay.records.len()
                ));
            }
        }
        drop(st);
        if let Some(d) = &self.doubts {
            problems.extend(self.notes.iter().cloned());
            if d.all_origin_reads {
                problems.push(
                    "salvage: the journal is damaged; snapshot reads of chunks not in the diff area fail".into(),
                );
            }
        }
        Ok(problems)
    }

    /// Marks the volume as needing recovery and passes the error on.
    fn fail(&self, e: Error) -> Error {
        if !self.failed.swap(true, Ordering::AcqRel) {
            warn!(error = %e, "diff-area update failed; the volume refuses writes until reopened");
        }
        e
    }

    /// Refuses changes to a failed or salvage-opened volume.
    fn check_ok(&self) -> Result<()> {
        if self.doubts.is_some() {
            Err(Error::SalvageReadOnly)
        } else if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else if self.failed.load(Ordering::Acquire) {
            Err(Error::NeedsRecovery)
        } else {
            Ok(())
        }
    }

    fn merge_extents(&self, chunks: impl Iterator<Item = u64>) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for c in chunks {
            let (offset, len) = self.geo.chunk_range(c);
            match out.last_mut() {
                Some(e) if e.offset + e.len == offset => e.len += len as u64,
                _ => out.push(Extent {
                    offset,
                    len: len as u64,
                }),
            }
        }
        out
    }

    /// Creates a snapshot; the gate is held closed by the caller.
    pub(crate) fn create_held(
        &self,
        _closed: &Closed<'_>,
        options: &SnapshotOptions,
        pending: Option<(Uuid, &[(Uuid, String)])>,
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
        if options.persistent && st.unjournaled {
            st.compact().map_err(|e| self.fail(e))?;
        }
        let rec = SnapshotRecord {
            seq: st.next_seq,
            id: *Uuid::new_v4().as_bytes(),
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
    fn delete_in_state(&self, st: &mut State, seq: u64, closed: Option<&Closed<'_>>) -> Result<()> {
        let was_newest = st.newest() == Some(seq);
        st.log(Record::SnapshotDelete { seq })
            .map_err(|e| self.fail(e))?;
        let freed = st.forget(seq);
        self.flush_diff(st)?;
        self.discard_slots(&freed);
        for s in &freed {
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
    fn discard_slots(&self, freed: &[u32]) {
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
    fn tell_auto_deleted(&self, info: SnapshotInfo) {
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
    fn alloc_slot(&self, st: &mut State) -> Result<Option<u32>> {
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

    /// Copies the current contents of `chunks` (sorted) to the diff area and
    /// journals them. Contiguous chunks are read from the origin in one
    /// request, copies to contiguous slots go out in one write each for data
    /// and hashes, and the batch's records in one journal write. Returns
    /// `Some((epoch, seq))` when the copies must be made durable before the
    /// origin is overwritten (some persistent snapshot may read them): a
    /// flush then covers the journal up to `seq` of `epoch`.
    fn preserve_many(&self, chunks: &[u64]) -> Result<Option<(u64, u64)>> {
        // Chunks copied by an earlier write that failed before marking them:
        // copying again would journal a duplicate; only durability is owed.
        let (todo, mut durable, journaled) = {
            let st = self.state_read();
            let Some(tag) = st.newest() else {
                return Ok(None);
            };
            let todo: Vec<u64> = chunks
                .iter()
                .copied()
                .filter(|&c| !st.index.contains(c as u32, tag))
                .collect();
            let owed = (todo.len() < chunks.len() && st.any_persistent())
                .then(|| (st.journal.epoch(), st.journal.next_seq()));
            // With no persistent snapshot, every snapshot these copies can
            // serve is discarded on reopen, and none can become persistent
            // (snapshots are only created with the gate closed): recovery
            // never needs their records or hashes. The next persistent
            // snapshot checkpoints the index (see `State::unjournaled`).
            // Their slot entries carry no blake3 (but the read checksum).
            (todo, owed, st.any_persistent())
        };
        if todo.is_empty() {
            return Ok(durable);
        }
        let cs = self.geo.chunk as usize;
        let mut data = vec![0u8; todo.len() * cs];
        for (i, j) in runs(&todo) {
            let (off, _) = self.geo.chunk_range(todo[i]);
            let end = ((todo[j - 1] + 1) << self.geo.shift).min(self.geo.origin_len);
            self.origin
                .read_at(&mut data[i * cs..i * cs + (end - off) as usize], off)?;
        }
        let mut slots = Vec::with_capacity(todo.len());
        {
            let mut st = self.state_write();
            for _ in &todo {
                match self.alloc_slot(&mut st) {
                    Ok(Some(s)) => slots.push(s),
                    other => {
                        for s in &slots {
                            st.slots.release(*s);
                        }
                        return other.map(|_| durable);
                    }
                }
            }
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
        let mut st = self.state_write();
        let release = |st: &mut State| {
            for s in &slots {
                st.slots.release(*s);
            }
        };
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
            durable = Some((st.journal.epoch(), st.journal.next_seq()));
        }
        Ok(durable)
    }

    /// Flushes the diff area and records how far the journal is durable.
    fn flush_diff(&self, st: &mut State) -> Result<()> {
        let (epoch, seq) = (st.journal.epoch(), st.journal.next_seq());
        self.diff.flush().map_err(|e| self.fail(e.into()))?;
        st.journal.mark_durable(epoch, seq);
        Ok(())
    }

    fn write_origin(&self, payload: Payload<'_>, offset: u64) -> Result<()> {
        match payload {
            Payload::Data(d) => self.origin.write_at(d, offset)?,
            Payload::Discard(n) => self.origin.discard(offset, n)?,
        }
        Ok(())
    }

    /// Locks the stripes of `chunks` in ascending order (so two callers
    /// never wait on each other crosswise); held while a chunk is copied or
    /// read from its snapshot place.
    fn lock_stripes(&self, chunks: impl Iterator<Item = u64>) -> Vec<MutexGuard<'_, ()>> {
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
    fn write_locked(&self, payload: Payload<'_>, offset: u64) -> Result<()> {
        self.check_ok()?;
        let len = payload.len();
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.geo.shift;
        let last = (offset + len - 1) >> self.geo.shift;
        if self.newest.load(Ordering::Acquire) == 0 {
            return self.write_origin(payload, offset);
        }
        let need: Vec<u64> = (first..=last).filter(|&c| !self.preserved.get(c)).collect();
        if need.is_empty() {
            return self.write_origin(payload, offset);
        }
        let _guards = self.lock_stripes(need.iter().copied());
        // Re-check under the stripe locks: another writer may have copied.
        let fresh: Vec<u64> = need
            .into_iter()
            .filter(|&c| !self.preserved.get(c))
            .collect();
        if let Some((epoch, seq)) = self.preserve_many(&fresh)? {
            self.commit.flush().map_err(|e| self.fail(e.into()))?;
            self.state_write().journal.mark_durable(epoch, seq);
        }
        // Only now may other writers skip these chunks: their copies are
        // durable where they must be.
        for c in fresh {
            self.preserved.set(c);
        }
        self.write_origin(payload, offset)
    }

    /// Allocation of `offset..offset+len` as snapshot `seq` sees it:
    /// chunks it reads from the diff area are data, the rest is whatever
    /// the origin reports.
    pub(crate) fn snapshot_allocation(
        &self,
        seq: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<volshadow_block::Extent>>> {
        use volshadow_block::{Extent as BExtent, push_extent};
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
            if kind {
                push_extent(
                    &mut out,
                    BExtent {
                        offset: lo,
                        len: hi - lo,
                        data: true,
                    },
                );
            } else {
                match self.origin.allocation(lo, hi - lo)? {
                    Some(exts) => {
                        for e in exts {
                            push_extent(&mut out, e);
                        }
                    }
                    None => return Ok(None),
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

    fn damaged(&self, snapshot: Uuid, chunk: u64, reason: &str) -> Error {
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
    fn read_slots(&self, id: Uuid, c0: u64, s0: u32, lo: u64, dst: &mut [u8]) -> Result<()> {
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

    /// Writes snapshot `seq`'s contents over the origin from chunk `start`.
    fn run_revert(&self, _closed: &Closed<'_>, seq: u64, start: u64) -> Result<()> {
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
                        self.write_locked(Payload::Data(&buf[..len]), off)?;
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

impl Drop for Inner {
    /// A clean close marks every journal record committed (see
    /// `Journal::close`), so later damage to one is reported, not cut off.
    fn drop(&mut self) {
        if self.doubts.is_some()
            || self.failed.load(Ordering::Acquire)
            || self.closed.load(Ordering::Acquire)
        {
            return;
        }
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = st.journal.close() {
            warn!(error = %e, "could not mark the journal committed at close");
        }
    }
}

impl BlockDevice for Volume {
    fn len(&self) -> u64 {
        self.inner.geo.origin_len
    }

    fn block_size(&self) -> u32 {
        self.inner.origin.block_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        check_range(self, Op::Read, offset, buf.len() as u64)?;
        self.inner.origin.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> volshadow_block::Result<()> {
        check_range(self, Op::Write, offset, buf.len() as u64)?;
        let _pass = self.inner.gate.enter();
        self.inner
            .write_locked(Payload::Data(buf), offset)
            .map_err(|e| e.into_block(self.name()))
    }

    fn flush(&self) -> volshadow_block::Result<()> {
        // Only persistent snapshots must survive a crash: with none, the
        // copies may stay in the diff area's cache (recovery discards
        // non-persistent snapshots and every copy only they reference).
        if self.inner.state_read().any_persistent() {
            self.inner.diff.flush()?;
        }
        self.inner.origin.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
        check_range(self, Op::Discard, offset, len)?;
        let _pass = self.inner.gate.enter();
        self.inner
            .write_locked(Payload::Discard(len), offset)
            .map_err(|e| e.into_block(self.name()))
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> volshadow_block::Result<Option<Vec<volshadow_block::Extent>>> {
        check_range(self, Op::Query, offset, len)?;
        self.inner.origin.allocation(offset, len)
    }

    fn name(&self) -> String {
        format!("volume {}", self.inner.origin.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_area_len_for_is_the_smallest_size_that_holds_the_capacity() {
        for chunk in [4096u32, 16 << 10, 1 << 20] {
            for capacity in [
                1u64,
                4 << 20,
                63 << 20,
                64 << 20,
                1 << 30,
                (1 << 30) + 12345,
            ] {
                let len = Volume::diff_area_len_for(capacity, chunk);
                let chunk = u64::from(chunk);
                let slots = capacity.div_ceil(chunk);
                let fits = |l: u64| plan_layout(l, chunk, None).is_some_and(|(.., n)| n >= slots);
                assert!(fits(len), "{capacity} bytes of {chunk}: {len} too small");
                assert!(
                    !fits(len - chunk),
                    "{capacity} bytes of {chunk}: {len} not minimal"
                );
            }
        }
    }

    #[test]
    fn slots_start_on_a_mebibyte_in_large_diff_areas_and_a_chunk_in_small_ones() {
        for (len, chunk, align) in [
            (64u64 << 20, 16u64 << 10, 1u64 << 20),
            (1 << 30, 4096, 1 << 20),
            (2 << 20, 16 << 10, 16 << 10),
            (8 << 20, 64 << 10, 64 << 10),
        ] {
            let Some((_, _, data_offset, slots)) = plan_layout(len, chunk, None) else {
                panic!("{len} bytes should hold a layout");
            };
            assert_eq!(data_offset % align, 0, "{len} bytes, {chunk} chunks");
            assert!(data_offset + slots * chunk <= len);
        }
    }
}
