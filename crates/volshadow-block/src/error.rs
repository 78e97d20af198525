//! The block layer's error type.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Which operation failed; carried by every error so a message says what was
/// being done, not only what went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Open,
    Read,
    Write,
    Flush,
    Discard,
    Lock,
    Query,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::Lock => "lock",
            Op::Query => "query",
        })
    }
}

/// Errors of the block layer. Every variant names the device (its path or a
/// descriptive name) so a message stands on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request does not fit inside the device, or its end overflows u64.
    /// Nothing was read or written.
    #[error("{op} of {len} bytes at offset {offset} is outside {device} ({size} bytes)")]
    OutOfRange {
        device: String,
        op: Op,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A write or discard on a read-only device (a snapshot, a read-only open).
    #[error("{device} is read-only")]
    ReadOnly { device: String },
    /// Another process (or another handle in this one) holds the exclusive lock.
    #[error("{device} is in use by another process")]
    InUse { device: String },
    /// The operating system reported an error.
    #[error("{op} at offset {offset} on {device} failed: {source}")]
    Io {
        device: String,
        op: Op,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Opening or inspecting a path failed.
    #[error("cannot {op} {path}: {source}", path = .path.display())]
    Path {
        path: PathBuf,
        op: Op,
        #[source]
        source: io::Error,
    },
    /// Arguments that no device could accept (zero size, misaligned option).
    #[error("{device}: {reason}")]
    Invalid { device: String, reason: String },
    /// A device layered on top of another (the copy-on-write volume, a
    /// snapshot view) failed for a reason of its own.
    #[error("{device}: {source}")]
    Layer {
        device: String,
        kind: io::ErrorKind,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// The closest `io::ErrorKind`, for callers that speak errno (NBD replies,
    /// the CLI's exit status).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::OutOfRange { .. } | Error::Invalid { .. } => io::ErrorKind::InvalidInput,
            Error::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
            Error::InUse { .. } => io::ErrorKind::ResourceBusy,
            Error::Io { source, .. } | Error::Path { source, .. } => source.kind(),
            Error::Layer { kind, .. } => *kind,
        }
    }

    /// The OS error number when the error came from the OS.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Path { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn io(device: &str, op: Op, offset: u64, source: io::Error) -> Self {
        Error::Io {
            device: device.to_owned(),
            op,
            offset,
            source,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::new(e.kind(), e)
    }
}

/// Result alias of the block layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
