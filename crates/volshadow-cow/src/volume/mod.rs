//! `Volume`: the live origin behind a copy-on-write layer, and everything
//! done to its snapshots. This file holds the type, opening and closing;
//! each concern has its room beside it: `lifecycle` (snapshots made,
//! listed, deleted, the full policy), `cow` (the write path), `read`
//! (snapshot reads), `revert`, `verify`.
//!
//! Lock order (never taken the other way round): gate -> chunk stripes ->
//! state. The journal lives inside the state, so "append a record and
//! update the index" is one critical section and a checkpoint always sees
//! a state that matches the records before it.

mod cow;
mod durability;
mod held;
mod lifecycle;
mod read;
mod revert;
mod verify;

use cow::Payload;
use durability::Owed;
use held::Held;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tracing::{info, warn};
use uuid::Uuid;
use volshadow_block::{BlockDevice, BufferPool, Op, check_range};

use crate::bitmap::{CopyHint, EpochBitmap};
use crate::commit::GroupCommit;
use crate::error::{Error, Result};
use crate::format::{FORMAT_VERSION, FullPolicy, Record, SUPERBLOCK_SLOT, Superblock};
use crate::gate::{Closed, Gate};
use crate::index::SlotAllocator;
use crate::journal::{Journal, Watermark};
use crate::layout::{self, Geometry, plan_layout};
use crate::recovery::{self, Doubts, OpenMode};
use crate::state::State;
use crate::types::{DEFAULT_MAX_SNAPSHOTS, SnapshotInfo, Usage, VolumeOptions};

/// Chunk-stripe locks: a write that must preserve chunk `c` holds stripe
/// `c % STRIPES` until the origin write is done; a snapshot read of `c`
/// holds it while it decides where to read from and reads.
const STRIPES: usize = 1024;
/// Copy buffers kept for reuse, and the largest kept (bounds the pool to
/// 16 MiB; larger batches allocate their own).
const COPY_BUFFERS_KEPT: usize = 4;
const COPY_BUFFER_MAX: usize = 4 << 20;
/// Unreported delete-oldest deletions kept for `take_auto_deleted`.
const AUTO_DELETED_KEPT: usize = 1024;
/// How long user operations wait for in-flight writes to drain: VSS's
/// write-hold limit, as for sets.
const DEFAULT_HOLD: Duration = crate::gate::DEFAULT_HOLD_TIMEOUT;

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
    /// The journal's durability watermark, advanced after group-commit
    /// flushes without taking the state lock.
    watermark: Arc<Watermark>,
    failed: AtomicBool,
    /// Origin writes waiting for their copies' flush.
    held: Held,
    /// Buffers for chunk copies.
    buffers: BufferPool,
    /// Copies are tried as extent clones (`BlockDevice::clone_from`) until
    /// the diff area first says it cannot.
    clones: AtomicBool,
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
///
/// # Durability
///
/// As for any [`BlockDevice`]: a write (`write_at`, `discard`) that has
/// returned is seen by every later read, and is durable once a `flush`
/// called after it returns. A first write after a persistent snapshot may
/// return before its new data reaches the origin: the data is held in
/// memory (bounded) until the copies of the old data are durable, then
/// written, so no crash can leave the origin overwritten without its copy.
/// `flush`, snapshot creation and [`close`](Self::close) wait for held
/// writes; the last handle's drop applies them. Should the diff area fail
/// while writes are held, they are lost and the volume fails: writes,
/// flushes and live reads return errors until it is reopened.
#[derive(Debug, Clone)]
pub struct Volume {
    pub(crate) inner: Arc<Inner>,
    /// Shared by the clones; dropped with the last one.
    _handle: Arc<Handle>,
}

/// The last `Volume` handle's going applies what is held and stops the
/// applier thread, so nothing touches the devices after it.
#[derive(Debug)]
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.held.stop();
    }
}

impl Volume {
    /// The smallest diff-area device size whose default layout (journal
    /// halves sized by the slot count) holds at least `capacity` bytes of
    /// `chunk_size` slots: what to give a new diff-area file.
    pub fn diff_area_len_for(capacity: u64, chunk_size: u32) -> u64 {
        layout::diff_area_len_for(capacity, chunk_size)
    }

    /// Initialises a diff area for `origin` on `diff` and opens the volume.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use volshadow_block::FileImage;
    /// use volshadow_cow::{FullPolicy, Volume, VolumeOptions, DEFAULT_CHUNK_SIZE};
    ///
    /// let dir = tempfile::tempdir().expect("temporary directory");
    /// let origin = Arc::new(FileImage::create(dir.path().join("disk.img"), 16 << 20)?);
    /// // Room for 4 MiB of old data; the oldest snapshot goes when it fills.
    /// let diff_len = Volume::diff_area_len_for(4 << 20, DEFAULT_CHUNK_SIZE);
    /// let diff = Arc::new(FileImage::create(dir.path().join("disk.diff"), diff_len)?);
    /// let options = VolumeOptions { policy: FullPolicy::DeleteOldest, ..Default::default() };
    /// let vol = Volume::create(origin, diff, options)?;
    /// assert_eq!(vol.usage().capacity_bytes, 4 << 20);
    /// # Ok::<(), volshadow_cow::Error>(())
    /// ```
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
        let layout = plan_layout(diff.len(), chunk, options.journal_half)
            .filter(|l| l.slots > 0)
            .ok_or_else(|| {
                Error::InvalidOptions(format!(
                    "diff area of {} bytes is too small for even one {cs}-byte chunk",
                    diff.len()
                ))
            })?;
        let slots = layout.slots;
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
            journal_half: layout.journal_half,
            hash_offset: layout.hash_offset,
            data_offset: layout.data_offset,
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
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use volshadow_block::{BlockDevice, FileImage};
    /// use volshadow_cow::{SnapshotOptions, Volume, VolumeOptions};
    ///
    /// let dir = tempfile::tempdir().expect("temporary directory");
    /// let (img, dif) = (dir.path().join("disk.img"), dir.path().join("disk.diff"));
    /// let vol = Volume::create(
    ///     Arc::new(FileImage::create(&img, 1 << 20)?),
    ///     Arc::new(FileImage::create(&dif, 8 << 20)?),
    ///     VolumeOptions::default(),
    /// )?;
    /// let snap = vol.create_snapshot(SnapshotOptions { persistent: true, ..Default::default() })?;
    /// vol.write_at(b"new", 0)?;
    /// vol.close()?;
    /// drop(vol); // releases the files' locks
    ///
    /// let vol = Volume::open(
    ///     Arc::new(FileImage::open(&img)?),
    ///     Arc::new(FileImage::open(&dif)?),
    /// )?;
    /// assert_eq!(vol.snapshots()[0].id, snap.id);
    /// # Ok::<(), volshadow_cow::Error>(())
    /// ```
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

    /// The volume id and superblock generation of the diff area on
    /// `diff` (its newest valid superblock copy), and whether the other
    /// copy failed to validate (then the newest may be the damaged one, and
    /// the generation one short), read without opening it or writing
    /// anything.
    pub fn peek(diff: &dyn BlockDevice) -> Result<(Uuid, u64, bool)> {
        let mut best: Option<Superblock> = None;
        let mut damaged = false;
        for copy in 0..2 {
            match Journal::read_superblock_copy(diff, copy)? {
                Ok(sb) if best.as_ref().is_none_or(|b| sb.generation > b.generation) => {
                    best = Some(sb);
                }
                Ok(_) => {}
                Err(_) => damaged = true,
            }
        }
        best.map(|sb| (Uuid::from_bytes(sb.uuid), sb.generation, damaged))
            .ok_or_else(|| Error::NotADiffArea {
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
        if inner.doubts.is_some() || inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        // Held writes first, without a time limit: they were acknowledged
        // and live only in memory. Then the gate drains writers inside.
        inner.held.wait_applied()?;
        let _closed = inner.gate.close(DEFAULT_HOLD)?;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        inner.origin.flush()?;
        if !inner.failed.load(Ordering::Acquire) {
            let mut st = inner.state_write();
            let records = st.checkpoint_records();
            st.journal.close(records)?;
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
        let watermark = state.journal.watermark();
        let inner = Arc::new(Inner {
            origin,
            diff,
            geo,
            gate: Gate::default(),
            state: RwLock::new(state),
            preserved,
            copied,
            newest: AtomicU64::new(newest),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            watermark,
            commit,
            failed: AtomicBool::new(false),
            held: Held::default(),
            buffers: BufferPool::new(COPY_BUFFERS_KEPT, COPY_BUFFER_MAX),
            clones: AtomicBool::new(true),
            max_snapshots: AtomicU64::new(DEFAULT_MAX_SNAPSHOTS as u64),
            auto_deleted: Mutex::new(Vec::new()),
            auto_deleted_total: AtomicU64::new(0),
            format: sb.version,
            closed: AtomicBool::new(false),
            doubts,
            notes,
        });
        Ok(Volume {
            _handle: Arc::new(Handle(inner.clone())),
            inner,
        })
    }

    /// The volume's id (recorded in the diff area).
    pub fn id(&self) -> Uuid {
        self.inner.geo.uuid
    }

    pub fn chunk_size(&self) -> u32 {
        self.inner.geo.chunk as u32
    }

    /// Whether copies may be taken as extent clones where the diff area
    /// can share the origin's extents (on by default; see
    /// `BlockDevice::clone_from`). A cloned chunk's next overwrite makes
    /// the origin's file system allocate new blocks (copy-on-write), so on
    /// a file system that may run out of space, turning clones off keeps
    /// overwrites of the origin in place.
    pub fn set_extent_clones(&self, on: bool) {
        self.inner.clones.store(on, Ordering::Relaxed);
    }

    /// Sets the most snapshots this volume keeps (VSS: 512).
    pub fn set_snapshot_limit(&self, limit: usize) {
        self.inner
            .max_snapshots
            .store(limit as u64, Ordering::Relaxed);
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

    pub(super) fn state_write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stripe(&self, chunk: u64) -> MutexGuard<'_, ()> {
        self.stripes[chunk as usize % STRIPES]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the volume as needing recovery and passes the error on.
    pub(super) fn fail(&self, e: Error) -> Error {
        if !self.failed.swap(true, Ordering::AcqRel) {
            warn!(error = %e, "diff-area update failed; the volume refuses writes until reopened");
        }
        e
    }

    /// Refuses changes to a failed or salvage-opened volume.
    pub(super) fn check_ok(&self) -> Result<()> {
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
}

impl Drop for Inner {
    /// A clean close leaves the state as a checkpoint the superblock names
    /// (see `Journal::close`), so later damage to it is reported, not cut
    /// off.
    fn drop(&mut self) {
        if self.doubts.is_some()
            || self.failed.load(Ordering::Acquire)
            || self.closed.load(Ordering::Acquire)
        {
            return;
        }
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let records = st.checkpoint_records();
        if let Err(e) = st.journal.close(records) {
            warn!(error = %e, "could not write the closing checkpoint");
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
        let held = &self.inner.held;
        // Taken before the origin is read (see `held`).
        let overlays = held.overlays(offset, buf.len() as u64);
        if held.lost() {
            // Acknowledged writes were dropped: the origin is stale.
            return Err(Error::NeedsRecovery.into_block(self.name()));
        }
        self.inner.origin.read_at(buf, offset)?;
        Held::apply_overlays(&overlays, buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> volshadow_block::Result<()> {
        check_range(self, Op::Write, offset, buf.len() as u64)?;
        let _pass = self.inner.gate.enter();
        self.inner
            .write_locked(Payload::Data(buf), offset, true)
            .map_err(|e| e.into_block(self.name()))
    }

    fn flush(&self) -> volshadow_block::Result<()> {
        // Every write held before this call reaches the origin first.
        self.inner
            .held
            .wait_applied()
            .map_err(|e| e.into_block(self.name()))?;
        // Only persistent snapshots must survive a crash: with none, the
        // copies may stay in the diff area's cache (recovery discards
        // non-persistent snapshots and every copy only they reference).
        let owed = {
            let st = self.inner.state_read();
            st.any_persistent().then(|| Owed::all_of(&st))
        };
        if let Some(owed) = owed {
            self.inner
                .settle(owed)
                .map_err(|e| e.into_block(self.name()))?;
        }
        self.inner.origin.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
        check_range(self, Op::Discard, offset, len)?;
        let _pass = self.inner.gate.enter();
        self.inner
            .write_locked(Payload::Discard(len), offset, true)
            .map_err(|e| e.into_block(self.name()))
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> volshadow_block::Result<Option<Vec<volshadow_block::Extent>>> {
        check_range(self, Op::Query, offset, len)?;
        let held = self.inner.held.data_extents(offset, len);
        if self.inner.held.lost() {
            return Err(Error::NeedsRecovery.into_block(self.name()));
        }
        let Some(mut map) = self.inner.origin.allocation(offset, len)? else {
            return Ok(None);
        };
        if !held.is_empty() {
            // Held data may sit where the origin still has a hole.
            map.extend(held);
            map.sort_unstable_by_key(|e| e.offset);
            map = map.into_iter().fold(Vec::new(), |mut merged, e| {
                volshadow_block::push_extent(&mut merged, e);
                merged
            });
        }
        Ok(Some(map))
    }

    fn name(&self) -> String {
        format!("volume {}", self.inner.origin.name())
    }
}
