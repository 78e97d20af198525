//! Slot entries: what each data slot holds, and its checksums.

use super::*;

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
