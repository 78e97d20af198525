//! Journal records and their envelope.

use serde::{Deserialize, Serialize};

use super::*;

/// What happens when the diff area has no free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FullPolicy {
    /// Drop the oldest snapshot (logged) and go on: VSS's default.
    #[default]
    DeleteOldest,
    /// Refuse the origin write with "no space"; snapshots are kept.
    FailWrites,
    /// Raise the limit in steps up to `max` bytes, then fail writes.
    Grow { max: u64 },
}

/// A snapshot as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub seq: u64,
    pub id: [u8; 16],
    pub set_id: Option<[u8; 16]>,
    /// Nanoseconds since the Unix epoch.
    pub created_ns: u64,
    pub attributes: u32,
    pub persistent: bool,
}

/// One preserved chunk version: the contents `chunk` had when it was first
/// written after snapshot `tag` (see DESIGN: reads of snapshot `s` use the
/// version with the smallest tag >= s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub chunk: u32,
    pub tag: u64,
    pub slot: u32,
}

/// An interrupted revert, resumed at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertState {
    pub seq: u64,
    pub next_chunk: u32,
}

/// Journal records. Variant order is part of the format (postcard writes
/// the variant index): append new kinds at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// First record of a half: the whole state but the versions.
    Checkpoint {
        next_seq: u64,
        max_bytes: u64,
        policy: FullPolicy,
        snapshots: Vec<SnapshotRecord>,
        revert: Option<RevertState>,
    },
    /// Versions belonging to the checkpoint, in batches.
    CheckpointVersions(Vec<VersionRecord>),
    /// The checkpoint is complete; `versions` is the batch total.
    CheckpointEnd {
        versions: u64,
    },
    SnapshotCreate(SnapshotRecord),
    /// A chunk copy. `hash` is the blake3 of the copied bytes; `durable`
    /// is the journal seq below which every record (with its data) was
    /// known durable when this one was appended (format 2 writes the same
    /// value as the envelope's `committed`; format 1 has only this field).
    /// Recovery checks the data of copies at or above the highest mark it
    /// sees, because their record may have reached the media without their
    /// data.
    Preserve {
        version: VersionRecord,
        hash: [u8; 32],
        durable: u64,
    },
    SnapshotDelete {
        seq: u64,
    },
    Limits {
        max_bytes: u64,
        policy: FullPolicy,
    },
    RevertBegin {
        seq: u64,
    },
    RevertProgress {
        next_chunk: u32,
    },
    RevertEnd,
    /// Written at a clean close after a flush: carries only its envelope's
    /// `committed` mark, so every record before it counts as committed and
    /// later damage to one of them is reported, not cut off as a torn tail.
    Mark,
    /// Phase one of a snapshot set on a member other than its decider
    /// (the first member): the snapshot is in doubt until `SetCommit`, or
    /// its delete when the set is abandoned.
    SetPending(InDoubtRecord),
    /// The set of in-doubt snapshot `seq` committed.
    SetCommit {
        seq: u64,
    },
    /// In-doubt snapshots belonging to the checkpoint (before its end).
    CheckpointInDoubt(Vec<InDoubtRecord>),
}

/// A snapshot whose set may or may not have committed: the set's decider
/// (the first member) holds the answer: its snapshot of the set exists
/// exactly when the set committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InDoubtRecord {
    pub seq: u64,
    pub set_id: [u8; 16],
    /// Every member, the decider first.
    pub members: Vec<SetMemberRecord>,
}

/// One member of a snapshot set: its volume id, and where the caller said
/// to find it (an image path for the CLI; free text, may be empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetMemberRecord {
    pub volume: [u8; 16],
    pub locator: String,
}

/// Encodes one record with its format-2 envelope.
pub fn encode_record(
    epoch: u64,
    seq: u64,
    committed: u64,
    record: &Record,
) -> Result<Vec<u8>, postcard::Error> {
    let body = postcard::to_stdvec(record)?;
    let mut out = Vec::with_capacity(RECORD_HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&committed.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordEnd {
    /// Not enough bytes for a header or the payload: end of the half.
    Truncated,
    /// Zero or oversized length.
    BadLength(u32),
    ChecksumMismatch,
    /// A record of another epoch (left over from the half's earlier use).
    Stale {
        epoch: u64,
    },
    /// A checksummed record out of sequence.
    BadSeq {
        expected: u64,
        found: u64,
    },
    /// A checksummed record whose payload does not decode: corruption by a
    /// writer, not a torn write.
    BadPayload,
}

/// A decoded record with its envelope's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub record: Record,
    /// Encoded length, envelope included.
    pub len: usize,
    /// The envelope's `committed` mark (format 1: 0, the mark is in
    /// `Record::Preserve` only).
    pub committed: u64,
}

/// A checksummed envelope: what a forward scan over a damaged journal
/// trusts without decoding the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    pub len: usize,
    pub epoch: u64,
    pub seq: u64,
    pub committed: u64,
}

/// Envelope header size of `format`.
pub fn record_header(format: u32) -> usize {
    if format == 1 {
        RECORD_HEADER_V1
    } else {
        RECORD_HEADER
    }
}

/// Checks the envelope at the start of `buf` (length and checksum only).
pub fn read_envelope(buf: &[u8], format: u32) -> Result<Envelope, RecordEnd> {
    let header = record_header(format);
    if buf.len() < header {
        return Err(RecordEnd::Truncated);
    }
    let word = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let dword = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let len = word(0);
    if len == 0 || len as usize > MAX_PAYLOAD {
        return Err(RecordEnd::BadLength(len));
    }
    let end = header + len as usize;
    if buf.len() < end {
        return Err(RecordEnd::Truncated);
    }
    if crc32c::crc32c(&buf[8..end]) != word(4) {
        return Err(RecordEnd::ChecksumMismatch);
    }
    Ok(Envelope {
        len: end,
        epoch: dword(8),
        seq: dword(16),
        committed: if format == 1 { 0 } else { dword(24) },
    })
}

/// Decodes the record at the start of `buf` if it is a valid continuation
/// (`epoch`, `seq`) in envelope `format`.
pub fn decode_record(buf: &[u8], epoch: u64, seq: u64, format: u32) -> Result<Decoded, RecordEnd> {
    let env = read_envelope(buf, format)?;
    if env.epoch != epoch {
        return Err(RecordEnd::Stale { epoch: env.epoch });
    }
    if env.seq != seq {
        return Err(RecordEnd::BadSeq {
            expected: seq,
            found: env.seq,
        });
    }
    let record = postcard::from_bytes(&buf[record_header(format)..env.len])
        .map_err(|_| RecordEnd::BadPayload)?;
    Ok(Decoded {
        record,
        len: env.len,
        committed: env.committed,
    })
}
