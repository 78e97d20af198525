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

use std::time::{Duration, Instant};

use tracing::warn;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::gate::Closed;
use crate::types::{SnapshotInfo, SnapshotOptions};
use crate::volume::Volume;

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
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use volshadow_block::MemDevice;
    /// use volshadow_cow::{DEFAULT_HOLD_TIMEOUT, SnapshotOptions, SnapshotSet, Volume, VolumeOptions};
    ///
    /// let make = || {
    ///     Volume::create(
    ///         Arc::new(MemDevice::new(1 << 20)),
    ///         Arc::new(MemDevice::new(8 << 20)),
    ///         VolumeOptions::default(),
    ///     )
    /// };
    /// let (data, log) = (make()?, make()?);
    /// let options = SnapshotOptions { persistent: true, ..Default::default() };
    /// let set = SnapshotSet::create(&[&data, &log], options, DEFAULT_HOLD_TIMEOUT)?;
    /// assert_eq!(set.snapshots.len(), 2);
    /// assert_eq!(data.snapshots()[0].set_id, Some(set.id));
    /// assert_eq!(log.snapshots()[0].set_id, Some(set.id));
    /// # Ok::<(), volshadow_cow::Error>(())
    /// ```
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
        let mut members: Vec<LocalMember<'_>> = volumes.iter().map(|v| v.set_member()).collect();
        let mut refs: Vec<&mut dyn SetMember> = members
            .iter_mut()
            .map(|m| m as &mut dyn SetMember)
            .collect();
        Self::create_across(&mut refs, locators, options, hold_timeout)
    }

    /// The set protocol over any members: volumes opened here
    /// ([`Volume::set_member`]) or held by other processes (a server's
    /// member speaks for its volume). `members[0]` decides. The hold
    /// timeout bounds everything from the first hold to the decider's
    /// snapshot: past it, the set is abandoned and nothing is left.
    pub fn create_across(
        members: &mut [&mut dyn SetMember],
        locators: &[String],
        options: SnapshotOptions,
        hold_timeout: Duration,
    ) -> Result<Self> {
        Self::create_across_then(members, locators, options, hold_timeout, |_| Ok(()))
    }

    /// `create_across`, running `while_held` once the set has committed
    /// and before writes are released: a caller that snapshots other
    /// storage at the same instant (a VSS coordinator committing several
    /// providers) does it there. If `while_held` fails, the set's
    /// snapshots are deleted before writes are released and its error is
    /// returned.
    pub fn create_across_then<E: From<Error>>(
        members: &mut [&mut dyn SetMember],
        locators: &[String],
        options: SnapshotOptions,
        hold_timeout: Duration,
        while_held: impl FnOnce(&SnapshotSet) -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, E> {
        if members.is_empty() {
            return Err(
                Error::InvalidOptions("a snapshot set needs at least one volume".into()).into(),
            );
        }
        if members.len() > MAX_MEMBERS || locators.iter().any(|l| l.len() > MAX_LOCATOR) {
            return Err(Error::InvalidOptions(format!(
                "a snapshot set takes at most {MAX_MEMBERS} volumes, each locator at most {MAX_LOCATOR} bytes"
            ))
            .into());
        }
        let ids: Vec<Uuid> = members.iter().map(|m| m.volume_id()).collect();
        for (i, v) in ids.iter().enumerate() {
            if ids[..i].contains(v) {
                return Err(
                    Error::InvalidOptions(format!("volume {v} is in the set twice")).into(),
                );
            }
        }
        let id = options.set_id.unwrap_or_else(Uuid::new_v4);
        let options = SnapshotOptions {
            set_id: Some(id),
            ..options
        };
        let roster: Vec<(Uuid, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, v)| (*v, locators.get(i).cloned().unwrap_or_default()))
            .collect();
        let deadline = Instant::now() + hold_timeout;
        let outcome = match Self::run_phases(members, &roster, &options, hold_timeout, deadline) {
            Ok(snapshots) => {
                let set = SnapshotSet { id, snapshots };
                match while_held(&set) {
                    Ok(()) => Ok(set),
                    Err(e) => {
                        // Every member made its snapshot, in member order.
                        for (m, info) in members.iter_mut().zip(&set.snapshots) {
                            if let Err(del) = m.abandon(info.seq) {
                                warn!(error = %del, snapshot = %info.id, "could not delete a snapshot of an abandoned set");
                            }
                        }
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e.into()),
        };
        for m in members.iter_mut() {
            m.release();
        }
        outcome
    }

    /// Holds every member, then the two phases; on failure, deletes what
    /// was made. Members stay held: the caller releases them.
    fn run_phases(
        members: &mut [&mut dyn SetMember],
        roster: &[(Uuid, String)],
        options: &SnapshotOptions,
        hold_timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<SnapshotInfo>> {
        let set_id = options.set_id.unwrap_or_default();
        for m in members.iter_mut() {
            m.hold(set_id, deadline.saturating_duration_since(Instant::now()))?;
        }
        let two_phase = options.persistent && members.len() > 1;
        let mut made: Vec<Option<SnapshotInfo>> = vec![None; members.len()];
        let abandon = |members: &mut [&mut dyn SetMember], made: &[Option<SnapshotInfo>], e| {
            for (m, info) in members.iter_mut().zip(made) {
                if let Some(info) = info
                    && let Err(del) = m.abandon(info.seq)
                {
                    warn!(error = %del, snapshot = %info.id, "could not delete a snapshot of a failed set");
                }
            }
            e
        };
        // Phase one: the members other than the decider, in doubt.
        for i in 1..members.len() {
            let pending = if two_phase { Some(roster) } else { None };
            match members[i].prepare(options, pending) {
                Ok(info) => made[i] = Some(info),
                Err(e) => return Err(abandon(members, &made, e)),
            }
        }
        // Phase two: the decider; its snapshot existing is the commit. A
        // set whose hold ran out is not committed: writes were held too long.
        if Instant::now() >= deadline {
            return Err(abandon(members, &made, Error::Timeout(hold_timeout)));
        }
        match members[0].prepare(options, None) {
            Ok(info) => made[0] = Some(info),
            // The decider may have journaled its snapshot before failing
            // (a lost reply, a failed flush): abandoning the others now
            // could leave half a set. They stay in doubt and settle by
            // asking the decider, whose journal decides.
            Err(e) if two_phase && outcome_unknown(&e) => {
                return Err(Error::SetOutcomeUnknown {
                    set: set_id,
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(abandon(members, &made, e)),
        }
        // Phase three: the others learn the outcome. A failure here leaves
        // a member in doubt, which `resolve` settles as committed.
        if two_phase {
            for (m, info) in members.iter_mut().zip(&made).skip(1) {
                if let Some(info) = info
                    && let Err(e) = m.commit(info.seq)
                {
                    warn!(error = %e, volume = %m.volume_id(), "set committed, but a member could not record it; it resolves at its next open");
                }
            }
        }
        Ok(made.into_iter().flatten().collect())
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

/// Whether a failed step may still have taken effect: an I/O failure or a
/// member that could not be heard, rather than a refusal.
fn outcome_unknown(e: &Error) -> bool {
    matches!(e, Error::Block(_) | Error::SetMember { .. })
}

/// One volume's part in a snapshot set, the steps
/// [`SnapshotSet::create_across`] drives in order: `hold`, `prepare`, then
/// `commit` (a member in doubt) or `abandon` (a failed set), and always
/// `release`.
pub trait SetMember {
    /// The member's volume id.
    fn volume_id(&self) -> Uuid;
    /// Holds new writes and drains those in flight, waiting at most
    /// `timeout`; for set `set_id`.
    fn hold(&mut self, set_id: Uuid, timeout: Duration) -> Result<()>;
    /// Takes the member's snapshot. With `pending` (every member, the
    /// decider first) it is journaled in doubt until `commit`.
    fn prepare(
        &mut self,
        options: &SnapshotOptions,
        pending: Option<&[(Uuid, String)]>,
    ) -> Result<SnapshotInfo>;
    /// Records that the set committed.
    fn commit(&mut self, seq: u64) -> Result<()>;
    /// Deletes the snapshot `prepare` made.
    fn abandon(&mut self, seq: u64) -> Result<()>;
    /// Lets writes go again. Idempotent.
    fn release(&mut self);
}

/// A volume opened in this process as a set member.
pub struct LocalMember<'a> {
    volume: &'a Volume,
    held: Option<Closed<'a>>,
}

impl std::fmt::Debug for LocalMember<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMember")
            .field("volume", &self.volume.id())
            .field("held", &self.held.is_some())
            .finish()
    }
}

impl Volume {
    /// This volume as a member of a snapshot set made across processes
    /// ([`SnapshotSet::create_across`]), e.g. by a server taking part in a
    /// set another process coordinates.
    pub fn set_member(&self) -> LocalMember<'_> {
        LocalMember {
            volume: self,
            held: None,
        }
    }
}

impl<'a> LocalMember<'a> {
    fn held(&self) -> Result<&Closed<'a>> {
        self.held
            .as_ref()
            .ok_or_else(|| Error::InvalidOptions("a set member must be held first".into()))
    }
}

impl SetMember for LocalMember<'_> {
    fn volume_id(&self) -> Uuid {
        self.volume.id()
    }

    fn hold(&mut self, _set_id: Uuid, timeout: Duration) -> Result<()> {
        if self.held.is_none() {
            self.held = Some(self.volume.hold(timeout)?);
        }
        Ok(())
    }

    fn prepare(
        &mut self,
        options: &SnapshotOptions,
        pending: Option<&[(Uuid, String)]>,
    ) -> Result<SnapshotInfo> {
        let pending = pending.map(|m| (options.set_id.unwrap_or_default(), m));
        self.volume
            .inner
            .create_held(self.held()?, options, pending, None)
    }

    fn commit(&mut self, seq: u64) -> Result<()> {
        self.volume.inner.commit_held(self.held()?, seq)
    }

    fn abandon(&mut self, seq: u64) -> Result<()> {
        self.volume.inner.delete_held(self.held()?, seq)
    }

    fn release(&mut self) {
        self.held = None;
    }
}
