//! Crash-consistency harness.
//!
//! A seeded workload (writes, discards, flushes, persistent and
//! non-persistent snapshots, deletes, reverts) runs on `FaultyDevice`s for
//! the origin and the diff area. Both sit on one "power rail" that counts
//! every write, discard and flush of either device. For crash point k the
//! power goes off at the k-th such operation; then a power cut decides what
//! of the unflushed writes reached the media (none; an in-order prefix whose
//! last write is torn at 512-byte granularity; or a random subset), the
//! volume is reopened with a second power failure injected during recovery,
//! reopened again, and checked against a model:
//!
//! - every persistent snapshot whose creation completed (and whose delete
//!   did not) exists and reads exactly its point-in-time bytes; a snapshot
//!   whose creation or delete was in flight either exists whole or not at all;
//!   no non-persistent snapshot survives;
//! - every byte the last completed flush covered reads as flushed; bytes
//!   written since read either their flushed value or a value written since;
//! - changed extents between surviving snapshots are exact;
//! - verify finds no damaged copy.
//!
//! Even seeds run with a diff area that takes copies as extent clones (an
//! unflushed write of the origin's bytes at that moment, as on XFS).
//!
//! `VOLSHADOW_CRASH_POINTS` sets how many crash points to run (default
//! 2000); the test prints `crash points: N, violations: M` and fails if M > 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

mod common;
use std::time::Instant;

use common::power::PowerRig;
use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_block::conformance::Rng;
use volshadow_cow::{Extent, SnapshotOptions, Target, Volume, VolumeOptions};

const LEN: usize = 128 << 10;
const CHUNK: usize = 4096;
const DIFF_LEN: u64 = 2 << 20;
const OPS: usize = 48;
const MAX_SNAPS: usize = 6;

/// One step of a workload. Picks are resolved against the live list.
#[derive(Debug, Clone)]
enum Step {
    Write { off: usize, len: usize, byte: u8 },
    Discard { off: usize, len: usize },
    Flush,
    Snapshot { persistent: bool },
    Delete { pick: usize },
    Revert { pick: usize },
}

fn workload(seed: u64) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    (0..OPS)
        .map(|_| {
            let r = rng.below(100);
            let off = rng.below(LEN as u64) as usize;
            let len = 1 + rng.below((LEN - off).min(3 * CHUNK) as u64) as usize;
            match r {
                0..=44 => Step::Write {
                    off,
                    len,
                    byte: rng.below(255) as u8 + 1,
                },
                45..=51 => Step::Discard { off, len },
                52..=65 => Step::Flush,
                66..=83 => Step::Snapshot {
                    persistent: rng.below(3) != 0,
                },
                84..=93 => Step::Delete {
                    pick: rng.below(8) as usize,
                },
                _ => Step::Revert {
                    pick: rng.below(8) as usize,
                },
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Snap {
    id: Uuid,
    persistent: bool,
    data: Vec<u8>,
    born: u64,
}

/// A value some byte may hold after a crash besides its flushed value.
#[derive(Debug, Clone)]
enum Since {
    Fill { off: usize, len: usize, byte: u8 },
    Copy { chunks: Vec<usize>, data: Vec<u8> },
}

#[derive(Debug, Default)]
struct Model {
    live: Vec<u8>,
    durable: Vec<u8>,
    since: Vec<Since>,
    snaps: Vec<Snap>,
    clock: u64,
    writes: Vec<(u64, usize)>,
    /// Set while a create (its expected bytes) or a delete (its id) is in flight.
    creating: Option<Vec<u8>>,
    deleting: Option<Uuid>,
}

impl Model {
    fn new() -> Self {
        Model {
            live: vec![0; LEN],
            durable: vec![0; LEN],
            ..Default::default()
        }
    }

    fn touch(&mut self, chunks: impl Iterator<Item = usize>) {
        self.clock += 1;
        for c in chunks {
            self.writes.push((self.clock, c));
        }
    }

    fn flushed(&mut self) {
        self.durable.clone_from(&self.live);
        self.since.clear();
    }

    fn changed(&self, from: u64, to: u64) -> Vec<Extent> {
        common::model_changed(&self.writes, from, to, CHUNK)
    }

    fn changed_since(&self, born: u64) -> Vec<usize> {
        let set: BTreeSet<usize> = self
            .writes
            .iter()
            .filter(|(t, _)| *t > born)
            .map(|&(_, c)| c)
            .collect();
        set.into_iter().collect()
    }
}

fn chunks_of(off: usize, len: usize) -> std::ops::RangeInclusive<usize> {
    off / CHUNK..=(off + len - 1) / CHUNK
}

/// Runs `steps` until one fails (the power went off). The model tracks
/// what is guaranteed and what is in flight.
fn run(vol: &Volume, steps: &[Step], m: &mut Model) {
    for step in steps {
        m.creating = None;
        m.deleting = None;
        let ok = match *step {
            Step::Write { off, len, byte } => {
                m.since.push(Since::Fill { off, len, byte });
                let r = vol.write_at(&vec![byte; len], off as u64);
                if r.is_ok() {
                    m.live[off..off + len].fill(byte);
                    m.touch(chunks_of(off, len));
                }
                r.is_ok()
            }
            Step::Discard { off, len } => {
                m.since.push(Since::Fill { off, len, byte: 0 });
                let r = vol.discard(off as u64, len as u64);
                if r.is_ok() {
                    m.live[off..off + len].fill(0);
                    m.touch(chunks_of(off, len));
                }
                r.is_ok()
            }
            Step::Flush => {
                let r = vol.flush();
                if r.is_ok() {
                    m.flushed();
                }
                r.is_ok()
            }
            Step::Snapshot { persistent } => {
                if m.snaps.len() >= MAX_SNAPS {
                    continue;
                }
                if persistent {
                    m.creating = Some(m.live.clone());
                }
                match vol.create_snapshot(SnapshotOptions {
                    persistent,
                    ..Default::default()
                }) {
                    Ok(info) => {
                        m.clock += 1;
                        m.snaps.push(Snap {
                            id: info.id,
                            persistent,
                            data: m.live.clone(),
                            born: m.clock,
                        });
                        if persistent {
                            m.flushed();
                        }
                        true
                    }
                    Err(_) => false,
                }
            }
            Step::Delete { pick } => {
                if m.snaps.is_empty() {
                    continue;
                }
                let i = pick % m.snaps.len();
                let id = m.snaps[i].id;
                m.deleting = Some(id);
                let r = vol.delete_snapshot(id);
                if r.is_ok() {
                    m.snaps.remove(i);
                }
                r.is_ok()
            }
            Step::Revert { pick } => {
                let persistent: Vec<usize> = (0..m.snaps.len())
                    .filter(|&i| m.snaps[i].persistent)
                    .collect();
                if persistent.is_empty() {
                    continue;
                }
                let i = persistent[pick % persistent.len()];
                // Only chunks whose bytes differ from the target are
                // rewritten (and count as changed).
                let target = &m.snaps[i].data;
                let chunks: Vec<usize> = m
                    .changed_since(m.snaps[i].born)
                    .into_iter()
                    .filter(|&c| {
                        m.live[c * CHUNK..(c + 1) * CHUNK] != target[c * CHUNK..(c + 1) * CHUNK]
                    })
                    .collect();
                m.since.push(Since::Copy {
                    chunks: chunks.clone(),
                    data: m.snaps[i].data.clone(),
                });
                let r = vol.revert(m.snaps[i].id);
                if r.is_ok() {
                    m.live.clone_from(&m.snaps[i].data);
                    m.touch(chunks.into_iter());
                    m.flushed();
                }
                r.is_ok()
            }
        };
        if !ok {
            return;
        }
    }
}

fn read_all(d: &dyn BlockDevice) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; LEN];
    d.read_at(&mut b, 0).map_err(|e| format!("read: {e}"))?;
    Ok(b)
}

/// Checks a recovered volume against the model.
fn check(vol: &Volume, m: &Model) -> Result<(), String> {
    // Live bytes.
    let live = read_all(vol)?;
    let mut allowed: Vec<Vec<u8>> = vec![Vec::new(); LEN];
    for s in &m.since {
        match s {
            Since::Fill { off, len, byte } => {
                for a in &mut allowed[*off..off + len] {
                    a.push(*byte);
                }
            }
            Since::Copy { chunks, data } => {
                for &c in chunks {
                    for b in c * CHUNK..(c + 1) * CHUNK {
                        allowed[b].push(data[b]);
                    }
                }
            }
        }
    }
    for b in 0..LEN {
        if live[b] != m.durable[b] && !allowed[b].contains(&live[b]) {
            return Err(format!(
                "live byte {b} is {:#x}; flushed value {:#x}, later writes {:?}",
                live[b], m.durable[b], allowed[b]
            ));
        }
    }
    // Snapshots.
    let listed = vol.snapshots();
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
            Some(x) if x.data != data => {
                let at = x
                    .data
                    .iter()
                    .zip(&data)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!("snapshot {} differs at byte {at}", s.id));
            }
            Some(_) => {}
            None => {
                unknown += 1;
                match &m.creating {
                    Some(want) if *want == data => {}
                    Some(_) => {
                        return Err(format!("half-made snapshot {} reads wrong bytes", s.id));
                    }
                    None => return Err(format!("unexpected snapshot {}", s.id)),
                }
            }
        }
    }
    if unknown > 1 {
        return Err("more than one unknown snapshot".into());
    }
    for x in m.snaps.iter().filter(|x| x.persistent) {
        if !listed.iter().any(|s| s.id == x.id) && m.deleting != Some(x.id) {
            return Err(format!("persistent snapshot {} was lost", x.id));
        }
    }
    // Changed extents between surviving known snapshots.
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
            let want = m.changed(a.born, b.born);
            if got != want {
                return Err(format!("changed extents {got:?}, expected {want:?}"));
            }
        }
    }
    let report = vol.verify().map_err(|e| e.to_string())?;
    if !report.mismatches.is_empty() {
        return Err(format!("verify: {:?}", report.mismatches));
    }
    Ok(())
}

/// The devices of one crash point.
struct Bench(PowerRig);

impl std::ops::Deref for Bench {
    type Target = PowerRig;
    fn deref(&self) -> &PowerRig {
        &self.0
    }
}

impl Bench {
    /// Even seeds' diff areas take copies as extent clones.
    fn new(seed: u64) -> Self {
        Bench(PowerRig::new(LEN as u64, DIFF_LEN).with_clones(seed.is_multiple_of(2)))
    }

    fn create(&self) -> Volume {
        self.0.create(VolumeOptions {
            chunk_size: CHUNK as u32,
            journal_half: Some(8192),
            ..Default::default()
        })
    }
}

/// Runs one crash point; `Err` is a violation.
fn crash_point(seed: u64, k: u64, variant: u64) -> Result<(), String> {
    let bench = Bench::new(seed);
    let steps = workload(seed);
    bench.rail.disarm();
    let vol = bench.create();
    bench.rail.arm(k);
    let mut model = Model::new();
    run(&vol, &steps, &mut model);
    drop(vol);
    let mut rng = Rng::new(seed ^ (k << 20) ^ variant);
    bench.cut(&mut rng, variant);
    // A second power failure during recovery.
    bench.rail.arm(rng.below(6));
    if let Ok(v) = bench.open() {
        drop(v);
    }
    bench.cut(&mut rng, variant);
    bench.rail.disarm();
    let vol = bench.open().map_err(|e| format!("recovery failed: {e}"))?;
    check(&vol, &model)
}

/// Operations a workload issues without a crash.
fn ops_of(seed: u64) -> u64 {
    let bench = Bench::new(seed);
    bench.rail.disarm();
    let vol = bench.create();
    bench.rail.arm(u64::MAX);
    let mut model = Model::new();
    run(&vol, &workload(seed), &mut model);
    let n = bench.rail.count();
    // Without a crash the whole model must hold as well.
    bench.rail.disarm();
    drop(vol);
    bench.origin.flush().unwrap();
    n
}

#[test]
fn crash_consistency() {
    let target: u64 = std::env::var("VOLSHADOW_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let start = Instant::now();
    let mut points = 0u64;
    let mut violations = Vec::new();
    let mut seed = 1u64;
    'outer: loop {
        let n = ops_of(seed);
        for k in 0..n {
            let variant = (k + seed) % 3;
            points += 1;
            if let Err(e) = crash_point(seed, k, variant) {
                violations.push(format!(
                    "seed {seed} crash at op {k} variant {variant}: {e}"
                ));
            }
            if points >= target {
                break 'outer;
            }
        }
        seed += 1;
    }
    for v in violations.iter().take(10) {
        eprintln!("violation: {v}");
    }
    println!(
        "crash points: {points}, violations: {} ({} seeds, {:.1} s)",
        violations.len(),
        seed,
        start.elapsed().as_secs_f64()
    );
    assert!(violations.is_empty(), "{} violations", violations.len());
}

/// Crash points that found bugs, kept as regressions:
/// - seed 1, op 13 / 28, random-subset cut: a copy's journal record reached
///   the media without its data; recovery trusted it and a snapshot read a
///   stale slot. Fixed by the `durable` mark and hash check in `Preserve`.
/// - seed 1, op 61: a crash during revert; resuming it closed the write
///   gate with `Duration::MAX`, which overflowed `Instant`.
/// - seed 4, op 109, random-subset cut: recovery rewrote a copy's slot
///   entry, then lost power inside its checkpoint; the checkpoint's half
///   reached the media but the entry write did not, and the next recovery
///   took that half as newer than the superblock. A newer half now needs
///   records appended after its checkpoint as proof.
#[test]
fn crash_regressions() {
    for (seed, k, variant) in [
        (1, 13, 2),
        (1, 28, 2),
        (1, 61, 2),
        (1, 139, 2),
        (1, 178, 2),
        (4, 109, 2),
    ] {
        crash_point(seed, k, variant).unwrap_or_else(|e| panic!("seed {seed} op {k}: {e}"));
    }
}

/// I/O fault injection: EIO and ENOSPC on every read, write and flush of
/// the origin and of the diff area, at every point of a workload. The
/// failing call must return an error (never panic); the volume then either
/// keeps working or refuses writes with "needs recovery"; after a reopen
/// nothing acknowledged is lost and no snapshot reads wrong bytes.
#[test]
fn io_fault_injection() {
    use volshadow_block::{Fault, FaultAction, FaultError, OpKind};
    let per_kind: u64 = std::env::var("VOLSHADOW_FAULT_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let start = Instant::now();
    let mut cases = 0u64;
    let mut violations = Vec::new();
    for seed in [3u64, 4] {
        // Count operations of each kind on each device in a clean run.
        let clean = Bench::new(seed);
        clean.rail.disarm();
        let vol = clean.create();
        let base = [OpKind::Read, OpKind::Write, OpKind::Flush]
            .map(|k| (clean.origin.count(k), clean.diff.count(k)));
        run(&vol, &workload(seed), &mut Model::new());
        drop(vol);
        let totals = [OpKind::Read, OpKind::Write, OpKind::Flush]
            .map(|k| (clean.origin.count(k), clean.diff.count(k)));
        for (ki, kind) in [OpKind::Read, OpKind::Write, OpKind::Flush]
            .into_iter()
            .enumerate()
        {
            for on_diff in [false, true] {
                let (b, t) = if on_diff {
                    (base[ki].1, totals[ki].1)
                } else {
                    (base[ki].0, totals[ki].0)
                };
                let n = t - b;
                let step = (n / per_kind).max(1);
                for nth in (0..n).step_by(step as usize) {
                    for err in [FaultError::Eio, FaultError::Enospc] {
                        cases += 1;
                        if let Err(e) = fault_case(seed, kind, on_diff, nth, err) {
                            violations.push(format!(
                                "seed {seed} {kind:?} #{nth} on {} {err:?}: {e}",
                                if on_diff { "diff" } else { "origin" }
                            ));
                        }
                    }
                }
            }
        }
    }
    for v in violations.iter().take(10) {
        eprintln!("violation: {v}");
    }
    println!(
        "fault cases: {cases}, violations: {} ({:.1} s)",
        violations.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(violations.is_empty());

    fn fault_case(
        seed: u64,
        kind: OpKind,
        on_diff: bool,
        nth: u64,
        err: FaultError,
    ) -> Result<(), String> {
        let bench = Bench::new(seed);
        bench.rail.disarm();
        let vol = bench.create();
        let dev = if on_diff { &bench.diff } else { &bench.origin };
        dev.set_fault(Fault::on(kind, nth, FaultAction::Fail(err)));
        let mut model = Model::new();
        run(&vol, &workload(seed), &mut model);
        // Keeps working, or refuses with a clear "needs recovery".
        model.since.push(Since::Fill {
            off: 0,
            len: 512,
            byte: 0xEE,
        });
        let failed_before = vol.needs_recovery();
        match vol.write_at(&[0xEE; 512], 0) {
            Ok(()) => {
                model.live[..512].fill(0xEE);
                model.touch(chunks_of(0, 512));
            }
            Err(e) => {
                let msg = e.to_string();
                if failed_before && !msg.contains("needs recovery") {
                    return Err(format!("a failed volume said {msg:?}"));
                }
            }
        }
        drop(vol);
        bench.origin.clear_fault();
        bench.diff.clear_fault();
        let vol = bench
            .open()
            .map_err(|e| format!("reopen after the fault failed: {e}"))?;
        check(&vol, &model)
    }
}
