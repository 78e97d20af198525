//! Snapshot sets: one instant across several volumes, all or nothing, also
//! across a crash.
//!
//! A persistent set commits in two phases with the first volume as its
//! decider. With every volume's writes held: (1) every other member
//! journals its snapshot *in doubt*, with the list of members, and
//! flushes; (2) the decider journals its snapshot and flushes: that is the
//! commit point; (3) the others journal the commit. A crash before (2)
//! leaves no snapshot on the decider; after it, one. So a member that
//! reopens with a snapshot in doubt learns the outcome from the decider
//! ([`SnapshotSet::resolve`]); until then the snapshot is hidden.
//! Non-persistent sets need none of this: recovery drops them anyway.

use std::time::Duration;

use tracing::warn;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::types::{SnapshotInfo, SnapshotOptions};
use crate::volume::Volume;

/// VSS's write-hold limit.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(10);

/// Most members a set may have, and the longest locator of one.
const MAX_MEMBERS: usize = 64;
const MAX_LOCATOR: usize = 4096;

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
        Self::create_located(volumes, &[], options, hold_timeout)
    }

    /// `create`, recording with each member where every member can be
    /// found (`locators[i]` for `volumes[i]`, e.g. its image path), so a
    /// member reopened after a crash can find the decider to resolve.
    pub fn create_located(
        volumes: &[&Volume],
        locators: &[String],
        options: SnapshotOptions,
        hold_timeout: Duration,
    ) -> Result<Self> {
        if volumes.is_empty() {
            return Err(Error::InvalidOptions(
                "a snapshot set needs at least one volume".into(),
            ));
        }
        if volumes.len() > MAX_MEMBERS || locators.iter().any(|l| l.len() > MAX_LOCATOR) {
            return Err(Error::InvalidOptions(format!(
                "a snapshot set takes at most {MAX_MEMBERS} volumes, each locator at most {MAX_LOCATOR} bytes"
            )));
        }
        for (i, v) in volumes.iter().enumerate() {
            if volumes[..i].iter().any(|w| w.id() == v.id()) {
                return Err(Error::InvalidOptions(format!(
                    "volume {} is in the set twice",
                    v.id()
                )));
            }
        }
        let id = options.set_id.unwrap_or_else(Uuid::new_v4);
        let options = SnapshotOptions {
            set_id: Some(id),
            ..options
        };
        let members: Vec<(Uuid, String)> = volumes
            .iter()
            .enumerate()
            .map(|(i, v)| (v.id(), locators.get(i).cloned().unwrap_or_default()))
            .collect();
        let deadline = std::time::Instant::now() + hold_timeout;
        let mut held = Vec::with_capacity(volumes.len());
        for v in volumes {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            held.push(v.hold(left)?);
        }
        let two_phase = options.persistent && volumes.len() > 1;
        let mut made: Vec<Option<SnapshotInfo>> = vec![None; volumes.len()];
        let abandon = |made: &[Option<SnapshotInfo>], e: Error| -> Error {
            for ((w, c), info) in volumes.iter().zip(&held).zip(made) {
                if let Some(info) = info
                    && let Err(del) = w.inner.delete_held(c, info.seq)
                {
                    warn!(error = %del, snapshot = %info.id, "could not delete a snapshot of a failed set");
                }
            }
            e
        };
        // Phase one: the members other than the decider, in doubt.
        for i in 1..volumes.len() {
            let pending = two_phase.then_some((id, &members[..]));
            match volumes[i].inner.create_held(&held[i], &options, pending) {
                Ok(info) => made[i] = Some(info),
                Err(e) => return Err(abandon(&made, e)),
            }
        }
        // Phase two: the decider; its snapshot existing is the commit.
        match volumes[0].inner.create_held(&held[0], &options, None) {
            Ok(info) => made[0] = Some(info),
            Err(e) => return Err(abandon(&made, e)),
        }
        // Phase three: the others learn the outcome. A failure here leaves
        // a member in doubt, which `resolve` settles as committed.
        if two_phase {
            for i in 1..volumes.len() {
                if let Some(info) = &made[i]
                    && let Err(e) = volumes[i].inner.commit_held(&held[i], info.seq)
                {
                    warn!(error = %e, volume = %volumes[i].id(), "set committed, but a member could not record it; it resolves at its next open");
                }
            }
        }
        drop(held);
        Ok(SnapshotSet {
            id,
            snapshots: made.into_iter().flatten().collect(),
        })
    }

    /// Settles every snapshot in doubt on `volumes` whose set's decider is
    /// among them: kept if the decider has its snapshot of the set (the
    /// set committed), deleted otherwise. Returns the sets settled, each
    /// with its outcome. Sets whose decider is not given stay in doubt.
    pub fn resolve(volumes: &[&Volume]) -> Result<Vec<(Uuid, bool)>> {
        let mut settled = Vec::new();
        for v in volumes {
            for d in v.in_doubt_sets() {
                let Some((decider, _)) = d.members.first() else {
                    continue;
                };
                let Some(dv) = volumes.iter().find(|w| w.id() == *decider) else {
                    continue;
                };
                let committed = Self::committed_on(dv, d.set_id);
                v.resolve_in_doubt(d.set_id, committed)?;
                settled.push((d.set_id, committed));
            }
        }
        Ok(settled)
    }

    /// True if `decider` has its snapshot of set `set_id`: the set
    /// committed.
    pub fn committed_on(decider: &Volume, set_id: Uuid) -> bool {
        decider.snapshots().iter().any(|s| s.set_id == Some(set_id))
    }
}
