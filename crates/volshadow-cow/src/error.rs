//! The engine's error type.

use std::io;

use uuid::Uuid;

/// Errors of the copy-on-write engine. Each says what failed and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The origin or diff-area device failed.
    #[error(transparent)]
    Block(#[from] volshadow_block::Error),
    /// Options that cannot work (chunk size, sizes, limits).
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The diff area does not start with a valid volshadow superblock.
    #[error("{device} is not a volshadow diff area: {reason}")]
    NotADiffArea { device: String, reason: String },
    /// Written by a newer format or with features this build lacks.
    #[error(
        "{device}: diff area format {version} with incompatible features {features:#x} is not supported by this build (format {supported})"
    )]
    Unsupported {
        device: String,
        version: u32,
        features: u64,
        supported: u32,
    },
    /// The diff area belongs to another origin, or the origin was resized.
    #[error(
        "diff area {diff} was made for a {expected}-byte origin {expected_id}, but {origin} has {found} bytes{detail}"
    )]
    OriginMismatch {
        diff: String,
        origin: String,
        expected: u64,
        found: u64,
        expected_id: Uuid,
        detail: String,
    },
    /// Structures inside the diff area contradict each other.
    #[error("diff area {device} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        device: String,
        offset: u64,
        reason: String,
    },
    /// No live snapshot has this id.
    #[error("no snapshot {0}")]
    SnapshotNotFound(Uuid),
    /// The diff area is full and the policy is to fail writes.
    #[error(
        "diff area is full ({used} of {max} bytes used); the write was refused and nothing changed"
    )]
    DiffAreaFull { used: u64, max: u64 },
    /// The per-volume snapshot limit is reached.
    #[error("volume already has {0} snapshots, the limit")]
    TooManySnapshots(usize),
    /// A write or discard on a snapshot.
    #[error("snapshot {0} is read-only")]
    ReadOnly(Uuid),
    /// Writes could not be held / drained in time.
    #[error("timed out after {0:?} waiting for in-flight writes to drain")]
    Timeout(std::time::Duration),
    /// An earlier I/O failure left in-memory and on-disk state possibly
    /// apart; the volume refuses writes until it is reopened (recovery).
    #[error("volume needs recovery after an earlier I/O error; reopen it")]
    NeedsRecovery,
    /// A preserved chunk failed its checksum (or a salvage open cannot
    /// vouch for it): the read fails rather than return wrong bytes.
    #[error("snapshot {snapshot}: chunk {chunk} at offset {offset} is damaged: {reason}")]
    Damaged {
        snapshot: Uuid,
        chunk: u64,
        offset: u64,
        reason: String,
    },
    /// The snapshot belongs to a set whose creation a crash cut; it is
    /// hidden until the set is resolved.
    #[error(
        "snapshot {snapshot} belongs to set {set}, whose creation was cut by a crash; resolve the set first"
    )]
    SetInDoubt { snapshot: Uuid, set: Uuid },
    /// A member of a snapshot set that another process holds failed a
    /// step (or could not be reached).
    #[error("set member {volume}: {reason}")]
    SetMember { volume: Uuid, reason: String },
    /// A set's first volume failed while taking its snapshot, in a way
    /// that may have taken effect: the other members keep theirs hidden
    /// until that volume can be asked whether the set committed.
    #[error(
        "snapshot set {set}: its first volume failed while committing ({reason}); the set counts as made only if that volume has its shadow copy, and the others settle when it can be asked"
    )]
    SetOutcomeUnknown { set: Uuid, reason: String },
    /// `Volume::close` ran; the volume takes no more changes.
    #[error("the volume is closed")]
    Closed,
    /// The volume was opened for salvage, which never writes.
    #[error("the volume is open for salvage, which is read-only")]
    SalvageReadOnly,
    /// The journal region cannot hold a checkpoint of this many versions.
    #[error("journal region too small: a checkpoint needs {needed} bytes, a half holds {capacity}")]
    JournalTooSmall { needed: u64, capacity: u64 },
}

impl Error {
    /// The closest `io::ErrorKind`, for errno-speaking callers.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Block(e) => e.kind(),
            Error::InvalidOptions(_) => io::ErrorKind::InvalidInput,
            Error::DiffAreaFull { .. } | Error::JournalTooSmall { .. } => {
                io::ErrorKind::StorageFull
            }
            Error::ReadOnly(_) | Error::SalvageReadOnly | Error::Closed => {
                io::ErrorKind::PermissionDenied
            }
            Error::SnapshotNotFound(_) => io::ErrorKind::NotFound,
            Error::Timeout(_) => io::ErrorKind::TimedOut,
            Error::TooManySnapshots(_) => io::ErrorKind::QuotaExceeded,
            _ => io::ErrorKind::InvalidData,
        }
    }

    /// As a block-layer error, for the `BlockDevice` impls.
    pub(crate) fn into_block(self, device: String) -> volshadow_block::Error {
        match self {
            Error::Block(e) => e,
            other => volshadow_block::Error::Layer {
                device,
                kind: other.kind(),
                source: Box::new(other),
            },
        }
    }
}

/// Result alias of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;
