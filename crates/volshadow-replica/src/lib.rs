//! Replication of volshadow shadow copies off the machine: a
//! self-describing, checksummed send stream (full or incremental), its
//! crash-safe apply onto a replica volume, and a content-addressed
//! object-store target.
#![forbid(unsafe_code)]

pub mod apply;
mod error;
#[cfg(feature = "s3")]
pub mod replicate;
#[cfg(feature = "s3")]
pub mod store;
pub mod stream;

pub use apply::{Apply, Pending, Settled};
pub use error::{Error, Result};
pub use stream::{Header, Kind, Record, StreamReader, StreamWriter};
