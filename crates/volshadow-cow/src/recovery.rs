//! Recovery: from the bytes of a diff area to the engine's state, or to a
//! clear error naming what is damaged.
//!
//! What is trusted and why:
//! - The superblock gives the geometry and names the journal half that
//!   gives the state. A newer half is used instead when its checkpoint is
//!   whole and records were appended after it (so the superblock switch
//!   happened, and that superblock copy was later damaged).
//! - A record that does not decode ends replay as a torn tail, unless a
//!   later record's `committed` mark covers it: then it is corruption.
//! - A copy whose record is not covered by any mark is checked against the
//!   hash in its record. If its data is wrong but the origin still holds
//!   those bytes, the copy never mattered (the origin is overwritten only
//!   after its copy is durable) and is dropped; otherwise the chunk is
//!   damaged and reported, never silently read from the origin.
//!
//! A salvage open ([`OpenMode::Salvage`]) writes nothing: it takes what
//! replays, and marks what it cannot vouch for so reads of it fail.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tracing::{info, warn};
use uuid::Uuid;
use volshadow_block::BlockDevice;

use crate::bitmap::AtomicBitmap;
use crate::error::{Error, Result};
use crate::format::{
    FORMAT_OLDEST, FORMAT_VERSION, HASH_LEN, INCOMPAT_SUPPORTED, InDoubtRecord, ORIGIN_ID_LEN,
    Record, RevertState, SlotEntry, Superblock, VersionRecord,
};
use crate::index::SlotAllocator;
use crate::journal::{Journal, Replay};
use crate::layout::Geometry;
use crate::state::State;

/// How to open a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenMode {
    /// Recover and open for reading and writing; any damage is an error.
    #[default]
    Normal,
    /// As `Normal`, but accept an origin whose identity differs from the
    /// one recorded (the image and its diff area were moved or copied
    /// together) and record the new one.
    Rebind,
    /// Read-only, writes nothing: serves what is provably intact of a
    /// damaged diff area; reads of anything else fail.
    Salvage,
}

/// What a salvage open could not vouch for.
#[derive(Debug, Default)]
pub(crate) struct Doubts {
    /// The journal was damaged: later changes (copies, deletes) are
    /// unknown, so no snapshot read from the origin can be vouched for.
    pub(crate) all_origin_reads: bool,
    /// Versions whose data is damaged: `(chunk, slot)`.
    pub(crate) versions: HashSet<(u32, u32)>,
}

/// The outcome of recovery.
pub(crate) struct Recovered {
    pub(crate) state: State,
    pub(crate) sb: Superblock,
    /// Set in salvage mode.
    pub(crate) doubts: Option<Doubts>,
    /// What recovery found and repaired, for logs and `verify`.
    pub(crate) notes: Vec<String>,
    pub(crate) resume_revert: Option<RevertState>,
}

fn corrupt(diff: &dyn BlockDevice, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        device: diff.name(),
        offset,
        reason: reason.into(),
    }
}

/// Reads both superblock copies; returns the valid one with the higher
/// generation and a note on the other when it is damaged.
fn choose_superblock(diff: &dyn BlockDevice) -> Result<(Superblock, Option<String>)> {
    let name = diff.name();
    if diff.len() < 2 * crate::format::SUPERBLOCK_SLOT {
        return Err(Error::NotADiffArea {
            device: name,
            reason: format!("{} bytes is too small to hold a superblock", diff.len()),
        });
    }
    let copies = [
        Journal::read_superblock_copy(diff, 0)?,
        Journal::read_superblock_copy(diff, 1)?,
    ];
    let valid: Vec<&Superblock> = copies.iter().filter_map(|c| c.as_ref().ok()).collect();
    let Some(best) = valid
        .iter()
        .max_by_key(|s| s.generation)
        .map(|s| (*s).clone())
    else {
        let reasons: Vec<String> = copies
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().err().map(|e| format!("copy {i}: {e}")))
            .collect();
        let magic = copies
            .iter()
            .any(|c| !matches!(c, Err(crate::format::SuperblockError::WrongMagic)));
        return Err(if magic {
            corrupt(
                diff,
                0,
                format!(
                    "both superblock copies are damaged ({})",
                    reasons.join("; ")
                ),
            )
        } else {
            Error::NotADiffArea {
                device: name,
                reason: reasons.join("; "),
            }
        });
    };
    if best.version > FORMAT_VERSION
        || best.version < FORMAT_OLDEST
        || best.incompat & !INCOMPAT_SUPPORTED != 0
    {
        return Err(Error::Unsupported {
            device: name,
            version: best.version,
            features: best.incompat,
            supported: FORMAT_VERSION,
        });
    }
    if let [a, b] = valid[..] {
        let geometry = |s: &Superblock| {
            (
                s.uuid,
                s.chunk_size,
                s.origin_len,
                s.diff_len,
                s.journal_half,
                s.hash_offset,
                s.data_offset,
                s.slots,
            )
        };
        if geometry(a) != geometry(b) {
            return Err(corrupt(
                diff,
                0,
                "the two superblock copies describe different volumes",
            ));
        }
    }
    if best.diff_len > diff.len() {
        return Err(corrupt(
            diff,
            0,
            format!(
                "superblock describes {} bytes but the device has {}",
                best.diff_len,
                diff.len()
            ),
        ));
    }
    let note = copies.iter().enumerate().find_map(|(i, c)| {
        c.as_ref()
            .err()
            .map(|e| format!("superblock copy {i} is damaged ({e}); copy {} used", 1 - i))
    });
    Ok((best, note))
}

/// Picks the journal half to replay: the superblock's, or a newer one with
/// a whole checkpoint and records appended after it (its superblock write
/// was damaged or lost). Returns its superblock view and replay.
/// A salvage open may fall back to an older half; the flag says so.
fn choose_half(
    diff: &Arc<dyn BlockDevice>,
    best: &Superblock,
    mode: OpenMode,
    notes: &mut Vec<String>,
) -> Result<(Superblock, Replay, bool)> {
    let probe = Journal::open(diff.clone(), best.clone());
    let mut candidates: Vec<(u64, u32)> = Vec::new();
    for half in 0..2 {
        if let Some(e) = probe.first_epoch(half)?
            && (e >= best.epoch || mode == OpenMode::Salvage)
        {
            candidates.push((e, half));
        }
    }
    candidates.sort_unstable_by(|a, b| b.cmp(a));
    for (epoch, half) in candidates {
        let sb = Superblock {
            active_half: half,
            epoch,
            ..best.clone()
        };
        let replay = Journal::open(diff.clone(), sb.clone()).replay()?;
        // A half newer than the superblock says counts only with proof it
        // was committed: a record appended after its checkpoint (mark
        // above 0). A checkpoint alone may have reached the media without
        // the writes its flush was to make durable before the superblock
        // switched (a crash in between); the older half is then the state.
        let proven = epoch <= best.epoch || replay.records.iter().any(|(_, c)| *c > 0);
        if replay.checkpoint_complete() && proven {
            if epoch < best.epoch {
                notes.push(format!(
                    "salvage: the journal half the superblock names is unreadable; fell back to the older half {half} (epoch {epoch})"
                ));
                return Ok((sb, replay, true));
            }
            if (epoch, half) != (best.epoch, best.active_half) {
                notes.push(format!(
                    "the superblock names journal half {} (epoch {}), but half {half} holds a whole newer checkpoint (epoch {epoch}): used it",
                    best.active_half, best.epoch
                ));
            }
            return Ok((sb, replay, false));
        }
        if let Some(cut) = replay.cut.as_ref().filter(|c| c.committed_by.is_some())
            && mode != OpenMode::Salvage
        {
            return Err(corrupt(
                &**diff,
                cut.offset,
                format!(
                    "the checkpoint of journal half {half} (epoch {epoch}) is damaged at record {}, and later records show it was committed",
                    cut.seq
                ),
            ));
        }
        // A checkpoint cut short by a crash before its superblock was
        // written: the older half is the state.
    }
    Err(corrupt(
        &**diff,
        best.journal_offset,
        format!(
            "no journal half holds a whole checkpoint of epoch {} or later",
            best.epoch
        ),
    ))
}

/// Builds the state a journal describes, checking every record against
/// what came before; any contradiction is corruption, reported with the
/// record's position.
struct Replayer {
    state: State,
    used: AtomicBitmap,
    chunks: u64,
    slots: u32,
    name: String,
    checkpoint_seen: bool,
    /// Highest `committed` mark seen: records below it had their data
    /// flushed.
    trusted: u64,
    /// Copies journaled after the checkpoint: (record seq, version, hash).
    recent: Vec<(u64, VersionRecord, [u8; 32])>,
}

impl Replayer {
    fn corrupt(&self, n: usize, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            device: self.name.clone(),
            offset: 0,
            reason: format!("journal record {n}: {}", reason.into()),
        }
    }

    fn add_version(&mut self, n: usize, v: VersionRecord) -> Result<()> {
        if v.chunk as u64 >= self.chunks || v.slot >= self.slots {
            return Err(self.corrupt(n, format!("version {v:?} is out of range")));
        }
        if !self.state.snapshots.contains_key(&v.tag) {
            return Err(self.corrupt(n, format!("version {v:?} names no live snapshot")));
        }
        if self.used.get(v.slot as u64) {
            return Err(self.corrupt(n, format!("slot {} is used twice", v.slot)));
        }
        if !self.state.index.insert(v.chunk, v.tag, v.slot) {
            return Err(self.corrupt(
                n,
                format!("chunk {} preserved twice for {}", v.chunk, v.tag),
            ));
        }
        self.used.set(v.slot as u64);
        Ok(())
    }

    fn add_in_doubt(&mut self, n: usize, d: InDoubtRecord) -> Result<()> {
        if !self.state.snapshots.contains_key(&d.seq) || self.state.in_doubt.contains_key(&d.seq) {
            return Err(self.corrupt(
                n,
                format!("in-doubt snapshot {} is unknown or listed twice", d.seq),
            ));
        }
        self.state.in_doubt.insert(d.seq, d);
        Ok(())
    }

    fn apply(&mut self, n: usize, rec: Record, committed: u64) -> Result<()> {
        let is_checkpoint = matches!(rec, Record::Checkpoint { .. });
        if (n == 0) != is_checkpoint {
            return Err(self.corrupt(n, "a journal half must start with exactly one checkpoint"));
        }
        if committed > n as u64 {
            return Err(self.corrupt(n, "committed mark beyond the record itself"));
        }
        self.trusted = self.trusted.max(committed);
        let st = &mut self.state;
        match rec {
            Record::Checkpoint {
                next_seq,
                max_bytes,
                policy,
                snapshots,
                revert,
            } => {
                st.next_seq = next_seq;
                st.max_slots = (max_bytes / st.chunk).min(self.slots as u64);
                st.policy = policy;
                st.revert = revert;
                for s in snapshots {
                    if s.seq == 0 || s.seq >= next_seq || st.snapshots.insert(s.seq, s).is_some() {
                        return Err(self.corrupt(n, "checkpoint lists a bad or duplicate snapshot"));
                    }
                }
            }
            Record::CheckpointVersions(vs) => {
                if self.checkpoint_seen {
                    return Err(self.corrupt(n, "checkpoint versions after the checkpoint ended"));
                }
                for v in vs {
                    self.add_version(n, v)?;
                }
            }
            Record::CheckpointEnd { versions } => {
                if versions != st.index.len() || self.checkpoint_seen {
                    return Err(self.corrupt(n, "checkpoint version count does not match"));
                }
                self.checkpoint_seen = true;
            }
            Record::CheckpointInDoubt(ds) => {
                if self.checkpoint_seen {
                    return Err(
                        self.corrupt(n, "checkpoint in-doubt list after the checkpoint ended")
                    );
                }
                for d in ds {
                    self.add_in_doubt(n, d)?;
                }
            }
            _ if !self.checkpoint_seen => {
                return Err(self.corrupt(n, "record before the checkpoint ended"));
            }
            Record::SnapshotCreate(s) => {
                if s.seq < st.next_seq.max(1) {
                    return Err(self.corrupt(n, format!("snapshot seq {} reused", s.seq)));
                }
                st.next_seq = s.seq + 1;
                st.snapshots.insert(s.seq, s);
            }
            Record::Preserve {
                version: v, hash, ..
            } => {
                if Some(v.tag) != st.newest() {
                    return Err(
                        self.corrupt(n, format!("{v:?} is not tagged with the newest snapshot"))
                    );
                }
                self.add_version(n, v)?;
                self.recent.push((n as u64, v, hash));
            }
            Record::SnapshotDelete { seq } => {
                if !st.snapshots.contains_key(&seq) {
                    return Err(self.corrupt(n, format!("delete of unknown snapshot {seq}")));
                }
                for slot in st.forget(seq) {
                    self.used.clear(slot as u64);
                }
            }
            Record::Limits { max_bytes, policy } => {
                st.max_slots = (max_bytes / st.chunk).min(self.slots as u64);
                st.policy = policy;
            }
            Record::RevertBegin { seq } => st.revert = Some(RevertState { seq, next_chunk: 0 }),
            Record::RevertProgress { next_chunk } => match st.revert.as_mut() {
                Some(r) => r.next_chunk = next_chunk,
                None => return Err(self.corrupt(n, "revert progress without a revert")),
            },
            Record::RevertEnd => st.revert = None,
            Record::Mark => {}
            Record::SetPending(d) => self.add_in_doubt(n, d)?,
            Record::SetCommit { seq } => {
                if st.in_doubt.remove(&seq).is_none() {
                    return Err(self.corrupt(
                        n,
                        format!("commit of snapshot {seq}, which is not in doubt"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Reads a slot's entry bytes.
pub(crate) fn read_entry(
    diff: &dyn BlockDevice,
    geo: &Geometry,
    slot: u32,
) -> Result<[u8; HASH_LEN as usize]> {
    let mut e = [0u8; HASH_LEN as usize];
    diff.read_at(&mut e, geo.entry_offset(slot))?;
    Ok(e)
}

/// True if `entry` (in `format`) vouches for `data` as chunk `chunk`.
pub(crate) fn entry_holds(
    format: u32,
    entry: &[u8; HASH_LEN as usize],
    chunk: u32,
    data: &[u8],
) -> bool {
    if format == 1 {
        // Format 1 kept the full blake3, or zeros when unrecorded.
        return *entry == [0; HASH_LEN as usize] || *entry == *blake3::hash(data).as_bytes();
    }
    SlotEntry::decode(entry).is_some_and(|e| e.holds(chunk, data))
}

/// Recovers the state of a diff area.
pub(crate) fn recover(
    origin: &Arc<dyn BlockDevice>,
    diff: &Arc<dyn BlockDevice>,
    mode: OpenMode,
) -> Result<Recovered> {
    let salvage = mode == OpenMode::Salvage;
    let mut notes = Vec::new();
    let (best, sb_note) = choose_superblock(&**diff)?;
    notes.extend(sb_note);
    let mismatch = |detail: String| Error::OriginMismatch {
        diff: diff.name(),
        origin: origin.name(),
        expected: best.origin_len,
        found: origin.len(),
        expected_id: Uuid::from_bytes(best.uuid),
        detail,
    };
    if origin.len() != best.origin_len {
        return Err(mismatch(" (wrong origin, or it was resized)".into()));
    }
    let identity = origin.identity();
    if let Some(now) = identity
        && best.origin_id != [0; ORIGIN_ID_LEN]
        && best.origin_id != now
        && mode != OpenMode::Rebind
    {
        return Err(mismatch(format!(
            ", and it was made for another file or device (recorded identity {}, found {}); if the image and its diff area were moved or copied together, rebind them",
            show_identity(&best.origin_id),
            show_identity(&now)
        )));
    }
    let (sb, replay, mut doubtful) = choose_half(diff, &best, mode, &mut notes)?;
    let geo = Geometry::from_superblock(&sb);
    let other = 1 - sb.active_half;
    if let Some(e) = Journal::open(diff.clone(), sb.clone()).newer_committed(other, sb.epoch)? {
        let msg = format!(
            "journal half {other} holds committed records of epoch {e}, newer than the usable state (epoch {}): changes since are unreadable",
            sb.epoch
        );
        if !salvage {
            return Err(corrupt(&**diff, sb.journal_offset, msg));
        }
        notes.push(msg);
        doubtful = true;
    }
    if let Some(cut) = &replay.cut {
        match cut.committed_by {
            Some((by, at)) => {
                let msg = format!(
                    "journal record {} at offset {} is damaged ({:?}); record {by} at offset {at} shows it was committed",
                    cut.seq, cut.offset, cut.why
                );
                if !salvage {
                    return Err(corrupt(&**diff, cut.offset, msg));
                }
                notes.push(msg);
                doubtful = true;
            }
            None => info!(
                record = cut.seq,
                offset = cut.offset,
                why = ?cut.why,
                "journal ends in a torn tail (an append cut by a crash): dropped"
            ),
        }
    }
    let journal = Journal::open(diff.clone(), sb.clone());
    let mut rp = Replayer {
        state: State::empty(journal, geo.chunk),
        used: AtomicBitmap::new(geo.slots as u64),
        chunks: geo.chunks,
        slots: geo.slots,
        name: diff.name(),
        checkpoint_seen: false,
        trusted: 0,
        recent: Vec::new(),
    };
    let count = replay.records.len();
    for (n, (rec, committed)) in replay.records.into_iter().enumerate() {
        if let Err(e) = rp.apply(n, rec, committed) {
            if !salvage || !rp.checkpoint_seen {
                return Err(e);
            }
            notes.push(format!("replay stopped: {e}"));
            doubtful = true;
            break;
        }
    }
    if !rp.checkpoint_seen {
        return Err(rp.corrupt(count, "the journal's checkpoint is incomplete"));
    }
    let (trusted, recent) = (rp.trusted, std::mem::take(&mut rp.recent));
    let mut state = rp.state;
    let dropped: Vec<u64> = state
        .snapshots
        .values()
        .filter(|s| !s.persistent)
        .map(|s| s.seq)
        .collect();
    for seq in &dropped {
        state.forget(*seq);
    }
    let mut resume_revert = state.revert;
    if resume_revert.is_some_and(|r| !state.snapshots.contains_key(&r.seq)) {
        let msg = "an interrupted revert names a snapshot that no longer exists";
        if !salvage {
            return Err(corrupt(&**diff, 0, msg));
        }
        notes.push(msg.into());
        resume_revert = None;
    }
    let mut doubts = Doubts::default();
    let mut damaged: Vec<String> = Vec::new();
    let live: HashMap<(u32, u32), u64> = state
        .index
        .iter()
        .map(|v| ((v.chunk, v.slot), v.tag))
        .collect();
    // Copies journaled after the last known flush: their record may have
    // landed without their data.
    let mut lost = 0;
    let mut buf = vec![0u8; geo.chunk as usize];
    let mut checked: HashSet<u32> = HashSet::new();
    for (_, v, hash) in recent.into_iter().filter(|r| r.0 >= trusted) {
        if !live.contains_key(&(v.chunk, v.slot)) {
            continue;
        }
        checked.insert(v.slot);
        let (off, len) = geo.chunk_range(v.chunk as u64);
        diff.read_at(&mut buf[..len], geo.slot_offset(v.slot))?;
        if *blake3::hash(&buf[..len]).as_bytes() == hash {
            if !salvage {
                let entry = SlotEntry::new(v.chunk, &buf[..len], Some(&hash)).encode();
                diff.write_at(&entry, geo.entry_offset(v.slot))?;
            }
            continue;
        }
        origin.read_at(&mut buf[..len], off)?;
        if *blake3::hash(&buf[..len]).as_bytes() == hash {
            // The origin still holds the old bytes: this copy's flush never
            // completed, so nothing was overwritten; snapshots read the
            // origin.
            state.index.remove_slot(v.chunk, v.slot);
            lost += 1;
        } else {
            damaged.push(describe(&state, v));
            doubts.versions.insert((v.chunk, v.slot));
        }
    }
    if sb.version == 1 && !salvage {
        upgrade_entries(&**diff, &geo, &state, &checked, &mut damaged, &mut buf)?;
    }
    if !damaged.is_empty() && !salvage {
        return Err(corrupt(
            &**diff,
            geo.data_offset,
            format!(
                "{} preserved chunk(s) are damaged and the origin no longer holds them: {}; open in salvage mode to read what is intact",
                damaged.len(),
                damaged.join("; ")
            ),
        ));
    }
    notes.extend(damaged.iter().map(|d| format!("damaged: {d}")));
    // After a journal cut nothing says which snapshots were deleted or
    // which chunks were copied since: only copies the index names, checked
    // by their entries, can be vouched for.
    doubts.all_origin_reads = doubtful;
    state.slots = SlotAllocator::from_used(geo.slots, state.index.iter().map(|v| v.slot));
    if !salvage {
        let records = state.checkpoint_records();
        let id = identity.unwrap_or(sb.origin_id);
        if mode == OpenMode::Rebind && id != best.origin_id {
            notes.push("rebound to a new origin identity".into());
        }
        state.journal.checkpoint(records, id)?;
    }
    info!(
        diff = %diff.name(),
        records = count,
        discarded_non_persistent = dropped.len(),
        unflushed_copies_dropped = lost,
        salvage,
        "recovered diff area"
    );
    for n in &notes {
        warn!(diff = %diff.name(), "{n}");
    }
    if let Some(n) = state.newest() {
        state.index.freeze_older_than(n);
    }
    let sb = state.journal.superblock().clone();
    Ok(Recovered {
        state,
        sb,
        doubts: salvage.then_some(doubts),
        notes,
        resume_revert: if salvage { None } else { resume_revert },
    })
}

/// "chunk C (slot S) read by snapshots …" for error messages.
fn describe(state: &State, v: VersionRecord) -> String {
    let ids: Vec<String> = state.readers(v).iter().map(Uuid::to_string).collect();
    format!(
        "chunk {} (slot {}) read by snapshot(s) {}",
        v.chunk,
        v.slot,
        ids.join(", ")
    )
}

fn show_identity(id: &[u8; ORIGIN_ID_LEN]) -> String {
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&id[at..at + 8]);
        u64::from_le_bytes(b)
    };
    match id[0] {
        1 => format!("file dev {:#x} inode {}", word(8), word(16)),
        2 => format!("block device {:#x}", word(8)),
        3 => format!("volume serial {:#x} file {:#x}", word(8) & 0xffff_ffff, {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&id[16..20]);
            b[4..].copy_from_slice(&id[12..16]);
            u64::from_le_bytes(b)
        }),
        _ => "unknown".into(),
    }
}

/// Format 1 to 2: every live copy gets a format-2 entry (crc and chunk),
/// checked against its format-1 hash first. Idempotent: an entry already
/// in format 2 for the same data passes, so a crash mid-way is harmless.
fn upgrade_entries(
    diff: &dyn BlockDevice,
    geo: &Geometry,
    state: &State,
    done: &HashSet<u32>,
    damaged: &mut Vec<String>,
    buf: &mut [u8],
) -> Result<()> {
    for v in state.index.iter() {
        if done.contains(&v.slot) {
            continue;
        }
        let (_, len) = geo.chunk_range(v.chunk as u64);
        diff.read_at(&mut buf[..len], geo.slot_offset(v.slot))?;
        let old = read_entry(diff, geo, v.slot)?;
        if entry_holds(FORMAT_VERSION, &old, v.chunk, &buf[..len]) {
            continue;
        }
        let hash = *blake3::hash(&buf[..len]).as_bytes();
        let recorded = if old == hash {
            Some(&hash)
        } else if old == [0; HASH_LEN as usize] {
            None
        } else {
            damaged.push(describe(state, v));
            continue;
        };
        let entry = SlotEntry::new(v.chunk, &buf[..len], recorded).encode();
        diff.write_at(&entry, geo.entry_offset(v.slot))?;
    }
    Ok(())
}
