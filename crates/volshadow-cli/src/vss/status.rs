//! The writers' status kept beside a configuration between commands, as
//! the VSS service keeps it between backups: `list writers` then shows how
//! the last backup or restore left each writer.

use std::path::{Path, PathBuf};

use tracing::warn;
use volshadow_vss::{Coordinator, WriterStatus};

/// `backup.toml` -> `backup.writers.json`.
pub fn path(config: &Path) -> PathBuf {
    config.with_extension("writers.json")
}

/// Gives the coordinator what the last command recorded (nothing if
/// there is no record or it cannot be read: the status is informative).
pub fn recall(c: &Coordinator, file: &Path) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    match serde_json::from_str::<Vec<WriterStatus>>(&text) {
        Ok(earlier) => c.recall_writer_status(&earlier),
        Err(e) => {
            warn!(file = %file.display(), error = %e, "ignoring an unreadable writers' status")
        }
    }
}

/// Records the writers' status; a failure to write it is only reported.
pub fn save(c: &Coordinator, file: &Path) {
    let text = match serde_json::to_string_pretty(&c.writer_status()) {
        Ok(t) => t + "\n",
        Err(e) => return warn!(error = %e, "cannot record the writers' status"),
    };
    if let Err(e) = std::fs::write(file, text) {
        eprintln!(
            "warning: cannot record the writers' status in {}: {e}",
            file.display()
        );
    }
}
