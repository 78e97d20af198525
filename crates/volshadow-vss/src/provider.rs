//! Providers: what actually makes a snapshot of a volume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volshadow_cow::{SnapshotOptions, SnapshotSet, Volume};

/// A snapshot a provider made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub volume: PathBuf,
    pub snapshot_id: Uuid,
    pub set_id: Uuid,
    pub provider: String,
    /// Where a provider keeps a file-level copy (reflink), if it does.
    pub location: Option<PathBuf>,
}

/// A provider's failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ProviderError(pub String);

impl From<volshadow_cow::Error> for ProviderError {
    fn from(e: volshadow_cow::Error) -> Self {
        ProviderError(e.to_string())
    }
}

impl From<volshadow_block::Error> for ProviderError {
    fn from(e: volshadow_block::Error) -> Self {
        ProviderError(e.to_string())
    }
}

pub type ProviderResult<T = ()> = Result<T, ProviderError>;

/// How a snapshot set should be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOptions {
    pub persistent: bool,
    pub attributes: u32,
    /// Longest time writes may be held (VSS: 10 s).
    pub hold_timeout: Duration,
}

/// A provider, as the coordinator drives it (VSS's provider interface).
/// A set is prepared volume by volume, then committed as one.
///
/// The coordinator calls, per set: `begin_prepare_snapshot` for each
/// volume, `end_prepare_snapshot`, (writers freeze) `pre_commit`,
/// `commit` (writes held only inside it), `post_commit`; `abort` on any
/// failure. Implement it for storage that snapshots by other means (an
/// array's hardware snapshots, say) and register it with
/// [`Coordinator::add_provider`](crate::Coordinator::add_provider).
///
/// # Example
///
/// Driving the engine's own provider by hand, as the coordinator does:
///
/// ```
/// use std::path::Path;
/// use std::sync::Arc;
/// use std::time::Duration;
/// use uuid::Uuid;
/// use volshadow_block::MemDevice;
/// use volshadow_cow::{Volume, VolumeOptions};
/// use volshadow_vss::{CommitOptions, CowProvider, Provider};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let volume = Volume::create(
///     Arc::new(MemDevice::new(1 << 20)),
///     Arc::new(MemDevice::new(8 << 20)),
///     VolumeOptions::default(),
/// )?;
/// let provider = CowProvider::new();
/// provider.add_volume("data.img", volume.clone());
///
/// let set = Uuid::new_v4();
/// provider.begin_prepare_snapshot(set, Path::new("data.img"))?;
/// provider.end_prepare_snapshot(set)?;
/// provider.pre_commit(set)?;
/// let options = CommitOptions {
///     persistent: true,
///     attributes: 0,
///     hold_timeout: Duration::from_secs(10),
/// };
/// provider.commit(set, &options)?;
/// let made = provider.post_commit(set)?;
///
/// assert_eq!(made[0].set_id, set);
/// assert_eq!(volume.snapshots()[0].id, made[0].snapshot_id);
/// # Ok(())
/// # }
/// ```
pub trait Provider: Send + Sync {
    fn name(&self) -> &str;
    fn id(&self) -> Uuid;
    /// "software" or "system", as `vssadmin list providers` shows.
    fn kind(&self) -> &str;
    fn is_volume_supported(&self, volume: &Path) -> bool;
    fn begin_prepare_snapshot(&self, set_id: Uuid, volume: &Path) -> ProviderResult;
    fn end_prepare_snapshot(&self, set_id: Uuid) -> ProviderResult;
    fn pre_commit(&self, set_id: Uuid) -> ProviderResult;
    /// Holds writes on every volume of the set (bounded by
    /// `hold_timeout`), takes the snapshots, releases. All or nothing.
    fn commit(&self, set_id: Uuid, options: &CommitOptions) -> ProviderResult;
    fn post_commit(&self, set_id: Uuid) -> ProviderResult<Vec<SnapshotRef>>;
    /// Forgets the set, deleting whatever it made.
    fn abort(&self, set_id: Uuid) -> ProviderResult;
    fn delete(&self, snapshot: &SnapshotRef) -> ProviderResult;
    /// Rolls the volume back to the snapshot.
    fn revert(&self, snapshot: &SnapshotRef) -> ProviderResult;
    /// Snapshots this provider holds.
    fn query(&self) -> Vec<SnapshotRef>;
}

#[derive(Debug, Default)]
struct Pending {
    volumes: Vec<PathBuf>,
    made: Vec<SnapshotRef>,
}

/// Sets being prepared or committed, by set id: what both providers keep
/// between the coordinator's calls.
#[derive(Debug, Default)]
struct PendingSets(Mutex<HashMap<Uuid, Pending>>);

impl PendingSets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Pending>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add_volume(&self, set: Uuid, volume: &Path) {
        self.lock()
            .entry(set)
            .or_default()
            .volumes
            .push(volume.to_owned());
    }

    fn volumes(&self, set: Uuid) -> Vec<PathBuf> {
        self.lock()
            .get(&set)
            .map(|p| p.volumes.clone())
            .unwrap_or_default()
    }

    fn set_made(&self, set: Uuid, made: Vec<SnapshotRef>) {
        if let Some(p) = self.lock().get_mut(&set) {
            p.made = made;
        }
    }

    /// Forgets the set; returns what its commit made.
    fn take(&self, set: Uuid) -> Vec<SnapshotRef> {
        self.lock().remove(&set).map(|p| p.made).unwrap_or_default()
    }
}

/// The system provider: this engine's copy-on-write snapshots.
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

    fn pre_commit(&self, set_id: Uuid) -> ProviderResult {
        let volumes = self.sets.volumes(set_id);
        for v in volumes {
            volshadow_block::BlockDevice::flush(&self.volume(&v)?)?;
        }
        Ok(())
    }

    fn commit(&self, set_id: Uuid, options: &CommitOptions) -> ProviderResult {
        let paths = self.sets.volumes(set_id);
        let vols: Vec<Volume> = paths
            .iter()
            .map(|p| self.volume(p))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&Volume> = vols.iter().collect();
        let set = SnapshotSet::create(
            &refs,
            SnapshotOptions {
                persistent: options.persistent,
                attributes: options.attributes,
                set_id: None,
            },
            options.hold_timeout,
        )?;
        let made = paths
            .iter()
            .zip(&set.snapshots)
            .map(|(p, s)| SnapshotRef {
                volume: p.clone(),
                snapshot_id: s.id,
                set_id,
                provider: self.name().to_string(),
                location: None,
            })
            .collect();
        self.sets.set_made(set_id, made);
        Ok(())
    }

    fn post_commit(&self, set_id: Uuid) -> ProviderResult<Vec<SnapshotRef>> {
        Ok(self.sets.take(set_id))
    }

    fn abort(&self, set_id: Uuid) -> ProviderResult {
        let made = self.sets.take(set_id);
        for s in made {
            self.delete(&s)?;
        }
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

    fn query(&self) -> Vec<SnapshotRef> {
        let vols = self.volumes.lock().unwrap_or_else(PoisonError::into_inner);
        vols.iter()
            .flat_map(|(p, v)| {
                v.snapshots().into_iter().map(move |s| SnapshotRef {
                    volume: p.clone(),
                    snapshot_id: s.id,
                    set_id: s.set_id.unwrap_or_default(),
                    provider: self.name().to_string(),
                    location: None,
                })
            })
            .collect()
    }
}

/// A software provider for image files on btrfs or xfs: a snapshot is a
/// reflink copy (`FICLONE`) beside the image, sharing its extents. It owns
/// no write path, so "holding writes" is the writers' freeze.
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

    fn commit(&self, set_id: Uuid, _options: &CommitOptions) -> ProviderResult {
        let volumes = self.sets.volumes(set_id);
        let mut made = Vec::new();
        for v in volumes {
            let id = Uuid::new_v4();
            let copy = Self::copy_path(&v, id);
            if let Err(e) = volshadow_block::reflink_file(&v, &copy) {
                for m in &made {
                    let _ = self.delete(m);
                }
                return Err(e.into());
            }
            made.push(SnapshotRef {
                volume: v,
                snapshot_id: id,
                set_id,
                provider: self.name().to_string(),
                location: Some(copy),
            });
        }
        self.sets.set_made(set_id, made);
        Ok(())
    }

    fn post_commit(&self, set_id: Uuid) -> ProviderResult<Vec<SnapshotRef>> {
        let made = self.sets.take(set_id);
        self.made
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(made.iter().cloned());
        Ok(made)
    }

    fn abort(&self, set_id: Uuid) -> ProviderResult {
        let made = self.sets.take(set_id);
        for m in &made {
            self.delete(m)?;
        }
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

    fn query(&self) -> Vec<SnapshotRef> {
        self.made
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
