//! A software provider for image files on btrfs or xfs.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use uuid::Uuid;
use volshadow_block::{BlockDevice, FileImage};

use crate::provider::{
    CommitOptions, PendingSets, Provider, ProviderError, ProviderResult, SnapshotRef,
};

/// A software provider for image files on btrfs or xfs: a snapshot is a
/// reflink copy (`FICLONE`) beside the image, sharing its extents. It owns
/// no write path, so the instant is the writers' freeze, and the other
/// providers of the set hold their writes while it copies.
#[derive(Debug, Default)]
pub struct ReflinkProvider {
    sets: PendingSets,
    made: Mutex<Vec<SnapshotRef>>,
}

impl ReflinkProvider {
    pub fn new() -> Self {
        Self::default()
    }

    fn copy_path(volume: &Path, id: Uuid) -> PathBuf {
        let mut s = volume.as_os_str().to_owned();
        s.push(format!(".reflink-{id}"));
        PathBuf::from(s)
    }

    fn remove_copies(made: &[SnapshotRef]) {
        for m in made {
            if let Some(loc) = &m.location {
                let _ = std::fs::remove_file(loc);
            }
        }
    }
}

impl Provider for ReflinkProvider {
    fn name(&self) -> &str {
        "volshadow reflink provider"
    }

    fn id(&self) -> Uuid {
        Uuid::from_u128(0x7673_6861_646f_7700_0000_0000_0000_0002)
    }

    fn kind(&self) -> &str {
        "software"
    }

    /// Supported when a reflink of the image can be made: tried once with a
    /// throw-away copy in the same directory.
    fn is_volume_supported(&self, volume: &Path) -> bool {
        if !volume.is_file() {
            return false;
        }
        let probe = Self::copy_path(volume, Uuid::new_v4());
        let ok = volshadow_block::reflink_file(volume, &probe).is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    }

    fn begin_prepare_snapshot(&self, set_id: Uuid, volume: &Path) -> ProviderResult {
        self.sets.add_volume(set_id, volume);
        Ok(())
    }

    fn end_prepare_snapshot(&self, _set_id: Uuid) -> ProviderResult {
        Ok(())
    }

    fn pre_commit(&self, _set_id: Uuid) -> ProviderResult {
        Ok(())
    }

    fn commit(
        &self,
        set_id: Uuid,
        _options: &CommitOptions,
        while_held: &mut dyn FnMut() -> ProviderResult,
    ) -> ProviderResult<Vec<SnapshotRef>> {
        let mut made = Vec::new();
        for v in self.sets.volumes(set_id) {
            let id = Uuid::new_v4();
            let copy = Self::copy_path(&v, id);
            if let Err(e) = volshadow_block::reflink_file(&v, &copy) {
                Self::remove_copies(&made);
                return Err(e.into());
            }
            made.push(SnapshotRef {
                volume: v,
                snapshot_id: id,
                set_id,
                provider: self.name().to_string(),
                provider_id: self.id(),
                location: Some(copy),
            });
        }
        if let Err(e) = while_held() {
            Self::remove_copies(&made);
            return Err(e);
        }
        self.made
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(made.iter().cloned());
        Ok(made)
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
        if let Some(loc) = &snapshot.location {
            std::fs::remove_file(loc)
                .map_err(|e| ProviderError(format!("cannot delete {}: {e}", loc.display())))?;
        }
        self.made
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|m| m.snapshot_id != snapshot.snapshot_id);
        Ok(())
    }

    fn revert(&self, snapshot: &SnapshotRef) -> ProviderResult {
        let loc = snapshot
            .location
            .as_ref()
            .ok_or_else(|| ProviderError("reflink snapshot without a location".into()))?;
        let tmp = Self::copy_path(&snapshot.volume, Uuid::new_v4());
        volshadow_block::reflink_file(loc, &tmp)?;
        std::fs::rename(&tmp, &snapshot.volume).map_err(|e| {
            ProviderError(format!("cannot replace {}: {e}", snapshot.volume.display()))
        })
    }

    fn open(&self, snapshot: &SnapshotRef) -> ProviderResult<Box<dyn BlockDevice>> {
        let loc = snapshot
            .location
            .as_ref()
            .ok_or_else(|| ProviderError("reflink snapshot without a location".into()))?;
        Ok(Box::new(FileImage::open_read_only(loc)?))
    }

    /// The copies this provider made (in this process) that are still there.
    fn query(&self) -> Vec<SnapshotRef> {
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        made.retain(|m| m.location.as_ref().is_some_and(|l| l.exists()));
        made.clone()
    }
}
