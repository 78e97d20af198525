//! The backup components document: what a backup made, kept for restore.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::context::{BackupType, Context};
use crate::provider::SnapshotRef;
use crate::writer::{RestoreMethod, WriterMetadata};

/// Format of the document; readers refuse newer ones.
pub const DOCUMENT_VERSION: u32 = 1;

/// One selected component and how its backup and restore went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentEntry {
    pub writer_id: Uuid,
    pub full_path: String,
    pub volumes: Vec<PathBuf>,
    pub restore_method: RestoreMethod,
    pub backup_succeeded: bool,
    /// Why the component's writer failed during the backup (a veto the
    /// requester went on past), if it did.
    #[serde(default)]
    pub writer_failure: Option<String>,
    /// Set by a restore.
    pub restore_succeeded: Option<bool>,
}

/// Changed-block tracking base of an incremental or differential backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtBase {
    pub volume: PathBuf,
    pub snapshot_id: Uuid,
}

/// The backup components document (serde JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDocument {
    pub version: u32,
    pub context: Context,
    pub backup_type: BackupType,
    pub set_id: Uuid,
    /// Nanoseconds since the Unix epoch (an integer, so the document
    /// round-trips exactly).
    pub time_ns: u64,
    pub writers: Vec<WriterMetadata>,
    pub components: Vec<ComponentEntry>,
    pub snapshots: Vec<SnapshotRef>,
    pub cbt_base: Vec<CbtBase>,
}

impl BackupDocument {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let doc: BackupDocument =
            serde_json::from_str(text).map_err(|e| format!("not a backup document: {e}"))?;
        if doc.version > DOCUMENT_VERSION {
            return Err(format!(
                "backup document version {} is newer than this build reads ({DOCUMENT_VERSION})",
                doc.version
            ));
        }
        Ok(doc)
    }
}
