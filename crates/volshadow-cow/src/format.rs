//! On-disk format of the diff area: superblock, record envelope, records,
//! slot entries. docs/FORMAT.md has the same tables; a change here is a
//! format change (bump `FORMAT_VERSION`, keep reading the old one or say
//! why not). Format 1 is still read: opening it upgrades it in place.
//!
//! Diff-area layout (all offsets 4 KiB aligned):
//!
//! | region          | offset              | size                          |
//! |-----------------|---------------------|-------------------------------|
//! | superblock A    | 0                   | 4096                          |
//! | superblock B    | 4096                | 4096                          |
//! | journal half 0  | `journal_offset`    | `journal_half`                |
//! | journal half 1  | + `journal_half`    | `journal_half`                |
//! | slot entries    | `hash_offset`       | 32 × `slots` (one per slot)   |
//! | data slots      | `data_offset`       | `chunk_size` × `slots`        |
//!
//! Superblock (little-endian, 176 bytes used of its 4096; format 1 stops
//! at 144 with its crc at 136 over bytes 0..136):
//!
//! | off | size | field          | meaning                                        |
//! |-----|------|----------------|------------------------------------------------|
//! | 0   | 8    | magic          | `VSHADOW\x01`                                  |
//! | 8   | 4    | version        | format version, 2 (1 is read and upgraded)     |
//! | 12  | 4    | header_len     | 176 (144 in format 1)                          |
//! | 16  | 8    | incompat       | feature bits a reader must know (none yet)     |
//! | 24  | 8    | compat         | feature bits a reader may ignore (none yet)    |
//! | 32  | 8    | generation     | +1 per superblock write; higher valid copy wins |
//! | 40  | 16   | uuid           | this volume's id                               |
//! | 56  | 4    | chunk_size     | bytes, power of two, 4 KiB ..= 1 MiB           |
//! | 60  | 4    | flags          | reserved, 0                                    |
//! | 64  | 8    | origin_len     | origin size in bytes                           |
//! | 72  | 8    | diff_len       | diff-area size used by the layout              |
//! | 80  | 8    | journal_offset |                                                |
//! | 88  | 8    | journal_half   | bytes per journal half                         |
//! | 96  | 8    | hash_offset    | start of the slot entries                      |
//! | 104 | 8    | data_offset    |                                                |
//! | 112 | 8    | slots          | number of data slots                           |
//! | 120 | 4    | active_half    | 0 or 1: the half recovery replays              |
//! | 124 | 4    | reserved       | 0                                              |
//! | 128 | 8    | epoch          | stamp of the active half's records             |
//! | 136 | 32   | origin_id      | identity of the origin (see `OriginId`), or 0  |
//! | 168 | 4    | crc            | crc32c of bytes 0..168                         |
//! | 172 | 4    | pad            | 0                                              |
//!
//! Journal record envelope (little-endian, then the postcard payload;
//! format 1 has no `committed` field and a 24-byte header):
//!
//! | off | size | field     | meaning                                          |
//! |-----|------|-----------|--------------------------------------------------|
//! | 0   | 4    | len       | payload length, 1 ..= `MAX_PAYLOAD`              |
//! | 4   | 4    | crc       | crc32c of bytes 8 .. 32+len                      |
//! | 8   | 8    | epoch     | must equal the superblock's epoch                |
//! | 16  | 8    | seq       | record number; consecutive within a half         |
//! | 24  | 8    | committed | every record below this seq, with its data, was  |
//! |     |      |           | durable when this one was written                |
//! | 32  | len  | body      | postcard-encoded [`Record`]                      |
//!
//! Replay stops at the first record whose length, checksum, epoch or seq is
//! wrong. That is a torn tail only if no later valid record of the half
//! says it was committed; otherwise it is corruption and is reported.
//!
//! Slot entry (32 bytes per data slot, written with the slot's data):
//!
//! | off | size | field  | meaning                                             |
//! |-----|------|--------|-----------------------------------------------------|
//! | 0   | 23   | hash   | first 23 bytes of the data's blake3, 0 if unrecorded |
//! | 23  | 1    | flags  | bit 0: entry in use; bit 1: `hash` recorded          |
//! | 24  | 4    | crc    | crc32c of (chunk as u32 LE, data): checked on reads  |
//! | 28  | 4    | chunk  | origin chunk whose old contents the slot holds       |
//!
//! Format 1 entries are the data's full 32-byte blake3 (or zeros).

use serde::{Deserialize, Serialize};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `VSHADOW` and format generation byte.
pub const MAGIC: [u8; 8] = *b"VSHADOW\x01";
/// The format this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this build reads (and upgrades on open).
pub const FORMAT_OLDEST: u32 = 1;
/// Incompatible feature bits this build understands.
pub const INCOMPAT_SUPPORTED: u64 = 0;
/// Bytes reserved for each superblock copy.
pub const SUPERBLOCK_SLOT: u64 = 4096;
/// Envelope header size (format 2).
pub const RECORD_HEADER: usize = 32;
/// Envelope header size of format 1 (no `committed` field).
pub const RECORD_HEADER_V1: usize = 24;
/// Largest payload accepted; a longer `len` is a torn or foreign tail.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes of one slot entry.
pub const HASH_LEN: u64 = 32;
/// Bytes of an origin identity.
pub const ORIGIN_ID_LEN: usize = 32;

/// The superblock as stored.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSuperblock {
    pub magic: [u8; 8],
    pub version: U32,
    pub header_len: U32,
    pub incompat: U64,
    pub compat: U64,
    pub generation: U64,
    pub uuid: [u8; 16],
    pub chunk_size: U32,
    pub flags: U32,
    pub origin_len: U64,
    pub diff_len: U64,
    pub journal_offset: U64,
    pub journal_half: U64,
    pub hash_offset: U64,
    pub data_offset: U64,
    pub slots: U64,
    pub active_half: U32,
    pub reserved: U32,
    pub epoch: U64,
    pub origin_id: [u8; ORIGIN_ID_LEN],
    pub crc: U32,
    pub pad: U32,
}

/// Bytes covered by the superblock checksum.
pub const SUPERBLOCK_CRC_SPAN: usize = 168;
/// Bytes of the superblock structure.
pub const SUPERBLOCK_LEN: usize = size_of::<RawSuperblock>();
/// Checksum span and length of a format-1 superblock.
const SUPERBLOCK_V1_CRC_SPAN: usize = 136;
const SUPERBLOCK_V1_LEN: usize = 144;

/// Why a superblock copy was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuperblockError {
    BadMagic,
    BadChecksum,
    BadField(&'static str),
}

impl std::fmt::Display for SuperblockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SuperblockError::BadMagic => f.write_str("bad magic"),
            SuperblockError::BadChecksum => f.write_str("bad checksum"),
            SuperblockError::BadField(name) => write!(f, "field {name} is out of range"),
        }
    }
}

/// The decoded, validated superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub incompat: u64,
    pub compat: u64,
    pub generation: u64,
    pub uuid: [u8; 16],
    pub chunk_size: u32,
    pub origin_len: u64,
    pub diff_len: u64,
    pub journal_offset: u64,
    pub journal_half: u64,
    pub hash_offset: u64,
    pub data_offset: u64,
    pub slots: u64,
    pub active_half: u32,
    pub epoch: u64,
    /// Identity of the origin this diff area belongs to (all zeros:
    /// unknown, adopted at the next open).
    pub origin_id: [u8; ORIGIN_ID_LEN],
}

impl Superblock {
    /// Encodes into one 4096-byte superblock slot, in this build's format
    /// (an upgraded format-1 superblock is written as format 2).
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = RawSuperblock {
            magic: MAGIC,
            version: FORMAT_VERSION.into(),
            header_len: (SUPERBLOCK_LEN as u32).into(),
            incompat: self.incompat.into(),
            compat: self.compat.into(),
            generation: self.generation.into(),
            uuid: self.uuid,
            chunk_size: self.chunk_size.into(),
            flags: 0.into(),
            origin_len: self.origin_len.into(),
            diff_len: self.diff_len.into(),
            journal_offset: self.journal_offset.into(),
            journal_half: self.journal_half.into(),
            hash_offset: self.hash_offset.into(),
            data_offset: self.data_offset.into(),
            slots: self.slots.into(),
            active_half: self.active_half.into(),
            reserved: 0.into(),
            epoch: self.epoch.into(),
            origin_id: self.origin_id,
            crc: 0.into(),
            pad: 0.into(),
        };
        raw.crc = crc32c::crc32c(&raw.as_bytes()[..SUPERBLOCK_CRC_SPAN]).into();
        let mut out = vec![0u8; SUPERBLOCK_SLOT as usize];
        out[..SUPERBLOCK_LEN].copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes and checks one copy. Geometry is checked for internal
    /// consistency (regions in order, inside `diff_len`) so later code can
    /// trust offsets without overflow.
    pub fn decode(bytes: &[u8]) -> Result<Self, SuperblockError> {
        let raw = RawSuperblock::ref_from_prefix(bytes)
            .map_err(|_| SuperblockError::BadMagic)?
            .0;
        if raw.magic != MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        let version = raw.version.get();
        let (span, len, crc) = if version == 1 {
            let b = raw.as_bytes();
            let crc = u32::from_le_bytes([b[136], b[137], b[138], b[139]]);
            (SUPERBLOCK_V1_CRC_SPAN, SUPERBLOCK_V1_LEN, crc)
        } else {
            (SUPERBLOCK_CRC_SPAN, SUPERBLOCK_LEN, raw.crc.get())
        };
        if crc32c::crc32c(&raw.as_bytes()[..span]) != crc {
            return Err(SuperblockError::BadChecksum);
        }
        if raw.header_len.get() as usize != len {
            return Err(SuperblockError::BadField("header_len"));
        }
        let sb = Superblock {
            version: raw.version.get(),
            incompat: raw.incompat.get(),
            compat: raw.compat.get(),
            generation: raw.generation.get(),
            uuid: raw.uuid,
            chunk_size: raw.chunk_size.get(),
            origin_len: raw.origin_len.get(),
            diff_len: raw.diff_len.get(),
            journal_offset: raw.journal_offset.get(),
            journal_half: raw.journal_half.get(),
            hash_offset: raw.hash_offset.get(),
            data_offset: raw.data_offset.get(),
            slots: raw.slots.get(),
            active_half: raw.active_half.get(),
            epoch: raw.epoch.get(),
            origin_id: if version == 1 {
                [0; ORIGIN_ID_LEN]
            } else {
                raw.origin_id
            },
        };
        sb.check()?;
        Ok(sb)
    }

    fn check(&self) -> Result<(), SuperblockError> {
        use SuperblockError::BadField;
        if self.version == 0 {
            return Err(BadField("version"));
        }
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(BadField("chunk_size"));
        }
        if self.active_half > 1 {
            return Err(BadField("active_half"));
        }
        if self.journal_offset != 2 * SUPERBLOCK_SLOT {
            return Err(BadField("journal_offset"));
        }
        let journal_end = self
            .journal_half
            .checked_mul(2)
            .and_then(|j| j.checked_add(self.journal_offset))
            .ok_or(BadField("journal_half"))?;
        if self.journal_half < 4096 || self.hash_offset < journal_end {
            return Err(BadField("hash_offset"));
        }
        let hash_end = self
            .slots
            .checked_mul(HASH_LEN)
            .and_then(|h| h.checked_add(self.hash_offset))
            .ok_or(BadField("slots"))?;
        if self.data_offset < hash_end {
            return Err(BadField("data_offset"));
        }
        let data_end = self
            .slots
            .checked_mul(cs as u64)
            .and_then(|d| d.checked_add(self.data_offset))
            .ok_or(BadField("slots"))?;
        if data_end > self.diff_len {
            return Err(BadField("diff_len"));
        }
        if self.slots > u32::MAX as u64 {
            return Err(BadField("slots"));
        }
        let chunks = self.origin_len.div_ceil(cs as u64);
        if self.origin_len == 0 || chunks > u32::MAX as u64 {
            return Err(BadField("origin_len"));
        }
        Ok(())
    }
}

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
    BadChecksum,
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
        return Err(RecordEnd::BadChecksum);
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

/// Flag bits of a slot entry.
const ENTRY_IN_USE: u8 = 1;
const ENTRY_HASHED: u8 = 2;
/// Bytes of blake3 kept in a slot entry.
const ENTRY_HASH_LEN: usize = 23;

/// What a data slot holds, as its entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotEntry {
    pub chunk: u32,
    /// crc32c of the chunk number and the data: checked on every read.
    pub crc: u32,
    /// Leading bytes of the data's blake3, when recorded (scrub and
    /// recovery; copies only non-persistent snapshots read skip it).
    pub hash: Option<[u8; ENTRY_HASH_LEN]>,
}

impl SlotEntry {
    /// The entry for `data`, the old contents of `chunk`.
    pub fn new(chunk: u32, data: &[u8], blake3: Option<&[u8; 32]>) -> Self {
        SlotEntry {
            chunk,
            crc: Self::crc_of(chunk, data),
            hash: blake3.map(|h| {
                let mut b = [0u8; ENTRY_HASH_LEN];
                b.copy_from_slice(&h[..ENTRY_HASH_LEN]);
                b
            }),
        }
    }

    pub fn crc_of(chunk: u32, data: &[u8]) -> u32 {
        crc32c::crc32c_append(crc32c::crc32c(&chunk.to_le_bytes()), data)
    }

    /// True if `data` is what this entry describes for `chunk`.
    pub fn holds(&self, chunk: u32, data: &[u8]) -> bool {
        self.chunk == chunk && self.crc == Self::crc_of(chunk, data)
    }

    /// True if a full blake3 agrees with the recorded prefix.
    pub fn hash_matches(&self, blake3: &[u8; 32]) -> bool {
        self.hash.is_none_or(|h| h[..] == blake3[..ENTRY_HASH_LEN])
    }

    pub fn encode(&self) -> [u8; HASH_LEN as usize] {
        let mut out = [0u8; HASH_LEN as usize];
        let mut flags = ENTRY_IN_USE;
        if let Some(h) = &self.hash {
            out[..ENTRY_HASH_LEN].copy_from_slice(h);
            flags |= ENTRY_HASHED;
        }
        out[23] = flags;
        out[24..28].copy_from_slice(&self.crc.to_le_bytes());
        out[28..32].copy_from_slice(&self.chunk.to_le_bytes());
        out
    }

    /// `None` for an unused (all-zero or not in use) entry.
    pub fn decode(b: &[u8; HASH_LEN as usize]) -> Option<Self> {
        let flags = b[23];
        if flags & ENTRY_IN_USE == 0 {
            return None;
        }
        let mut hash = [0u8; ENTRY_HASH_LEN];
        hash.copy_from_slice(&b[..ENTRY_HASH_LEN]);
        Some(SlotEntry {
            chunk: u32::from_le_bytes([b[28], b[29], b[30], b[31]]),
            crc: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
            hash: (flags & ENTRY_HASHED != 0).then_some(hash),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            incompat: 0,
            compat: 0,
            generation: 3,
            uuid: [7; 16],
            chunk_size: 16384,
            origin_len: 1 << 30,
            diff_len: 1 << 28,
            journal_offset: 8192,
            journal_half: 1 << 20,
            hash_offset: 8192 + (2 << 20),
            data_offset: 8192 + (2 << 20) + 4096 * 32,
            slots: 4096,
            active_half: 1,
            epoch: 9,
            origin_id: [5; ORIGIN_ID_LEN],
        }
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = sample();
        let bytes = sb.encode();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(SUPERBLOCK_LEN, 176);
        assert_eq!(Superblock::decode(&bytes).unwrap(), sb);
        for i in [0usize, 9, 40, 70, 135, 140, 167, 170] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Superblock::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert_eq!(
            Superblock::decode(&bytes[..100]).unwrap_err(),
            SuperblockError::BadMagic
        );
    }

    #[test]
    fn superblock_geometry_is_checked() {
        let mut sb = sample();
        sb.slots = 1 << 40;
        assert!(Superblock::decode(&sb.encode()).is_err());
        let mut sb = sample();
        sb.chunk_size = 3000;
        assert!(Superblock::decode(&sb.encode()).is_err());
        let mut sb = sample();
        sb.data_offset = u64::MAX - 5;
        assert!(Superblock::decode(&sb.encode()).is_err());
    }

    #[test]
    fn record_envelope_round_trips_and_rejects_tails() {
        let rec = Record::Preserve {
            version: VersionRecord {
                chunk: 5,
                tag: 2,
                slot: 9,
            },
            hash: [3; 32],
            durable: 7,
        };
        let bytes = encode_record(4, 11, 6, &rec).unwrap();
        assert_eq!(
            decode_record(&bytes, 4, 11, FORMAT_VERSION).unwrap(),
            Decoded {
                record: rec,
                len: bytes.len(),
                committed: 6
            }
        );
        assert_eq!(
            decode_record(&bytes, 5, 11, FORMAT_VERSION).unwrap_err(),
            RecordEnd::Stale { epoch: 4 }
        );
        assert!(matches!(
            decode_record(&bytes, 4, 12, FORMAT_VERSION).unwrap_err(),
            RecordEnd::BadSeq { .. }
        ));
        for cut in 0..bytes.len() {
            assert!(decode_record(&bytes[..cut], 4, 11, FORMAT_VERSION).is_err());
        }
        for i in 4..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 1;
            assert_eq!(
                decode_record(&flipped, 4, 11, FORMAT_VERSION).unwrap_err(),
                RecordEnd::BadChecksum,
                "flip at {i}"
            );
        }
        assert!(matches!(
            decode_record(&[0u8; 64], 4, 11, FORMAT_VERSION).unwrap_err(),
            RecordEnd::BadLength(0)
        ));
    }

    #[test]
    fn slot_entries_round_trip_and_bind_data_to_its_chunk() {
        let data = vec![7u8; 4096];
        let h = *blake3::hash(&data).as_bytes();
        for hash in [None, Some(&h)] {
            let e = SlotEntry::new(12, &data, hash);
            assert_eq!(SlotEntry::decode(&e.encode()), Some(e));
            assert!(e.holds(12, &data));
            assert!(!e.holds(13, &data), "another chunk's slot must not pass");
            let mut bad = data.clone();
            bad[100] ^= 4;
            assert!(!e.holds(12, &bad));
            assert!(e.hash_matches(&h));
        }
        assert_eq!(SlotEntry::decode(&[0u8; 32]), None);
    }
}
