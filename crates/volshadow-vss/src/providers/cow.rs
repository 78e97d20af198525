//! The system provider: this engine's copy-on-write snapshots.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_cow::{SetMember, SnapshotOptions, SnapshotSet, Volume};

use crate::provider::{
    CommitOptions, PendingSets, Provider, ProviderError, ProviderResult, SnapshotRef,
};

/// A volume as the copy-on-write provider drives it: one opened in this
/// process ([`Volume`]), or one another process holds and answers for
/// (the command line's `serve` and `mount`), which the embedder
/// implements.
pub trait CowVolume: Send + Sync + std::fmt::Debug {
    /// The volume's part in a snapshot set.
    fn member(&self) -> volshadow_cow::Result<Box<dyn SetMember + '_>>;
    fn flush(&self) -> ProviderResult;
    /// Its snapshots: id and set id, oldest first.
    fn snapshots(&self) -> ProviderResult<Vec<(Uuid, Option<Uuid>)>>;
    fn delete_snapshot(&self, id: Uuid) -> ProviderResult;
    fn revert(&self, id: Uuid) -> ProviderResult;
    /// The snapshot's contents, read-only.
    fn open(&self, id: Uuid) -> ProviderResult<Box<dyn BlockDevice>>;
}

impl CowVolume for Volume {
    fn member(&self) -> volshadow_cow::Result<Box<dyn SetMember + '_>> {
        Ok(Box::new(self.set_member()))
    }

    fn flush(&self) -> ProviderResult {
        Ok(BlockDevice::flush(self)?)
    }

    fn snapshots(&self) -> ProviderResult<Vec<(Uuid, Option<Uuid>)>> {
        Ok(Volume::snapshots(self)
            .into_iter()
            .map(|s| (s.id, s.set_id))
            .collect())
    }

    fn delete_snapshot(&self, id: Uuid) -> ProviderResult {
        Ok(Volume::delete_snapshot(self, id)?)
    }

    fn revert(&self, id: Uuid) -> ProviderResult {
        Ok(Volume::revert(self, id)?)
    }

    fn open(&self, id: Uuid) -> ProviderResult<Box<dyn BlockDevice>> {
        Ok(Box::new(self.snapshot(id)?))
    }
}

/// The system provider: this engine's copy-on-write snapshots. The set id
/// the coordinator gives is the engine's set id, so `list shadows` and
/// the backup document agree.
#[derive(Debug, Default)]
pub struct CowProvider {
    volumes: Mutex<HashMap<PathBuf, Arc<dyn CowVolume>>>,
    sets: PendingSets,
}

impl CowProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `volume` (named by its origin path) available to this provider.
    pub fn add_volume(&self, path: impl Into<PathBuf>, volume: Volume) {
        self.add(path, Arc::new(volume));
    }

    /// Makes a volume reached some other way available to this provider.
    pub fn add(&self, path: impl Into<PathBuf>, volume: Arc<dyn CowVolume>) {
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.into(), volume);
    }

    fn volume(&self, path: &Path) -> ProviderResult<Arc<dyn CowVolume>> {
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
        let vols: Vec<Arc<dyn CowVolume>> = paths
            .iter()
            .map(|p| self.volume(p))
            .collect::<Result<_, _>>()?;
        let mut members: Vec<Box<dyn SetMember + '_>> =
            vols.iter().map(|v| v.member()).collect::<Result<_, _>>()?;
        let mut refs: Vec<&mut dyn SetMember> = members
            .iter_mut()
            .map(|m| m.as_mut() as &mut dyn SetMember)
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
        self.volume(&snapshot.volume)?.open(snapshot.snapshot_id)
    }

    fn query(&self) -> Vec<SnapshotRef> {
        let vols = self.volumes.lock().unwrap_or_else(PoisonError::into_inner);
        vols.iter()
            .flat_map(|(p, v)| {
                // A volume that cannot be asked (its server went) lists none.
                v.snapshots()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |(id, set)| self.snapshot_ref(p, id, set.unwrap_or_default()))
            })
            .collect()
    }
}
