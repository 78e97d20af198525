//! The replication crate's one error type.

use std::path::PathBuf;

use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the stream at byte {at}: {source}")]
    Read {
        at: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the stream ends early, at byte {at} (cut short?)")]
    Truncated { at: u64 },
    #[error("writing the stream: {0}")]
    Write(#[source] std::io::Error),
    #[error("not a volshadow stream (bad magic at byte 0)")]
    NotAStream,
    #[error("stream version {0} is not supported (this build reads version 1)")]
    Version(u32),
    #[error("the stream uses features this build does not know (incompat bits {0:#x})")]
    Features(u64),
    #[error("the stream is damaged: {what}, at byte {at}")]
    Damaged { what: String, at: u64 },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Marker { path: PathBuf, what: String },
    #[error("the replica: {0}")]
    Engine(#[from] volshadow_cow::Error),
    #[error("the replica: {0}")]
    Block(#[from] volshadow_block::Error),
    #[error("shadow copy {0} is not in the replica")]
    Missing(Uuid),
    #[error("{0}")]
    Refused(String),
    /// The volume being sent failed a read (the caller's own error text).
    #[error("reading the shadow copy: {0}")]
    Source(String),
    #[error("object store {url}: {what}")]
    Store { url: String, what: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
