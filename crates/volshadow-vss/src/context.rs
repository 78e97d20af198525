//! What kind of backup this is: VSS's snapshot contexts and backup types.

use serde::{Deserialize, Serialize};

/// VSS snapshot contexts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Context {
    /// Non-persistent, auto-release, with writers.
    #[default]
    Backup,
    /// Non-persistent, no writers.
    FileShare,
    /// Persistent, with writers.
    AppRollback,
    /// Persistent, no writers.
    NasRollback,
    /// Persistent, no writers, visible to users.
    ClientAccessible,
}

impl Context {
    pub fn persistent(self) -> bool {
        matches!(
            self,
            Context::AppRollback | Context::NasRollback | Context::ClientAccessible
        )
    }

    pub fn with_writers(self) -> bool {
        matches!(self, Context::Backup | Context::AppRollback)
    }

    /// The configuration's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Backup => "backup",
            Context::FileShare => "file-share",
            Context::AppRollback => "app-rollback",
            Context::NasRollback => "nas-rollback",
            Context::ClientAccessible => "client-accessible",
        }
    }

    /// VSS attribute bits of snapshots made in this context.
    pub fn attributes(self) -> u32 {
        use volshadow_cow::attributes::*;
        match self {
            Context::Backup => 0,
            Context::FileShare => NO_WRITERS | FILE_SHARE,
            Context::AppRollback => PERSISTENT | NO_AUTO_RELEASE,
            Context::NasRollback => PERSISTENT | NO_AUTO_RELEASE | NO_WRITERS,
            Context::ClientAccessible => {
                PERSISTENT | NO_AUTO_RELEASE | NO_WRITERS | CLIENT_ACCESSIBLE
            }
        }
    }
}

/// VSS backup types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackupType {
    #[default]
    Full,
    Incremental,
    Differential,
    Copy,
    Log,
}

impl BackupType {
    /// The configuration's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Incremental => "incremental",
            BackupType::Differential => "differential",
            BackupType::Copy => "copy",
            BackupType::Log => "log",
        }
    }
}
