//! Writers: applications that make their data consistent on request.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Which kind of failure a writer reports (VSS's `VSS_E_WRITERERROR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    Retryable,
    NonRetryable,
    InconsistentSnapshot,
    OutOfResources,
    Timeout,
}

/// A writer's failure: its kind and what it said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct WriterFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl WriterFailure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        WriterFailure {
            kind,
            message: message.into(),
        }
    }
}

/// What a writer call returns.
pub type WriterResult = Result<(), WriterFailure>;

/// The phases of the protocol, for states and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Identify,
    PrepareBackup,
    PrepareSnapshot,
    Freeze,
    Thaw,
    PostSnapshot,
    BackupComplete,
    PreRestore,
    PostRestore,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Identify => "identify",
            Phase::PrepareBackup => "prepare-backup",
            Phase::PrepareSnapshot => "prepare-snapshot",
            Phase::Freeze => "freeze",
            Phase::Thaw => "thaw",
            Phase::PostSnapshot => "post-snapshot",
            Phase::BackupComplete => "backup-complete",
            Phase::PreRestore => "pre-restore",
            Phase::PostRestore => "post-restore",
        })
    }
}

/// A writer's state, as `vssadmin list writers` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriterState {
    Stable,
    WaitingForFreeze,
    WaitingForThaw,
    WaitingForPostSnapshot,
    WaitingForBackupComplete,
    FailedAt(Phase),
}

impl fmt::Display for WriterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriterState::Stable => f.write_str("[1] Stable"),
            WriterState::WaitingForFreeze => f.write_str("[2] Waiting for freeze"),
            WriterState::WaitingForThaw => f.write_str("[3] Waiting for thaw"),
            WriterState::WaitingForPostSnapshot => f.write_str("[4] Waiting for post-snapshot"),
            WriterState::WaitingForBackupComplete => f.write_str("[5] Waiting for backup complete"),
            WriterState::FailedAt(p) => write!(f, "[8] Failed at {p}"),
        }
    }
}

/// One writer's status row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterStatus {
    pub name: String,
    pub writer_id: Uuid,
    pub instance_id: Uuid,
    pub state: WriterState,
    /// The last failure, kept after the writer returns to stable.
    pub last_error: Option<WriterFailure>,
}

/// When a writer freezes relative to the others (VSS freeze levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FreezeLevel {
    Front,
    Back,
    System,
}

/// How a component is put back (VSS restore methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMethod {
    #[default]
    RestoreIfCanReplace,
    RestoreIfNotThere,
    StopRestoreStart,
    RestoreToAlternateLocation,
    RestoreAtReboot,
    Custom,
}

/// What the writer's data is (VSS usage types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UsageType {
    #[default]
    UserData,
    BootableSystemState,
    SystemService,
    Other,
}

/// A unit of backup and restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// Where the component sits in the writer's tree ("" for the root).
    pub logical_path: String,
    pub name: String,
    /// Files or directories that make up the component.
    pub paths: Vec<PathBuf>,
    /// Volumes (origins) the component's data lives on; restore rolls
    /// these back.
    pub volumes: Vec<PathBuf>,
    pub selectable: bool,
}

impl Component {
    /// `logical_path\name`, VSS's full component path.
    pub fn full_path(&self) -> String {
        if self.logical_path.is_empty() {
            self.name.clone()
        } else {
            format!("{}\\{}", self.logical_path, self.name)
        }
    }
}

/// What `identify` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterMetadata {
    pub name: String,
    pub writer_id: Uuid,
    pub instance_id: Uuid,
    pub usage: UsageType,
    pub restore_method: RestoreMethod,
    pub components: Vec<Component>,
}

/// A writer. Synchronous, object-safe, shared between threads. Every call
/// but `identify` defaults to success, so a writer implements what it
/// needs.
///
/// Between `freeze` and `thaw` the application must not write (VSS gives
/// it 60 s, [`Timeouts::freeze`](crate::Timeouts)); a failure in any call
/// aborts the whole snapshot set, and the writer then gets `abort` and
/// `thaw`.
///
/// # Example
///
/// ```
/// use std::sync::Mutex;
/// use uuid::Uuid;
/// use volshadow_vss::*;
///
/// /// A database that stops taking writes while frozen.
/// #[derive(Default)]
/// struct Database {
///     frozen: Mutex<bool>,
/// }
///
/// impl Writer for Database {
///     fn identify(&self) -> Result<WriterMetadata, WriterFailure> {
///         Ok(WriterMetadata {
///             name: "database".into(),
///             writer_id: Uuid::from_u128(0xd8),
///             instance_id: Uuid::new_v4(),
///             usage: UsageType::UserData,
///             restore_method: RestoreMethod::StopRestoreStart,
///             components: Vec::new(),
///         })
///     }
///     fn freeze(&self) -> WriterResult {
///         let mut frozen = self.frozen.lock().map_err(|_| {
///             WriterFailure::new(FailureKind::NonRetryable, "lock poisoned")
///         })?;
///         *frozen = true; // a real one flushes its log here, then holds writes
///         Ok(())
///     }
///     fn thaw(&self) -> WriterResult {
///         if let Ok(mut frozen) = self.frozen.lock() {
///             *frozen = false;
///         }
///         Ok(())
///     }
/// }
///
/// let db = Database::default();
/// db.freeze().unwrap();
/// assert!(*db.frozen.lock().unwrap());
/// db.thaw().unwrap();
/// assert_eq!(db.identify().unwrap().name, "database");
/// ```
pub trait Writer: Send + Sync {
    fn identify(&self) -> Result<WriterMetadata, WriterFailure>;
    fn freeze_level(&self) -> FreezeLevel {
        FreezeLevel::Back
    }
    fn prepare_for_backup(&self, _components: &[String]) -> WriterResult {
        Ok(())
    }
    fn prepare_for_snapshot(&self) -> WriterResult {
        Ok(())
    }
    fn freeze(&self) -> WriterResult {
        Ok(())
    }
    fn thaw(&self) -> WriterResult {
        Ok(())
    }
    fn post_snapshot(&self) -> WriterResult {
        Ok(())
    }
    fn backup_complete(&self, _succeeded: &[String]) -> WriterResult {
        Ok(())
    }
    /// The backup was aborted; release whatever was prepared. Always
    /// followed by `thaw`.
    fn abort(&self) -> WriterResult {
        Ok(())
    }
    fn pre_restore(&self, _components: &[String]) -> WriterResult {
        Ok(())
    }
    fn post_restore(&self, _components: &[String]) -> WriterResult {
        Ok(())
    }
}
