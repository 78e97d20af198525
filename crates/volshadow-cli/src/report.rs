//! Telling about shadow copies the delete-oldest policy removed to make
//! room: the engine hands them out once (`take_auto_deleted`); under
//! `serve` they are logged as they happen and handed to the control
//! request that was running when they went.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use volshadow_cow::{SnapshotInfo, Volume};

use crate::ops::ShadowRow;

/// Recent deletions kept for attribution to control requests.
const KEPT: usize = 1024;

/// The serving process's view of one volume's automatic deletions.
#[derive(Debug)]
pub struct Reporter {
    vol: Volume,
    recent: Mutex<VecDeque<ShadowRow>>,
}

impl Reporter {
    pub fn new(vol: Volume) -> Self {
        Reporter {
            vol,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// The control channel's requests run on this.
    pub fn volume(&self) -> &Volume {
        &self.vol
    }

    /// Takes what the engine deleted since the last call and logs each.
    /// Called by a ticker (writes over NBD) and after control requests.
    pub fn drain(&self) {
        let taken = self.vol.take_auto_deleted();
        if taken.is_empty() {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        for s in &taken {
            let row = ShadowRow::from(s);
            tracing::warn!(
                "shadow storage full: deleted shadow copy {} (created {}) to make room",
                row.id,
                crate::ops::time(row.created)
            );
            if recent.len() >= KEPT {
                recent.pop_front();
            }
            recent.push_back(row);
        }
    }

    /// Runs `f` and returns, beside its result, the shadow copies deleted
    /// to make room while it ran (also by other writers at the same time:
    /// the engine does not say which write caused a deletion).
    pub fn during<T>(&self, f: impl FnOnce() -> T) -> (T, Vec<ShadowRow>) {
        let before = self.vol.auto_deleted_count();
        let out = f();
        self.drain();
        let n = self.vol.auto_deleted_count().saturating_sub(before);
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(recent.len());
        (out, recent.iter().skip(recent.len() - n).cloned().collect())
    }
}

/// The one stderr line a command prints per deleted shadow copy.
pub fn stderr_line(s: &ShadowRow) -> String {
    format!(
        "volshadow: shadow storage full: deleted shadow copy {} (created {}) to make room",
        s.id,
        crate::ops::time(s.created)
    )
}

/// In-process: what the engine deleted during one operation.
pub fn taken(vol: &Volume) -> Vec<ShadowRow> {
    vol.take_auto_deleted()
        .iter()
        .map(|s: &SnapshotInfo| ShadowRow::from(s))
        .collect()
}
