//! Snapshot sets: one instant across several volumes, all or nothing.

use std::time::Duration;

use tracing::warn;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::types::{SnapshotInfo, SnapshotOptions};
use crate::volume::Volume;

/// VSS's write-hold limit.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(10);

/// Snapshots of several volumes taken at one instant.
#[derive(Debug, Clone)]
pub struct SnapshotSet {
    pub id: Uuid,
    /// One per volume, in the order the volumes were given.
    pub snapshots: Vec<SnapshotInfo>,
}

impl SnapshotSet {
    /// Holds new writes on every volume, waits (at most `hold_timeout` in
    /// all) for in-flight writes to drain, snapshots each volume, releases.
    /// If any step fails, snapshots already made for the set are deleted
    /// and the error returned: there is no partial set.
    pub fn create(
        volumes: &[&Volume],
        options: SnapshotOptions,
        hold_timeout: Duration,
    ) -> Result<Self> {
        if volumes.is_empty() {
            return Err(Error::InvalidOptions(
                "a snapshot set needs at least one volume".into(),
            ));
        }
        for (i, v) in volumes.iter().enumerate() {
            if volumes[..i].iter().any(|w| w.id() == v.id()) {
                return Err(Error::InvalidOptions(format!(
                    "volume {} is in the set twice",
                    v.id()
                )));
            }
        }
        let id = Uuid::new_v4();
        let options = SnapshotOptions {
            set_id: Some(id),
            ..options
        };
        let deadline = std::time::Instant::now() + hold_timeout;
        let mut held = Vec::with_capacity(volumes.len());
        for v in volumes {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            held.push(v.hold(left)?);
        }
        let mut made: Vec<SnapshotInfo> = Vec::with_capacity(volumes.len());
        for (v, closed) in volumes.iter().zip(&held) {
            match v.inner.create_held(closed, &options) {
                Ok(info) => made.push(info),
                Err(e) => {
                    for ((w, c), info) in volumes.iter().zip(&held).zip(&made) {
                        if let Err(del) = w.inner.delete_held(c, info.seq) {
                            warn!(error = %del, snapshot = %info.id, "could not delete a snapshot of a failed set");
                        }
                    }
                    return Err(e);
                }
            }
        }
        drop(held);
        Ok(SnapshotSet {
            id,
            snapshots: made,
        })
    }
}
