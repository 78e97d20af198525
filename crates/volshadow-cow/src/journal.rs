//! The journal: two halves used in turn, each starting with a checkpoint.
//!
//! Records are appended to the active half. When one does not fit, a
//! checkpoint of the whole state is written to the other half under a new
//! epoch, flushed, and only then the superblock (next generation, other
//! copy) is pointed at it and flushed. A crash at any point leaves one
//! superblock whose half is complete, so recovery replays at most one
//! half: recovery time is bounded by the half's size.
//!
//! Every record carries the journal's `committed` mark at the time it was
//! written: the seq below which every record, with its data, was flushed.
//! A record that fails its checksum is a torn tail only while no later
//! record of the half says it was committed (see [`Journal::replay`]).

use std::sync::Arc;

use volshadow_block::BlockDevice;

use crate::error::{Error, Result};
use crate::format::{
    self, Envelope, FORMAT_VERSION, Record, RecordEnd, SUPERBLOCK_SLOT, Superblock, read_envelope,
};

#[derive(Debug)]
pub(crate) struct Journal {
    diff: Arc<dyn BlockDevice>,
    sb: Superblock,
    /// Bytes used in the active half.
    tail: u64,
    next_seq: u64,
    /// Records below `.seq` of epoch `.epoch` (and the data they point
    /// to) are durable. Shared, so a flush's completion is recorded
    /// without the state lock (see [`Watermark`]).
    durable: Arc<Watermark>,
}

/// Where and why replay stopped before the end of the records.
#[derive(Debug, Clone)]
pub(crate) struct Cut {
    /// The record number that did not decode.
    pub(crate) seq: u64,
    /// Its byte offset on the diff-area device.
    pub(crate) offset: u64,
    pub(crate) why: RecordEnd,
    /// A later record of the same half that says `seq` was committed
    /// (its seq and offset): the cut is corruption, not a torn tail.
    pub(crate) committed_by: Option<(u64, u64)>,
}

/// Outcome of reading one half.
#[derive(Debug)]
pub(crate) struct Replay {
    /// Records in order, each with its envelope's `committed` mark.
    pub(crate) records: Vec<(Record, u64)>,
    /// Why replay stopped, when it was not a clean end.
    pub(crate) cut: Option<Cut>,
}

impl Replay {
    /// True if the half starts with a whole checkpoint.
    pub(crate) fn checkpoint_complete(&self) -> bool {
        self.records
            .iter()
            .any(|(r, _)| matches!(r, Record::CheckpointEnd { .. }))
    }
}

impl Journal {
    fn name(&self) -> String {
        self.diff.name()
    }

    fn half_offset(&self, half: u32) -> u64 {
        self.sb.journal_offset + half as u64 * self.sb.journal_half
    }

    pub(crate) fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Reads one superblock copy; `Err` says why it is not valid.
    pub(crate) fn read_superblock_copy(
        diff: &dyn BlockDevice,
        copy: u64,
    ) -> Result<std::result::Result<Superblock, format::SuperblockError>> {
        let mut buf = vec![0u8; SUPERBLOCK_SLOT as usize];
        diff.read_at(&mut buf, copy * SUPERBLOCK_SLOT)?;
        Ok(Superblock::decode(&buf))
    }

    /// Writes the superblock to the copy its generation selects.
    fn write_superblock(diff: &dyn BlockDevice, sb: &Superblock) -> Result<()> {
        diff.write_at(&sb.encode(), (sb.generation % 2) * SUPERBLOCK_SLOT)?;
        Ok(())
    }

    /// Initialises a new diff area: checkpoint in half 0, then both
    /// superblock copies (generations 1 and 2), all flushed.
    pub(crate) fn create(
        diff: Arc<dyn BlockDevice>,
        mut sb: Superblock,
        checkpoint: Vec<Record>,
    ) -> Result<Self> {
        sb.active_half = 0;
        sb.epoch = 1;
        sb.generation = 0;
        let mut j = Journal {
            diff,
            sb,
            tail: 0,
            next_seq: 0,
            durable: Arc::default(),
        };
        j.write_half(0, 1, &checkpoint)?;
        j.diff.flush()?;
        j.durable.reset(1, j.next_seq);
        for generation in [1, 2] {
            j.sb.generation = generation;
            Self::write_superblock(&*j.diff, &j.sb)?;
        }
        j.diff.flush()?;
        Ok(j)
    }

    /// Opens for replay; `sb` names the half and epoch to read.
    pub(crate) fn open(diff: Arc<dyn BlockDevice>, sb: Superblock) -> Self {
        Journal {
            diff,
            sb,
            tail: 0,
            next_seq: 0,
            durable: Arc::default(),
        }
    }

    /// The seq the next record gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// A flush that started after record `seq - 1` was appended completed.
    /// Ignored if a checkpoint began a new half meanwhile (`epoch` moved).
    pub(crate) fn mark_durable(&self, epoch: u64, seq: u64) {
        self.durable.advance(epoch, seq);
    }

    /// The watermark, to advance without the state lock.
    pub(crate) fn watermark(&self) -> Arc<Watermark> {
        self.durable.clone()
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.sb.epoch
    }

    /// A bounded reader over `half`.
    fn window(&self, half: u32) -> HalfWindow<'_> {
        HalfWindow {
            dev: &*self.diff,
            base: self.half_offset(half),
            len: self.sb.journal_half,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// The epoch of the checksummed record at the start of `half`, if any.
    pub(crate) fn first_epoch(&self, half: u32) -> Result<Option<u64>> {
        let mut w = self.window(half);
        Ok(read_envelope(w.at(0)?, self.sb.version)
            .ok()
            .map(|e| e.epoch))
    }

    /// Reads every valid record of the active half, in order. Where a
    /// record does not decode, the rest of the half is scanned for a later
    /// record of the same epoch whose `committed` mark covers it: then the
    /// damage is reported in `cut.committed_by` (it is not a torn tail).
    pub(crate) fn replay(&self) -> Result<Replay> {
        let half = self.sb.active_half;
        let base = self.half_offset(half);
        let mut w = self.window(half);
        let format = self.sb.version;
        let mut records = Vec::new();
        let mut pos = 0u64;
        let mut seq = 0u64;
        loop {
            match format::decode_record(w.at(pos)?, self.sb.epoch, seq, format) {
                Ok(d) => {
                    let committed = match &d.record {
                        Record::Preserve { durable, .. } if format == 1 => *durable,
                        _ => d.committed,
                    };
                    records.push((d.record, committed));
                    pos += d.len as u64;
                    seq += 1;
                }
                Err(RecordEnd::BadPayload) => {
                    // A valid checksum over a body that does not decode was
                    // written that way: never a torn write.
                    return Err(Error::Corrupt {
                        device: self.name(),
                        offset: base + pos,
                        reason: format!(
                            "journal record {seq} has a valid checksum but does not decode"
                        ),
                    });
                }
                Err(why) => {
                    let clean = matches!(why, RecordEnd::BadLength(0) | RecordEnd::Stale { .. })
                        || pos == w.len;
                    let epoch = self.sb.epoch;
                    let committed_by = w
                        .find(pos + 1, format, epoch..=epoch, |e| {
                            e.seq > seq && e.committed > seq
                        })?
                        .map(|(e, at)| (e.seq, base + at));
                    let cut = (!clean || committed_by.is_some()).then(|| Cut {
                        seq,
                        offset: base + pos,
                        why,
                        committed_by,
                    });
                    return Ok(Replay { records, cut });
                }
            }
        }
    }

    /// Scans `half` for a checksummed record of an epoch newer than
    /// `epoch` that was appended after its checkpoint committed (mark
    /// above 0): proof that a newer half was in use.
    pub(crate) fn newer_committed(&self, half: u32, epoch: u64) -> Result<Option<u64>> {
        let mut w = self.window(half);
        // A newer half is at most a few compactions ahead.
        let newer = epoch + 1..=epoch + 8;
        Ok(w.find(0, self.sb.version, newer, |e| e.committed > 0)?
            .map(|(e, _)| e.epoch))
    }

    /// Bytes free in the active half.
    fn room(&self) -> u64 {
        self.sb.journal_half.saturating_sub(self.tail)
    }

    /// Appends the longest prefix of `records` that fits in the active
    /// half, in one write; returns how many went out (0: compact first).
    /// Each is stamped with the current `committed` mark, so a mark is
    /// always one of this half (compaction restarts the numbering).
    pub(crate) fn append_fitting(&mut self, records: &[Record]) -> Result<usize> {
        let mut bytes = Vec::new();
        let mut n = 0;
        for r in records {
            let committed = self.durable.get(self.sb.epoch);
            let enc = self.encode(self.sb.epoch, self.next_seq + n as u64, committed, r)?;
            if (bytes.len() + enc.len()) as u64 > self.room() {
                break;
            }
            bytes.extend_from_slice(&enc);
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        let at = self.half_offset(self.sb.active_half) + self.tail;
        self.diff.write_at(&bytes, at)?;
        self.tail += bytes.len() as u64;
        self.next_seq += n as u64;
        Ok(n)
    }

    /// Encodes `record` under this build's envelope. A `Preserve` carries
    /// the same mark in its body.
    fn encode(&self, epoch: u64, seq: u64, committed: u64, record: &Record) -> Result<Vec<u8>> {
        let stamped;
        let record = match record {
            Record::Preserve { version, hash, .. } => {
                stamped = Record::Preserve {
                    version: *version,
                    hash: *hash,
                    durable: committed,
                };
                &stamped
            }
            other => other,
        };
        format::encode_record(epoch, seq, committed, record).map_err(|e| Error::Corrupt {
            device: self.name(),
            offset: 0,
            reason: format!("cannot encode journal record: {e}"),
        })
    }

    /// Writes `records` from the start of `half` under `epoch` with mark 0
    /// (nothing before a checkpoint); returns the bytes used. Records go
    /// out in one write per megabyte.
    fn write_half(&mut self, half: u32, epoch: u64, records: &[Record]) -> Result<u64> {
        let base = self.half_offset(half);
        let mut out = Vec::new();
        let mut written = 0u64;
        for (seq, rec) in records.iter().enumerate() {
            out.extend_from_slice(&self.encode(epoch, seq as u64, 0, rec)?);
            if written + out.len() as u64 > self.sb.journal_half {
                return Err(Error::JournalTooSmall {
                    needed: written + out.len() as u64,
                    capacity: self.sb.journal_half,
                });
            }
            if out.len() >= 1 << 20 {
                self.diff.write_at(&out, base + written)?;
                written += out.len() as u64;
                out.clear();
            }
        }
        // A zeroed header after the last record ends replay cleanly even if
        // the half holds older bytes (their epoch would stop it anyway).
        out.extend_from_slice(&[0u8; format::RECORD_HEADER]);
        let end = (written + out.len() as u64).min(self.sb.journal_half);
        let n = (end - written) as usize;
        self.diff.write_at(&out[..n], base + written)?;
        self.tail = written + n as u64 - format::RECORD_HEADER.min(n) as u64;
        self.next_seq = records.len() as u64;
        Ok(self.tail)
    }

    /// Compacts: the checkpoint records go to the other half under a new
    /// epoch, then the superblock switches to it (in this build's format,
    /// with `origin_id`). Two flushes.
    pub(crate) fn checkpoint(&mut self, records: Vec<Record>, origin_id: [u8; 32]) -> Result<()> {
        let half = 1 - self.sb.active_half;
        let epoch = self.sb.epoch + 1;
        self.write_half(half, epoch, &records)?;
        self.diff.flush()?;
        self.sb.active_half = half;
        self.sb.epoch = epoch;
        self.sb.generation += 1;
        self.sb.version = FORMAT_VERSION;
        self.sb.origin_id = origin_id;
        Self::write_superblock(&*self.diff, &self.sb)?;
        self.diff.flush()?;
        self.durable.reset(epoch, self.next_seq);
        Ok(())
    }

    /// At a clean close: the state (`records`, a checkpoint) goes to the
    /// other half and the superblock switches to it, as in compaction. What
    /// a clean close leaves then ends in that checkpoint's `CheckpointEnd`,
    /// which the superblock vouches for: later damage to any of it, up to
    /// its last record, is reported (an incomplete checkpoint) instead of
    /// cut off as a torn tail. (A `Mark` appended after the records could
    /// not say that of damage that reached the `Mark` too: copies whose
    /// records were lost with it would be read from the overwritten origin.)
    ///
    /// Only while the superblock on the device is still this handle's: a
    /// handle whose diff area was opened again meanwhile (a second opener
    /// where nothing locks the device) writes nothing, so it cannot
    /// overwrite the newer state.
    pub(crate) fn close(&mut self, records: Vec<Record>) -> Result<()> {
        let newest = (0..2)
            .filter_map(|copy| Self::read_superblock_copy(&*self.diff, copy).ok()?.ok())
            .map(|sb| sb.generation)
            .max();
        if newest != Some(self.sb.generation) {
            return Err(Error::Corrupt {
                device: self.name(),
                offset: 0,
                reason: format!(
                    "not closed: the superblock is at generation {newest:?}, this handle's is {}; the diff area was opened again meanwhile",
                    self.sb.generation
                ),
            });
        }
        let id = self.sb.origin_id;
        self.checkpoint(records, id)
    }
}

/// How far the active half is durable: records below `seq` of `epoch`.
/// A completed flush advances it (ignored once a checkpoint began a new
/// half: `epoch` moved); appends read it for their `committed` mark.
#[derive(Debug, Default)]
pub(crate) struct Watermark(std::sync::Mutex<(u64, u64)>);

impl Watermark {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, u64)> {
        // Two integers set in single statements: a panic elsewhere cannot
        // leave them half-changed.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn advance(&self, epoch: u64, seq: u64) {
        let mut w = self.lock();
        if w.0 == epoch {
            w.1 = w.1.max(seq);
        }
    }

    fn reset(&self, epoch: u64, seq: u64) {
        *self.lock() = (epoch, seq);
    }

    /// The mark for a record of `epoch` (0 if the watermark is of another).
    fn get(&self, epoch: u64) -> u64 {
        let w = self.lock();
        if w.0 == epoch { w.1 } else { 0 }
    }
}

/// Bytes read ahead beyond one whole record.
const REPLAY_READ: u64 = 1 << 20;
/// Longest record envelope and body.
const MAX_RECORD: u64 = (format::RECORD_HEADER + format::MAX_PAYLOAD) as u64;

/// A journal half read through a bounded window (about 2 MiB), so replay
/// and scans hold that much of it whatever the half's size.
struct HalfWindow<'a> {
    dev: &'a dyn BlockDevice,
    /// Device offset of the half.
    base: u64,
    len: u64,
    buf: Vec<u8>,
    /// Half offset of `buf[0]`.
    start: u64,
}

impl HalfWindow<'_> {
    /// The bytes from `pos` on: a whole record's worth, or to the half's end.
    fn at(&mut self, pos: u64) -> Result<&[u8]> {
        let pos = pos.min(self.len);
        let need = (pos + MAX_RECORD).min(self.len);
        if pos < self.start || need > self.start + self.buf.len() as u64 {
            let end = (pos + MAX_RECORD + REPLAY_READ).min(self.len);
            self.buf.resize((end - pos) as usize, 0);
            self.dev.read_at(&mut self.buf, self.base + pos)?;
            self.start = pos;
        }
        Ok(&self.buf[(pos - self.start) as usize..])
    }

    /// The first checksummed envelope at or after `from` that `wanted`
    /// accepts, with its half offset. Envelopes are not aligned, so every
    /// offset is tried; the checksum is only computed for plausible ones.
    /// Only envelopes whose epoch lies in `epochs` are checksummed: the
    /// 8-byte compare rejects almost every offset first.
    fn find(
        &mut self,
        from: u64,
        format: u32,
        epochs: std::ops::RangeInclusive<u64>,
        wanted: impl Fn(&Envelope) -> bool,
    ) -> Result<Option<(Envelope, u64)>> {
        let header = format::record_header(format) as u64;
        let mut at = from;
        while at + header <= self.len {
            let bytes = self.at(at)?;
            let mut epoch = [0u8; 8];
            epoch.copy_from_slice(&bytes[8..16]);
            if epochs.contains(&u64::from_le_bytes(epoch))
                && let Ok(e) = read_envelope(bytes, format)
                && wanted(&e)
            {
                return Ok(Some((e, at)));
            }
            at += 1;
        }
        Ok(None)
    }
}
