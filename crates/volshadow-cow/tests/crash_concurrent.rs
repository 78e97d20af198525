//! Concurrent crash-consistency harness (issue 23).
//!
//! Several writer threads, snapshot creates and deletes (persistent and
//! non-persistent), FLUSH and FUA, a diff area small enough to hit its full
//! policy and a journal small enough (`journal_half: 8 KiB`, about 120
//! copy records) that compactions happen all the time, including under
//! write batches of 64–256 chunks, whose copy records do not fit in a half.
//! Everything runs on the power-loss devices of `common::power`: one rail
//! counts every write, discard and flush of the origin and the diff area,
//! from whatever thread; for crash point k the power fails at the k-th
//! operation. A power cut then keeps none, an in-order torn prefix, or a
//! random subset of the unflushed writes; recovery runs once with a second
//! power failure injected, is cut again, and runs again.
//!
//! The workload of a seed is a sequence of rounds. Each round starts at a
//! barrier where only the main thread acts: it flushes, deletes a snapshot,
//! creates one (seeded choices, picks resolved against the live list).
//! Then every writer thread runs its seeded list of writes, FUA writes and
//! flushes in its own region of the volume (regions are disjoint, so each
//! region's history is one thread's sequence), concurrently: they race for
//! group commit, slot allocation, compaction and the full policy. Snapshot
//! contents are therefore known exactly (the model's bytes at the barrier),
//! while the operation order inside a round, and so what the k-th device
//! operation is, depends on scheduling. One seed in four runs its writers
//! in lockstep instead (a seeded turn order, one operation at a time): the
//! same operations in the same order every run, so its crash points
//! reproduce (freed slots come back in a fixed order).
//!
//! The model asserts only what holds for every interleaving:
//!
//! - recovery opens (`Volume::open` succeeds);
//! - every persistent snapshot whose create returned (and whose delete did
//!   not start, and that the delete-oldest policy did not remove) exists and
//!   reads exactly its point-in-time bytes; one whose create or delete was
//!   in flight exists whole or not at all; the oldest snapshot may be gone
//!   if the crash hit a write that was deleting it for room; no
//!   non-persistent snapshot survives, no deleted one comes back;
//! - every write acknowledged before a flush started that then completed
//!   (a FLUSH, the flush of a FUA write, a persistent snapshot's create)
//!   reads back, unless a later write of the same bytes was issued; other
//!   bytes read a value some write issued there;
//! - changed extents between surviving snapshots are exact;
//! - `verify` finds no mismatch;
//! - no operation fails but for the power (or "diff area is full" under
//!   the fail-writes and grow policies, which must leave the data as it was).
//!
//! `VOLSHADOW_CONCURRENT_CRASH_POINTS` sets how many crash points to run
//! (default 20000), `VOLSHADOW_CONCURRENT_CRASH_SEED` the first seed
//! (default 1), `VOLSHADOW_CONCURRENT_CRASH_LANES` how many crash points
//! run at once (default 2; lane l runs seeds first + l, first + l + lanes,
//! ...), and `VOLSHADOW_CONCURRENT_CRASH_LOG` a file to write every
//! violation to. The test prints `crash points: N, violations: M` (and
//! what the crash-free runs of its seeds did: compactions, writes larger
//! than a journal half, refusals and deletions for room) and fails if
//! M > 0; it shows each kind of violation once with an example. The
//! default run (main at 791b0ce: 0 violations) takes 150 s of CPU in
//! `--release`, 150 s of wall time on two cores other builds were also
//! using.
//!
//! Found before the fix (engine at 58ecebe, the default run: 20 000
//! crash points of seeds 1..=21 in 153 s on 2 busy cores): 14 602
//! violations. 14 596 were "recovery failed: … journal record 3 (or 2):
//! durable mark beyond the record itself", 15 of them in the crash-free
//! runs (15 of 18 seeds could not even be reopened cleanly): a batch of
//! copy records that straddled a compaction was written into the new half
//! with the old half's `durable` mark. The other 6 (seeds 10 and 13, free
//! interleavings) opened but a persistent snapshot read new data: "snapshot
//! 2 (round 1) differs at byte 1586039 (445577 bytes differ): reads 0x36,
//! took 0x0" and "snapshot 2 (round 1) differs at byte 45056 (491520 bytes
//! differ): reads 0xdf, took 0x99": the records of a batch larger than a
//! half, written one by one across compactions built from an index that did
//! not hold the batch yet, were lost. `concurrent_crash_regressions` keeps
//! four lockstep points of the first kind.
//!
//! Found after that fix (main at 83d186f: 11 violations in 20 000 points;
//! at 4d4ace0: 17, seeds 1..=29, 248 s), all under a random-subset power
//! cut (a cache that writes back out of order), all "read: snapshot …:
//! chunk N … is damaged: the preserved copy fails its checksum". The power
//! fails at the flush of a compaction started in the middle of a batch of
//! copies; the cache wrote the new half's checkpoint but not the batch's
//! slot entries (or data); recovery adopts a whole checkpoint in the half
//! the superblock does not name yet and trusts its versions unchecked.
//! Kept as a regression: seed 15 op 8. (A flush before a compaction writes
//! its checkpoint, tried outside the tree, gave 0 violations in 20 000
//! points.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use common::power::PowerRig;
use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_block::conformance::Rng;
use volshadow_cow::{FullPolicy, SnapshotOptions, Target, Volume, VolumeOptions};

const CHUNK: usize = 4096;
/// Writer regions (offset, length): one thread each.
const REGIONS: [(usize, usize); 3] = [(0, 1 << 20), (1 << 20, 512 << 10), (1536 << 10, 512 << 10)];
const LEN: usize = 2 << 20;
/// 683 slots of 4 KiB: a checkpoint of a full index still fits in a half.
const DIFF_LEN: u64 = 3 << 20;
const JOURNAL_HALF: u64 = 8192;
const ROUNDS: usize = 6;
const MAX_SNAPS: usize = 5;

/// One operation of a writer thread.
#[derive(Debug, Clone)]
enum WOp {
    /// `fua`: a flush follows the write (FUA as the NBD server does it).
    Write {
        off: usize,
        len: usize,
        byte: u8,
        fua: bool,
    },
    Flush,
}

/// One operation of the main thread at a barrier.
#[derive(Debug, Clone)]
enum BOp {
    Flush,
    Create { persistent: bool },
    Delete { pick: usize },
}

#[derive(Debug, Clone)]
struct Round {
    barrier: Vec<BOp>,
    writers: Vec<Vec<WOp>>,
    /// Lockstep: the seeded order in which writers take turns.
    turns: Option<Vec<usize>>,
}

fn policy_of(seed: u64) -> (FullPolicy, Option<u64>) {
    let slot = CHUNK as u64;
    match seed % 3 {
        0 => (FullPolicy::DeleteOldest, Some(320 * slot)),
        1 => (FullPolicy::FailWrites, Some(400 * slot)),
        _ => (FullPolicy::Grow { max: 600 * slot }, Some(200 * slot)),
    }
}

/// Seeds whose writers take seeded turns: one in four, or all with
/// `VOLSHADOW_CONCURRENT_CRASH_LOCKSTEP=1` (to reproduce a point exactly).
fn lockstep(seed: u64) -> bool {
    static ALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    seed % 4 == 3 || *ALL.get_or_init(|| env("VOLSHADOW_CONCURRENT_CRASH_LOCKSTEP", 0) == 1)
}

fn writer_op(rng: &mut Rng, (start, len): (usize, usize)) -> WOp {
    let r = rng.below(100);
    if r < 18 {
        return WOp::Flush;
    }
    let (off, wlen) = if r < 36 {
        // A batch of 64..=region chunks: its copy records overflow a half.
        let rc = len / CHUNK;
        let n = 64 + rng.below((rc - 64 + 1) as u64) as usize;
        let c0 = rng.below((rc - n + 1) as u64) as usize;
        let (mut off, mut l) = (start + c0 * CHUNK, n * CHUNK);
        if rng.below(2) == 0 {
            let cut = rng.below(CHUNK as u64) as usize;
            off += cut;
            l -= cut;
        }
        (off, l)
    } else {
        let off = start + rng.below(len as u64) as usize;
        let l = 1 + rng.below((start + len - off).min(4 * CHUNK) as u64) as usize;
        (off, l)
    };
    WOp::Write {
        off,
        len: wlen,
        byte: rng.below(255) as u8 + 1,
        fua: rng.below(5) == 0,
    }
}

fn workload(seed: u64) -> Vec<Round> {
    let mut rng = Rng::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    (0..ROUNDS)
        .map(|i| {
            let mut barrier = Vec::new();
            if i == 0 || rng.below(100) < 80 {
                barrier.push(BOp::Create {
                    persistent: rng.below(4) != 0,
                });
            }
            if rng.below(100) < 40 {
                barrier.push(BOp::Delete {
                    pick: rng.below(8) as usize,
                });
            }
            if rng.below(100) < 40 {
                barrier.push(BOp::Flush);
            }
            // Seeded order of the barrier's operations.
            for j in (1..barrier.len()).rev() {
                barrier.swap(j, rng.below(j as u64 + 1) as usize);
            }
            let writers: Vec<Vec<WOp>> = REGIONS
                .iter()
                .map(|&region| {
                    let n = 2 + rng.below(4) as usize;
                    (0..n).map(|_| writer_op(&mut rng, region)).collect()
                })
                .collect();
            let turns = lockstep(seed).then(|| {
                let mut t: Vec<usize> = writers
                    .iter()
                    .enumerate()
                    .flat_map(|(w, ops)| std::iter::repeat_n(w, ops.len()))
                    .collect();
                for j in (1..t.len()).rev() {
                    t.swap(j, rng.below(j as u64 + 1) as usize);
                }
                t
            });
            Round {
                barrier,
                writers,
                turns,
            }
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A write as its region's thread issued it.
#[derive(Debug, Clone)]
struct WRec {
    off: usize,
    len: usize,
    byte: u8,
    /// Logical time of its acknowledgement; `None` while in flight (or
    /// when the power failed under it).
    ack: Option<u64>,
}

#[derive(Debug)]
struct Region {
    start: usize,
    /// The region's bytes as of the acknowledged writes.
    image: Vec<u8>,
    writes: Vec<WRec>,
    /// (round, chunk) of every acknowledged write.
    touched: Vec<(usize, usize)>,
}

#[derive(Debug, Clone)]
struct Snap {
    id: Uuid,
    persistent: bool,
    data: Arc<Vec<u8>>,
    /// Created at the barrier of this round.
    round: usize,
}

/// What the threads share, and what the check needs.
#[derive(Debug)]
struct Model {
    /// Logical clock: write acknowledgements and flush starts.
    clock: AtomicU64,
    /// Every write acknowledged before this time is durable: the largest
    /// start time of a completed flush.
    durable: AtomicU64,
    regions: Vec<Mutex<Region>>,
    /// Failures other than the power's.
    unexpected: Mutex<Vec<String>>,
    snaps: Vec<Snap>,
    /// In flight when the power failed: a create (persistent, bytes) or a
    /// delete.
    creating: Option<(bool, Arc<Vec<u8>>)>,
    deleting: Option<Uuid>,
    /// Snapshots whose delete completed (by the main thread or the
    /// delete-oldest policy).
    gone: Vec<Uuid>,
    /// The power failed while writers ran (a delete-oldest may have been in
    /// flight).
    in_writers: bool,
    /// Writes refused because the diff area was full, and snapshots the
    /// delete-oldest policy removed (for the statistics).
    refused: AtomicU64,
    auto_deleted: u64,
}

impl Model {
    fn new() -> Self {
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

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// A flush that started at `start` completed.
    fn flushed(&self, start: u64) {
        self.durable.fetch_max(start, Ordering::SeqCst);
    }

    /// The volume's bytes as of every acknowledged write (at a barrier:
    /// exactly the live bytes).
    fn image(&self) -> Arc<Vec<u8>> {
        let mut out = vec![0u8; LEN];
        for r in &self.regions {
            let r = lock(r);
            out[r.start..r.start + r.image.len()].copy_from_slice(&r.image);
        }
        Arc::new(out)
    }

    fn unexpected(&self, what: String) {
        lock(&self.unexpected).push(what);
    }

    fn forget_auto_deleted(&mut self, vol: &Volume) {
        for s in vol.take_auto_deleted() {
            self.snaps.retain(|x| x.id != s.id);
            self.gone.push(s.id);
            self.auto_deleted += 1;
        }
    }
}

/// Seeded turn order of a lockstep round.
#[derive(Debug)]
struct Turns {
    order: Vec<usize>,
    pos: Mutex<usize>,
    next: Condvar,
}

impl Turns {
    fn wait(&self, me: usize) {
        let mut pos = lock(&self.pos);
        while self.order[*pos] != me {
            pos = self.next.wait(pos).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn done(&self) {
        *lock(&self.pos) += 1;
        self.next.notify_all();
    }
}

fn is_full(e: &volshadow_block::Error) -> bool {
    e.to_string().contains("diff area is full")
}

/// One writer thread's round. Stops at the first failure of the power.
fn writer(
    vol: &Volume,
    m: &Model,
    rig: &PowerRig,
    w: usize,
    round: usize,
    ops: &[WOp],
    turns: Option<&Turns>,
) {
    let mut stopped = false;
    for op in ops {
        if let Some(t) = turns {
            t.wait(w);
        }
        if !stopped && !rig.rail.is_off() {
            stopped = !writer_op_run(vol, m, rig, w, round, op);
        }
        if let Some(t) = turns {
            t.done();
        }
    }
}

/// Runs one writer operation; false once the power failed under it.
fn writer_op_run(
    vol: &Volume,
    m: &Model,
    rig: &PowerRig,
    w: usize,
    round: usize,
    op: &WOp,
) -> bool {
    let flush = || {
        let start = m.tick();
        match vol.flush() {
            Ok(()) => {
                m.flushed(start);
                true
            }
            Err(e) => {
                if !rig.rail.is_off() {
                    m.unexpected(format!("writer {w}: flush failed: {e}"));
                }
                false
            }
        }
    };
    match *op {
        WOp::Flush => flush(),
        WOp::Write {
            off,
            len,
            byte,
            fua,
        } => {
            let idx = {
                let mut r = lock(&m.regions[w]);
                r.writes.push(WRec {
                    off,
                    len,
                    byte,
                    ack: None,
                });
                r.writes.len() - 1
            };
            match vol.write_at(&vec![byte; len], off as u64) {
                Ok(()) => {
                    let ack = m.tick();
                    let mut r = lock(&m.regions[w]);
                    r.writes[idx].ack = Some(ack);
                    let s = r.start;
                    r.image[off - s..off - s + len].fill(byte);
                    for c in off / CHUNK..=(off + len - 1) / CHUNK {
                        r.touched.push((round, c));
                    }
                }
                // In flight when the power failed: may have landed.
                Err(_) if rig.rail.is_off() => return false,
                Err(e) if is_full(&e) => {
                    // Refused: nothing changed.
                    lock(&m.regions[w]).writes.pop();
                    m.refused.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    m.unexpected(format!("writer {w}: write of {len} at {off} failed: {e}"));
                    return false;
                }
            }
            if fua { flush() } else { true }
        }
    }
}

/// Runs the workload until the power fails.
fn run(vol: &Volume, rig: &PowerRig, rounds: &[Round], m: &mut Model) {
    for (i, round) in rounds.iter().enumerate() {
        m.forget_auto_deleted(vol);
        for op in &round.barrier {
            m.creating = None;
            m.deleting = None;
            match *op {
                BOp::Flush => {
                    let start = m.tick();
                    match vol.flush() {
                        Ok(()) => m.flushed(start),
                        Err(e) => {
                            if !rig.rail.is_off() {
                                m.unexpected(format!("flush failed: {e}"));
                            }
                            return;
                        }
                    }
                }
                BOp::Create { persistent } => {
                    let data = m.image();
                    m.creating = Some((persistent, data.clone()));
                    let start = m.tick();
                    match vol.create_snapshot(SnapshotOptions {
                        persistent,
                        ..Default::default()
                    }) {
                        Ok(info) => {
                            if persistent {
                                m.flushed(start);
                            }
                            m.snaps.push(Snap {
                                id: info.id,
                                persistent,
                                data,
                                round: i,
                            });
                        }
                        Err(e) => {
                            if !rig.rail.is_off() {
                                m.unexpected(format!("create failed: {e}"));
                            }
                            return;
                        }
                    }
                }
                BOp::Delete { pick } => {
                    if m.snaps.is_empty() {
                        continue;
                    }
                    let i = pick % m.snaps.len();
                    let id = m.snaps[i].id;
                    m.deleting = Some(id);
                    match vol.delete_snapshot(id) {
                        Ok(()) => {
                            m.snaps.remove(i);
                            m.gone.push(id);
                        }
                        Err(e) => {
                            if !rig.rail.is_off() {
                                m.unexpected(format!("delete failed: {e}"));
                            }
                            return;
                        }
                    }
                }
            }
        }
        m.creating = None;
        m.deleting = None;
        // Keep the snapshot count bounded: the oldest goes.
        while m.snaps.len() >= MAX_SNAPS {
            let id = m.snaps[0].id;
            m.deleting = Some(id);
            if vol.delete_snapshot(id).is_err() {
                if !rig.rail.is_off() {
                    m.unexpected("bounding delete failed".into());
                }
                return;
            }
            m.snaps.remove(0);
            m.gone.push(id);
            m.deleting = None;
        }
        m.in_writers = true;
        let turns = round.turns.as_ref().map(|order| Turns {
            order: order.clone(),
            pos: Mutex::new(0),
            next: Condvar::new(),
        });
        let model: &Model = m;
        std::thread::scope(|s| {
            for (w, ops) in round.writers.iter().enumerate() {
                let turns = turns.as_ref();
                s.spawn(move || writer(vol, model, rig, w, i, ops, turns));
            }
        });
        if rig.rail.is_off() {
            // The power failed under a writer; completed deletes for room
            // are known, an in-flight one is allowed by `check`.
            m.forget_auto_deleted(vol);
            return;
        }
        m.in_writers = false;
    }
    m.forget_auto_deleted(vol);
    let start = m.tick();
    match vol.flush() {
        Ok(()) => m.flushed(start),
        Err(e) => {
            if !rig.rail.is_off() {
                m.unexpected(format!("final flush failed: {e}"));
            }
        }
    }
}

fn read_all(d: &dyn BlockDevice) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; LEN];
    d.read_at(&mut b, 0).map_err(|e| format!("read: {e}"))?;
    Ok(b)
}

/// Live bytes: per region, the writes acknowledged before the durable mark
/// are a prefix of its history and must read back; the rest may or may not
/// have landed (torn at any sector).
fn check_live(live: &[u8], m: &Model) -> Result<(), String> {
    let durable = m.durable.load(Ordering::SeqCst);
    for region in &m.regions {
        let r = lock(region);
        let s = r.start;
        let n = r.image.len();
        let mut want = vec![0u8; n];
        let mut maybe = vec![false; n];
        let mut prefix = true;
        for w in &r.writes {
            let (lo, hi) = (w.off - s, w.off - s + w.len);
            prefix &= w.ack.is_some_and(|a| a < durable);
            if prefix {
                want[lo..hi].fill(w.byte);
            } else {
                for (b, ok) in live[s + lo..s + hi].iter().zip(&mut maybe[lo..hi]) {
                    *ok |= *b == w.byte;
                }
            }
        }
        for b in 0..n {
            if live[s + b] != want[b] && !maybe[b] {
                let later: BTreeSet<u8> = r
                    .writes
                    .iter()
                    .filter(|w| w.off <= s + b && s + b < w.off + w.len)
                    .filter(|w| w.ack.is_none_or(|a| a >= durable))
                    .map(|w| w.byte)
                    .collect();
                return Err(format!(
                    "live byte {} is {:#x}; flushed value {:#x}, later writes {later:x?}",
                    s + b,
                    live[s + b],
                    want[b]
                ));
            }
        }
    }
    Ok(())
}

/// Checks a recovered volume against the model.
fn check(vol: &Volume, m: &Model, policy: FullPolicy) -> Result<(), String> {
    if let Some(e) = lock(&m.unexpected).first() {
        return Err(format!("unexpected failure before the crash: {e}"));
    }
    check_live(&read_all(vol)?, m)?;
    let listed = vol.snapshots();
    // A delete for room may have been in flight: the oldest left.
    let auto = (m.in_writers && policy == FullPolicy::DeleteOldest)
        .then(|| m.snaps.first().map(|s| s.id))
        .flatten();
    let mut unknown = 0;
    for s in &listed {
        if !s.persistent {
            return Err(format!("non-persistent snapshot {} survived", s.id));
        }
        let data = read_all(&vol.snapshot(s.id).map_err(|e| e.to_string())?)?;
        match m.snaps.iter().find(|x| x.id == s.id) {
            Some(x) if !x.persistent => {
                return Err(format!("non-persistent snapshot {} survived", s.id));
            }
            Some(x) if *x.data != data => {
                let at = x
                    .data
                    .iter()
                    .zip(&data)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                let diff = x.data.iter().zip(&data).filter(|(a, b)| a != b).count();
                return Err(format!(
                    "snapshot {} (round {}) differs at byte {at} ({diff} bytes differ): reads {:#x}, took {:#x}",
                    s.seq, x.round, data[at], x.data[at]
                ));
            }
            Some(_) => {}
            None if m.gone.contains(&s.id) => {
                return Err(format!("deleted snapshot {} came back", s.seq));
            }
            None => {
                unknown += 1;
                match &m.creating {
                    Some((true, want)) if **want == data => {}
                    Some((true, _)) => {
                        return Err(format!("half-made snapshot {} reads wrong bytes", s.seq));
                    }
                    _ => return Err(format!("unexpected snapshot {}", s.seq)),
                }
            }
        }
    }
    if unknown > 1 {
        return Err("more than one unknown snapshot".into());
    }
    for x in m.snaps.iter().filter(|x| x.persistent) {
        if !listed.iter().any(|s| s.id == x.id) && m.deleting != Some(x.id) && auto != Some(x.id) {
            return Err(format!("persistent snapshot of round {} was lost", x.round));
        }
    }
    // Changed extents between surviving known snapshots.
    let mut touched: Vec<(u64, usize)> = Vec::new();
    for r in &m.regions {
        touched.extend(
            lock(r)
                .touched
                .iter()
                .map(|&(round, c)| (2 * round as u64 + 1, c)),
        );
    }
    let known: Vec<&Snap> = m
        .snaps
        .iter()
        .filter(|x| listed.iter().any(|s| s.id == x.id))
        .collect();
    for (i, a) in known.iter().enumerate() {
        for b in &known[i..] {
            let got = vol
                .changed_extents(a.id, Target::Snapshot(b.id))
                .map_err(|e| e.to_string())?;
            let want =
                common::model_changed(&touched, 2 * a.round as u64, 2 * b.round as u64, CHUNK);
            if got != want {
                return Err(format!(
                    "changed extents rounds {}..{}: {got:?}, expected {want:?}",
                    a.round, b.round
                ));
            }
        }
    }
    let report = vol.verify().map_err(|e| format!("verify: {e}"))?;
    if !report.mismatches.is_empty() {
        return Err(format!("verify: {:?}", report.mismatches));
    }
    Ok(())
}

fn options(seed: u64) -> VolumeOptions {
    let (policy, max_bytes) = policy_of(seed);
    VolumeOptions {
        chunk_size: CHUNK as u32,
        journal_half: Some(JOURNAL_HALF),
        policy,
        max_bytes,
        ..Default::default()
    }
}

/// Runs one crash point; `Err` is a violation.
fn crash_point(seed: u64, k: u64, variant: u64) -> Result<(), String> {
    let rig = PowerRig::new(LEN as u64, DIFF_LEN);
    rig.rail.disarm();
    let vol = rig.create(options(seed));
    rig.rail.arm(k);
    let mut model = Model::new();
    run(&vol, &rig, &workload(seed), &mut model);
    drop(vol);
    let mut rng = Rng::new(seed ^ (k << 20) ^ (variant << 56));
    rig.cut(&mut rng, variant);
    // A second power failure during recovery.
    rig.rail.arm(rng.below(6));
    if let Ok(v) = rig.open() {
        drop(v);
    }
    rig.cut(&mut rng, variant);
    rig.rail.disarm();
    let vol = rig.open().map_err(|e| format!("recovery failed: {e}"))?;
    check(&vol, &model, options(seed).policy)
}

/// What the crash-free runs did, to show the workload reaches the paths
/// it is meant to.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    seeds: u64,
    /// Journal compactions (superblock writes).
    compactions: u64,
    /// Writes whose copy records overflow a journal half (> 120 chunks).
    big_batches: u64,
    refused: u64,
    auto_deleted: u64,
    group_commit_flushes: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.seeds += o.seeds;
        self.compactions += o.compactions;
        self.big_batches += o.big_batches;
        self.refused += o.refused;
        self.auto_deleted += o.auto_deleted;
        self.group_commit_flushes += o.group_commit_flushes;
    }
}

/// Runs a seed without a crash: returns the device operations it issued,
/// and checks the model after a clean reopen.
fn clean_run(seed: u64) -> (u64, Stats, Result<(), String>) {
    use volshadow_block::OpKind;
    let rig = PowerRig::new(LEN as u64, DIFF_LEN);
    rig.rail.disarm();
    let vol = rig.create(options(seed));
    rig.diff.clear_log();
    rig.rail.arm(u64::MAX);
    let mut model = Model::new();
    let rounds = workload(seed);
    run(&vol, &rig, &rounds, &mut model);
    let n = rig.rail.count();
    let stats = Stats {
        seeds: 1,
        compactions: rig
            .diff
            .log()
            .iter()
            .filter(|r| r.kind == OpKind::Write && r.offset < 8192 && !r.failed)
            .count() as u64,
        big_batches: rounds
            .iter()
            .flat_map(|r| r.writers.iter().flatten())
            .filter(|op| matches!(op, WOp::Write { len, .. } if *len > 120 * CHUNK))
            .count() as u64,
        refused: model.refused.load(Ordering::Relaxed),
        auto_deleted: model.auto_deleted,
        group_commit_flushes: vol.group_commit_flushes(),
    };
    drop(vol);
    rig.cut(&mut Rng::new(seed), 0);
    rig.rail.disarm();
    let checked = match rig.open() {
        Ok(vol) => check(&vol, &model, options(seed).policy),
        Err(e) => Err(format!("reopen failed: {e}")),
    };
    (n, stats, checked)
}

/// "journal record 7: durable mark" -> "journal record #: durable mark":
/// every word holding a digit (numbers, ids) becomes `#`.
fn kind_of(msg: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.chars().any(|c| c.is_ascii_digit()) {
            out.push('#');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in msg.chars() {
        if c.is_ascii_alphanumeric() || c == '-' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one lane ran.
#[derive(Debug, Default)]
struct Lane {
    points: u64,
    violations: Vec<String>,
    last_seed: u64,
    stats: Stats,
}

/// Crash points of seeds `first`, `first + step`, ... until `target` ran.
fn lane(first: u64, step: u64, target: u64) -> Lane {
    let mut out = Lane::default();
    let Lane {
        points,
        violations,
        last_seed: seed,
        stats,
    } = &mut out;
    *seed = first;
    loop {
        let (n, st, clean) = clean_run(*seed);
        *stats += st;
        if let Err(e) = clean {
            violations.push(format!("seed {seed} without a crash: {e}"));
        }
        for k in 0..n {
            if *points >= target {
                return out;
            }
            let variant = (k + *seed) % 3;
            *points += 1;
            if let Err(e) = crash_point(*seed, k, variant) {
                violations.push(format!(
                    "seed {seed}{} crash at op {k} of {n} variant {variant}: {e}",
                    if lockstep(*seed) { " (lockstep)" } else { "" }
                ));
            }
        }
        *seed += step;
    }
}

#[test]
fn concurrent_crash_consistency() {
    let target = env("VOLSHADOW_CONCURRENT_CRASH_POINTS", 20000);
    let first = env("VOLSHADOW_CONCURRENT_CRASH_SEED", 1);
    // Crash points run in this many lanes at once (each lane its own
    // seeds: first + lane, first + lane + lanes, ...).
    let lanes = env("VOLSHADOW_CONCURRENT_CRASH_LANES", 2).max(1);
    let start = Instant::now();
    let lanes_run: Vec<Lane> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|l| {
                let share = target / lanes + u64::from(l < target % lanes);
                s.spawn(move || lane(first + l, lanes, share))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let points: u64 = lanes_run.iter().map(|r| r.points).sum();
    let last = lanes_run.iter().map(|r| r.last_seed).max().unwrap_or(first);
    let violations: Vec<&String> = lanes_run.iter().flat_map(|r| &r.violations).collect();
    let mut stats = Stats::default();
    for l in &lanes_run {
        stats += l.stats;
    }
    println!(
        "crash-free runs of {} seeds: {} compactions, {} writes of more than a journal half of copies (120 chunks), \
         {} writes refused (diff area full), {} snapshots deleted for room, {} group-commit flushes",
        stats.seeds,
        stats.compactions,
        stats.big_batches,
        stats.refused,
        stats.auto_deleted,
        stats.group_commit_flushes
    );
    let mut kinds: BTreeMap<String, (u64, &String)> = BTreeMap::new();
    for v in &violations {
        let msg = v.split_once(": ").map_or(v.as_str(), |(_, m)| m);
        kinds.entry(kind_of(msg)).or_insert((0, v)).0 += 1;
    }
    if let Ok(path) = std::env::var("VOLSHADOW_CONCURRENT_CRASH_LOG") {
        let all: Vec<&str> = violations.iter().map(|v| v.as_str()).collect();
        std::fs::write(&path, all.join("\n")).expect("violation log");
    }
    for (kind, (count, example)) in &kinds {
        eprintln!("violation x{count}: {kind}\n  e.g. {example}");
    }
    println!(
        "crash points: {points}, violations: {} (seeds {first}..={last}, {lanes} lanes, {:.1} s)",
        violations.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(violations.is_empty(), "{} violations", violations.len());
}

/// Lockstep crash points that found bugs, kept as regressions (seed, op,
/// power-cut variant):
/// - the first four failed before the fix (58ecebe) with "journal record 3
///   (2 for seed 7): durable mark beyond the record itself";
/// - seed 15 op 8 random subset, after it (83d186f): the power fails at the
///   flush of a compaction that a batch of 126 copies started; the cache
///   wrote back the new half's checkpoint but not the batch's slot entries;
///   recovery adopted the whole newer checkpoint the superblock did not
///   name yet, trusting its versions unchecked, and the persistent
///   snapshot's read of chunk 384 fails: "the preserved copy fails its
///   checksum".
#[test]
fn concurrent_crash_regressions() {
    let failed: Vec<String> = [
        (7, 30, 1),
        (11, 50, 1),
        (15, 29, 2),
        (19, 621, 1),
        (15, 8, 2),
    ]
    .into_iter()
    .filter_map(|(seed, k, variant)| {
        assert!(lockstep(seed));
        crash_point(seed, k, variant)
            .err()
            .map(|e| format!("seed {seed} op {k} variant {variant}: {e}"))
    })
    .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
