//! What a server offers (exports, their devices and changed extents) and
//! how a connection can fail: the types every part of the server shares.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use volshadow_block::{BlockDevice, Extent};

/// Produces the changed extents `(offset, len)` of an export within
/// `(offset, len)`, sorted: a BLOCK_STATUS request asks for its range only.
pub type ChangedFn = Arc<dyn Fn(u64, u64) -> Vec<Extent> + Send + Sync>;

/// One export: a device and, optionally, its changed extents.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Extents changed since the export's base (the previous snapshot, or
    /// the newest one for the live volume): the `volshadow:changed` context.
    pub changed: Option<ChangedFn>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("read_only", &self.device.is_read_only())
            .finish_non_exhaustive()
    }
}

/// What a server offers.
pub trait Exports: Send + Sync {
    /// Export names, the default export first.
    fn names(&self) -> Vec<String>;
    /// The export called `name`; `""` is the default export.
    fn open(&self, name: &str) -> Option<Export>;
}

/// What went wrong: a connection that ended other than by a clean
/// disconnect, or TLS credentials that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on the connection: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS credentials {}: {reason}", path.display())]
    Credentials { path: PathBuf, reason: String },
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Metadata context ids this server hands out.
pub(crate) const CONTEXT_ID_ALLOCATION: u32 = 1;
pub(crate) const CONTEXT_ID_CHANGED: u32 = 2;
