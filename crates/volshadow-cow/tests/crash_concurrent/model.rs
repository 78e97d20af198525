//! The model: what each region and snapshot must read, and whose turn it is.

use super::*;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A write as its region's thread issued it.
#[derive(Debug, Clone)]
pub(crate) struct WRec {
    pub(crate) off: usize,
    pub(crate) len: usize,
    pub(crate) byte: u8,
    /// Logical time of its acknowledgement; `None` while in flight (or
    /// when the power failed under it).
    pub(crate) ack: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct Region {
    pub(crate) start: usize,
    /// The region's bytes as of the acknowledged writes.
    pub(crate) image: Vec<u8>,
    pub(crate) writes: Vec<WRec>,
    /// (round, chunk) of every acknowledged write.
    pub(crate) touched: Vec<(usize, usize)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Snap {
    pub(crate) id: Uuid,
    pub(crate) persistent: bool,
    pub(crate) data: Arc<Vec<u8>>,
    /// Created at the barrier of this round.
    pub(crate) round: usize,
}

/// What the threads share, and what the check needs.
#[derive(Debug)]
pub(crate) struct Model {
    /// Logical clock: write acknowledgements and flush starts.
    pub(crate) clock: AtomicU64,
    /// Every write acknowledged before this time is durable: the largest
    /// start time of a completed flush.
    pub(crate) durable: AtomicU64,
    pub(crate) regions: Vec<Mutex<Region>>,
    /// Failures other than the power's.
    pub(crate) unexpected: Mutex<Vec<String>>,
    pub(crate) snaps: Vec<Snap>,
    /// In flight when the power failed: a create (persistent, bytes) or a
    /// delete.
    pub(crate) creating: Option<(bool, Arc<Vec<u8>>)>,
    pub(crate) deleting: Option<Uuid>,
    /// Snapshots whose delete completed (by the main thread or the
    /// delete-oldest policy).
    pub(crate) gone: Vec<Uuid>,
    /// The power failed while writers ran (a delete-oldest may have been in
    /// flight).
    pub(crate) in_writers: bool,
    /// Writes refused because the diff area was full, and snapshots the
    /// delete-oldest policy removed (for the statistics).
    pub(crate) refused: AtomicU64,
    pub(crate) auto_deleted: u64,
}

impl Model {
    pub(crate) fn new() -> Self {
        Model {
            clock: AtomicU64::new(1),
            durable: AtomicU64::new(0),
            regions: REGIONS
                .iter()
                .map(|&(start, len)| {
                    Mutex::new(Region {
                        start,
                        image: vec![0; len],
                        writes: Vec::new(),
                        touched: Vec::new(),
                    })
                })
                .collect(),
            unexpected: Mutex::new(Vec::new()),
            snaps: Vec::new(),
            creating: None,
            deleting: None,
            gone: Vec::new(),
            in_writers: false,
            refused: AtomicU64::new(0),
            auto_deleted: 0,
        }
    }

    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// A flush that started at `start` completed.
    pub(crate) fn flushed(&self, start: u64) {
        self.durable.fetch_max(start, Ordering::SeqCst);
    }

    /// The volume's bytes as of every acknowledged write (at a barrier:
    /// exactly the live bytes).
    pub(crate) fn image(&self) -> Arc<Vec<u8>> {
        let mut out = vec![0u8; LEN];
        for r in &self.regions {
            let r = lock(r);
            out[r.start..r.start + r.image.len()].copy_from_slice(&r.image);
        }
        Arc::new(out)
    }

    pub(crate) fn unexpected(&self, what: String) {
        lock(&self.unexpected).push(what);
    }

    pub(crate) fn forget_auto_deleted(&mut self, vol: &Volume) {
        for s in vol.take_auto_deleted() {
            self.snaps.retain(|x| x.id != s.id);
            self.gone.push(s.id);
            self.auto_deleted += 1;
        }
    }
}

/// Seeded turn order of a lockstep round.
#[derive(Debug)]
pub(crate) struct Turns {
    pub(crate) order: Vec<usize>,
    pub(crate) pos: Mutex<usize>,
    pub(crate) next: Condvar,
}

impl Turns {
    pub(crate) fn wait(&self, me: usize) {
        let mut pos = lock(&self.pos);
        while self.order[*pos] != me {
            pos = self.next.wait(pos).unwrap_or_else(PoisonError::into_inner);
        }
    }

    pub(crate) fn done(&self) {
        *lock(&self.pos) += 1;
        self.next.notify_all();
    }
}
