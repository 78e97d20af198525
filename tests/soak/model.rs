//! What the run expects: writes in flight and durable per lane, shadow copies and their contents.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    /// Blocks `first..first + n` (volume block indices) with write `id`.
    Write {
        id: u32,
        first: u32,
        n: u32,
        fua: bool,
    },
    Flush,
}

/// One writer's region during a round.
#[derive(Debug, Default)]
pub(crate) struct Lane {
    /// Which writer: its region starts at block `index * REGION`.
    pub(crate) index: usize,
    /// At the start of the round (read back and flushed): durable.
    pub(crate) base: Vec<u32>,
    /// After every acknowledged write.
    pub(crate) cur: Vec<u32>,
    /// Requests in the order sent; each is pushed before it is sent.
    pub(crate) log: Vec<Op>,
    /// `log[..acked]` were acknowledged; `log[acked]`, if any, was in
    /// flight when the server died.
    pub(crate) acked: usize,
}

impl Lane {
    pub(crate) fn start(&self) -> usize {
        self.index * REGION
    }

    /// Per block of the region, every value it may hold after a crash: its
    /// durable value first, then values written since.
    pub(crate) fn allowed(&self) -> Vec<Vec<u32>> {
        let flushed = self.log[..self.acked]
            .iter()
            .rposition(|op| matches!(op, Op::Flush));
        let mut cand: Vec<Vec<u32>> = self.base.iter().map(|&v| vec![v]).collect();
        for (i, op) in self.log.iter().enumerate() {
            if let Op::Write { id, first, n, fua } = *op {
                let durable = (fua && i < self.acked) || flushed.is_some_and(|f| i < f);
                for b in first..first + n {
                    let c = &mut cand[b as usize - self.start()];
                    if durable {
                        c.clear();
                    }
                    c.push(id);
                }
            }
        }
        cand
    }

    /// The writes of `log[from..to]` as (first block, blocks, id).
    pub(crate) fn steps(&self, from: usize, to: usize) -> Vec<(u32, u32, u32)> {
        self.log[from..to]
            .iter()
            .filter_map(|op| match *op {
                Op::Write { id, first, n, .. } => Some((first, n, id)),
                Op::Flush => None,
            })
            .collect()
    }
}

/// What a shadow copy must hold.
#[derive(Debug, Clone)]
pub(crate) enum Expect {
    /// Write id per volume block.
    Exact(Arc<Vec<u32>>),
    /// Taken while writers ran: per region, `base` plus some prefix of
    /// that writer's `steps`.
    Range(Arc<RangeExpect>),
}

#[derive(Debug)]
pub(crate) struct RangeExpect {
    pub(crate) base: Vec<u32>,
    pub(crate) steps: Vec<Vec<(u32, u32, u32)>>,
}

/// Finds, per region, the prefix of the writer's steps that `got` shows.
pub(crate) fn resolve_range(r: &RangeExpect, got: &Image) -> Result<Vec<u32>, String> {
    let mut exact = vec![0u32; BLOCKS];
    for w in 0..WRITERS {
        let lo = w * REGION;
        let g = &got.ids[lo..lo + REGION];
        let mut state = r.base[lo..lo + REGION].to_vec();
        let mut bad = state.iter().zip(g).filter(|(a, b)| a != b).count();
        let mut best = (bad, 0);
        let mut k = 0;
        while bad != 0 && k < r.steps[w].len() {
            let (first, n, id) = r.steps[w][k];
            for b in first..first + n {
                let i = b as usize - lo;
                let was = state[i] != g[i];
                state[i] = id;
                let is = state[i] != g[i];
                if was && !is {
                    bad -= 1;
                } else if is && !was {
                    bad += 1;
                }
            }
            k += 1;
            if bad < best.0 {
                best = (bad, k);
            }
        }
        if bad != 0 {
            // The closest prefix, and its first differing block.
            let mut closest = r.base[lo..lo + REGION].to_vec();
            for &(first, n, id) in &r.steps[w][..best.1] {
                closest[first as usize - lo..(first + n) as usize - lo].fill(id);
            }
            let i = (0..REGION).find(|&i| closest[i] != g[i]).unwrap_or(0);
            return Err(format!(
                "region {w} matches no prefix of its writer's {} writes during the create \
                 (closest: {} blocks differ after {} writes, e.g. block {} (offset {}) holds {}, \
                 expected {})",
                r.steps[w].len(),
                best.0,
                best.1,
                lo + i,
                (lo + i) * BLOCK,
                got.show(lo + i),
                show(closest[i])
            ));
        }
        exact[lo..lo + REGION].copy_from_slice(&state);
    }
    Ok(exact)
}

/// Compares a shadow copy read back with what it must hold; on success the
/// exact contents.
pub(crate) fn check_shadow(expect: &Expect, got: &Image) -> Result<Arc<Vec<u32>>, String> {
    match expect {
        Expect::Exact(want) => {
            let bad: Vec<usize> = (0..BLOCKS).filter(|&b| got.ids[b] != want[b]).collect();
            if bad.is_empty() {
                return Ok(want.clone());
            }
            let mut msg = format!("{} of {BLOCKS} blocks differ:", bad.len());
            for &b in bad.iter().take(4) {
                let _ = write!(
                    msg,
                    " block {b} (offset {}) holds {}, expected {};",
                    b * BLOCK,
                    got.show(b),
                    show(want[b])
                );
            }
            Err(msg)
        }
        Expect::Range(r) => resolve_range(r, got).map(Arc::new),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Life {
    Live,
    /// Its delete was in flight at a kill.
    Deleting,
}

#[derive(Debug)]
pub(crate) struct Shadow {
    pub(crate) id: String,
    pub(crate) persistent: bool,
    pub(crate) expect: Expect,
    pub(crate) life: Life,
    /// Readers using it; it is not deleted meanwhile.
    pub(crate) pins: usize,
}

/// A create in flight (at most one: the churn thread is sequential).
#[derive(Debug)]
pub(crate) enum Pending {
    /// Contents known (writers parked), or bounded once the round ended.
    Known { persistent: bool, expect: Expect },
    /// Taken while writers ran, from the lanes' positions `from`; the
    /// writes it may hold are settled when the round ends.
    Open { base: Vec<u32>, from: Vec<usize> },
}

/// A shadow copy that must never be listed again.
#[derive(Debug)]
pub(crate) struct Gone {
    pub(crate) id: String,
    pub(crate) how: String,
    /// What it held, to tell a resurrected copy's state in the report.
    pub(crate) expect: Expect,
}

#[derive(Debug, Default)]
pub(crate) struct Book {
    pub(crate) shadows: Vec<Shadow>,
    pub(crate) pending: Option<Pending>,
    /// Gone for good, with how it went: the delete returned success, or
    /// it was in flight at a kill and the copy was not listed after the
    /// restart. Never listed again.
    pub(crate) deleted: Vec<Gone>,
}

#[derive(Debug, Default)]
pub(crate) struct Pause {
    pub(crate) requested: bool,
    pub(crate) flush: bool,
    pub(crate) epoch: u64,
    /// Writers parked in this epoch.
    pub(crate) parked: usize,
    /// Writers still running this round.
    pub(crate) alive: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) writes: AtomicU64,
    pub(crate) write_bytes: AtomicU64,
    pub(crate) fua: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) created_persistent: AtomicU64,
    pub(crate) created_non_persistent: AtomicU64,
    pub(crate) created_while_writing: AtomicU64,
    pub(crate) deleted: AtomicU64,
    pub(crate) creates_cut: AtomicU64,
    pub(crate) creates_cut_kept: AtomicU64,
    pub(crate) deletes_cut: AtomicU64,
    pub(crate) deletes_cut_kept: AtomicU64,
    pub(crate) checked: AtomicU64,
    pub(crate) checked_bytes: AtomicU64,
    pub(crate) read_under_load: AtomicU64,
    /// Blocks whose last acknowledged (unflushed) write was not seen after
    /// a kill: allowed, counted for the report.
    pub(crate) unflushed_lost: AtomicU64,
    /// Successful churn commands and their total time (µs), by kind.
    pub(crate) cmds: [AtomicU64; 3],
    pub(crate) cmd_us: [AtomicU64; 3],
}

pub(crate) const IDLE: u8 = 0;
pub(crate) const CREATING: u8 = 1;
pub(crate) const DELETING: u8 = 2;

pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) seed: u64,
    pub(crate) non_persistent: bool,
    pub(crate) round: AtomicU64,
    pub(crate) killed: AtomicBool,
    pub(crate) next_id: AtomicU32,
    pub(crate) lanes: Vec<Mutex<Lane>>,
    pub(crate) pause: Mutex<Pause>,
    pub(crate) pause_cv: Condvar,
    pub(crate) pause_flag: AtomicBool,
    /// What command the churn thread runs: `IDLE`, `CREATING`, `DELETING`.
    pub(crate) busy: AtomicU8,
    pub(crate) book: Mutex<Book>,
    pub(crate) stats: Stats,
    /// `events.log` in the run's directory: creates, deletes, kills,
    /// restarts, listings, with milliseconds since the start.
    pub(crate) events: Mutex<std::fs::File>,
    pub(crate) started: Instant,
    pub(crate) violations: Mutex<Vec<String>>,
}

impl Shared {
    pub(crate) fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    pub(crate) fn violation(&self, msg: String) {
        let msg = format!(
            "seed {}, round {}: {msg}",
            self.seed,
            self.round.load(Ordering::SeqCst)
        );
        self.event(&format!("VIOLATION {msg}"));
        let mut v = lock(&self.violations);
        if v.len() < SHOWN {
            eprintln!("VIOLATION {msg}");
        }
        v.push(msg);
    }

    pub(crate) fn event(&self, msg: &str) {
        use std::io::Write;
        let ms = self.started.elapsed().as_millis();
        let _ = writeln!(lock(&self.events), "{ms:>8} {msg}");
    }

    pub(crate) fn vs(&self, args: &[&str]) -> Output {
        vs_raw(&self.dir, args)
    }

    /// A create or delete by the churn thread (the kill may aim at it),
    /// timed.
    pub(crate) fn churn_cmd(&self, kind: u8, args: &[&str]) -> Output {
        self.busy.store(kind, Ordering::SeqCst);
        self.event(&format!("start {}", args.join(" ")));
        let t = Instant::now();
        let out = self.vs(args);
        let us = t.elapsed().as_micros() as u64;
        self.busy.store(IDLE, Ordering::SeqCst);
        self.event(&format!(
            "end {} ({} us): {} {}",
            args[0],
            us,
            out.status,
            if out.status.success() {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                stderr(&out)
            }
        ));
        if out.status.success() {
            add(&self.stats.cmd_us[usize::from(kind)], us);
            add(&self.stats.cmds[usize::from(kind)], 1);
        }
        out
    }

    /// Mean time of a successful command of `kind` so far (ms, at least 1).
    pub(crate) fn cmd_ms(&self, kind: u8) -> u64 {
        let k = usize::from(kind);
        (get(&self.stats.cmd_us[k]) / get(&self.stats.cmds[k]).max(1) / 1000).max(1)
    }

    /// Parks every writer (after a FLUSH if `flush`); false if the server
    /// was killed meanwhile.
    pub(crate) fn quiesce(&self, flush: bool) -> bool {
        let mut p = lock(&self.pause);
        p.requested = true;
        p.flush = flush;
        p.parked = 0;
        self.pause_flag.store(true, Ordering::SeqCst);
        while p.parked < p.alive && !self.killed() {
            p = self
                .pause_cv
                .wait_timeout(p, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        !self.killed()
    }

    pub(crate) fn resume(&self) {
        let mut p = lock(&self.pause);
        p.requested = false;
        p.parked = 0;
        p.epoch += 1;
        self.pause_flag.store(false, Ordering::SeqCst);
        self.pause_cv.notify_all();
    }

    /// The volume's blocks as every writer last had acknowledged them.
    pub(crate) fn acked_state(&self) -> (Vec<u32>, Vec<usize>) {
        let mut all = Vec::with_capacity(BLOCKS);
        let mut at = Vec::new();
        for lane in &self.lanes {
            let l = lock(lane);
            all.extend_from_slice(&l.cur);
            at.push(l.acked);
        }
        (all, at)
    }
}
