//! The coordinator's errors.

use std::time::Duration;

use crate::writer::{Phase, WriterFailure};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VssError {
    /// A call out of order (VSS_E_BAD_STATE).
    #[error("{call} is not allowed now: the session is {state}")]
    BadState { call: &'static str, state: String },
    /// Another snapshot set is being created (VSS_E_SNAPSHOT_SET_IN_PROGRESS).
    #[error("another snapshot set is being created")]
    SnapshotSetInProgress,
    /// A writer failed at freeze or thaw (or overran its limit there); the
    /// set was aborted.
    #[error("writer {writer} failed at {phase}: {failure}")]
    WriterFailed {
        writer: String,
        phase: Phase,
        failure: WriterFailure,
    },
    /// A provider failed; the set was aborted.
    #[error("provider {provider} failed at {phase}: {message}")]
    ProviderFailed {
        provider: String,
        phase: &'static str,
        message: String,
    },
    /// Writes were held longer than the limit (VSS_E_FLUSH_WRITES_TIMEOUT);
    /// the set was aborted, nothing of it kept.
    #[error("writes were held longer than {0:?}; the snapshot set was not kept")]
    HoldTimedOut(Duration),
    /// No provider supports the volume (VSS_E_VOLUME_NOT_SUPPORTED).
    #[error("no provider supports volume {0}")]
    VolumeNotSupported(String),
    /// No snapshot or set with that id (VSS_E_OBJECT_NOT_FOUND).
    #[error("{0} not found")]
    ObjectNotFound(String),
    /// VSS's limits (64 volumes a set, 512 snapshots a volume).
    #[error("limit reached: {0}")]
    LimitReached(String),
    #[error("{0}")]
    Invalid(String),
}

pub type VssResult<T = ()> = Result<T, VssError>;
