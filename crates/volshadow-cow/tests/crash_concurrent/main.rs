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
//! reproduce (freed slots come back in a fixed order) up to the engine's
//! applier thread, which writes held first writes to the origin after
//! their copies' flush, on its own time.
//!
//! Even seeds run with a diff area that takes copies as extent clones (an
//! unflushed write of the origin's bytes at that moment, as on XFS).
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

mod checks;
#[path = "../common/mod.rs"]
mod common;
mod exec;
mod model;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use common::power::PowerRig;
use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_block::conformance::Rng;
use volshadow_cow::{FullPolicy, SnapshotOptions, Target, Volume, VolumeOptions};

use checks::*;
use exec::*;
use model::*;
use workload::*;

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
    let rig = PowerRig::new(LEN as u64, DIFF_LEN).with_clones(seed.is_multiple_of(2));
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
    let rig = PowerRig::new(LEN as u64, DIFF_LEN).with_clones(seed.is_multiple_of(2));
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
