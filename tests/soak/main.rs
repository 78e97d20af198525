//! Process-level soak test: `volshadow serve` under concurrent NBD writers
//! and shadow-copy churn, killed with SIGKILL at random moments, restarted,
//! and checked against a model after every restart.
//!
//! One run: a 64 MiB image with shadow storage (4 KiB or 16 KiB chunks,
//! chosen by the seed), then rounds of
//!
//! - `serve` on a Unix socket;
//! - `WRITERS` writer threads, each with its own NBD connection and its own
//!   16 MiB region, sending WRITEs of 4 KiB–1 MiB (some with FUA) and a
//!   FLUSH every so often, one request at a time;
//! - a churn thread that creates shadow copies through the command line
//!   (`create shadow`, persistent and `--non-persistent`) and deletes some
//!   (`delete shadows --shadow ID`), at most `MAX_SHADOWS` alive. Most
//!   creates quiesce the writers first (they park between requests, half
//!   the time after a FLUSH), so the copy's contents are known exactly;
//!   some run while the writers keep writing, and such a copy must then
//!   hold, per region, every write acknowledged before the create began
//!   plus some prefix of the writes sent until it returned (it is read
//!   back at once to pin down which);
//! - a reader thread reading random ranges of shadow copies over NBD;
//! - SIGKILL of `serve` at a random moment (one kill in three aimed into a
//!   create or delete command), then a restart. Meanwhile the image's
//!   binding file is moved aside, so a command that reaches no server
//!   cannot fall back to opening the volume itself.
//!
//! After each restart: the server starts (the volume opens); every
//! persistent shadow copy whose create succeeded and whose delete did not is
//! listed and reads back exactly (over NBD, some through `volshadow read`);
//! a copy whose create or delete was in flight at the kill exists whole or
//! not at all; deleted and non-persistent copies are gone; `verify` finds no
//! damage; every 4 KiB block of the live volume holds its durable value (the
//! last write acknowledged with FUA or before an acknowledged FLUSH) or a
//! value written after it.
//!
//! Every block a write leaves is self-describing (write id, block index,
//! then bytes derived from both), so a block read back names the write it
//! came from, and torn or misplaced data shows as such.
//!
//! `VOLSHADOW_SOAK_SECS` (default 50): no new round starts after this many
//! seconds (at least 3 rounds run). `VOLSHADOW_SOAK_SEED` repeats a run's
//! choices (sizes, offsets, actions, round lengths; thread timing still
//! varies), `VOLSHADOW_SOAK_CHUNK` (e.g. `4K`) overrides the chunk size. The
//! test prints a line per round and a summary, and fails on any violation,
//! keeping the run's directory (image, diff area, server logs and
//! `events.log`: every command, kill, restart and listing, timed).
// Unix only: the server is SIGKILLed under load and served on a Unix socket.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod checks;
#[path = "../common/mod.rs"]
mod common;
mod data;
mod model;
mod threads;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::*;
use volshadow_block::conformance::{self, mix64};

use checks::*;
use data::*;
use model::*;
use threads::*;

pub(crate) const IMG: &str = "disk.img";
pub(crate) const BLOCK: usize = 4096;
pub(crate) const IMG_SIZE: u64 = 64 << 20;
pub(crate) const BLOCKS: usize = (IMG_SIZE as usize) / BLOCK;
pub(crate) const WRITERS: usize = 4;
/// Blocks per writer region (16 MiB).
pub(crate) const REGION: usize = BLOCKS / WRITERS;
/// Largest write or read: 1 MiB.
pub(crate) const MAX_BLOCKS: u64 = 256;
/// Most shadow copies alive at once (the churn deletes one first when
/// there are this many). Each holds at most one copy of every chunk, 64 MiB;
/// after a restart a create that was in flight may add one more. So
/// `MAX_SIZE` of shadow storage never fills and delete-oldest never runs,
/// yet it is small enough that the journal (sized by it) compacts every
/// few seconds under these writers.
pub(crate) const MAX_SHADOWS: usize = 4;
pub(crate) const MAX_SIZE: &str = "384M";
/// A reply slower than this is a hang.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const MIN_ROUNDS: u64 = 3;
/// Violations printed (all are in `events.log`).
pub(crate) const SHOWN: usize = 20;
pub(crate) const DEFAULT_SECS: u64 = 50;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// Free bytes where `dir` is, if `df` says.
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = std::process::Command::new("df")
        .args(["-Pk"])
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn human(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[test]
fn serve_survives_sigkill_under_writers_and_shadow_churn() {
    let secs = env_u64("VOLSHADOW_SOAK_SECS").unwrap_or(DEFAULT_SECS);
    if secs == 0 {
        eprintln!("SKIP: VOLSHADOW_SOAK_SECS=0");
        return;
    }
    let seed = env_u64("VOLSHADOW_SOAK_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        mix64(t.as_nanos() as u64) % 1_000_000
    });
    let chunk = std::env::var("VOLSHADOW_SOAK_CHUNK")
        .unwrap_or_else(|_| if seed.is_multiple_of(2) { "4K" } else { "16K" }.to_string());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    if let Some(free) = free_bytes(&dir)
        && free < 2 << 30
    {
        eprintln!(
            "SKIP: the soak test needs about 2 GiB free beside {}, there are {}",
            dir.display(),
            human(free)
        );
        return;
    }
    let help = vs(&dir, &["create", "shadow", "--help"]);
    let non_persistent = help.contains("--non-persistent");
    if !non_persistent {
        eprintln!("soak: `create shadow` has no --non-persistent; only persistent copies");
    }
    eprintln!(
        "soak: seed {seed}, chunk {chunk}, {secs} s (repeat with VOLSHADOW_SOAK_SEED={seed} \
         VOLSHADOW_SOAK_CHUNK={chunk} VOLSHADOW_SOAK_SECS={secs}); files in {}",
        dir.display()
    );
    vs(&dir, &["image", "create", IMG, "--size", "64M"]);
    vs(
        &dir,
        &[
            "add",
            "shadowstorage",
            "--for",
            IMG,
            "--on",
            "disk.diff",
            "--maxsize",
            MAX_SIZE,
            "--chunk-size",
            &chunk,
        ],
    );
    let binding = dir.join(format!("{IMG}.vshadow"));
    let hidden = dir.join("binding.hidden");

    let sh = Arc::new(Shared {
        socket: dir.join("nbd.sock"),
        dir: dir.clone(),
        seed,
        non_persistent,
        round: AtomicU64::new(0),
        killed: AtomicBool::new(false),
        next_id: AtomicU32::new(1),
        lanes: (0..WRITERS)
            .map(|index| {
                Mutex::new(Lane {
                    index,
                    base: vec![0; REGION],
                    ..Lane::default()
                })
            })
            .collect(),
        pause: Mutex::new(Pause::default()),
        pause_cv: Condvar::new(),
        pause_flag: AtomicBool::new(false),
        busy: AtomicU8::new(IDLE),
        book: Mutex::new(Book::default()),
        stats: Stats::default(),
        violations: Mutex::new(Vec::new()),
        events: Mutex::new(std::fs::File::create(dir.join("events.log")).unwrap()),
        started: Instant::now(),
    });

    let started = Instant::now();
    let mut main_rng = Rng::new(seed, 0, 0);
    let mut server = Server::try_start(&dir, IMG, &dir.join("serve-0.log"), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("serve does not start on a new volume: {e}"));
    let mut rounds = 0u64;
    let mut restart_max = Duration::ZERO;
    while rounds < MIN_ROUNDS || started.elapsed() < Duration::from_secs(secs) {
        rounds += 1;
        let round = rounds;
        sh.round.store(round, Ordering::SeqCst);
        sh.killed.store(false, Ordering::SeqCst);
        for lane in &sh.lanes {
            let mut l = lock(lane);
            l.cur = l.base.clone();
            l.log.clear();
            l.acked = 0;
        }
        *lock(&sh.pause) = Pause {
            alive: WRITERS,
            ..Pause::default()
        };
        let run_for = main_rng.range(1500, 7000);
        let writes_before = get(&sh.stats.writes);
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let sh = sh.clone();
                std::thread::spawn(move || writer(&sh, w, Rng::new(seed, 10 + w as u64, round)))
            })
            .chain([
                {
                    let sh = sh.clone();
                    std::thread::spawn(move || churn(&sh, Rng::new(seed, 1, round)))
                },
                {
                    let sh = sh.clone();
                    std::thread::spawn(move || reader(&sh, Rng::new(seed, 2, round)))
                },
            ])
            .collect();
        std::thread::sleep(Duration::from_millis(run_for));
        // One kill in three aims at a create or a delete: at a random
        // point within its usual duration.
        let aimed = main_rng.one_in(3);
        let target = if main_rng.one_in(2) {
            CREATING
        } else {
            DELETING
        };
        let delay = main_rng.below(sh.cmd_ms(target) * 1000);
        if aimed {
            let until = Instant::now() + Duration::from_secs(5);
            while sh.busy.load(Ordering::SeqCst) != target && Instant::now() < until {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_micros(delay));
        }

        // A command line started from here on must not open the volume
        // itself once the server is gone: without the binding it cannot.
        std::fs::rename(&binding, &hidden).unwrap();
        sh.killed.store(true, Ordering::SeqCst);
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        sh.event(&format!("round {round}: killed serve"));
        sh.pause_cv.notify_all();
        for t in threads {
            t.join().unwrap();
        }
        std::fs::rename(&hidden, &binding).unwrap();

        // What was in flight at the kill.
        let in_flight = {
            let mut b = lock(&sh.book);
            b.pending = match b.pending.take() {
                // Every write it may hold was sent before the kill.
                Some(Pending::Open { base, from }) => {
                    let steps = sh
                        .lanes
                        .iter()
                        .zip(&from)
                        .map(|(lane, &f)| {
                            let l = lock(lane);
                            l.steps(f, l.log.len())
                        })
                        .collect();
                    Some(Pending::Known {
                        persistent: true,
                        expect: Expect::Range(Arc::new(RangeExpect { base, steps })),
                    })
                }
                other => other,
            };
            let creating = b.pending.is_some();
            let deleting = b
                .shadows
                .iter()
                .filter(|s| s.life == Life::Deleting)
                .count();
            if creating {
                add(&sh.stats.creates_cut, 1);
            }
            sh.event(&format!(
                "round {round}: at the kill a create in flight: {creating}; deletes in flight: {:?}",
                b.shadows
                    .iter()
                    .filter(|s| s.life == Life::Deleting)
                    .map(|s| &s.id)
                    .collect::<Vec<_>>()
            ));
            add(&sh.stats.deletes_cut, deleting as u64);
            (creating, deleting)
        };
        for lane in &sh.lanes {
            let l = lock(lane);
            for op in &l.log[..l.acked] {
                match *op {
                    Op::Write { n, fua, .. } => {
                        add(&sh.stats.writes, 1);
                        add(&sh.stats.write_bytes, u64::from(n) * BLOCK as u64);
                        if fua {
                            add(&sh.stats.fua, 1);
                        }
                    }
                    Op::Flush => add(&sh.stats.flushes, 1),
                }
            }
        }

        let t = Instant::now();
        let log = dir.join(format!("serve-{round}.log"));
        server = match Server::try_start(&dir, IMG, &log, IO_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                sh.violation(format!("serve does not start after the kill: {e}"));
                break;
            }
        };
        let restart = t.elapsed();
        restart_max = restart_max.max(restart);
        sh.event(&format!("round {round}: serve restarted"));
        let t = Instant::now();
        check_live(&sh);
        check_shadows(&sh, &mut main_rng);
        eprintln!(
            "soak round {round}: killed after {run_for} ms{} ({} writes{}{}), restarted in {} ms, \
             checked in {} ms, {} shadow copies live, {} violations so far",
            match (aimed, target) {
                (false, _) => "",
                (true, CREATING) => " (aimed at a create)",
                (true, _) => " (aimed at a delete)",
            },
            get(&sh.stats.writes) - writes_before,
            if in_flight.0 {
                ", a create in flight"
            } else {
                ""
            },
            if in_flight.1 > 0 {
                ", a delete in flight"
            } else {
                ""
            },
            restart.as_millis(),
            t.elapsed().as_millis(),
            lock(&sh.book).shadows.len(),
            lock(&sh.violations).len()
        );
    }
    drop(server);

    let s = &sh.stats;
    let violations = lock(&sh.violations).clone();
    println!(
        "soak: seed {seed}, chunk {chunk}, {rounds} rounds (SIGKILL + restart each) in {:.0} s: \
         {} writes ({}, {} with FUA), {} flushes; shadow copies: {} persistent and {} \
         non-persistent created ({} while writers ran), {} deleted; at the kills {} creates \
         in flight ({} kept) and {} deletes ({} kept); {} shadow copies read back whole after \
         restarts ({}), {} read under load; {} blocks missed their last unflushed write; \
         create {} ms and delete {} ms on average; slowest restart {} ms; violations: {}",
        started.elapsed().as_secs_f64(),
        get(&s.writes),
        human(get(&s.write_bytes)),
        get(&s.fua),
        get(&s.flushes),
        get(&s.created_persistent),
        get(&s.created_non_persistent),
        get(&s.created_while_writing),
        get(&s.deleted),
        get(&s.creates_cut),
        get(&s.creates_cut_kept),
        get(&s.deletes_cut),
        get(&s.deletes_cut_kept),
        get(&s.checked),
        human(get(&s.checked_bytes)),
        human(get(&s.read_under_load)),
        get(&s.unflushed_lost),
        sh.cmd_ms(CREATING),
        sh.cmd_ms(DELETING),
        restart_max.as_millis(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} violations (seed {seed}, chunk {chunk}), the first {}:\n{}\nfiles kept in {} \
         (all violations in events.log)",
        violations.len(),
        violations.len().min(SHOWN),
        violations[..violations.len().min(SHOWN)].join("\n"),
        tmp.keep().display()
    );
}
