//! Public option and report types of the engine.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::format::FullPolicy;
use crate::format::SnapshotRecord;

/// Default chunk size: 16 KiB, like the VSS system provider.
pub const DEFAULT_CHUNK_SIZE: u32 = 16 << 10;
/// VSS's limit of snapshots per volume.
pub const DEFAULT_MAX_SNAPSHOTS: usize = 512;

/// Options of a new volume (`Volume::create`).
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Power of two, 4 KiB ..= 1 MiB. Writes smaller than a chunk still
    /// preserve the whole chunk.
    pub chunk_size: u32,
    /// Most bytes of preserved data; `None` = all the diff area can hold.
    pub max_bytes: Option<u64>,
    /// What to do when the limit is reached.
    pub policy: FullPolicy,
    /// Replace an existing diff area on the device. Without it, `create`
    /// refuses a device that already holds one.
    pub overwrite: bool,
    /// Bytes per journal half instead of the computed size (at least
    /// 8 KiB). Smaller halves checkpoint more often; tests use this to
    /// exercise compaction. A half must hold a checkpoint of the largest
    /// state, or writes fail with `JournalTooSmall`.
    pub journal_half: Option<u64>,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_bytes: None,
            policy: FullPolicy::DeleteOldest,
            overwrite: false,
            journal_half: None,
        }
    }
}

/// VSS snapshot attribute bits (`VSS_VOLSNAP_ATTR_*` values).
pub mod attributes {
    pub const PERSISTENT: u32 = 0x0000_0001;
    pub const NO_AUTO_RECOVERY: u32 = 0x0000_0002;
    pub const CLIENT_ACCESSIBLE: u32 = 0x0000_0004;
    pub const NO_AUTO_RELEASE: u32 = 0x0000_0008;
    pub const NO_WRITERS: u32 = 0x0000_0010;
    pub const TRANSPORTABLE: u32 = 0x0000_0020;
    pub const NOT_SURFACED: u32 = 0x0000_0040;
    pub const NOT_TRANSACTED: u32 = 0x0000_0080;
    pub const HARDWARE_ASSISTED: u32 = 0x0001_0000;
    pub const DIFFERENTIAL: u32 = 0x0002_0000;
    pub const PLEX: u32 = 0x0004_0000;
    pub const IMPORTED: u32 = 0x0008_0000;
    pub const EXPOSED_LOCALLY: u32 = 0x0010_0000;
    pub const EXPOSED_REMOTELY: u32 = 0x0020_0000;
    pub const AUTORECOVER: u32 = 0x0040_0000;
    pub const ROLLBACK_RECOVERY: u32 = 0x0080_0000;
    pub const DELAYED_POSTSNAPSHOT: u32 = 0x0100_0000;
    pub const TXF_RECOVERY: u32 = 0x0200_0000;
    pub const FILE_SHARE: u32 = 0x0400_0000;

    /// Names of the bits set in `attrs`, for listings.
    pub fn names(attrs: u32) -> Vec<&'static str> {
        const ALL: [(u32, &str); 19] = [
            (PERSISTENT, "persistent"),
            (NO_AUTO_RECOVERY, "no-auto-recovery"),
            (CLIENT_ACCESSIBLE, "client-accessible"),
            (NO_AUTO_RELEASE, "no-auto-release"),
            (NO_WRITERS, "no-writers"),
            (TRANSPORTABLE, "transportable"),
            (NOT_SURFACED, "not-surfaced"),
            (NOT_TRANSACTED, "not-transacted"),
            (HARDWARE_ASSISTED, "hardware-assisted"),
            (DIFFERENTIAL, "differential"),
            (PLEX, "plex"),
            (IMPORTED, "imported"),
            (EXPOSED_LOCALLY, "exposed-locally"),
            (EXPOSED_REMOTELY, "exposed-remotely"),
            (AUTORECOVER, "autorecover"),
            (ROLLBACK_RECOVERY, "rollback-recovery"),
            (DELAYED_POSTSNAPSHOT, "delayed-postsnapshot"),
            (TXF_RECOVERY, "txf-recovery"),
            (FILE_SHARE, "file-share"),
        ];
        ALL.iter()
            .filter(|(bit, _)| attrs & bit != 0)
            .map(|(_, n)| *n)
            .collect()
    }
}

/// Options of one snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Survives a crash and a reopen. Non-persistent (VSS's backup default,
    /// auto-release) snapshots skip the diff-area flush before origin
    /// overwrites and are discarded by recovery: that is their contract.
    pub persistent: bool,
    /// VSS attribute bits ([`attributes`]); `PERSISTENT` follows `persistent`.
    pub attributes: u32,
    /// The snapshot set this snapshot belongs to.
    pub set_id: Option<Uuid>,
}

/// A live snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: Uuid,
    /// Creation order on this volume, from 1.
    pub seq: u64,
    pub set_id: Option<Uuid>,
    pub created: SystemTime,
    pub attributes: u32,
    pub persistent: bool,
}

impl SnapshotInfo {
    pub(crate) fn from_record(r: &SnapshotRecord) -> Self {
        SnapshotInfo {
            id: Uuid::from_bytes(r.id),
            seq: r.seq,
            set_id: r.set_id.map(Uuid::from_bytes),
            created: UNIX_EPOCH + Duration::from_nanos(r.created_ns),
            attributes: r.attributes,
            persistent: r.persistent,
        }
    }
}

/// Diff-area usage, as `vssadmin list shadowstorage` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes of preserved data (slots in use × chunk size).
    pub used_bytes: u64,
    /// The current limit.
    pub max_bytes: u64,
    /// Most the diff area's layout can ever hold.
    pub capacity_bytes: u64,
    pub chunk_size: u32,
    /// Preserved chunk versions.
    pub preserved_chunks: u64,
    pub snapshots: usize,
    pub policy: FullPolicy,
}

/// Where changed extents are measured to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Snapshot(Uuid),
    /// The live volume, now.
    Live,
}

/// A preserved chunk whose bytes no longer match their hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub chunk: u64,
    /// Byte offset of the chunk in the volume.
    pub offset: u64,
    pub slot: u32,
    /// The live snapshots that read this version.
    pub snapshots: Vec<Uuid>,
}

/// A member's snapshot of a set whose creation a crash cut before this
/// member learnt whether the set committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InDoubtSet {
    pub snapshot: SnapshotInfo,
    pub set_id: Uuid,
    /// Every member's volume id and locator, the decider first.
    pub members: Vec<(Uuid, String)>,
}

/// Result of `Volume::verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Copies checked (each at least against its read checksum).
    pub checked: u64,
    /// Of those, copies that carry no blake3: made while no persistent
    /// snapshot existed, so only non-persistent snapshots (gone on reopen)
    /// read them.
    pub unhashed: u64,
    pub mismatches: Vec<Mismatch>,
    #[serde(default)]
    /// Damage outside the copies (superblock, journal) and, after a
    /// salvage open, what could not be vouched for. One line each.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// True if nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.mismatches.is_empty() && self.problems.is_empty()
    }
}
