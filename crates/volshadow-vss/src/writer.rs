//! Writers: applications that make their data consistent on request.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::context::{BackupType, Context};

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

impl fmt::Display for FailureKind {
    /// The words `vssadmin list writers` uses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Retryable => "Retryable error",
            FailureKind::NonRetryable => "Non-retryable error",
            FailureKind::InconsistentSnapshot => "Inconsistent shadow copy",
            FailureKind::OutOfResources => "Out of resources",
            FailureKind::Timeout => "Timed out",
        })
    }
}

/// A writer's failure: its kind and what it said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
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
    BackupShutdown,
    Abort,
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
            Phase::BackupShutdown => "backup-shutdown",
            Phase::Abort => "abort",
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
            WriterState::FailedAt(_) => f.write_str("[8] Failed"),
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
    /// The event `last_error` happened at.
    #[serde(default)]
    pub last_error_at: Option<Phase>,
}

impl WriterStatus {
    /// `Last error` as `vssadmin list writers` words it, with the event.
    pub fn last_error_text(&self) -> String {
        match (&self.last_error, self.last_error_at) {
            (None, _) => "No error".into(),
            (Some(e), Some(p)) => format!("{} at {p} ({})", e.kind, e.message),
            (Some(e), None) => format!("{} ({})", e.kind, e.message),
        }
    }
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
    /// Selectable for backup: included only when the requester selects
    /// it (its subcomponents, the components whose logical path starts
    /// with its full path, come with it). A non-selectable component with
    /// no selectable ancestor comes with every backup its writer takes
    /// part in.
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

/// What every writer event carries (VSS: the backup components document
/// and the set a writer sees during each event).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventContext {
    /// The snapshot set (none before `start_snapshot_set`, nor in a restore).
    pub set_id: Option<Uuid>,
    /// The volumes in the set (in a restore: those being restored).
    pub volumes: Vec<PathBuf>,
    pub backup_type: BackupType,
    pub context: Context,
    /// This writer's components the event is about (`logical_path\name`):
    /// those included in the backup, at `backup_complete` those whose
    /// backup succeeded, in a restore those selected for restore.
    pub components: Vec<String>,
}

/// A writer. Synchronous, object-safe, shared between threads. Every call
/// but `identify` defaults to success, so a writer implements what it
/// needs. Only writers with a component in the backup get its events.
///
/// Between `freeze` and `thaw` the application must not write (VSS gives
/// it 60 s, [`Timeouts::freeze`](crate::Timeouts), or its own
/// [`Writer::timeout`]). A failure at freeze or thaw aborts the snapshot
/// set and the writer then gets `abort` alone; a failure at another event
/// is a veto (see [`BackupSession`](crate::BackupSession)).
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
///     fn freeze(&self, _event: &EventContext) -> WriterResult {
///         let mut frozen = self.frozen.lock().map_err(|_| {
///             WriterFailure::new(FailureKind::NonRetryable, "lock poisoned")
///         })?;
///         *frozen = true; // a real one flushes its log here, then holds writes
///         Ok(())
///     }
///     fn thaw(&self, _event: &EventContext) -> WriterResult {
///         if let Ok(mut frozen) = self.frozen.lock() {
///             *frozen = false;
///         }
///         Ok(())
///     }
/// }
///
/// let db = Database::default();
/// let event = EventContext::default();
/// db.freeze(&event).unwrap();
/// assert!(*db.frozen.lock().unwrap());
/// db.thaw(&event).unwrap();
/// assert_eq!(db.identify().unwrap().name, "database");
/// ```
pub trait Writer: Send + Sync {
    fn identify(&self) -> Result<WriterMetadata, WriterFailure>;
    fn freeze_level(&self) -> FreezeLevel {
        FreezeLevel::Back
    }
    /// This writer's own limit from freeze to thaw, its freeze and thaw
    /// calls included (VSS: the freeze timeout a writer gives at
    /// initialization); `None`: the coordinator's.
    fn timeout(&self) -> Option<Duration> {
        None
    }
    fn prepare_for_backup(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    fn prepare_for_snapshot(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    fn freeze(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    fn thaw(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    fn post_snapshot(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    fn backup_complete(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    /// The requester's session ended (VSS: BackupShutdown), whether the
    /// backup completed, failed or was abandoned.
    fn backup_shutdown(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    /// The backup was aborted: undo whatever was prepared or frozen (a
    /// thaw's work too; no thaw follows). May come more than once, and
    /// after a call of this writer that overran its limit returns.
    fn abort(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    fn pre_restore(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
    fn post_restore(&self, _event: &EventContext) -> WriterResult {
        Ok(())
    }
}
