//! Calling a writer within its limit, and what becomes of a call that
//! overruns it.
//!
//! A call runs on its own thread. At its deadline the coordinator stops
//! waiting and reports a timeout naming the writer; the call is fenced:
//! the writer gets no other call (no abort running beside a freeze) until
//! it returns. Then a late freeze that succeeded is undone with `abort`,
//! and an abort sent meanwhile is delivered, so nothing is left frozen
//! with nobody to thaw it.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::writer::{EventContext, FailureKind, Phase, Writer, WriterFailure, WriterResult};

use super::Coordinator;

/// One writer event: what the writer is asked.
pub(super) type Event = fn(&dyn Writer, &EventContext) -> WriterResult;

/// A writer's call that overran its limit.
#[derive(Debug, Default)]
pub(super) struct Late {
    /// The call is still running.
    running: bool,
    /// An abort was sent while it ran: delivered when it returns.
    abort_owed: bool,
}

/// Runs once a late call has returned: the undo and the aborts owed,
/// then the writer is free again.
fn settle_late(writer: &dyn Writer, ctx: &EventContext, late: &Mutex<Late>, mut undo: bool) {
    loop {
        {
            let mut l = late.lock().unwrap_or_else(PoisonError::into_inner);
            if !undo && !l.abort_owed {
                l.running = false;
                return;
            }
            l.abort_owed = false;
        }
        undo = false;
        let _ = writer.abort(ctx);
    }
}

enum CallState {
    Running,
    Done(WriterResult),
    /// The coordinator gave up waiting; the call's thread finishes it.
    Abandoned,
}

impl Coordinator {
    /// Writer `idx`'s freeze window: its own limit, or the coordinator's.
    pub(super) fn window_of(&self, idx: usize) -> Duration {
        self.writers[idx]
            .writer
            .timeout()
            .unwrap_or(self.timeouts.freeze)
    }

    /// True while a call of writer `idx` that overran its limit is still
    /// running.
    pub(super) fn is_late(&self, idx: usize) -> bool {
        self.writers[idx]
            .late
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running
    }

    /// Waits (at most `limit`) for writer calls that overran their limit
    /// to return and be undone; returns the writers whose call is still
    /// running. A process must not exit before: a late freeze that returns
    /// after the process is gone is never thawed.
    pub fn finish_late_calls(&self, limit: Duration) -> Vec<String> {
        let until = Instant::now() + limit;
        loop {
            let late: Vec<usize> = (0..self.writers.len())
                .filter(|&i| self.is_late(i))
                .collect();
            if late.is_empty() || Instant::now() >= until {
                return late.into_iter().map(|i| self.name_of(i)).collect();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Calls writer `idx` for `phase`, waiting until `deadline`. `undo`:
    /// the call, if it returns success after the deadline, is undone with
    /// `abort` (a freeze).
    pub(super) fn call(
        &self,
        idx: usize,
        phase: Phase,
        deadline: Instant,
        ctx: &EventContext,
        undo: bool,
        event: Event,
    ) -> WriterResult {
        let slot = &self.writers[idx];
        {
            let mut late = slot.late.lock().unwrap_or_else(PoisonError::into_inner);
            if late.running {
                if phase == Phase::Abort {
                    late.abort_owed = true;
                    return Ok(());
                }
                return Err(WriterFailure::new(
                    FailureKind::Timeout,
                    format!(
                        "not called for {phase}: a call that overran its limit is still running"
                    ),
                ));
            }
        }
        let limit = deadline.saturating_duration_since(Instant::now());
        let shared = Arc::new((Mutex::new(CallState::Running), Condvar::new()));
        let theirs = shared.clone();
        let writer = slot.writer.clone();
        let late = slot.late.clone();
        let ctx_theirs = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("writer {phase}"))
            .spawn(move || {
                let result = event(&*writer, &ctx_theirs);
                let (lock, changed) = &*theirs;
                let mut st = lock.lock().unwrap_or_else(PoisonError::into_inner);
                if matches!(*st, CallState::Abandoned) {
                    drop(st);
                    settle_late(&*writer, &ctx_theirs, &late, undo && result.is_ok());
                } else {
                    *st = CallState::Done(result);
                    changed.notify_all();
                }
            });
        if let Err(e) = spawned {
            return Err(WriterFailure::new(
                FailureKind::OutOfResources,
                format!("cannot start a thread for {phase}: {e}"),
            ));
        }
        let (lock, changed) = &*shared;
        let mut st = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match std::mem::replace(&mut *st, CallState::Running) {
                CallState::Done(result) => return result,
                other => *st = other,
            }
            let now = Instant::now();
            if now >= deadline {
                *st = CallState::Abandoned;
                slot.late
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .running = true;
                return Err(WriterFailure::new(
                    FailureKind::Timeout,
                    format!("{phase} did not return within {limit:?}"),
                ));
            }
            st = changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
