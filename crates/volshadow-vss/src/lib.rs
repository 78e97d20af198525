//! VSS's requester / writer / provider protocol over volshadow.
//!
//! A [`Coordinator`] holds [`Writer`]s and [`Provider`]s (in order of
//! preference). A [`BackupSession`] drives a backup in VSS's order and
//! produces a [`BackupDocument`]; a [`RestoreSession`] uses that document
//! to bring components back. The repository's docs/PROTOCOL.md maps each
//! VSS call and event onto this crate and states where it differs.
//!
//! # Guide
//!
//! - Implement [`Writer`] for each application whose data must be
//!   consistent in a snapshot: it names its components in `identify` and
//!   flushes and holds its writes between `freeze` and `thaw`. Every call
//!   but `identify` defaults to success. [`CommandWriter`] runs commands,
//!   [`FsFreezeWriter`] freezes a Linux file system.
//! - Register providers: [`CowProvider`] makes this engine's snapshots of
//!   the [`volshadow_cow::Volume`]s given to it, by path.
//! - Drive a backup with [`Coordinator::backup`] (see [`BackupSession`]
//!   for the whole sequence), keep the [`BackupDocument`] it returns
//!   ([`BackupDocument::to_json`]), and restore with
//!   [`Coordinator::restore`].
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use volshadow_block::MemDevice;
//! use volshadow_cow::{Volume, VolumeOptions};
//! use volshadow_vss::{Coordinator, CowProvider, Provider};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let volume = Volume::create(
//!     Arc::new(MemDevice::new(1 << 20)),
//!     Arc::new(MemDevice::new(8 << 20)),
//!     VolumeOptions::default(),
//! )?;
//! let provider = Arc::new(CowProvider::new());
//! provider.add_volume("data.img", volume);
//! assert!(provider.is_volume_supported("data.img".as_ref()));
//!
//! let mut coordinator = Coordinator::new();
//! coordinator.add_provider(provider);
//! assert_eq!(coordinator.provider_info()[0].kind, "system");
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod context;
mod coordinator;
mod document;
mod error;
mod provider;
mod providers;
mod writer;
mod writers;

pub use context::{BackupType, Context};
pub use coordinator::{BackupSession, Coordinator, Limits, ProviderInfo, RestoreSession, Timeouts};
pub use document::{BackupDocument, CbtBase, ComponentEntry, DOCUMENT_VERSION};
pub use error::{VssError, VssResult};
pub use provider::{CommitOptions, Provider, ProviderError, ProviderResult, SnapshotRef};
pub use providers::{CowProvider, CowVolume, ReflinkProvider};
pub use writer::{
    Component, EventContext, FailureKind, FreezeLevel, Phase, RestoreMethod, UsageType, Writer,
    WriterFailure, WriterMetadata, WriterResult, WriterState, WriterStatus,
};
pub use writers::{CommandWriter, EVENTS, FsFreezeWriter};
