//! Group commit: concurrent first writes after a persistent snapshot share
//! one diff-area flush.
//!
//! A caller takes a ticket *after* its records and data are written. If no
//! flush is running it becomes the leader: it flushes for every ticket
//! issued so far, on its own thread. Callers arriving during that flush
//! wait; when it ends, one of them leads the next flush for all of them.
//! So a flush that starts after a ticket was taken always covers it, and a
//! burst of N writers costs about two flushes, not N. No thread hand-off
//! sits on the path of a lone writer.
//!
//! A failed flush is final: every later call fails too. Once the diff area
//! reported a lost write, a later successful flush proves nothing (the
//! kernel may have dropped the dirty pages), and the volume refuses writes
//! until it is reopened and recovered anyway.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use volshadow_block::BlockDevice;

#[derive(Debug, Default)]
struct State {
    /// Tickets handed out so far.
    issued: u64,
    /// Every ticket up to this one is covered by a completed flush.
    covered: u64,
    /// A leader is flushing now.
    flushing: bool,
    /// The failure that ended group commit for this volume.
    failed: Option<(io::ErrorKind, String)>,
}

pub(crate) struct GroupCommit {
    diff: Arc<dyn BlockDevice>,
    state: Mutex<State>,
    done: Condvar,
    flushes: AtomicU64,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("device", &self.diff.name())
            .field("flushes", &self.flush_count())
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    pub(crate) fn new(diff: Arc<dyn BlockDevice>) -> Self {
        GroupCommit {
            diff,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            flushes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few counters updated in single statements; a
        // panic elsewhere cannot leave it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once a flush that started after this call has completed.
    pub(crate) fn flush(&self) -> volshadow_block::Result<()> {
        let mut s = self.lock();
        s.issued += 1;
        let ticket = s.issued;
        loop {
            if let Some((kind, msg)) = &s.failed {
                return Err(volshadow_block::Error::Layer {
                    device: self.diff.name(),
                    kind: *kind,
                    source: msg.clone().into(),
                });
            }
            if s.covered >= ticket {
                return Ok(());
            }
            if s.flushing {
                s = self.done.wait(s).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead: every ticket issued so far had its writes done before
            // it was taken, so this flush covers all of them.
            s.flushing = true;
            let upto = s.issued;
            drop(s);
            let result = self.diff.flush();
            self.flushes.fetch_add(1, Ordering::Relaxed);
            s = self.lock();
            s.flushing = false;
            match result {
                Ok(()) => s.covered = upto,
                Err(e) => s.failed = Some((e.kind(), e.to_string())),
            }
            self.done.notify_all();
        }
    }

    /// Flushes issued by group commit so far.
    pub(crate) fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volshadow_block::MemDevice;
    use volshadow_block::{Fault, FaultAction, FaultError, FaultyDevice, OpKind};

    /// A device that counts "writes" and, on flush, makes durable every
    /// write counted before the flush began.
    struct Counting {
        mem: MemDevice,
        written: AtomicU64,
        durable: AtomicU64,
    }

    impl BlockDevice for Counting {
        fn len(&self) -> u64 {
            self.mem.len()
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> volshadow_block::Result<()> {
            self.mem.write_at(buf, offset)
        }
        fn flush(&self) -> volshadow_block::Result<()> {
            let upto = self.written.load(Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_micros(200));
            self.durable.fetch_max(upto, Ordering::SeqCst);
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
            self.mem.discard(offset, len)
        }
        fn name(&self) -> String {
            "counting".into()
        }
    }

    #[test]
    fn every_caller_is_covered_and_callers_share_flushes() {
        let dev = Arc::new(Counting {
            mem: MemDevice::new(4096),
            written: AtomicU64::new(0),
            durable: AtomicU64::new(0),
        });
        let gc = GroupCommit::new(dev.clone());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        let mine = dev.written.fetch_add(1, Ordering::SeqCst) + 1;
                        gc.flush().unwrap();
                        assert!(dev.durable.load(Ordering::SeqCst) >= mine);
                    }
                });
            }
        });
        // Eight writers waiting behind each 200 µs flush share the next.
        assert!(gc.flush_count() < 800, "{} flushes", gc.flush_count());
    }

    #[test]
    fn a_failed_flush_fails_every_later_call() {
        let dev = Arc::new(FaultyDevice::new(MemDevice::new(1 << 20)));
        let gc = GroupCommit::new(dev.clone());
        gc.flush().unwrap();
        // One flush fails; the device would flush fine afterwards.
        dev.set_fault(Fault::on(
            OpKind::Flush,
            0,
            FaultAction::Fail(FaultError::Eio),
        ));
        assert!(gc.flush().is_err());
        assert!(gc.flush().is_err(), "the failure is sticky");
        dev.flush().unwrap();
        assert_eq!(gc.flush_count(), 2, "no flush after the failure");
    }
}
