//! volshadow's copy-on-write engine.
//!
//! A [`Volume`] puts a copy-on-write layer in front of an origin device and
//! keeps old data in a diff area (another device). Snapshots are cheap
//! (no I/O proportional to the volume), share preserved data (one copy per
//! chunk per snapshot interval however many snapshots exist), survive
//! crashes when persistent, and report the chunks changed between any two.
//! The on-disk format is laid out byte by byte in the repository's
//! docs/FORMAT.md, and what a crash can and cannot do in docs/RELIABILITY.md.
//!
//! # Guide
//!
//! - Make a volume with [`Volume::create`] over two [`BlockDevice`]s: the
//!   origin (your data) and the diff area (where old data goes;
//!   [`Volume::diff_area_len_for`] sizes it). Reopen it later with
//!   [`Volume::open`], which runs recovery.
//! - Write through the volume, never around it: `Volume` is itself a
//!   [`BlockDevice`] (the live volume). Writes that bypass it are not seen
//!   by the copy-on-write layer and corrupt older snapshots.
//! - [`Volume::create_snapshot`] takes a snapshot;
//!   [`SnapshotOptions::persistent`] says whether it survives a reopen.
//!   [`Volume::snapshot`] gives a read-only [`SnapshotView`] (a
//!   `BlockDevice` too) to read or export it.
//! - [`Volume::changed_extents`] gives the byte ranges changed between two
//!   snapshots or since one (changed-block tracking, for incremental
//!   copies); [`Volume::revert`] rolls the origin back;
//!   [`Volume::verify`] rereads every preserved chunk.
//! - [`SnapshotSet::create`] snapshots several volumes at one instant.
//! - Every operation streams in bounded buffers, and each error says what
//!   failed and where ([`Error`]); bad input changes no data.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use volshadow_block::{BlockDevice, MemDevice};
//! use volshadow_cow::{SnapshotOptions, Target, Volume, VolumeOptions};
//!
//! # fn main() -> volshadow_cow::Result<()> {
//! let origin = Arc::new(MemDevice::new(4 << 20));
//! let diff = Arc::new(MemDevice::new(Volume::diff_area_len_for(2 << 20, 16 << 10)));
//! let vol = Volume::create(origin, diff, VolumeOptions::default())?;
//!
//! vol.write_at(&[1; 4096], 0)?;
//! let before = vol.create_snapshot(SnapshotOptions { persistent: true, ..Default::default() })?;
//! vol.write_at(&[2; 4096], 0)?;
//!
//! // The snapshot still reads the old bytes; the live volume the new ones.
//! let mut buf = [0u8; 4096];
//! vol.snapshot(before.id)?.read_at(&mut buf, 0)?;
//! assert_eq!(buf, [1; 4096]);
//! vol.read_at(&mut buf, 0)?;
//! assert_eq!(buf, [2; 4096]);
//!
//! // One 16 KiB chunk changed since the snapshot.
//! let changed = vol.changed_extents(before.id, Target::Live)?;
//! assert_eq!(changed.iter().map(|e| e.len).sum::<u64>(), 16 << 10);
//! assert!(vol.verify()?.is_clean());
//! # Ok(())
//! # }
//! ```
//!
//! [`BlockDevice`]: volshadow_block::BlockDevice
#![forbid(unsafe_code)]

mod bitmap;
mod commit;
mod error;
/// The on-disk structures, public only for the corruption tests (feature
/// `testing`).
#[cfg(feature = "testing")]
pub mod format;
#[cfg(not(feature = "testing"))]
mod format;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
mod gate;
mod index;
mod journal;
mod layout;
mod recovery;
mod set;
mod state;
mod types;
mod view;
mod volume;

pub use error::{Error, Result};
pub use format::FullPolicy;
pub use gate::DEFAULT_HOLD_TIMEOUT;
pub use recovery::OpenMode;
pub use set::{LocalMember, SetMember, SnapshotSet};
pub use types::{
    DEFAULT_CHUNK_SIZE, DEFAULT_MAX_SNAPSHOTS, InDoubtSet, Mismatch, SnapshotInfo, SnapshotOptions,
    Target, Usage, VerifyReport, VolumeOptions, attributes,
};
pub use view::SnapshotView;
pub use volshadow_block::Extent;
pub use volume::Volume;
