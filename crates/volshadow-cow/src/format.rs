//! On-disk format of the diff area: superblock, record envelope, records.
//! docs/FORMAT.md has the same tables; a change here is a format change
//! (bump `FORMAT_VERSION`, keep reading the old one or say why not).
//!
//! Diff-area layout (all offsets 4 KiB aligned):
//!
//! | region          | offset              | size                         |
//! |-----------------|---------------------|------------------------------|
//! | superblock A    | 0                   | 4096                         |
//! | superblock B    | 4096                | 4096                         |
//! | journal half 0  | `journal_offset`    | `journal_half`               |
//! | journal half 1  | + `journal_half`    | `journal_half`               |
//! | hash table      | `hash_offset`       | 32 × `slots` (blake3 / slot) |
//! | data slots      | `data_offset`       | `chunk_size` × `slots`       |
//!
//! Superblock (little-endian, 144 bytes used of its 4096):
//!
//! | off | size | field          | meaning                                        |
//! |-----|------|----------------|------------------------------------------------|
//! | 0   | 8    | magic          | `VSHADOW\x01`                                  |
//! | 8   | 4    | version        | format version, 1                              |
//! | 12  | 4    | header_len     | 144                                            |
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
//! | 96  | 8    | hash_offset    |                                                |
//! | 104 | 8    | data_offset    |                                                |
//! | 112 | 8    | slots          | number of data slots                           |
//! | 120 | 4    | active_half    | 0 or 1: the half recovery replays              |
//! | 124 | 4    | reserved       | 0                                              |
//! | 128 | 8    | epoch          | stamp of the active half's records             |
//! | 136 | 4    | crc            | crc32c of bytes 0..136                         |
//! | 140 | 4    | pad            | 0                                              |
//!
//! Journal record envelope (little-endian, then the postcard payload):
//!
//! | off | size | field | meaning                                             |
//! |-----|------|-------|-----------------------------------------------------|
//! | 0   | 4    | len   | payload length, 1 ..= `MAX_PAYLOAD`                 |
//! | 4   | 4    | crc   | crc32c of bytes 8 .. 24+len                         |
//! | 8   | 8    | epoch | must equal the superblock's epoch                   |
//! | 16  | 8    | seq   | record number; consecutive within a half            |
//! | 24  | len  | body  | postcard-encoded [`Record`]                         |
//!
//! Replay stops at the first record whose length, checksum, epoch or seq is
//! wrong: a torn or stale tail is cut off, never trusted.

use serde::{Deserialize, Serialize};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `VSHADOW` and format generation byte.
pub const MAGIC: [u8; 8] = *b"VSHADOW\x01";
/// The format this build writes.
pub const FORMAT_VERSION: u32 = 1;
/// Incompatible feature bits this build understands.
pub const INCOMPAT_SUPPORTED: u64 = 0;
/// Bytes reserved for each superblock copy.
pub const SUPERBLOCK_SLOT: u64 = 4096;
/// Envelope header size.
pub const RECORD_HEADER: usize = 24;
/// Largest payload accepted; a longer `len` is a torn or foreign tail.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes of one slot's hash in the hash table.
pub const HASH_LEN: u64 = 32;

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
    pub crc: U32,
    pub pad: U32,
}

/// Bytes covered by the superblock checksum.
pub const SUPERBLOCK_CRC_SPAN: usize = 136;
/// Bytes of the superblock structure.
pub const SUPERBLOCK_LEN: usize = size_of::<RawSuperblock>();

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
}

impl Superblock {
    /// Encodes into one 4096-byte superblock slot.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = RawSuperblock {
            magic: MAGIC,
            version: self.version.into(),
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
        if crc32c::crc32c(&raw.as_bytes()[..SUPERBLOCK_CRC_SPAN]) != raw.crc.get() {
            return Err(SuperblockError::BadChecksum);
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
        };
        sb.check()?;
        Ok(sb)
    }

    fn check(&self) -> Result<(), SuperblockError> {
        use SuperblockError::BadField;
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
    /// known durable when this one was appended. Recovery checks the data
    /// of copies at or above the highest `durable` it sees, because their
    /// record may have reached the media without their data.
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
}

/// Encodes one record with its envelope.
pub fn encode_record(epoch: u64, seq: u64, record: &Record) -> Result<Vec<u8>, postcard::Error> {
    let body = postcard::to_stdvec(record)?;
    let mut out = Vec::with_capacity(RECORD_HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
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

/// Decodes the record at the start of `buf` if it is a valid continuation
/// (`epoch`, `seq`). Returns the record and its encoded length.
pub fn decode_record(buf: &[u8], epoch: u64, seq: u64) -> Result<(Record, usize), RecordEnd> {
    if buf.len() < RECORD_HEADER {
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
    let end = RECORD_HEADER + len as usize;
    if buf.len() < end {
        return Err(RecordEnd::Truncated);
    }
    if crc32c::crc32c(&buf[8..end]) != word(4) {
        return Err(RecordEnd::BadChecksum);
    }
    let rec_epoch = dword(8);
    if rec_epoch != epoch {
        return Err(RecordEnd::Stale { epoch: rec_epoch });
    }
    let rec_seq = dword(16);
    if rec_seq != seq {
        return Err(RecordEnd::BadSeq {
            expected: seq,
            found: rec_seq,
        });
    }
    let record =
        postcard::from_bytes(&buf[RECORD_HEADER..end]).map_err(|_| RecordEnd::BadPayload)?;
    Ok((record, end))
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
        }
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = sample();
        let bytes = sb.encode();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(SUPERBLOCK_LEN, 144);
        assert_eq!(Superblock::decode(&bytes).unwrap(), sb);
        for i in [0usize, 9, 40, 70, 135] {
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
        let bytes = encode_record(4, 11, &rec).unwrap();
        assert_eq!(decode_record(&bytes, 4, 11).unwrap(), (rec, bytes.len()));
        assert_eq!(
            decode_record(&bytes, 5, 11).unwrap_err(),
            RecordEnd::Stale { epoch: 4 }
        );
        assert!(matches!(
            decode_record(&bytes, 4, 12).unwrap_err(),
            RecordEnd::BadSeq { .. }
        ));
        for cut in 0..bytes.len() {
            assert!(decode_record(&bytes[..cut], 4, 11).is_err());
        }
        let mut torn = bytes.clone();
        let last = torn.len() - 1;
        torn[last] ^= 1;
        assert_eq!(
            decode_record(&torn, 4, 11).unwrap_err(),
            RecordEnd::BadChecksum
        );
        assert!(matches!(
            decode_record(&[0u8; 64], 4, 11).unwrap_err(),
            RecordEnd::BadLength(0)
        ));
    }
}
