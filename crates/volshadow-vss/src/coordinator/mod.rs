//! The coordinator: writers, providers in order of preference, the
//! writers' status, and the snapshots the providers hold.
//!
//! Its sessions drive VSS's sequences: [`BackupSession`] (`backup.rs`, the
//! snapshot set itself in `snapshot.rs`) and [`RestoreSession`]
//! (`restore.rs`); `call.rs` bounds each writer call.

mod backup;
mod call;
mod restore;
mod snapshot;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::warn;
use uuid::Uuid;
use volshadow_block::BlockDevice;

use crate::error::{VssError, VssResult};
use crate::provider::{Provider, SnapshotRef};
use crate::writer::{Phase, Writer, WriterFailure, WriterState, WriterStatus};

pub use backup::BackupSession;
pub use restore::RestoreSession;

/// VSS's limits, configurable.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub volumes_per_set: usize,
    pub snapshots_per_volume: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            volumes_per_set: 64,
            snapshots_per_volume: 512,
        }
    }
}

/// VSS's timeouts, configurable.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Freeze to thaw, for writers that do not give their own limit
    /// ([`crate::Writer::timeout`]; VSS: 60 s).
    pub freeze: Duration,
    /// Each writer event outside the freeze window (prepare, post-snapshot,
    /// complete, abort, shutdown, restore events): no event can hang a
    /// session.
    pub event: Duration,
    /// Writes held on the volumes, from the hold to its release, across
    /// all providers of the set (VSS: 10 s).
    pub hold: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            freeze: Duration::from_secs(60),
            event: Duration::from_secs(60),
            hold: volshadow_cow::DEFAULT_HOLD_TIMEOUT,
        }
    }
}

struct WriterSlot {
    writer: Arc<dyn Writer>,
    status: Mutex<WriterStatus>,
    /// A call that overran its limit (see `call.rs`).
    late: Arc<Mutex<call::Late>>,
}

/// How long dropping a coordinator waits for late writer calls.
const LATE_CALLS_AT_DROP: Duration = Duration::from_secs(60);

/// Writers, providers (in order of preference) and their status.
///
/// Build it once, share it as an `Arc`; [`Coordinator::backup`] and
/// [`Coordinator::restore`] start sessions. One snapshot set is created
/// at a time.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use volshadow_vss::{Coordinator, CowProvider, ReflinkProvider};
///
/// let mut coordinator = Coordinator::new();
/// coordinator.add_provider(Arc::new(CowProvider::new())); // preferred
/// coordinator.add_provider(Arc::new(ReflinkProvider::new()));
/// coordinator.timeouts.freeze = Duration::from_secs(20);
/// let coordinator = Arc::new(coordinator);
/// assert_eq!(coordinator.provider_info().len(), 2);
/// assert!(coordinator.writer_status().is_empty());
/// ```
pub struct Coordinator {
    writers: Vec<WriterSlot>,
    providers: Vec<Arc<dyn Provider>>,
    set_in_progress: AtomicBool,
    pub limits: Limits,
    pub timeouts: Timeouts,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("writers", &self.writers.len())
            .field("providers", &self.providers.len())
            .finish_non_exhaustive()
    }
}

/// A provider as `list providers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProviderInfo {
    pub name: String,
    pub id: Uuid,
    pub kind: String,
}

impl Drop for Coordinator {
    /// Late writer calls are waited for (bounded), so a late freeze is
    /// still undone when the coordinator goes away.
    fn drop(&mut self) {
        let left = self.finish_late_calls(LATE_CALLS_AT_DROP);
        if !left.is_empty() {
            warn!(writers = ?left, "writer calls that overran their limit are still running");
        }
    }
}

impl Default for Coordinator {
    fn default() -> Self {
        Self::new()
    }
}

impl Coordinator {
    pub fn new() -> Self {
        Coordinator {
            writers: Vec::new(),
            providers: Vec::new(),
            set_in_progress: AtomicBool::new(false),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
        }
    }

    /// Registers a writer; its identity comes from `identify`.
    pub fn add_writer(&mut self, writer: Arc<dyn Writer>) {
        let status = match writer.identify() {
            Ok(m) => WriterStatus {
                name: m.name,
                writer_id: m.writer_id,
                instance_id: m.instance_id,
                state: WriterState::Stable,
                last_error: None,
                last_error_at: None,
            },
            Err(e) => WriterStatus {
                name: format!("writer {}", self.writers.len() + 1),
                writer_id: Uuid::nil(),
                instance_id: Uuid::new_v4(),
                state: WriterState::FailedAt(Phase::Identify),
                last_error: Some(e),
                last_error_at: Some(Phase::Identify),
            },
        };
        self.writers.push(WriterSlot {
            writer,
            status: Mutex::new(status),
            late: Arc::default(),
        });
    }

    /// Adds a provider; earlier ones are preferred.
    pub fn add_provider(&mut self, provider: Arc<dyn Provider>) {
        self.providers.push(provider);
    }

    /// `vssadmin list writers`.
    pub fn writer_status(&self) -> Vec<WriterStatus> {
        self.writers
            .iter()
            .map(|w| {
                w.status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            })
            .collect()
    }

    /// Takes back what an earlier coordinator on the same configuration
    /// recorded (state and last error), for writers with the same name and
    /// id: how `list writers` shows the last backup's outcome.
    pub fn recall_writer_status(&self, earlier: &[WriterStatus]) {
        for slot in &self.writers {
            let mut st = slot.status.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = earlier
                .iter()
                .find(|e| e.name == st.name && e.writer_id == st.writer_id)
                && st.state == WriterState::Stable
                && st.last_error.is_none()
            {
                st.state = e.state;
                st.last_error = e.last_error.clone();
                st.last_error_at = e.last_error_at;
            }
        }
    }

    /// `vssadmin list providers`.
    pub fn provider_info(&self) -> Vec<ProviderInfo> {
        self.providers
            .iter()
            .map(|p| ProviderInfo {
                name: p.name().to_string(),
                id: p.id(),
                kind: p.kind().to_string(),
            })
            .collect()
    }

    /// The provider that made `snapshot`, found by its id (by name only
    /// for documents that did not record the id).
    pub fn provider_of(&self, snapshot: &SnapshotRef) -> Option<&Arc<dyn Provider>> {
        if snapshot.provider_id.is_nil() {
            self.providers
                .iter()
                .find(|p| p.name() == snapshot.provider)
        } else {
            self.providers
                .iter()
                .find(|p| p.id() == snapshot.provider_id)
        }
    }

    /// Every snapshot the providers hold (VSS: Query).
    pub fn query(&self) -> Vec<SnapshotRef> {
        self.providers.iter().flat_map(|p| p.query()).collect()
    }

    /// The snapshots of set `set_id`.
    pub fn query_set(&self, set_id: Uuid) -> Vec<SnapshotRef> {
        self.query()
            .into_iter()
            .filter(|s| s.set_id == set_id)
            .collect()
    }

    /// True if the provider that made `snapshot` still holds it.
    pub fn exists(&self, snapshot: &SnapshotRef) -> bool {
        self.provider_of(snapshot).is_some_and(|p| {
            p.query()
                .iter()
                .any(|s| s.snapshot_id == snapshot.snapshot_id)
        })
    }

    /// Deletes one snapshot (VSS: DeleteSnapshots of a snapshot).
    pub fn delete_snapshot(&self, snapshot_id: Uuid) -> VssResult<SnapshotRef> {
        let s = self
            .query()
            .into_iter()
            .find(|s| s.snapshot_id == snapshot_id)
            .ok_or_else(|| VssError::ObjectNotFound(format!("snapshot {snapshot_id}")))?;
        self.delete(&s)?;
        Ok(s)
    }

    /// Deletes every snapshot of a set (VSS: DeleteSnapshots of a set).
    pub fn delete_set(&self, set_id: Uuid) -> VssResult<Vec<SnapshotRef>> {
        let members = self.query_set(set_id);
        if members.is_empty() {
            return Err(VssError::ObjectNotFound(format!("snapshot set {set_id}")));
        }
        for s in &members {
            self.delete(s)?;
        }
        Ok(members)
    }

    fn delete(&self, s: &SnapshotRef) -> VssResult {
        let p = self.provider_of(s).ok_or_else(|| {
            VssError::ObjectNotFound(format!("provider {} ({})", s.provider, s.provider_id))
        })?;
        p.delete(s).map_err(|e| VssError::ProviderFailed {
            provider: p.name().to_string(),
            phase: "delete",
            message: e.0,
        })
    }

    /// A snapshot's contents, read-only, from whichever provider made it.
    pub fn open(&self, snapshot: &SnapshotRef) -> VssResult<Box<dyn BlockDevice>> {
        let p = self.provider_of(snapshot).ok_or_else(|| {
            VssError::ObjectNotFound(format!(
                "provider {} ({})",
                snapshot.provider, snapshot.provider_id
            ))
        })?;
        p.open(snapshot).map_err(|e| VssError::ProviderFailed {
            provider: p.name().to_string(),
            phase: "open",
            message: e.0,
        })
    }

    fn set_status(&self, idx: usize, state: WriterState, error: Option<(Phase, WriterFailure)>) {
        let mut st = self.writers[idx]
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        st.state = state;
        if let Some((phase, e)) = error {
            st.last_error = Some(e);
            st.last_error_at = Some(phase);
        }
    }

    fn writer_id(&self, idx: usize) -> Uuid {
        self.writers[idx]
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .writer_id
    }

    fn name_of(&self, idx: usize) -> String {
        self.writers[idx]
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .name
            .clone()
    }
}
