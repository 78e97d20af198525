//! volshadow's copy-on-write engine.
//!
//! A [`Volume`] puts a copy-on-write layer in front of an origin device and
//! keeps old data in a diff area (another device). Snapshots are cheap
//! (no I/O proportional to the volume), share preserved data (one copy per
//! chunk per snapshot interval however many snapshots exist), survive
//! crashes when persistent, and report the chunks changed between any two.
//! The design and its invariants are in DESIGN.md §2 and docs/FORMAT.md.
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
