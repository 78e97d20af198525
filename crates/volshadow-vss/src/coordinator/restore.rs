//! A restore from a saved backup document, honouring each component's
//! restore method or refusing it before anything changes.
//!
//! gather writer metadata -> select components (and alternate locations)
//! -> pre-restore -> restore -> post-restore. What a restore will do is
//! settled and checked before the first writer event: a method that
//! cannot be honoured, a volume shared with a component not being
//! restored, a snapshot that is gone, are refused with nothing changed.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use crate::document::{BackupDocument, ComponentEntry, DOCUMENT_VERSION};
use crate::error::{VssError, VssResult};
use crate::provider::SnapshotRef;
use crate::writer::{EventContext, Phase, RestoreMethod, WriterMetadata, WriterState};

use super::Coordinator;
use super::call::Event;

/// Bytes copied at a time to an alternate location.
const COPY_CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestoreState {
    Initialized,
    MetadataGathered,
    PreRestored,
    Restored,
    Done,
}

/// How one selected component comes back.
#[derive(Debug, Clone)]
enum Plan {
    /// Its volumes rolled back to the backup's snapshots.
    Revert(Vec<SnapshotRef>),
    /// Its volumes' snapshots written as image files into a directory.
    Alternate(PathBuf, Vec<SnapshotRef>),
}

/// A restore from a saved backup document.
pub struct RestoreSession {
    coord: Arc<Coordinator>,
    document: BackupDocument,
    state: RestoreState,
    selected: Vec<String>,
    alternate: HashMap<String, PathBuf>,
}

impl std::fmt::Debug for RestoreSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreSession")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// A restore driven by a saved backup document. Refused up front when
    /// its snapshots are gone: released at backup complete (context
    /// `backup` or `file-share`), or deleted since.
    pub fn restore(self: &Arc<Self>, document: BackupDocument) -> VssResult<RestoreSession> {
        if document.version > DOCUMENT_VERSION {
            return Err(VssError::Invalid(format!(
                "backup document version {} is not supported",
                document.version
            )));
        }
        if !document.context.persistent() {
            return Err(VssError::Invalid(format!(
                "backup set {} was made in context {}: its shadow copies were released when the backup completed, so there is nothing to restore from (restore from the copy taken during the backup, or back up with a persistent context such as app-rollback)",
                document.set_id,
                document.context.as_str()
            )));
        }
        if let Some(gone) = document.snapshots.iter().find(|s| !self.exists(s)) {
            return Err(VssError::ObjectNotFound(format!(
                "shadow copy {} of {} (set {}, {})",
                gone.snapshot_id,
                gone.volume.display(),
                gone.set_id,
                gone.provider
            )));
        }
        Ok(RestoreSession {
            coord: self.clone(),
            document,
            state: RestoreState::Initialized,
            selected: Vec::new(),
            alternate: HashMap::new(),
        })
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

    fn entry(&self, full_path: &str) -> Option<&ComponentEntry> {
        self.document
            .components
            .iter()
            .find(|c| c.full_path == full_path)
    }

    /// Writers with selected components, and those components.
    fn writers_of(&self) -> Vec<(usize, Vec<String>)> {
        (0..self.coord.writers.len())
            .filter_map(|idx| {
                let id = self.coord.writer_id(idx);
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

    fn call_each(&self, phase: Phase, event: Event) -> Vec<(usize, crate::WriterFailure)> {
        let volumes: Vec<PathBuf> = self
            .selected
            .iter()
            .filter_map(|p| self.entry(p))
            .flat_map(|c| c.volumes.clone())
            .collect();
        let mut failed = Vec::new();
        for (idx, components) in self.writers_of() {
            let ctx = EventContext {
                set_id: Some(self.document.set_id),
                volumes: volumes.clone(),
                backup_type: self.document.backup_type,
                context: self.document.context,
                components,
            };
            let deadline = Instant::now() + self.coord.timeouts.event;
            if let Err(e) = self.coord.call(idx, phase, deadline, &ctx, false, event) {
                self.coord
                    .set_status(idx, WriterState::FailedAt(phase), Some((phase, e.clone())));
                failed.push((idx, e));
            }
        }
        failed
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
                Err(e) => self.coord.set_status(
                    idx,
                    WriterState::FailedAt(Phase::Identify),
                    Some((Phase::Identify, e)),
                ),
            }
        }
        self.state = RestoreState::MetadataGathered;
        Ok(out)
    }

    pub fn select_for_restore(&mut self, full_path: &str) -> VssResult {
        self.expect("select_for_restore", RestoreState::MetadataGathered)?;
        if self.entry(full_path).is_none() {
            return Err(VssError::Invalid(format!(
                "the backup has no component {full_path}"
            )));
        }
        if !self.selected.iter().any(|p| p == full_path) {
            self.selected.push(full_path.to_string());
        }
        Ok(())
    }

    /// Restores a selected component into directory `dir` (one image file
    /// per volume, named as the volume) instead of over its volumes (VSS:
    /// an alternate location mapping).
    pub fn set_alternate_location(&mut self, full_path: &str, dir: &Path) -> VssResult {
        self.expect("set_alternate_location", RestoreState::MetadataGathered)?;
        if !self.selected.iter().any(|p| p == full_path) {
            return Err(VssError::Invalid(format!(
                "{full_path} is not selected for restore"
            )));
        }
        self.alternate.insert(full_path.to_string(), dir.to_owned());
        Ok(())
    }

    fn snapshot_for(&self, volume: &Path) -> VssResult<SnapshotRef> {
        self.document
            .snapshots
            .iter()
            .find(|s| s.volume == volume)
            .cloned()
            .ok_or_else(|| {
                VssError::Invalid(format!(
                    "the backup has no snapshot of {}",
                    volume.display()
                ))
            })
    }

    /// How each selected component comes back, or why it cannot.
    fn plan(&self) -> VssResult<Vec<(String, Plan)>> {
        let mut plans = Vec::new();
        for path in &self.selected {
            let Some(c) = self.entry(path) else { continue };
            let refuse = |why: String| {
                Err(VssError::Invalid(format!(
                    "component {path} cannot be restored: {why}; nothing was changed"
                )))
            };
            let snaps: Vec<SnapshotRef> = c
                .volumes
                .iter()
                .map(|v| self.snapshot_for(v))
                .collect::<VssResult<_>>()?;
            match c.restore_method {
                RestoreMethod::Custom | RestoreMethod::RestoreAtReboot => {
                    return refuse(format!(
                        "its writer asks for {:?}, which volshadow cannot carry out",
                        c.restore_method
                    ));
                }
                RestoreMethod::RestoreToAlternateLocation if !self.alternate.contains_key(path) => {
                    return refuse(
                        "its writer restores only to an alternate location; give one".into(),
                    );
                }
                RestoreMethod::RestoreIfNotThere => {
                    let here = self.writer_paths(c);
                    if let Some(p) = here.iter().find(|p| p.exists()) {
                        return refuse(format!(
                            "its writer restores only what is not there, and {} is",
                            p.display()
                        ));
                    }
                }
                _ => {}
            }
            if let Some(dir) = self.alternate.get(path) {
                for s in &snaps {
                    let target = alternate_target(dir, &s.volume);
                    if target.exists() {
                        return refuse(format!("{} already exists", target.display()));
                    }
                }
                plans.push((path.clone(), Plan::Alternate(dir.clone(), snaps)));
                continue;
            }
            // A whole-volume revert rolls back everything on the volume:
            // only when the components being restored own it.
            for v in &c.volumes {
                let others: Vec<&str> = self
                    .document
                    .components
                    .iter()
                    .filter(|o| o.volumes.contains(v) && !self.selected.contains(&o.full_path))
                    .map(|o| o.full_path.as_str())
                    .collect();
                if !others.is_empty() {
                    return refuse(format!(
                        "volume {} also holds {}; rolling it back would restore those too (select them as well, or restore to an alternate location)",
                        v.display(),
                        others.join(", ")
                    ));
                }
            }
            plans.push((path.clone(), Plan::Revert(snaps)));
        }
        Ok(plans)
    }

    /// The files the component's writer listed for it, from the document.
    fn writer_paths(&self, c: &ComponentEntry) -> Vec<PathBuf> {
        self.document
            .writers
            .iter()
            .filter(|m| m.writer_id == c.writer_id)
            .flat_map(|m| m.components.iter())
            .filter(|wc| wc.full_path() == c.full_path)
            .flat_map(|wc| wc.paths.clone())
            .collect()
    }

    pub fn pre_restore(&mut self) -> VssResult {
        self.expect("pre_restore", RestoreState::MetadataGathered)?;
        if self.selected.is_empty() {
            return Err(VssError::Invalid(
                "no component selected for restore".into(),
            ));
        }
        self.plan()?;
        if let Some((idx, e)) = self
            .call_each(Phase::PreRestore, |w, c| w.pre_restore(c))
            .into_iter()
            .next()
        {
            return Err(VssError::WriterFailed {
                writer: self.coord.name_of(idx),
                phase: Phase::PreRestore,
                failure: e,
            });
        }
        self.state = RestoreState::PreRestored;
        Ok(())
    }

    /// Brings the selected components back as planned and records each
    /// component's restore status.
    pub fn restore(&mut self) -> VssResult {
        self.expect("restore", RestoreState::PreRestored)?;
        let plans = self.plan()?;
        let mut reverted: HashMap<PathBuf, Result<(), String>> = HashMap::new();
        for (path, plan) in plans {
            let result = match plan {
                Plan::Revert(snaps) => snaps
                    .iter()
                    .map(|s| {
                        reverted
                            .entry(s.volume.clone())
                            .or_insert_with(|| self.revert(s))
                            .clone()
                    })
                    .collect::<Result<Vec<()>, String>>()
                    .map(|_| ()),
                Plan::Alternate(dir, snaps) => snaps
                    .iter()
                    .try_for_each(|s| self.copy_to(s, &alternate_target(&dir, &s.volume))),
            };
            if let Err(e) = &result {
                warn!(component = %path, error = %e, "restore failed");
            }
            if let Some(entry) = self
                .document
                .components
                .iter_mut()
                .find(|e| e.full_path == path)
            {
                entry.restore_succeeded = Some(result.is_ok());
            }
        }
        self.state = RestoreState::Restored;
        Ok(())
    }

    fn revert(&self, s: &SnapshotRef) -> Result<(), String> {
        let p = self.coord.provider_of(s).ok_or_else(|| {
            format!(
                "provider {} ({}) is not available",
                s.provider, s.provider_id
            )
        })?;
        p.revert(s).map_err(|e| e.0)
    }

    /// Writes the snapshot's contents to a new file `target`, a bounded
    /// piece at a time.
    fn copy_to(&self, s: &SnapshotRef, target: &Path) -> Result<(), String> {
        let dev = self.coord.open(s).map_err(|e| e.to_string())?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        let mut buf = vec![0u8; COPY_CHUNK];
        let len = dev.len();
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(COPY_CHUNK as u64) as usize;
            dev.read_at(&mut buf[..n], at)
                .map_err(|e| format!("reading {} at {at}: {e}", s.snapshot_id))?;
            out.write_all(&buf[..n])
                .map_err(|e| format!("writing {}: {e}", target.display()))?;
            at += n as u64;
        }
        out.sync_all()
            .map_err(|e| format!("writing {}: {e}", target.display()))
    }

    /// Tells writers the restore is over; returns the document with each
    /// component's restore status.
    pub fn post_restore(&mut self) -> VssResult<BackupDocument> {
        self.expect("post_restore", RestoreState::Restored)?;
        for (idx, e) in self.call_each(Phase::PostRestore, |w, c| w.post_restore(c)) {
            warn!(writer = %self.coord.name_of(idx), error = %e, "post-restore failed");
        }
        self.state = RestoreState::Done;
        Ok(self.document.clone())
    }
}

/// Where a volume's image goes in an alternate location.
fn alternate_target(dir: &Path, volume: &Path) -> PathBuf {
    dir.join(volume.file_name().unwrap_or(volume.as_os_str()))
}
