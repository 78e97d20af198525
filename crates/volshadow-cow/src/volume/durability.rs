//! Durability of the diff area: every flush of it goes through here, so
//! the journal's watermark (the `committed` mark later records carry)
//! always moves with it. The watermark has its own small lock: a writer
//! settling its copies never waits for the state lock (nor blocks the
//! snapshot reads that take it). Copies a persistent snapshot may read are owed a
//! flush before the origin is overwritten; [`Owed`] is that debt, and only
//! [`Inner::settle`] pays it.

use crate::error::Result;
use crate::state::State;

use super::Inner;

/// Copies journaled up to record `seq` of journal epoch `epoch` that must
/// be durable before the origin chunks they hold are overwritten.
#[must_use = "the copies must be made durable before the origin is overwritten"]
#[derive(Debug, Clone, Copy)]
pub(super) struct Owed {
    epoch: u64,
    seq: u64,
}

impl Owed {
    /// The later of two debts (a flush covering it covers both).
    pub(super) fn later(self, other: Owed) -> Owed {
        if (other.epoch, other.seq) > (self.epoch, self.seq) {
            other
        } else {
            self
        }
    }

    /// Everything the journal holds now.
    pub(super) fn all_of(st: &State) -> Self {
        Owed {
            epoch: st.journal.epoch(),
            seq: st.journal.next_seq(),
        }
    }
}

impl Inner {
    /// Pays `owed` with a group-commit flush (shared with concurrent
    /// writers) and moves the watermark, without the state lock. A failed
    /// flush fails the volume.
    pub(super) fn settle(&self, owed: Owed) -> Result<()> {
        self.commit.flush().map_err(|e| self.fail(e.into()))?;
        self.watermark.advance(owed.epoch, owed.seq);
        Ok(())
    }

    /// Flushes the diff area with the state held (a delete, a snapshot
    /// create, a revert step) and moves the watermark.
    pub(super) fn flush_diff(&self, st: &mut State) -> Result<()> {
        let owed = Owed::all_of(st);
        self.diff.flush().map_err(|e| self.fail(e.into()))?;
        st.journal.mark_durable(owed.epoch, owed.seq);
        Ok(())
    }
}
