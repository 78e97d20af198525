//! VSS's requester / writer / provider protocol over volshadow.
//!
//! A [`Coordinator`] holds [`Writer`]s and [`Provider`]s (in order of
//! preference). A [`BackupSession`] drives a backup in VSS's order and
//! produces a [`BackupDocument`]; a [`RestoreSession`] uses that document
//! to bring components back. See ../shared/VSS.md for the model and
//! docs/PROTOCOL.md for how it maps.
#![forbid(unsafe_code)]

mod coordinator;
mod document;
mod error;
mod provider;
mod writer;
mod writers;

pub use coordinator::{BackupSession, Coordinator, Limits, ProviderInfo, RestoreSession, Timeouts};
pub use document::{
    BackupDocument, BackupType, CbtBase, ComponentEntry, Context, DOCUMENT_VERSION,
};
pub use error::{VssError, VssResult};
pub use provider::{
    CommitOptions, CowProvider, Provider, ProviderError, ProviderResult, ReflinkProvider,
    SnapshotRef,
};
pub use writer::{
    Component, FailureKind, FreezeLevel, Phase, RestoreMethod, UsageType, Writer, WriterFailure,
    WriterMetadata, WriterResult, WriterState, WriterStatus,
};
pub use writers::{CommandWriter, EVENTS, FsFreezeWriter};
