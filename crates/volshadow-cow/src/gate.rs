//! The write gate: how a snapshot (or a set of them) gets a clean instant.
//!
//! Writers `enter` for the duration of one write. `close` stops new writers
//! from entering, waits (bounded) until the ones inside have left, and
//! holds the gate until the returned guard drops. This is VSS's "hold
//! writes, drain in-flight I/O" step: a snapshot taken while closed holds
//! every write that completed before `close` was called and none that
//! started after it returned.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// VSS's write-hold limit: the longest writes are held for a snapshot.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct GateState {
    inside: usize,
    closed: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

/// A writer inside the gate.
#[derive(Debug)]
pub(crate) struct Pass<'a>(&'a Gate);

/// The gate held closed.
#[derive(Debug)]
pub(crate) struct Closed<'a>(&'a Gate);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn enter(&self) -> Pass<'_> {
        let mut st = self.lock();
        while st.closed {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.inside += 1;
        Pass(self)
    }

    /// Counts one more writer inside without a [`Pass`]: a write whose
    /// origin update is held back (see `volume::held`) stays inside until
    /// [`leave_detached`](Self::leave_detached), so closing the gate drains
    /// it too. The caller is inside already (holds a `Pass`), so the gate
    /// cannot be closed at this moment.
    pub(crate) fn enter_detached(&self) {
        self.lock().inside += 1;
    }

    /// Ends `n` detached entries.
    pub(crate) fn leave_detached(&self, n: usize) {
        let mut st = self.lock();
        st.inside -= n;
        if st.inside == 0 && st.closed {
            self.changed.notify_all();
        }
    }

    /// Closes the gate, waiting at most `timeout` for another closer to
    /// finish and for writers inside to drain.
    pub(crate) fn close(&self, timeout: Duration) -> Result<Closed<'_>> {
        // No deadline when `timeout` is too long to represent (Duration::MAX).
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.lock();
        while st.closed {
            st = self.wait_until(st, deadline, timeout)?;
        }
        st.closed = true;
        while st.inside > 0 {
            match self.wait_until(st, deadline, timeout) {
                Ok(g) => st = g,
                Err(e) => {
                    let mut st = self.lock();
                    st.closed = false;
                    self.changed.notify_all();
                    return Err(e);
                }
            }
        }
        Ok(Closed(self))
    }

    fn wait_until<'a>(
        &'a self,
        st: MutexGuard<'a, GateState>,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<MutexGuard<'a, GateState>> {
        let Some(deadline) = deadline else {
            return Ok(self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner));
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout(timeout));
        }
        let (st, _) = self
            .changed
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(PoisonError::into_inner);
        Ok(st)
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.inside -= 1;
        if st.inside == 0 && st.closed {
            self.0.changed.notify_all();
        }
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.lock().closed = false;
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn close_waits_for_writers_and_blocks_new_ones() {
        let gate = Arc::new(Gate::default());
        let pass = gate.enter();
        assert!(matches!(
            gate.close(Duration::from_millis(20)),
            Err(Error::Timeout(_))
        ));
        // After a timed-out close the gate is open again.
        drop(gate.enter());
        drop(pass);
        let closed = gate.close(Duration::from_secs(1)).unwrap();
        let entered = Arc::new(AtomicBool::new(false));
        let (g, e) = (gate.clone(), entered.clone());
        let t = std::thread::spawn(move || {
            let _p = g.enter();
            e.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!entered.load(Ordering::SeqCst));
        drop(closed);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}
