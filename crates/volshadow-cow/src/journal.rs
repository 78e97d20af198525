//! The journal: two halves used in turn, each starting with a checkpoint.
//!
//! Records are appended to the active half. When one does not fit, a
//! checkpoint of the whole state is written to the other half under a new
//! epoch, flushed, and only then the superblock (next generation, other
//! copy) is pointed at it and flushed. A crash at any point leaves one
//! superblock whose half is complete, so recovery replays at most one
//! half: recovery time is bounded by the half's size.

use std::sync::Arc;

use volshadow_block::BlockDevice;

use crate::error::{Error, Result};
use crate::format::{
    self, FORMAT_VERSION, INCOMPAT_SUPPORTED, Record, RecordEnd, SUPERBLOCK_SLOT, Superblock,
};

/// Read granularity of replay.
const REPLAY_READ: u64 = 1 << 20;

#[derive(Debug)]
pub(crate) struct Journal {
    diff: Arc<dyn BlockDevice>,
    sb: Superblock,
    /// Bytes used in the active half.
    tail: u64,
    next_seq: u64,
    /// Records below this seq (and the data they point to) are durable.
    durable: u64,
}

/// Outcome of reading the active half.
#[derive(Debug)]
pub(crate) struct Replay {
    pub(crate) records: Vec<Record>,
    /// Why replay stopped (for logs and tests).
    pub(crate) end: RecordEnd,
}

impl Journal {
    fn name(&self) -> String {
        self.diff.name()
    }

    fn half_offset(&self, half: u32) -> u64 {
        self.sb.journal_offset + half as u64 * self.sb.journal_half
    }

    /// Reads both superblock copies and returns the valid one with the
    /// higher generation.
    pub(crate) fn read_superblock(diff: &dyn BlockDevice) -> Result<Superblock> {
        let name = diff.name();
        if diff.len() < 2 * SUPERBLOCK_SLOT {
            return Err(Error::NotADiffArea {
                device: name,
                reason: format!("{} bytes is too small to hold a superblock", diff.len()),
            });
        }
        let mut best: Option<Superblock> = None;
        let mut reasons = Vec::new();
        for copy in 0..2u64 {
            let mut buf = vec![0u8; SUPERBLOCK_SLOT as usize];
            diff.read_at(&mut buf, copy * SUPERBLOCK_SLOT)?;
            match Superblock::decode(&buf) {
                Ok(sb) if best.as_ref().is_none_or(|b| sb.generation > b.generation) => {
                    best = Some(sb)
                }
                Ok(_) => {}
                Err(e) => reasons.push(format!("copy {copy}: {e}")),
            }
        }
        let sb = best.ok_or_else(|| Error::NotADiffArea {
            device: name.clone(),
            reason: reasons.join("; "),
        })?;
        if sb.version > FORMAT_VERSION || sb.incompat & !INCOMPAT_SUPPORTED != 0 {
            return Err(Error::Unsupported {
                device: name,
                version: sb.version,
                features: sb.incompat,
                supported: FORMAT_VERSION,
            });
        }
        if sb.diff_len > diff.len() {
            return Err(Error::Corrupt {
                device: name,
                offset: 0,
                reason: format!(
                    "superblock describes {} bytes but the device has {}",
                    sb.diff_len,
                    diff.len()
                ),
            });
        }
        Ok(sb)
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
            durable: 0,
        };
        j.write_half(0, 1, &checkpoint)?;
        j.diff.flush()?;
        j.durable = j.next_seq;
        for generation in [1, 2] {
            j.sb.generation = generation;
            Self::write_superblock(&*j.diff, &j.sb)?;
        }
        j.diff.flush()?;
        Ok(j)
    }

    /// Opens for replay.
    pub(crate) fn open(diff: Arc<dyn BlockDevice>, sb: Superblock) -> Self {
        Journal {
            diff,
            sb,
            tail: 0,
            next_seq: 0,
            durable: 0,
        }
    }

    /// The seq the next record gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seq below which records are known durable.
    pub(crate) fn durable(&self) -> u64 {
        self.durable
    }

    /// A flush that started after record `seq - 1` was appended completed.
    /// Ignored if a checkpoint began a new half meanwhile (`epoch` moved).
    pub(crate) fn mark_durable(&mut self, epoch: u64, seq: u64) {
        if epoch == self.sb.epoch {
            self.durable = self.durable.max(seq);
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.sb.epoch
    }

    /// Reads every valid record of the active half, in order.
    pub(crate) fn replay(&self) -> Result<Replay> {
        let base = self.half_offset(self.sb.active_half);
        let half = self.sb.journal_half;
        let mut records = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_start = 0u64; // offset in the half of buf[0]
        let mut pos = 0u64;
        let mut seq = 0u64;
        loop {
            let in_buf = (pos - buf_start) as usize;
            match format::decode_record(&buf[in_buf..], self.sb.epoch, seq) {
                Ok((rec, len)) => {
                    records.push(rec);
                    pos += len as u64;
                    seq += 1;
                }
                Err(RecordEnd::Truncated) if buf_start + (buf.len() as u64) < half => {
                    // Refill from `pos`, reading enough for the largest record.
                    let want = (half - pos).min(REPLAY_READ + format::MAX_PAYLOAD as u64);
                    buf = vec![0u8; want as usize];
                    self.diff.read_at(&mut buf, base + pos)?;
                    buf_start = pos;
                    if want == 0 {
                        return Ok(Replay {
                            records,
                            end: RecordEnd::Truncated,
                        });
                    }
                }
                Err(RecordEnd::BadPayload) => {
                    return Err(Error::Corrupt {
                        device: self.name(),
                        offset: base + pos,
                        reason: format!(
                            "journal record {seq} has a valid checksum but does not decode"
                        ),
                    });
                }
                Err(end) => return Ok(Replay { records, end }),
            }
        }
    }

    /// After replay, continue appending after the last valid record.
    /// Recovery instead starts a fresh half via `checkpoint`, which also
    /// drops any torn tail.
    pub(crate) fn has_room(&self, len: usize) -> bool {
        self.tail + len as u64 <= self.sb.journal_half
    }

    /// Appends one record at the tail. The caller checkpoints first when
    /// `has_room` says no.
    pub(crate) fn append(&mut self, record: &Record) -> Result<()> {
        self.append_many(std::slice::from_ref(record))
    }

    /// Appends several records with one write.
    pub(crate) fn append_many(&mut self, records: &[Record]) -> Result<()> {
        let mut bytes = Vec::new();
        for (k, r) in records.iter().enumerate() {
            bytes.extend_from_slice(&self.encode(self.sb.epoch, self.next_seq + k as u64, r)?);
        }
        if !self.has_room(bytes.len()) {
            return Err(Error::JournalTooSmall {
                needed: self.tail + bytes.len() as u64,
                capacity: self.sb.journal_half,
            });
        }
        let at = self.half_offset(self.sb.active_half) + self.tail;
        self.diff.write_at(&bytes, at)?;
        self.tail += bytes.len() as u64;
        self.next_seq += records.len() as u64;
        Ok(())
    }

    /// Encoded size of a record (for `has_room`).
    pub(crate) fn encoded_len(&self, record: &Record) -> Result<usize> {
        Ok(self.encode(self.sb.epoch, self.next_seq, record)?.len())
    }

    fn encode(&self, epoch: u64, seq: u64, record: &Record) -> Result<Vec<u8>> {
        format::encode_record(epoch, seq, record).map_err(|e| Error::Corrupt {
            device: self.name(),
            offset: 0,
            reason: format!("cannot encode journal record: {e}"),
        })
    }

    /// Writes `records` from the start of `half` under `epoch`; returns the
    /// bytes used. Records go out in one write per megabyte.
    fn write_half(&mut self, half: u32, epoch: u64, records: &[Record]) -> Result<u64> {
        let base = self.half_offset(half);
        let mut out = Vec::new();
        let mut written = 0u64;
        for (seq, rec) in records.iter().enumerate() {
            out.extend_from_slice(&self.encode(epoch, seq as u64, rec)?);
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
    /// epoch, then the superblock switches to it. Two flushes.
    pub(crate) fn checkpoint(&mut self, records: Vec<Record>) -> Result<()> {
        let half = 1 - self.sb.active_half;
        let epoch = self.sb.epoch + 1;
        self.write_half(half, epoch, &records)?;
        self.diff.flush()?;
        self.sb.active_half = half;
        self.sb.epoch = epoch;
        self.sb.generation += 1;
        Self::write_superblock(&*self.diff, &self.sb)?;
        self.diff.flush()?;
        self.durable = self.next_seq;
        Ok(())
    }
}
