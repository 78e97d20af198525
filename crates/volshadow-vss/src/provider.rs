//! Providers: what actually makes a snapshot of a volume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volshadow_block::BlockDevice;

/// A snapshot a provider made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub volume: PathBuf,
    pub snapshot_id: Uuid,
    pub set_id: Uuid,
    /// The provider's name, for people; `provider_id` is what finds it.
    pub provider: String,
    /// The provider's [`Provider::id`] (nil in documents written before it
    /// was recorded: those are matched by name).
    #[serde(default)]
    pub provider_id: Uuid,
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
    /// Longest time writes may be held, from the hold to its release
    /// (VSS: 10 s).
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
/// // Writes stay held while the closure runs: the coordinator commits
/// // the set's other providers there, so the whole set is one instant.
/// let made = provider.commit(set, &options, &mut || Ok(()))?;
/// provider.post_commit(set)?;
///
/// assert_eq!(made[0].set_id, set);
/// assert_eq!(volume.snapshots()[0].id, made[0].snapshot_id);
/// # Ok(())
/// # }
/// ```
pub trait Provider: Send + Sync {
    fn name(&self) -> &str;
    /// What identifies the provider: documents and the coordinator find a
    /// provider by this, never by its name.
    fn id(&self) -> Uuid;
    /// "software" or "system", as `vssadmin list providers` shows.
    fn kind(&self) -> &str;
    fn is_volume_supported(&self, volume: &Path) -> bool;
    fn begin_prepare_snapshot(&self, set_id: Uuid, volume: &Path) -> ProviderResult;
    fn end_prepare_snapshot(&self, set_id: Uuid) -> ProviderResult;
    /// Readies the commit (flushes what can be flushed before writes are
    /// held).
    fn pre_commit(&self, set_id: Uuid) -> ProviderResult;
    /// Hold, commit, release: holds writes on every volume of the set
    /// (in-flight writes drained), takes the snapshots, then calls
    /// `while_held` with writes still held (the coordinator commits the
    /// set's other providers there, so the set is one instant), and
    /// releases only after it returns. If anything fails, `while_held`
    /// included, or the hold outlasts `options.hold_timeout`, the
    /// snapshots are deleted before writes are released: all or nothing.
    fn commit(
        &self,
        set_id: Uuid,
        options: &CommitOptions,
        while_held: &mut dyn FnMut() -> ProviderResult,
    ) -> ProviderResult<Vec<SnapshotRef>>;
    /// Writes are released; the set is done.
    fn post_commit(&self, set_id: Uuid) -> ProviderResult;
    /// Forgets a set that was not committed.
    fn abort(&self, set_id: Uuid) -> ProviderResult;
    fn delete(&self, snapshot: &SnapshotRef) -> ProviderResult;
    /// Rolls the volume back to the snapshot.
    fn revert(&self, snapshot: &SnapshotRef) -> ProviderResult;
    /// The snapshot's contents, read-only: a requester reads a snapshot
    /// without knowing which provider made it.
    fn open(&self, snapshot: &SnapshotRef) -> ProviderResult<Box<dyn BlockDevice>>;
    /// Snapshots this provider holds.
    fn query(&self) -> Vec<SnapshotRef>;
}

/// Volumes of the sets being prepared, by set id: what a provider keeps
/// between the coordinator's calls.
#[derive(Debug, Default)]
pub(crate) struct PendingSets(Mutex<HashMap<Uuid, Vec<PathBuf>>>);

impl PendingSets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<PathBuf>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn add_volume(&self, set: Uuid, volume: &Path) {
        self.lock().entry(set).or_default().push(volume.to_owned());
    }

    pub(crate) fn volumes(&self, set: Uuid) -> Vec<PathBuf> {
        self.lock().get(&set).cloned().unwrap_or_default()
    }

    pub(crate) fn forget(&self, set: Uuid) {
        self.lock().remove(&set);
    }
}
