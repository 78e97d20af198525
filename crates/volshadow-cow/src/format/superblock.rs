//! The superblock: geometry, the active journal half, the origin's identity.

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::*;

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
    WrongMagic,
    ChecksumMismatch,
    FieldOutOfRange(&'static str),
}

impl std::fmt::Display for SuperblockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SuperblockError::WrongMagic => f.write_str("bad magic"),
            SuperblockError::ChecksumMismatch => f.write_str("bad checksum"),
            SuperblockError::FieldOutOfRange(name) => write!(f, "field {name} is out of range"),
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
            .map_err(|_| SuperblockError::WrongMagic)?
            .0;
        if raw.magic != MAGIC {
            return Err(SuperblockError::WrongMagic);
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
            return Err(SuperblockError::ChecksumMismatch);
        }
        if raw.header_len.get() as usize != len {
            return Err(SuperblockError::FieldOutOfRange("header_len"));
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
        use SuperblockError::FieldOutOfRange;
        if self.version == 0 {
            return Err(FieldOutOfRange("version"));
        }
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
            return Err(FieldOutOfRange("chunk_size"));
        }
        if self.active_half > 1 {
            return Err(FieldOutOfRange("active_half"));
        }
        if self.journal_offset != 2 * SUPERBLOCK_SLOT {
            return Err(FieldOutOfRange("journal_offset"));
        }
        let journal_end = self
            .journal_half
            .checked_mul(2)
            .and_then(|j| j.checked_add(self.journal_offset))
            .ok_or(FieldOutOfRange("journal_half"))?;
        if self.journal_half < 4096 || self.hash_offset < journal_end {
            return Err(FieldOutOfRange("hash_offset"));
        }
        let hash_end = self
            .slots
            .checked_mul(HASH_LEN)
            .and_then(|h| h.checked_add(self.hash_offset))
            .ok_or(FieldOutOfRange("slots"))?;
        if self.data_offset < hash_end {
            return Err(FieldOutOfRange("data_offset"));
        }
        let data_end = self
            .slots
            .checked_mul(cs as u64)
            .and_then(|d| d.checked_add(self.data_offset))
            .ok_or(FieldOutOfRange("slots"))?;
        if data_end > self.diff_len {
            return Err(FieldOutOfRange("diff_len"));
        }
        if self.slots > u32::MAX as u64 {
            return Err(FieldOutOfRange("slots"));
        }
        let chunks = self.origin_len.div_ceil(cs as u64);
        if self.origin_len == 0 || chunks > u32::MAX as u64 {
            return Err(FieldOutOfRange("origin_len"));
        }
        Ok(())
    }
}
