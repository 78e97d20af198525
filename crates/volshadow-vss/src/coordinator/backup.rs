//! The requester's backup session, one call per VSS step.
//!
//! initialize -> set context (and backup state) -> (exclude writers) ->
//! gather writer metadata -> add components -> start set -> add volumes
//! -> prepare for backup -> do snapshot set -> component succeeded ->
//! backup complete. Any call out of that order is `BadState`.
//!
//! Only writers with a component in the backup take part. A writer's
//! failure at prepare-backup, prepare-snapshot or post-snapshot is a veto:
//! the writer is failed at that event and takes no further part, the set
//! stands, and the requester decides ([`BackupSession::vetoes`]). A failure
//! at freeze or thaw, a writer overrunning its freeze window, a provider's
//! failure or an overlong write hold abort the set: every writer taking
//! part gets `abort` (only), and nothing of the set is kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::warn;
use uuid::Uuid;

use crate::context::{BackupType, Context};
use crate::document::{BackupDocument, CbtBase, ComponentEntry, DOCUMENT_VERSION};
use crate::error::{VssError, VssResult};
use crate::provider::SnapshotRef;
use crate::writer::{
    Component, EventContext, Phase, WriterFailure, WriterMetadata, WriterResult, WriterState,
};

use super::Coordinator;
use super::call::Event;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BackupState {
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
    pub(super) coord: Arc<Coordinator>,
    pub(super) state: BackupState,
    pub(super) context: Context,
    pub(super) backup_type: BackupType,
    pub(super) base: Vec<CbtBase>,
    /// Writer ids left out by the requester.
    pub(super) excluded: Vec<Uuid>,
    /// (writer index, metadata) of writers that identified.
    pub(super) metadata: Vec<(usize, WriterMetadata)>,
    /// (writer index, component full path) the requester selected.
    pub(super) selected: Vec<(usize, String)>,
    /// (writer index, event, failure) of writers that vetoed.
    pub(super) vetoes: Vec<(usize, Phase, WriterFailure)>,
    pub(super) set_id: Option<Uuid>,
    /// (volume, provider index).
    pub(super) volumes: Vec<(PathBuf, usize)>,
    pub(super) snapshots: Vec<SnapshotRef>,
    pub(super) succeeded: Vec<String>,
}

impl std::fmt::Debug for BackupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession")
            .field("state", &self.state)
            .field("set_id", &self.set_id)
            .finish_non_exhaustive()
    }
}

/// True if `c` sits under the component whose full path is `parent`.
fn is_under(c: &Component, parent: &str) -> bool {
    c.logical_path == parent || c.logical_path.starts_with(&format!("{parent}\\"))
}

impl Coordinator {
    /// A backup session, driven in VSS's order (see [`BackupSession`]).
    pub fn backup(self: &Arc<Self>) -> BackupSession {
        BackupSession {
            coord: self.clone(),
            state: BackupState::Created,
            context: Context::Backup,
            backup_type: BackupType::Full,
            base: Vec::new(),
            excluded: Vec::new(),
            metadata: Vec::new(),
            selected: Vec::new(),
            vetoes: Vec::new(),
            set_id: None,
            volumes: Vec::new(),
            snapshots: Vec::new(),
            succeeded: Vec::new(),
        }
    }
}

impl BackupSession {
    pub(super) fn expect(&self, call: &'static str, allowed: &[BackupState]) -> VssResult {
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

    /// The backup type; an incremental or differential backup names the
    /// document it builds on, whose snapshots become its changed-block
    /// base. That base must be persistent and still exist, and not be a
    /// copy or log backup (they are outside the backup history); a
    /// differential builds on the last full backup (given directly, or
    /// through an earlier differential's base).
    pub fn set_backup_state(
        &mut self,
        backup_type: BackupType,
        previous: Option<&BackupDocument>,
    ) -> VssResult {
        self.expect("set_backup_state", &[BackupState::ContextSet])?;
        self.base = match (backup_type, previous) {
            (BackupType::Incremental | BackupType::Differential, None) => {
                return Err(VssError::Invalid(format!(
                    "a {} backup needs the document of the backup it builds on",
                    backup_type.as_str()
                )));
            }
            (BackupType::Incremental | BackupType::Differential, Some(doc)) => {
                self.base_from(backup_type, doc)?
            }
            _ => Vec::new(),
        };
        self.backup_type = backup_type;
        Ok(())
    }

    fn base_from(&self, backup_type: BackupType, doc: &BackupDocument) -> VssResult<Vec<CbtBase>> {
        let bad = |why: String| {
            Err(VssError::Invalid(format!(
                "a {} backup cannot build on backup set {}: {why}",
                backup_type.as_str(),
                doc.set_id
            )))
        };
        if !doc.context.persistent() {
            return bad(format!(
                "its context {} released its snapshots at backup complete",
                doc.context.as_str()
            ));
        }
        let base: Vec<CbtBase> = match (backup_type, doc.backup_type) {
            (_, BackupType::Copy | BackupType::Log) => {
                return bad(format!(
                    "it is a {} backup, which is outside the backup history",
                    doc.backup_type.as_str()
                ));
            }
            (BackupType::Differential, BackupType::Incremental) => {
                return bad(
                    "a differential builds on the last full backup, not an incremental".into(),
                );
            }
            (BackupType::Differential, BackupType::Differential) => doc.cbt_base.clone(),
            _ => doc
                .snapshots
                .iter()
                .map(|s| CbtBase {
                    volume: s.volume.clone(),
                    snapshot_id: s.snapshot_id,
                })
                .collect(),
        };
        let all = self.coord.query();
        if let Some(gone) = base
            .iter()
            .find(|b| !all.iter().any(|s| s.snapshot_id == b.snapshot_id))
        {
            return bad(format!(
                "its snapshot {} of {} no longer exists",
                gone.snapshot_id,
                gone.volume.display()
            ));
        }
        Ok(base)
    }

    /// Leaves a writer out of this backup (VSS: disabling a writer before
    /// gathering metadata, or excluding it after).
    pub fn exclude_writer(&mut self, writer_id: Uuid) -> VssResult {
        self.expect(
            "exclude_writer",
            &[
                BackupState::Initialized,
                BackupState::ContextSet,
                BackupState::MetadataGathered,
            ],
        )?;
        self.excluded.push(writer_id);
        let out: Vec<usize> = self
            .metadata
            .iter()
            .filter(|(_, m)| m.writer_id == writer_id)
            .map(|(i, _)| *i)
            .collect();
        self.metadata.retain(|(_, m)| m.writer_id != writer_id);
        self.selected.retain(|(i, _)| !out.contains(i));
        Ok(())
    }

    /// Asks every writer not excluded to identify itself. A writer left
    /// failed by an earlier backup returns to stable here; its last error
    /// is kept.
    pub fn gather_writer_metadata(&mut self) -> VssResult<Vec<WriterMetadata>> {
        self.expect("gather_writer_metadata", &[BackupState::ContextSet])?;
        self.metadata.clear();
        if self.context.with_writers() {
            for idx in 0..self.coord.writers.len() {
                if self.coord.is_late(idx) {
                    warn!(writer = %self.coord.name_of(idx), "a call that overran its limit is still running; left out of this backup");
                    continue;
                }
                if self.excluded.contains(&self.coord.writer_id(idx)) {
                    continue;
                }
                match self.coord.writers[idx].writer.identify() {
                    Ok(m) if self.excluded.contains(&m.writer_id) => {}
                    Ok(m) => {
                        self.coord.set_status(idx, WriterState::Stable, None);
                        self.metadata.push((idx, m));
                    }
                    Err(e) => {
                        warn!(error = %e, "writer failed to identify; left out of this backup");
                        self.coord.set_status(
                            idx,
                            WriterState::FailedAt(Phase::Identify),
                            Some((Phase::Identify, e)),
                        );
                    }
                }
            }
        }
        self.state = BackupState::MetadataGathered;
        Ok(self.metadata.iter().map(|(_, m)| m.clone()).collect())
    }

    /// Selects a component (`logical_path\name`) of a writer for backup.
    /// A selectable component brings its subcomponents; a non-selectable
    /// one under a selectable ancestor comes only with that ancestor.
    pub fn add_component(&mut self, writer_id: Uuid, full_path: &str) -> VssResult {
        self.expect("add_component", &[BackupState::MetadataGathered])?;
        let Some((idx, m)) = self.metadata.iter().find(|(_, m)| m.writer_id == writer_id) else {
            return Err(VssError::Invalid(format!(
                "writer {writer_id} is not taking part in this backup"
            )));
        };
        let Some(c) = m.components.iter().find(|c| c.full_path() == full_path) else {
            return Err(VssError::Invalid(format!(
                "writer {} has no component {full_path}",
                m.name
            )));
        };
        if !c.selectable
            && let Some(owner) = m
                .components
                .iter()
                .find(|o| o.selectable && is_under(c, &o.full_path()))
        {
            return Err(VssError::Invalid(format!(
                "component {full_path} is part of {}'s component set: select {}",
                owner.full_path(),
                owner.full_path()
            )));
        }
        let idx = *idx;
        if !self
            .selected
            .iter()
            .any(|(i, p)| *i == idx && p == full_path)
        {
            self.selected.push((idx, full_path.to_string()));
        }
        Ok(())
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

    /// Components of writer `idx` in the backup: those selected, their
    /// subcomponents, and non-selectable ones with no selectable ancestor
    /// (those come whenever the writer takes part).
    pub(super) fn included_of(&self, idx: usize) -> Vec<&Component> {
        let explicit: Vec<&String> = self
            .selected
            .iter()
            .filter(|(i, _)| *i == idx)
            .map(|(_, p)| p)
            .collect();
        let Some((_, m)) = self.metadata.iter().find(|(i, _)| *i == idx) else {
            return Vec::new();
        };
        if explicit.is_empty() {
            return Vec::new();
        }
        m.components
            .iter()
            .filter(|c| {
                explicit.contains(&&c.full_path())
                    || explicit.iter().any(|p| is_under(c, p))
                    || (!c.selectable
                        && !m
                            .components
                            .iter()
                            .any(|o| o.selectable && is_under(c, &o.full_path())))
            })
            .collect()
    }

    /// Writers taking part: a component in the backup, no veto so far.
    pub(super) fn active(&self) -> Vec<usize> {
        self.metadata
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| self.selected.iter().any(|(j, _)| j == i))
            .filter(|i| !self.vetoes.iter().any(|(j, _, _)| j == i))
            .collect()
    }

    /// What writer `idx` sees with each event.
    pub(super) fn event_for(&self, idx: usize) -> EventContext {
        EventContext {
            set_id: self.set_id,
            volumes: self.volumes.iter().map(|(v, _)| v.clone()).collect(),
            backup_type: self.backup_type,
            context: self.context,
            components: self
                .included_of(idx)
                .iter()
                .map(|c| c.full_path())
                .collect(),
        }
    }

    /// Calls writer `idx` for `phase` (an event outside the freeze
    /// window), within the coordinator's event limit.
    pub(super) fn call_writer(&self, idx: usize, phase: Phase, event: Event) -> WriterResult {
        let ctx = self.event_for(idx);
        let deadline = Instant::now() + self.coord.timeouts.event;
        self.coord.call(idx, phase, deadline, &ctx, false, event)
    }

    /// Writer `idx` vetoed at `phase`: failed there, out of the rest.
    pub(super) fn veto(&mut self, idx: usize, phase: Phase, failure: WriterFailure) {
        warn!(writer = %self.coord.name_of(idx), %phase, error = %failure, "writer vetoed; it takes no further part");
        self.coord.set_status(
            idx,
            WriterState::FailedAt(phase),
            Some((phase, failure.clone())),
        );
        self.vetoes.push((idx, phase, failure));
    }

    /// The writers that vetoed so far: (name, event, failure).
    pub fn vetoes(&self) -> Vec<(String, Phase, WriterFailure)> {
        self.vetoes
            .iter()
            .map(|(i, p, f)| (self.coord.name_of(*i), *p, f.clone()))
            .collect()
    }

    /// PrepareForBackup. A writer that fails vetoes; see [`Self::vetoes`].
    pub fn prepare_for_backup(&mut self) -> VssResult {
        self.expect("prepare_for_backup", &[BackupState::SetStarted])?;
        for idx in self.active() {
            if let Err(e) =
                self.call_writer(idx, Phase::PrepareBackup, |w, c| w.prepare_for_backup(c))
            {
                self.veto(idx, Phase::PrepareBackup, e);
            }
        }
        self.state = BackupState::Prepared;
        Ok(())
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
        for idx in self.active() {
            let mut ctx = self.event_for(idx);
            ctx.components.retain(|p| {
                self.succeeded.contains(p)
                    || self
                        .succeeded
                        .iter()
                        .any(|s| p.starts_with(&format!("{s}\\")))
            });
            let deadline = Instant::now() + self.coord.timeouts.event;
            match self
                .coord
                .call(idx, Phase::BackupComplete, deadline, &ctx, false, |w, c| {
                    w.backup_complete(c)
                }) {
                Ok(()) => self.coord.set_status(idx, WriterState::Stable, None),
                Err(e) => self.coord.set_status(
                    idx,
                    WriterState::FailedAt(Phase::BackupComplete),
                    Some((Phase::BackupComplete, e)),
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

    pub(super) fn release(&mut self) {
        for s in std::mem::take(&mut self.snapshots) {
            if let Some(p) = self.coord.provider_of(&s)
                && let Err(e) = p.delete(&s)
            {
                warn!(error = %e, snapshot = %s.snapshot_id, "could not release a snapshot");
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
                // The component's set: its volumes and its subcomponents'.
                let mut volumes = c.volumes.clone();
                for sub in m.components.iter().filter(|s| is_under(s, path)) {
                    for v in &sub.volumes {
                        if !volumes.contains(v) {
                            volumes.push(v.clone());
                        }
                    }
                }
                let writer_failure = self
                    .vetoes
                    .iter()
                    .find(|(i, _, _)| i == idx)
                    .map(|(_, p, f)| format!("failed at {p}: {f}"));
                Some(ComponentEntry {
                    writer_id: m.writer_id,
                    full_path: path.clone(),
                    volumes,
                    restore_method: m.restore_method,
                    backup_succeeded: self.succeeded.contains(path),
                    writer_failure,
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

    /// Abandons the backup at any point before completion (VSS:
    /// AbortBackup): writers taking part get `abort`, the set's snapshots
    /// are deleted.
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
        self.abort_all(&made);
        Ok(())
    }

    /// Every writer that took part gets `abort` (bounded by its limit; a
    /// writer with a late call still running gets it when that call
    /// returns, see `call.rs`), `made` is deleted, the set slot freed.
    pub(super) fn abort_all(&mut self, made: &[SnapshotRef]) {
        let had_set = self.set_id.is_some();
        let taking_part: Vec<usize> = self
            .metadata
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| self.selected.iter().any(|(j, _)| j == i))
            .collect();
        for idx in taking_part {
            if let Err(e) = self.call_writer(idx, Phase::Abort, |w, c| w.abort(c)) {
                warn!(writer = %self.coord.name_of(idx), error = %e, "abort failed");
            }
            if !self.vetoes.iter().any(|(i, _, _)| *i == idx) {
                self.coord.set_status(idx, WriterState::Stable, None);
            }
        }
        if let Some(set) = self.set_id {
            for p in self.providers_used() {
                if let Err(e) = self.coord.providers[p].abort(set) {
                    warn!(error = %e, "provider abort failed");
                }
            }
        }
        for s in made {
            if let Some(p) = self.coord.provider_of(s)
                && let Err(e) = p.delete(s)
            {
                warn!(error = %e, snapshot = %s.snapshot_id, "could not delete a snapshot of an aborted set");
            }
        }
        if had_set {
            self.coord.set_in_progress.store(false, Ordering::Release);
        }
        self.state = BackupState::Aborted;
    }

    pub(super) fn providers_used(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.volumes.iter().map(|(_, p)| *p).collect();
        v.sort_unstable();
        v.dedup();
        v
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
        // VSS: BackupShutdown, to every writer that took part.
        let taking_part: Vec<usize> = self
            .metadata
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| self.selected.iter().any(|(j, _)| j == i))
            .collect();
        for idx in taking_part {
            if let Err(e) =
                self.call_writer(idx, Phase::BackupShutdown, |w, c| w.backup_shutdown(c))
            {
                warn!(writer = %self.coord.name_of(idx), error = %e, "backup shutdown failed");
            }
        }
    }
}
