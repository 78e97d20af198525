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

mod record;
mod slot;
mod superblock;

pub use record::*;
pub use slot::*;
pub use superblock::*;

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
            SuperblockError::WrongMagic
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
                RecordEnd::ChecksumMismatch,
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
