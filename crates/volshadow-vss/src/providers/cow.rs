//! The system provider: this engine's copy-on-write snapshots.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_cow::{LocalMember, SetMember, SnapshotOptions, SnapshotSet, Volume};

use crate::provider::{
    CommitOptions, PendingSets, Provider, ProviderError, ProviderResult, SnapshotRef,
};

/// The system provider: this engine's copy-on-write snapshots. The set id
/// the coordinator gives is the engine's set id, so `list shadows` and
/// the backup document agree.
#[derive(Debug, Default)]
pub struct CowProvider {
    volumes: Mutex<HashMap<PathBuf, Volume>>,
    sets: PendingSets,
}

impl CowProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `volume` (named by its origin path) available to this provider.
    pub fn add_volume(&self, path: impl Into<PathBuf>, volume: Volume) {
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.into(), volume);
    }

    fn volume(&self, path: &Path) -> ProviderResult<Volume> {
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(path)
            .cloned()
            .ok_or_else(|| {
                ProviderError(format!(
                    "{} is not a volume of this provider",
                    path.display()
                ))
            })
    }

    fn snapshot_ref(&self, volume: &Path, id: Uuid, set_id: Uuid) -> SnapshotRef {
        SnapshotRef {
            volume: volume.to_owned(),
            snapshot_id: id,
            set_id,
            provider: self.name().to_string(),
            provider_id: self.id(),
            location: None,
        }
    }
}

impl Provider for CowProvider {
    fn name(&self) -> &str {
        "volshadow copy-on-write provider"
    }

    fn id(&self) -> Uuid {
        Uuid::from_u128(0x7673_6861_646f_7700_0000_0000_0000_0001)
    }

    fn kind(&self) -> &str {
        "system"
    }

    fn is_volume_supported(&self, volume: &Path) -> bool {
        self.volume(volume).is_ok()
    }

    fn begin_prepare_snapshot(&self, set_id: Uuid, volume: &Path) -> ProviderResult {
        self.volume(volume)?;
        self.sets.add_volume(set_id, volume);
        Ok(())
    }

    fn end_prepare_snapshot(&self, _set_id: Uuid) -> ProviderResult {
        Ok(())
    }

    /// Flushes before the hold, so the flush inside it has little to do.
    fn pre_commit(&self, set_id: Uuid) -> ProviderResult {
        for v in self.sets.volumes(set_id) {
            self.volume(&v)?.flush()?;
        }
        Ok(())
    }

    fn commit(
        &self,
        set_id: Uuid,
        options: &CommitOptions,
        while_held: &mut dyn FnMut() -> ProviderResult,
    ) -> ProviderResult<Vec<SnapshotRef>> {
        let paths = self.sets.volumes(set_id);
        let vols: Vec<Volume> = paths
            .iter()
            .map(|p| self.volume(p))
            .collect::<Result<_, _>>()?;
        let mut members: Vec<LocalMember<'_>> = vols.iter().map(|v| v.set_member()).collect();
        let mut refs: Vec<&mut dyn SetMember> = members
            .iter_mut()
            .map(|m| m as &mut dyn SetMember)
            .collect();
        // Members find each other by path after a crash (set resolution).
        let locators: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let set = SnapshotSet::create_across_then(
            &mut refs,
            &locators,
            SnapshotOptions {
                persistent: options.persistent,
                attributes: options.attributes,
                set_id: Some(set_id),
            },
            options.hold_timeout,
            |_| while_held(),
        )?;
        Ok(paths
            .iter()
            .zip(&set.snapshots)
            .map(|(p, s)| self.snapshot_ref(p, s.id, set.id))
            .collect())
    }

    fn post_commit(&self, set_id: Uuid) -> ProviderResult {
        self.sets.forget(set_id);
        Ok(())
    }

    fn abort(&self, set_id: Uuid) -> ProviderResult {
        self.sets.forget(set_id);
        Ok(())
    }

    fn delete(&self, snapshot: &SnapshotRef) -> ProviderResult {
        self.volume(&snapshot.volume)?
            .delete_snapshot(snapshot.snapshot_id)?;
        Ok(())
    }

    fn revert(&self, snapshot: &SnapshotRef) -> ProviderResult {
        self.volume(&snapshot.volume)?
            .revert(snapshot.snapshot_id)?;
        Ok(())
    }

    fn open(&self, snapshot: &SnapshotRef) -> ProviderResult<Box<dyn BlockDevice>> {
        let view = self
            .volume(&snapshot.volume)?
            .snapshot(snapshot.snapshot_id)?;
        Ok(Box::new(view))
    }

    fn query(&self) -> Vec<SnapshotRef> {
        let vols = self.volumes.lock().unwrap_or_else(PoisonError::into_inner);
        vols.iter()
            .flat_map(|(p, v)| {
                v.snapshots()
                    .into_iter()
                    .map(move |s| self.snapshot_ref(p, s.id, s.set_id.unwrap_or_default()))
            })
            .collect()
    }
}
