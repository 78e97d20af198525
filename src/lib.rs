//! volshadow: a portable point-in-time snapshot engine for block volumes.
//!
//! This facade re-exports the workspace crates so an embedder depends on one
//! package: [`block`] (devices), [`cow`] (the copy-on-write engine), [`vss`]
//! (the requester / writer / provider protocol), [`nbd`] (network export)
//! and [`replica`] (send/receive streams and object storage).
//!
//! # Where to start
//!
//! - [`cow::Volume`]: create or open a volume over two
//!   [`block::BlockDevice`]s, take snapshots, read them, ask what changed,
//!   revert, verify.
//! - [`block::BlockDevice`]: implement it to put the engine over storage of
//!   your own; [`block::open_device`] opens files and block devices.
//! - [`vss::BackupSession`]: a VSS-style backup with writers of your own.
//! - [`nbd::serve`]: serve the live volume and its snapshots over NBD
//!   (TCP or Unix socket, TLS optional).
//!
//! The repository's `examples/` run each of these end to end
//! (`cargo run --example embed`, `backup`, `incremental`, `serve`), and
//! `volshadow-capi` gives C, C++ and Go programs the same engine.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use volshadow::block::{BlockDevice, MemDevice};
//! use volshadow::cow::{SnapshotOptions, Volume, VolumeOptions};
//!
//! # fn main() -> volshadow::cow::Result<()> {
//! let vol = Volume::create(
//!     Arc::new(MemDevice::new(1 << 20)),
//!     Arc::new(MemDevice::new(8 << 20)),
//!     VolumeOptions::default(),
//! )?;
//! let snap = vol.create_snapshot(SnapshotOptions::default())?;
//! vol.write_at(b"after", 0)?;
//! let mut buf = [1u8; 5];
//! vol.snapshot(snap.id)?.read_at(&mut buf, 0)?;
//! assert_eq!(buf, [0; 5]);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

pub use volshadow_block as block;
pub use volshadow_cow as cow;
pub use volshadow_nbd as nbd;
pub use volshadow_replica as replica;
pub use volshadow_vss as vss;
