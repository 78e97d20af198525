//! Origin writes held back until the copies they overwrite are durable.
//!
//! A first write after a persistent snapshot must not reach the origin
//! before the diff area holds the chunk's old contents durably. Waiting for
//! that flush inside the write would make every first write wait for a
//! disk flush. Instead the write returns once its copies are written and
//! journaled, and its new data is held here; an applier thread flushes the
//! diff area once for everything held (group commit), then writes the held
//! data to the origin in arrival order. The [`BlockDevice`] contract and
//! NBD allow this: a write is durable only after a later flush, and
//! `Volume::flush` waits for everything held before it.
//!
//! Invariants:
//! - an entry reaches the origin only after a group-commit flush that began
//!   after the entry was queued (its copies and records were written before);
//! - a later write touching a *chunk* of a held entry is held too, behind
//!   it: the chunk's copy is what is not yet durable, and overlapping
//!   writes keep their order;
//! - live reads lay held entries, in order, over what the origin holds;
//!   an entry leaves the queue only after the origin holds its bytes;
//! - each held entry counts as a writer inside the gate until applied, so
//!   closing the gate (snapshots, sets, revert, close) drains the queue;
//! - memory is bounded: a writer waits while [`MAX_HELD_BYTES`] are held
//!   or being copied (a single larger write is admitted alone);
//! - after a failed flush or origin write (or a panic in the applier),
//!   held entries are dropped, the volume is failed, and live reads fail
//!   rather than return stale data;
//! - writers are admitted in arrival order and copy their payload only
//!   once admitted.
//!
//! [`BlockDevice`]: volshadow_block::BlockDevice

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use volshadow_block::Extent;

use crate::error::{Error, Result};

use super::Inner;
use super::cow::Payload;
use super::durability::Owed;

/// Most bytes of new data held at once.
const MAX_HELD_BYTES: usize = 64 << 20;

/// New contents of a held range.
#[derive(Debug, Clone)]
enum Contents {
    Data(Arc<[u8]>),
    Discard,
}

#[derive(Debug)]
struct Entry {
    offset: u64,
    len: u64,
    /// First and last chunk the write touches.
    chunks: (u64, u64),
    contents: Contents,
    /// The copies that must be durable first; `None` for a write held only
    /// to stay behind an earlier one.
    owed: Option<Owed>,
}

impl Entry {
    fn bytes(&self) -> usize {
        match self.contents {
            Contents::Data(_) => self.len as usize,
            Contents::Discard => 0,
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Entries ever queued, and ever finished (applied or dropped).
    queued: u64,
    finished: u64,
    /// A held write was dropped: the volume has failed.
    lost: bool,
    /// Admission tickets: handed out, and the one admitted next.
    next_ticket: u64,
    serving: u64,
    stopping: bool,
    applier: Option<JoinHandle<()>>,
}

/// A held range as a read sees it.
pub(super) struct Overlay {
    offset: u64,
    len: u64,
    contents: Contents,
}

#[derive(Debug, Default)]
pub(super) struct Held {
    queue: Mutex<Queue>,
    /// Held by whoever applies a batch (the applier thread, or a writer
    /// when no thread could be started): batches never overlap.
    applying: Mutex<()>,
    changed: Condvar,
    /// Entries held now; 0 lets reads and writes skip the lock.
    count: AtomicUsize,
    lost: AtomicBool,
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every change to the queue is completed under the lock before it
        // is released; a panic cannot leave it half-changed.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, q: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        self.changed.wait(q).unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// True once a held write was dropped by a failure.
    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Waits until every write held before the call is applied (or, after
    /// a failure, dropped: then the error).
    pub(super) fn wait_applied(&self) -> Result<()> {
        let mut q = self.lock();
        let upto = q.queued;
        while q.finished < upto {
            q = self.wait(q);
        }
        if q.lost {
            Err(Error::NeedsRecovery)
        } else {
            Ok(())
        }
    }

    /// The held ranges overlapping `offset..offset + len`, oldest first.
    /// Taken *before* the origin is read: an entry missing from the list
    /// was applied before the list was taken.
    pub(super) fn overlays(&self, offset: u64, len: u64) -> Vec<Overlay> {
        if self.is_empty() {
            return Vec::new();
        }
        let end = offset + len;
        self.lock()
            .entries
            .iter()
            .filter(|e| e.offset < end && offset < e.offset + e.len)
            .map(|e| Overlay {
                offset: e.offset,
                len: e.len,
                contents: e.contents.clone(),
            })
            .collect()
    }

    /// Lays `overlays` over `buf` (read from the origin at `offset`).
    pub(super) fn apply_overlays(overlays: &[Overlay], buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        for o in overlays {
            let lo = o.offset.max(offset);
            let hi = (o.offset + o.len).min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match &o.contents {
                Contents::Data(d) => {
                    dst.copy_from_slice(&d[(lo - o.offset) as usize..(hi - o.offset) as usize])
                }
                Contents::Discard => dst.fill(0),
            }
        }
    }

    /// Held data ranges inside `offset..offset + len`: they hold data even
    /// where the origin still has a hole.
    pub(super) fn data_extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset + len;
        self.overlays(offset, len)
            .into_iter()
            .filter(|o| matches!(o.contents, Contents::Data(_)))
            .map(|o| {
                let lo = o.offset.max(offset);
                Extent {
                    offset: lo,
                    len: (o.offset + o.len).min(end) - lo,
                }
            })
            .collect()
    }

    /// Stops the applier once everything held is applied (or dropped after
    /// a failure) and waits for it: the last `Volume` handle is going.
    pub(super) fn stop(&self) {
        let handle = {
            let mut q = self.lock();
            q.stopping = true;
            self.changed.notify_all();
            q.applier.take()
        };
        // The applier catches its own panics, so joining cannot fail.
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("the applier of held writes ended abnormally");
        }
    }
}

impl Inner {
    /// Holds a write whose copies (`owed`) are not durable yet, or, with
    /// `owed` `None`, only if it touches a chunk of a held write (then it
    /// must stay behind that one). Returns false when it was not held: the
    /// caller writes the origin itself.
    pub(super) fn hold(
        self: &Arc<Self>,
        payload: Payload<'_>,
        offset: u64,
        chunks: (u64, u64),
        owed: Option<Owed>,
    ) -> Result<bool> {
        let held = &self.held;
        let (len, bytes) = match payload {
            Payload::Data(d) => (d.len() as u64, d.len()),
            Payload::Discard(n) => (n, 0),
        };
        let mut q = held.lock();
        if owed.is_none()
            && !q
                .entries
                .iter()
                .any(|e| e.chunks.0 <= chunks.1 && chunks.0 <= e.chunks.1)
        {
            return Ok(false);
        }
        // Admitted in arrival order (a large write is not passed by smaller
        // ones), and only then is the payload copied: at most
        // MAX_HELD_BYTES (or one larger write) are held or being copied.
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        while !q.lost && (q.serving != ticket || (q.bytes > 0 && q.bytes + bytes > MAX_HELD_BYTES))
        {
            q = held.wait(q);
        }
        if q.lost {
            return Err(Error::NeedsRecovery);
        }
        q.serving += 1;
        q.bytes += bytes;
        held.changed.notify_all();
        drop(q);
        let contents = match payload {
            Payload::Data(d) => Contents::Data(Arc::from(d)),
            Payload::Discard(_) => Contents::Discard,
        };
        let mut q = held.lock();
        if q.lost {
            q.bytes -= bytes;
            return Err(Error::NeedsRecovery);
        }
        q.queued += 1;
        q.entries.push_back(Entry {
            offset,
            len,
            chunks,
            contents,
            owed,
        });
        held.count.fetch_add(1, Ordering::AcqRel);
        self.gate.enter_detached();
        if q.applier.is_none() {
            let inner = self.clone();
            match std::thread::Builder::new()
                .name("volshadow-apply".into())
                .spawn(move || inner.apply_held())
            {
                Ok(h) => q.applier = Some(h),
                Err(e) => {
                    // No thread to apply it: apply everything held now, and
                    // report this write's fate.
                    tracing::warn!(error = %e, "no applier thread; applying held writes inline");
                    drop(q);
                    self.apply_batch();
                    return if held.lost() {
                        Err(Error::NeedsRecovery)
                    } else {
                        Ok(true)
                    };
                }
            }
        }
        held.changed.notify_all();
        Ok(true)
    }

    /// The applier: applies what is held, batch by batch, until stopped.
    fn apply_held(self: Arc<Self>) {
        loop {
            {
                let mut q = self.held.lock();
                while q.entries.is_empty() && !q.stopping {
                    q = self.held.wait(q);
                }
                if q.entries.is_empty() {
                    return;
                }
            }
            let applied =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply_batch()));
            if applied.is_err() {
                // A bug, but no waiter may hang on it: what is held is
                // lost and the volume fails, as after an I/O error.
                let mut q = self.held.lock();
                self.drop_held(&mut q, "the applier of held writes panicked");
                return;
            }
        }
    }

    /// Drops every held entry after a failure: the volume fails and live
    /// reads fail from now on.
    fn drop_held(&self, q: &mut Queue, why: &str) {
        tracing::error!(
            reason = why,
            "held writes could not be applied; the volume fails"
        );
        self.failed.store(true, Ordering::Release);
        q.lost = true;
        self.held.lost.store(true, Ordering::Release);
        let n = q.entries.len();
        // Bytes reserved by writers still copying are theirs to give back.
        let freed: usize = q.entries.drain(..).map(|e| e.bytes()).sum();
        q.bytes -= freed;
        q.finished += n as u64;
        self.held.count.fetch_sub(n, Ordering::AcqRel);
        self.gate.leave_detached(n);
        self.held.changed.notify_all();
    }

    /// Applies every entry held now: one group-commit flush covers all
    /// their copies, then their data goes to the origin in order.
    fn apply_batch(&self) {
        let _applying = self
            .held
            .applying
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (batch, owed) = {
            let q = self.held.lock();
            let batch: Vec<(u64, u64, Contents)> = q
                .entries
                .iter()
                .map(|e| (e.offset, e.len, e.contents.clone()))
                .collect();
            let owed = q.entries.iter().filter_map(|e| e.owed).reduce(Owed::later);
            (batch, owed)
        };
        if batch.is_empty() {
            return;
        }
        let mut result = owed.map_or(Ok(()), |o| self.settle(o));
        if result.is_ok() {
            result = batch.iter().try_for_each(|(offset, len, contents)| {
                let payload = match contents {
                    Contents::Data(d) => Payload::Data(d),
                    Contents::Discard => Payload::Discard(*len),
                };
                self.write_origin(payload, *offset)
            });
        }
        let mut q = self.held.lock();
        if let Err(e) = result {
            // The writes were acknowledged; they are gone now.
            let e = self.fail(e);
            self.drop_held(&mut q, &e.to_string());
            return;
        }
        let n = batch.len();
        let freed: usize = q.entries.drain(..n).map(|e| e.bytes()).sum();
        q.bytes -= freed;
        q.finished += n as u64;
        self.held.count.fetch_sub(n, Ordering::AcqRel);
        self.gate.leave_detached(n);
        self.held.changed.notify_all();
    }
}
