//! The coordinator and the requester's sessions, in VSS order.
//!
//! Backup: initialize -> set context (and backup state) -> gather writer
//! metadata -> add components -> start set -> add volumes -> prepare for
//! backup -> do snapshot set -> component succeeded -> backup complete.
//! Any call out of that order is `BadState`. Any failure inside the
//! snapshot set aborts it: every writer gets abort and thaw, every snapshot
//! made for the set is deleted, and the error names the writer (or
//! provider) and the phase.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};
use uuid::Uuid;

use crate::document::{
    BackupDocument, BackupType, CbtBase, ComponentEntry, Context, DOCUMENT_VERSION,
};
use crate::error::{VssError, VssResult};
use crate::provider::{CommitOptions, Provider, SnapshotRef};
use crate::writer::{
    FailureKind, Phase, Writer, WriterFailure, WriterMetadata, WriterResult, WriterState,
    WriterStatus,
};

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
    /// Freeze to thaw (VSS: 60 s).
    pub freeze: Duration,
    /// Writes held on the volumes (VSS: 10 s).
    pub hold: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            freeze: Duration::from_secs(60),
            hold: volshadow_cow::DEFAULT_HOLD_TIMEOUT,
        }
    }
}

struct WriterSlot {
    writer: Arc<dyn Writer>,
    status: Mutex<WriterStatus>,
}

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
            },
            Err(e) => WriterStatus {
                name: format!("writer {}", self.writers.len() + 1),
                writer_id: Uuid::nil(),
                instance_id: Uuid::new_v4(),
                state: WriterState::FailedAt(Phase::Identify),
                last_error: Some(e),
            },
        };
        self.writers.push(WriterSlot {
            writer,
            status: Mutex::new(status),
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

    /// A backup session, driven in VSS's order (see [`BackupSession`]).
    pub fn backup(self: &Arc<Self>) -> BackupSession {
        BackupSession {
            coord: self.clone(),
            state: BackupState::Created,
            context: Context::Backup,
            backup_type: BackupType::Full,
            base: Vec::new(),
            metadata: Vec::new(),
            selected: Vec::new(),
            set_id: None,
            volumes: Vec::new(),
            snapshots: Vec::new(),
            succeeded: Vec::new(),
        }
    }

    /// A restore driven by a saved backup document.
    pub fn restore(self: &Arc<Self>, document: BackupDocument) -> VssResult<RestoreSession> {
        if document.version > DOCUMENT_VERSION {
            return Err(VssError::Invalid(format!(
                "backup document version {} is not supported",
                document.version
            )));
        }
        Ok(RestoreSession {
            coord: self.clone(),
            document,
            state: RestoreState::Initialized,
            selected: Vec::new(),
        })
    }

    fn set_status(&self, idx: usize, state: WriterState, error: Option<WriterFailure>) {
        let mut st = self.writers[idx]
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        st.state = state;
        if error.is_some() {
            st.last_error = error;
        }
    }

    /// Calls a writer, bounded by `deadline`: a writer that overruns is
    /// reported as timed out (its call goes on in the background; the
    /// command writer kills its own children on timeout).
    fn call(
        &self,
        idx: usize,
        deadline: Option<Instant>,
        f: impl FnOnce(&dyn Writer) -> WriterResult + Send + 'static,
    ) -> WriterResult {
        let writer = self.writers[idx].writer.clone();
        let Some(deadline) = deadline else {
            return f(&*writer);
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(f(&*writer));
        });
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => r,
            Err(_) => Err(WriterFailure::new(
                FailureKind::Timeout,
                format!("did not answer within the {:?} window", left),
            )),
        }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackupState {
    Created,
    Initialized,
    ContextSet,
    MetadataGathered,
    SetStarted,
    Prepared,
    SnapshotDone,
    Completed,
    Aborted,
}

/// The requester's backup, one call per VSS step.
///
/// # Example
///
/// A whole backup of one volume with one writer, in VSS's order:
///
/// ```
/// use std::path::{Path, PathBuf};
/// use std::sync::Arc;
/// use uuid::Uuid;
/// use volshadow_block::MemDevice;
/// use volshadow_cow::{Volume, VolumeOptions};
/// use volshadow_vss::*;
///
/// /// An application that flushes and holds its writes while frozen.
/// struct App;
///
/// impl Writer for App {
///     fn identify(&self) -> Result<WriterMetadata, WriterFailure> {
///         Ok(WriterMetadata {
///             name: "app".into(),
///             writer_id: Uuid::from_u128(1),
///             instance_id: Uuid::from_u128(2),
///             usage: UsageType::UserData,
///             restore_method: RestoreMethod::RestoreIfCanReplace,
///             components: vec![Component {
///                 logical_path: String::new(),
///                 name: "db".into(),
///                 paths: vec![PathBuf::from("/srv/db")],
///                 volumes: vec![PathBuf::from("data.img")],
///                 selectable: true,
///             }],
///         })
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let volume = Volume::create(
///     Arc::new(MemDevice::new(1 << 20)),
///     Arc::new(MemDevice::new(8 << 20)),
///     VolumeOptions::default(),
/// )?;
/// let provider = Arc::new(CowProvider::new());
/// provider.add_volume("data.img", volume.clone());
/// let mut coordinator = Coordinator::new();
/// coordinator.add_provider(provider);
/// coordinator.add_writer(Arc::new(App));
/// let coordinator = Arc::new(coordinator);
///
/// let mut session = coordinator.backup();
/// session.initialize_for_backup()?;
/// session.set_context(Context::AppRollback)?; // persistent, with writers
/// session.set_backup_state(BackupType::Full, None)?;
/// for writer in session.gather_writer_metadata()? {
///     for component in &writer.components {
///         session.add_component(writer.writer_id, &component.full_path())?;
///     }
/// }
/// session.start_snapshot_set()?;
/// session.add_to_snapshot_set(Path::new("data.img"))?;
/// session.prepare_for_backup()?;
/// session.do_snapshot_set()?; // freeze, commit, thaw
/// // ... copy the snapshot (`session.snapshot_of`) to backup media ...
/// session.backup_component_succeeded("db")?;
/// let document = session.backup_complete()?;
///
/// assert_eq!(document.snapshots[0].snapshot_id, volume.snapshots()[0].id);
/// let saved = document.to_json();
/// assert_eq!(BackupDocument::from_json(&saved)?, document);
/// # Ok(())
/// # }
/// ```
pub struct BackupSession {
    coord: Arc<Coordinator>,
    state: BackupState,
    context: Context,
    backup_type: BackupType,
    base: Vec<CbtBase>,
    /// (writer index, metadata) of writers that identified.
    metadata: Vec<(usize, WriterMetadata)>,
    /// (writer index, component full path).
    selected: Vec<(usize, String)>,
    set_id: Option<Uuid>,
    /// (volume, provider index).
    volumes: Vec<(PathBuf, usize)>,
    snapshots: Vec<SnapshotRef>,
    succeeded: Vec<String>,
}

impl std::fmt::Debug for BackupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession")
            .field("state", &self.state)
            .field("set_id", &self.set_id)
            .finish_non_exhaustive()
    }
}

impl BackupSession {
    fn expect(&self, call: &'static str, allowed: &[BackupState]) -> VssResult {
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(VssError::BadState {
                call,
                state: format!("{:?}", self.state),
            })
        }
    }

    pub fn initialize_for_backup(&mut self) -> VssResult {
        self.expect("initialize_for_backup", &[BackupState::Created])?;
        self.state = BackupState::Initialized;
        Ok(())
    }

    pub fn set_context(&mut self, context: Context) -> VssResult {
        self.expect("set_context", &[BackupState::Initialized])?;
        self.context = context;
        self.state = BackupState::ContextSet;
        Ok(())
    }

    /// The backup type; for incremental and differential backups, the
    /// document of the backup they build on (its snapshots become the
    /// changed-block-tracking base).
    pub fn set_backup_state(
        &mut self,
        backup_type: BackupType,
        previous: Option<&BackupDocument>,
    ) -> VssResult {
        self.expect("set_backup_state", &[BackupState::ContextSet])?;
        let needs_base = matches!(
            backup_type,
            BackupType::Incremental | BackupType::Differential
        );
        self.base = match (needs_base, previous) {
            (true, Some(doc)) => doc
                .snapshots
                .iter()
                .map(|s| CbtBase {
                    volume: s.volume.clone(),
                    snapshot_id: s.snapshot_id,
                })
                .collect(),
            (true, None) => {
                return Err(VssError::Invalid(format!(
                    "a {backup_type:?} backup needs the previous backup's document"
                )));
            }
            (false, _) => Vec::new(),
        };
        self.backup_type = backup_type;
        Ok(())
    }

    /// Asks every writer to identify itself. A writer left failed by an
    /// earlier backup returns to stable here; its last error is kept.
    pub fn gather_writer_metadata(&mut self) -> VssResult<Vec<WriterMetadata>> {
        self.expect("gather_writer_metadata", &[BackupState::ContextSet])?;
        self.metadata.clear();
        if self.context.with_writers() {
            for idx in 0..self.coord.writers.len() {
                match self.coord.writers[idx].writer.identify() {
                    Ok(m) => {
                        self.coord.set_status(idx, WriterState::Stable, None);
                        self.metadata.push((idx, m));
                    }
                    Err(e) => {
                        warn!(error = %e, "writer failed to identify; left out of this backup");
                        self.coord
                            .set_status(idx, WriterState::FailedAt(Phase::Identify), Some(e));
                    }
                }
            }
        }
        self.state = BackupState::MetadataGathered;
        Ok(self.metadata.iter().map(|(_, m)| m.clone()).collect())
    }

    /// Selects a component (`logical_path\name`) of a writer for backup.
    pub fn add_component(&mut self, writer_id: Uuid, full_path: &str) -> VssResult {
        self.expect("add_component", &[BackupState::MetadataGathered])?;
        let found = self.metadata.iter().find_map(|(idx, m)| {
            (m.writer_id == writer_id)
                .then(|| {
                    m.components
                        .iter()
                        .find(|c| c.full_path() == full_path)
                        .map(|c| (*idx, c))
                })
                .flatten()
        });
        match found {
            Some((idx, c)) if c.selectable => {
                if !self
                    .selected
                    .iter()
                    .any(|(i, p)| *i == idx && p == full_path)
                {
                    self.selected.push((idx, full_path.to_string()));
                }
                Ok(())
            }
            Some(_) => Err(VssError::Invalid(format!(
                "component {full_path} is not selectable"
            ))),
            None => Err(VssError::Invalid(format!(
                "writer {writer_id} has no component {full_path}"
            ))),
        }
    }

    /// Starts the snapshot set; only one set is created at a time.
    pub fn start_snapshot_set(&mut self) -> VssResult<Uuid> {
        self.expect("start_snapshot_set", &[BackupState::MetadataGathered])?;
        if self.coord.set_in_progress.swap(true, Ordering::AcqRel) {
            return Err(VssError::SnapshotSetInProgress);
        }
        let id = Uuid::new_v4();
        self.set_id = Some(id);
        self.state = BackupState::SetStarted;
        Ok(id)
    }

    /// Adds a volume; the first provider in preference order that supports
    /// it is chosen. Returns the provider's name.
    pub fn add_to_snapshot_set(&mut self, volume: &Path) -> VssResult<String> {
        self.expect("add_to_snapshot_set", &[BackupState::SetStarted])?;
        if self.volumes.iter().any(|(v, _)| v == volume) {
            return Err(VssError::Invalid(format!(
                "{} is already in the set",
                volume.display()
            )));
        }
        if self.volumes.len() >= self.coord.limits.volumes_per_set {
            return Err(VssError::LimitReached(format!(
                "{} volumes per snapshot set",
                self.coord.limits.volumes_per_set
            )));
        }
        let idx = self
            .coord
            .providers
            .iter()
            .position(|p| p.is_volume_supported(volume))
            .ok_or_else(|| VssError::VolumeNotSupported(volume.display().to_string()))?;
        let provider = &self.coord.providers[idx];
        let existing = provider
            .query()
            .iter()
            .filter(|s| s.volume == volume)
            .count();
        if existing >= self.coord.limits.snapshots_per_volume {
            return Err(VssError::LimitReached(format!(
                "{} snapshots per volume on {}",
                self.coord.limits.snapshots_per_volume,
                volume.display()
            )));
        }
        self.volumes.push((volume.to_owned(), idx));
        Ok(provider.name().to_string())
    }

    fn selected_of(&self, idx: usize) -> Vec<String> {
        self.selected
            .iter()
            .filter(|(i, _)| *i == idx)
            .map(|(_, p)| p.clone())
            .collect()
    }

    pub fn prepare_for_backup(&mut self) -> VssResult {
        self.expect("prepare_for_backup", &[BackupState::SetStarted])?;
        if self.volumes.is_empty() {
            return Err(VssError::Invalid("the snapshot set has no volumes".into()));
        }
        for (idx, _) in self.metadata.clone() {
            let comps = self.selected_of(idx);
            if let Err(e) = self
                .coord
                .call(idx, None, move |w| w.prepare_for_backup(&comps))
            {
                return Err(self.abort_with(idx, Phase::PrepareBackup, e, &[]));
            }
        }
        self.state = BackupState::Prepared;
        Ok(())
    }

    fn providers_used(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.volumes.iter().map(|(_, p)| *p).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Aborts after writer `idx` failed at `phase`: abort + thaw to every
    /// writer, delete everything made for the set, return the error.
    fn abort_with(
        &mut self,
        idx: usize,
        phase: Phase,
        failure: WriterFailure,
        made: &[SnapshotRef],
    ) -> VssError {
        let name = self.coord.name_of(idx);
        warn!(writer = %name, %phase, error = %failure, "writer failed; aborting the snapshot set");
        self.abort_all(made);
        self.coord
            .set_status(idx, WriterState::FailedAt(phase), Some(failure.clone()));
        VssError::WriterFailed {
            writer: name,
            phase,
            failure,
        }
    }

    fn abort_provider(
        &mut self,
        provider: usize,
        phase: &'static str,
        message: String,
        made: &[SnapshotRef],
    ) -> VssError {
        let name = self.coord.providers[provider].name().to_string();
        warn!(provider = %name, phase, error = %message, "provider failed; aborting the snapshot set");
        self.abort_all(made);
        VssError::ProviderFailed {
            provider: name,
            phase,
            message,
        }
    }

    fn abort_all(&mut self, made: &[SnapshotRef]) {
        for (idx, _) in self.metadata.clone() {
            let _ = self.coord.writers[idx].writer.abort();
            let _ = self.coord.writers[idx].writer.thaw();
            self.coord.set_status(idx, WriterState::Stable, None);
        }
        if let Some(set) = self.set_id {
            for p in self.providers_used() {
                if let Err(e) = self.coord.providers[p].abort(set) {
                    warn!(error = %e, "provider abort failed");
                }
            }
        }
        for s in made {
            if let Some(p) = self.coord.providers.iter().find(|p| p.name() == s.provider)
                && let Err(e) = p.delete(s)
            {
                warn!(error = %e, snapshot = %s.snapshot_id, "could not delete a snapshot of an aborted set");
            }
        }
        self.coord.set_in_progress.store(false, Ordering::Release);
        self.state = BackupState::Aborted;
    }

    /// Creates the snapshot set exactly as VSS sequences it.
    pub fn do_snapshot_set(&mut self) -> VssResult<Vec<SnapshotRef>> {
        self.expect("do_snapshot_set", &[BackupState::Prepared])?;
        let set = self.set_id.unwrap_or_default();
        let writers: Vec<usize> = self.metadata.iter().map(|(i, _)| *i).collect();
        for &idx in &writers {
            self.coord
                .set_status(idx, WriterState::WaitingForFreeze, None);
            if let Err(e) = self.coord.call(idx, None, |w| w.prepare_for_snapshot()) {
                return Err(self.abort_with(idx, Phase::PrepareSnapshot, e, &[]));
            }
        }
        for (vol, p) in self.volumes.clone() {
            if let Err(e) = self.coord.providers[p].begin_prepare_snapshot(set, &vol) {
                return Err(self.abort_provider(p, "begin-prepare", e.0, &[]));
            }
        }
        for p in self.providers_used() {
            if let Err(e) = self.coord.providers[p].end_prepare_snapshot(set) {
                return Err(self.abort_provider(p, "end-prepare", e.0, &[]));
            }
        }
        // Freeze: front, back, then system level; the window runs from here.
        let freeze_deadline = Instant::now() + self.coord.timeouts.freeze;
        let mut order = writers.clone();
        order.sort_by_key(|&i| self.coord.writers[i].writer.freeze_level());
        for &idx in &order {
            if let Err(e) = self.coord.call(idx, Some(freeze_deadline), |w| w.freeze()) {
                return Err(self.abort_with(idx, Phase::Freeze, e, &[]));
            }
            self.coord
                .set_status(idx, WriterState::WaitingForThaw, None);
        }
        for p in self.providers_used() {
            if let Err(e) = self.coord.providers[p].pre_commit(set) {
                return Err(self.abort_provider(p, "pre-commit", e.0, &[]));
            }
        }
        let options = CommitOptions {
            persistent: self.context.persistent(),
            attributes: self.context.attributes(),
            hold_timeout: self.coord.timeouts.hold,
        };
        // Commit holds writes on each provider's volumes, snapshots, releases.
        for p in self.providers_used() {
            if let Err(e) = self.coord.providers[p].commit(set, &options) {
                return Err(self.abort_provider(p, "commit", e.0, &[]));
            }
        }
        let mut made = Vec::new();
        for p in self.providers_used() {
            match self.coord.providers[p].post_commit(set) {
                Ok(refs) => made.extend(refs),
                Err(e) => return Err(self.abort_provider(p, "post-commit", e.0, &made)),
            }
        }
        if Instant::now() > freeze_deadline {
            let idx = order.first().copied().unwrap_or(0);
            let e = WriterFailure::new(
                FailureKind::Timeout,
                format!(
                    "freeze to thaw took longer than {:?}",
                    self.coord.timeouts.freeze
                ),
            );
            return Err(self.abort_with(idx, Phase::Freeze, e, &made));
        }
        for &idx in order.iter().rev() {
            if let Err(e) = self.coord.call(idx, Some(freeze_deadline), |w| w.thaw()) {
                return Err(self.abort_with(idx, Phase::Thaw, e, &made));
            }
            self.coord
                .set_status(idx, WriterState::WaitingForPostSnapshot, None);
        }
        for &idx in &writers {
            if let Err(e) = self.coord.call(idx, None, |w| w.post_snapshot()) {
                return Err(self.abort_with(idx, Phase::PostSnapshot, e, &made));
            }
            self.coord
                .set_status(idx, WriterState::WaitingForBackupComplete, None);
        }
        self.coord.set_in_progress.store(false, Ordering::Release);
        info!(%set, snapshots = made.len(), "snapshot set created");
        self.snapshots = made.clone();
        self.state = BackupState::SnapshotDone;
        Ok(made)
    }

    /// The snapshot of `volume` in this set (for the requester's copy).
    pub fn snapshot_of(&self, volume: &Path) -> Option<&SnapshotRef> {
        self.snapshots.iter().find(|s| s.volume == volume)
    }

    pub fn backup_component_succeeded(&mut self, full_path: &str) -> VssResult {
        self.expect("backup_component_succeeded", &[BackupState::SnapshotDone])?;
        if !self.selected.iter().any(|(_, p)| p == full_path) {
            return Err(VssError::Invalid(format!("{full_path} was not selected")));
        }
        if !self.succeeded.iter().any(|p| p == full_path) {
            self.succeeded.push(full_path.to_string());
        }
        Ok(())
    }

    /// Tells writers the backup is complete and returns the document.
    /// Non-persistent snapshots are released (deleted) here, as VSS does.
    pub fn backup_complete(&mut self) -> VssResult<BackupDocument> {
        self.expect("backup_complete", &[BackupState::SnapshotDone])?;
        for (idx, _) in self.metadata.clone() {
            let ok: Vec<String> = self
                .selected_of(idx)
                .into_iter()
                .filter(|p| self.succeeded.contains(p))
                .collect();
            match self.coord.call(idx, None, move |w| w.backup_complete(&ok)) {
                Ok(()) => self.coord.set_status(idx, WriterState::Stable, None),
                Err(e) => self.coord.set_status(
                    idx,
                    WriterState::FailedAt(Phase::BackupComplete),
                    Some(e),
                ),
            }
        }
        let doc = self.document();
        if !self.context.persistent() {
            self.release();
        }
        self.state = BackupState::Completed;
        Ok(doc)
    }

    fn release(&mut self) {
        for s in std::mem::take(&mut self.snapshots) {
            if let Some(p) = self.coord.providers.iter().find(|p| p.name() == s.provider) {
                let _ = p.delete(&s);
            }
        }
    }

    fn document(&self) -> BackupDocument {
        let components = self
            .selected
            .iter()
            .filter_map(|(idx, path)| {
                let (_, m) = self.metadata.iter().find(|(i, _)| i == idx)?;
                let c = m.components.iter().find(|c| c.full_path() == *path)?;
                Some(ComponentEntry {
                    writer_id: m.writer_id,
                    full_path: path.clone(),
                    volumes: c.volumes.clone(),
                    restore_method: m.restore_method,
                    backup_succeeded: self.succeeded.contains(path),
                    restore_succeeded: None,
                })
            })
            .collect();
        BackupDocument {
            version: DOCUMENT_VERSION,
            context: self.context,
            backup_type: self.backup_type,
            set_id: self.set_id.unwrap_or_default(),
            time_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            writers: self.metadata.iter().map(|(_, m)| m.clone()).collect(),
            components,
            snapshots: self.snapshots.clone(),
            cbt_base: self.base.clone(),
        }
    }

    /// Abandons the backup at any point before completion.
    pub fn abort(&mut self) -> VssResult {
        self.expect(
            "abort",
            &[
                BackupState::Initialized,
                BackupState::ContextSet,
                BackupState::MetadataGathered,
                BackupState::SetStarted,
                BackupState::Prepared,
                BackupState::SnapshotDone,
            ],
        )?;
        let made = std::mem::take(&mut self.snapshots);
        let had_set = self.set_id.is_some();
        self.abort_all(&made);
        if !had_set {
            self.state = BackupState::Aborted;
        }
        Ok(())
    }
}

impl Drop for BackupSession {
    fn drop(&mut self) {
        // A session dropped mid-way must not keep the set slot or frozen
        // writers; non-persistent snapshots are auto-released.
        match self.state {
            BackupState::SetStarted | BackupState::Prepared => {
                let _ = self.abort();
            }
            BackupState::SnapshotDone if !self.context.persistent() => self.release(),
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestoreState {
    Initialized,
    MetadataGathered,
    PreRestored,
    Restored,
    Done,
}

/// A restore from a saved backup document.
pub struct RestoreSession {
    coord: Arc<Coordinator>,
    document: BackupDocument,
    state: RestoreState,
    selected: Vec<String>,
}

impl std::fmt::Debug for RestoreSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreSession")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl RestoreSession {
    fn expect(&self, call: &'static str, allowed: RestoreState) -> VssResult {
        if self.state == allowed {
            Ok(())
        } else {
            Err(VssError::BadState {
                call,
                state: format!("{:?}", self.state),
            })
        }
    }

    fn writers_of(&self) -> Vec<(usize, Vec<String>)> {
        self.coord
            .writers
            .iter()
            .enumerate()
            .filter_map(|(idx, slot)| {
                let id = slot
                    .status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .writer_id;
                let comps: Vec<String> = self
                    .document
                    .components
                    .iter()
                    .filter(|c| c.writer_id == id && self.selected.contains(&c.full_path))
                    .map(|c| c.full_path.clone())
                    .collect();
                (!comps.is_empty()).then_some((idx, comps))
            })
            .collect()
    }

    pub fn gather_writer_metadata(&mut self) -> VssResult<Vec<WriterMetadata>> {
        self.expect("gather_writer_metadata", RestoreState::Initialized)?;
        let mut out = Vec::new();
        for (idx, slot) in self.coord.writers.iter().enumerate() {
            match slot.writer.identify() {
                Ok(m) => {
                    self.coord.set_status(idx, WriterState::Stable, None);
                    out.push(m);
                }
                Err(e) => {
                    self.coord
                        .set_status(idx, WriterState::FailedAt(Phase::Identify), Some(e))
                }
            }
        }
        self.state = RestoreState::MetadataGathered;
        Ok(out)
    }

    pub fn select_for_restore(&mut self, full_path: &str) -> VssResult {
        self.expect("select_for_restore", RestoreState::MetadataGathered)?;
        if !self
            .document
            .components
            .iter()
            .any(|c| c.full_path == full_path)
        {
            return Err(VssError::Invalid(format!(
                "the backup has no component {full_path}"
            )));
        }
        self.selected.push(full_path.to_string());
        Ok(())
    }

    pub fn pre_restore(&mut self) -> VssResult {
        self.expect("pre_restore", RestoreState::MetadataGathered)?;
        if self.selected.is_empty() {
            return Err(VssError::Invalid(
                "no component selected for restore".into(),
            ));
        }
        for (idx, comps) in self.writers_of() {
            if let Err(e) = self.coord.call(idx, None, move |w| w.pre_restore(&comps)) {
                let name = self.coord.name_of(idx);
                self.coord.set_status(
                    idx,
                    WriterState::FailedAt(Phase::PreRestore),
                    Some(e.clone()),
                );
                return Err(VssError::WriterFailed {
                    writer: name,
                    phase: Phase::PreRestore,
                    failure: e,
                });
            }
        }
        self.state = RestoreState::PreRestored;
        Ok(())
    }

    /// Copies the selected components' volumes back from the backup's
    /// snapshots and records each component's restore status.
    pub fn restore(&mut self) -> VssResult {
        self.expect("restore", RestoreState::PreRestored)?;
        let mut done: HashMap<PathBuf, Result<(), String>> = HashMap::new();
        for c in self.document.components.clone() {
            if !self.selected.contains(&c.full_path) {
                continue;
            }
            let mut ok = true;
            for vol in &c.volumes {
                let r = done.entry(vol.clone()).or_insert_with(|| {
                    let snap = self
                        .document
                        .snapshots
                        .iter()
                        .find(|s| &s.volume == vol)
                        .ok_or_else(|| {
                            format!("the backup has no snapshot of {}", vol.display())
                        })?;
                    let provider = self
                        .coord
                        .providers
                        .iter()
                        .find(|p| p.name() == snap.provider)
                        .ok_or_else(|| format!("provider {} is not available", snap.provider))?;
                    provider.revert(snap).map_err(|e| e.0)
                });
                if let Err(e) = r {
                    warn!(component = %c.full_path, error = %e, "restore failed");
                    ok = false;
                }
            }
            if let Some(entry) = self
                .document
                .components
                .iter_mut()
                .find(|e| e.full_path == c.full_path)
            {
                entry.restore_succeeded = Some(ok);
            }
        }
        self.state = RestoreState::Restored;
        Ok(())
    }

    /// Tells writers the restore is over; returns the document with each
    /// component's restore status.
    pub fn post_restore(&mut self) -> VssResult<BackupDocument> {
        self.expect("post_restore", RestoreState::Restored)?;
        for (idx, comps) in self.writers_of() {
            if let Err(e) = self.coord.call(idx, None, move |w| w.post_restore(&comps)) {
                self.coord
                    .set_status(idx, WriterState::FailedAt(Phase::PostRestore), Some(e));
            }
        }
        self.state = RestoreState::Done;
        Ok(self.document.clone())
    }
}
