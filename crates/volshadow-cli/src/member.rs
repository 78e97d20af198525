//! Snapshot sets across processes: a volume held by a `serve` process
//! takes part in a set another command coordinates, through one control
//! connection kept open for the set's steps ([`SetMember`]).
//!
//! Safety of the outcome: a member whose coordinator vanished after its
//! snapshot was journaled in doubt must not guess. It asks the set's
//! decider, and a decider whose own part is still under way answers
//! "in progress" (`SetsInProgress`), so the question is asked again later;
//! a decider opened by the coordinator itself cannot be opened meanwhile
//! ("in use"), so that, too, is asked again. Either way the answer comes
//! only once the decider's outcome is final.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use uuid::Uuid;
use volshadow_cow::{SetMember, SnapshotInfo, SnapshotOptions, Volume};

use crate::channel::Stream;
use crate::control::{self, Connection, Envelope};
use crate::ops::{Reply, Request};

/// Beyond its hold timeout, how long a server waits for the coordinator's
/// next step before it lets writes go (a stalled coordinator must not hold
/// a served volume's writes for long).
const STEP_GRACE: Duration = Duration::from_secs(2);
/// The longest hold a coordinator may ask a served volume for.
const MAX_HOLD: Duration = Duration::from_secs(60);
/// How often a member left in doubt asks its decider again, and how many
/// times before leaving it to the volume's next open (a decider that moved
/// or is gone does not answer later either).
const ASK_AGAIN: Duration = Duration::from_secs(1);
const ASK_TIMES: u32 = 300;

/// The sets whose creation this server is taking part in right now.
#[derive(Debug)]
pub struct SetsInProgress {
    img: PathBuf,
    vol: Volume,
    ids: Mutex<HashSet<Uuid>>,
}

impl SetsInProgress {
    pub fn new(img: &Path, vol: Volume) -> Self {
        SetsInProgress {
            img: img.to_path_buf(),
            vol,
            ids: Mutex::new(HashSet::new()),
        }
    }

    pub fn contains(&self, set_id: Uuid) -> bool {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&set_id)
    }

    /// One set conversation on `stream` (after its `SetJoin`): each step
    /// answered in turn until `SetRelease` or the coordinator goes away.
    /// The steps must come in order (one hold, one prepare, then commit
    /// or abandon of that snapshot only); the first step refused ends the
    /// conversation. Writes are held from `SetHold` at most its timeout
    /// plus [`STEP_GRACE`], however the coordinator behaves.
    pub fn converse(&self, stream: &Stream, r: &mut impl BufRead) -> Result<()> {
        reply(
            stream,
            Ok(Reply::SetJoined {
                volume_id: self.vol.id(),
            }),
        )?;
        let mut c = Conversation {
            member: self.vol.set_member(),
            set_id: None,
            deadline: None,
            made: Made::Nothing,
            released: false,
        };
        let ended = (|| -> Result<()> {
            while !c.released {
                if let Some(deadline) = c.deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        bail!("the set's hold ran out; writes are let go");
                    }
                    stream.set_read_timeout(Some(left))?;
                }
                let (env, _) = control::receive::<Request>(r, control::MAX_REQUEST_LINE)?;
                let Some(req) = env.ok else {
                    bail!("set step without an operation");
                };
                match c.step(self, req) {
                    Ok(answer) => reply(stream, Ok(answer))?,
                    Err(e) => {
                        let said = crate::one_line(&e);
                        let _ = reply(stream, Err(e));
                        bail!("set step refused: {said}");
                    }
                }
            }
            Ok(())
        })();
        c.member.release();
        if let Some(set_id) = c.set_id {
            self.ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&set_id);
            match c.made {
                // The coordinator went before telling the outcome.
                Made::InDoubt(_) => self.settle_later(set_id),
                // A non-persistent copy of a set that was never finished:
                // nothing decides it, so it goes.
                Made::Copy(info, false) if !c.released => {
                    if let Err(e) = self.vol.delete_snapshot(info.id) {
                        tracing::warn!(error = %e, %set_id, "cannot delete the copy of an unfinished set");
                    }
                }
                _ => {}
            }
        }
        ended
    }

    /// The coordinator left this member's snapshot in doubt: ask the
    /// decider until it gives a final answer (or the server stops; the
    /// next open asks again).
    fn settle_later(&self, set_id: Uuid) {
        let (img, vol) = (self.img.clone(), self.vol.clone());
        let spawned = std::thread::Builder::new().spawn(move || {
            let mut told = false;
            for _ in 0..ASK_TIMES {
                let Some(d) = vol.in_doubt_sets().into_iter().find(|d| d.set_id == set_id) else {
                    return;
                };
                let settled = crate::storage::ask_decider(&d)
                    .and_then(|committed| crate::storage::settle(&img, &vol, &d, committed));
                match settled {
                    Ok(()) => return,
                    Err(e) if !told => {
                        told = true;
                        tracing::warn!(error = %crate::one_line(&e), %set_id, "a set's coordinator went away; its shadow copy here stays hidden until the set's first volume answers");
                    }
                    Err(_) => {}
                }
                std::thread::sleep(ASK_AGAIN);
            }
            tracing::warn!(%set_id, "gave up asking the set's first volume; the shadow copy here stays hidden until the volume is opened again");
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, %set_id, "cannot start settling a set left in doubt; it settles at the next open");
        }
    }
}

fn reply(stream: &Stream, answer: Result<Reply>) -> Result<()> {
    let env = match answer {
        Ok(reply) => Envelope {
            ok: Some(reply),
            error: None,
            payload_len: 0,
            auto_deleted: Vec::new(),
        },
        Err(e) => Envelope {
            ok: None,
            error: Some(crate::one_line(&e)),
            payload_len: 0,
            auto_deleted: Vec::new(),
        },
    };
    control::send(&mut &*stream, &env, &[])
}

/// A volume its server holds, as a member of a set this command makes.
#[derive(Debug)]
pub struct RemoteMember {
    img: PathBuf,
    conn: Connection,
    volume_id: Uuid,
    /// Until `release` ends the conversation.
    open: bool,
}

impl RemoteMember {
    /// `None` when no server holds `img`.
    pub fn join(img: &Path) -> Result<Option<Self>> {
        let Some(mut conn) = Connection::open(img)? else {
            return Ok(None);
        };
        match conn.call(&Request::SetJoin)? {
            Reply::SetJoined { volume_id } => Ok(Some(RemoteMember {
                img: img.to_path_buf(),
                conn,
                volume_id,
                open: true,
            })),
            other => bail!("unexpected answer {other:?} to joining a set"),
        }
    }

    fn step(&mut self, req: &Request) -> volshadow_cow::Result<Reply> {
        self.conn
            .call(req)
            .map_err(|e| volshadow_cow::Error::SetMember {
                volume: self.volume_id,
                reason: format!("{} (served): {}", self.img.display(), crate::one_line(&e)),
            })
    }

    fn done(&mut self, req: &Request) -> volshadow_cow::Result<()> {
        match self.step(req)? {
            Reply::Done => Ok(()),
            other => Err(volshadow_cow::Error::SetMember {
                volume: self.volume_id,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }
}

impl SetMember for RemoteMember {
    fn volume_id(&self) -> Uuid {
        self.volume_id
    }

    fn hold(&mut self, set_id: Uuid, timeout: Duration) -> volshadow_cow::Result<()> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.done(&Request::SetHold { set_id, timeout_ms })
    }

    fn prepare(
        &mut self,
        options: &SnapshotOptions,
        pending: Option<&[(Uuid, String)]>,
    ) -> volshadow_cow::Result<SnapshotInfo> {
        match self.step(&Request::SetPrepare {
            persistent: options.persistent,
            attributes: options.attributes,
            pending: pending.map(<[_]>::to_vec),
        })? {
            Reply::SetPrepared { snapshot } => Ok(snapshot),
            other => Err(volshadow_cow::Error::SetMember {
                volume: self.volume_id,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    fn commit(&mut self, seq: u64) -> volshadow_cow::Result<()> {
        self.done(&Request::SetCommit { seq })
    }

    fn abandon(&mut self, seq: u64) -> volshadow_cow::Result<()> {
        self.done(&Request::SetAbandon { seq })
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.open)
            && let Err(e) = self.done(&Request::SetRelease)
        {
            // The server lets writes go by itself when the connection ends.
            tracing::debug!(error = %e, "set release not acknowledged");
        }
    }
}

impl Drop for RemoteMember {
    /// A command that gives up before the set (a bad argument found late)
    /// still ends the conversation politely.
    fn drop(&mut self) {
        self.release();
    }
}

/// What one set conversation has made on this volume.
#[derive(Debug)]
enum Made {
    Nothing,
    /// A snapshot journaled in doubt (seq), until commit or abandon.
    InDoubt(u64),
    /// A snapshot that needs no outcome (the decider's, or a
    /// non-persistent one), and whether it is persistent.
    Copy(SnapshotInfo, bool),
    /// Committed or abandoned.
    Settled,
}

/// The state of one set conversation on the server.
struct Conversation<'a> {
    member: volshadow_cow::LocalMember<'a>,
    set_id: Option<Uuid>,
    deadline: Option<Instant>,
    made: Made,
    released: bool,
}

impl Conversation<'_> {
    /// One step, in the order the protocol allows.
    fn step(&mut self, sets: &SetsInProgress, req: Request) -> Result<Reply> {
        Ok(match req {
            Request::SetHold { set_id, timeout_ms } => {
                if self.set_id.is_some() {
                    bail!("a set conversation holds once");
                }
                if !sets
                    .ids
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(set_id)
                {
                    bail!("set {set_id} is already being made on this volume");
                }
                self.set_id = Some(set_id);
                // A client's number, bounded before use.
                let timeout = Duration::from_millis(timeout_ms).min(MAX_HOLD);
                self.deadline = Some(Instant::now() + timeout + STEP_GRACE);
                self.member.hold(set_id, timeout)?;
                Reply::Done
            }
            Request::SetPrepare {
                persistent,
                attributes,
                pending,
            } => {
                let Some(set_id) = self.set_id else {
                    bail!("a set member prepares after its hold");
                };
                if !matches!(self.made, Made::Nothing) {
                    bail!("a set member prepares once");
                }
                let options = SnapshotOptions {
                    persistent,
                    attributes,
                    set_id: Some(set_id),
                };
                let snapshot = self.member.prepare(&options, pending.as_deref())?;
                self.made = if pending.is_some() {
                    Made::InDoubt(snapshot.seq)
                } else {
                    Made::Copy(snapshot.clone(), persistent)
                };
                Reply::SetPrepared { snapshot }
            }
            Request::SetCommit { seq } => {
                let Made::InDoubt(mine) = self.made else {
                    bail!("no snapshot of this set is in doubt here");
                };
                if seq != mine {
                    bail!("snapshot {seq} is not this set's (it is {mine})");
                }
                self.member.commit(seq)?;
                self.made = Made::Settled;
                Reply::Done
            }
            Request::SetAbandon { seq } => {
                let mine = match &self.made {
                    Made::InDoubt(s) => *s,
                    Made::Copy(info, _) => info.seq,
                    _ => bail!("this set made no snapshot here"),
                };
                if seq != mine {
                    bail!("snapshot {seq} is not this set's (it is {mine})");
                }
                self.member.abandon(seq)?;
                self.made = Made::Settled;
                Reply::Done
            }
            Request::SetRelease => {
                self.member.release();
                self.released = true;
                Reply::Done
            }
            other => bail!("{other:?} is not a step of a snapshot set"),
        })
    }
}
