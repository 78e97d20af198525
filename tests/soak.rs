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
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::*;
use volshadow_block::conformance::{self, mix64};

const IMG: &str = "disk.img";
const BLOCK: usize = 4096;
const IMG_SIZE: u64 = 64 << 20;
const BLOCKS: usize = (IMG_SIZE as usize) / BLOCK;
const WRITERS: usize = 4;
/// Blocks per writer region (16 MiB).
const REGION: usize = BLOCKS / WRITERS;
/// Largest write or read: 1 MiB.
const MAX_BLOCKS: u64 = 256;
/// Most shadow copies alive at once (the churn deletes one first when
/// there are this many). Each holds at most one copy of every chunk, 64 MiB;
/// after a restart a create that was in flight may add one more. So
/// `MAX_SIZE` of shadow storage never fills and delete-oldest never runs,
/// yet it is small enough that the journal (sized by it) compacts every
/// few seconds under these writers.
const MAX_SHADOWS: usize = 4;
const MAX_SIZE: &str = "384M";
/// A reply slower than this is a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const MIN_ROUNDS: u64 = 3;
/// Violations printed (all are in `events.log`).
const SHOWN: usize = 20;
const DEFAULT_SECS: u64 = 50;

// ---------------------------------------------------------------- data

#[derive(Debug, Clone)]
struct Rng(conformance::Rng);

impl Rng {
    /// A generator for one part (`role`, `round`) of the run `seed`.
    fn new(seed: u64, role: u64, round: u64) -> Rng {
        Rng(conformance::Rng::new(mix64(
            seed ^ mix64(role ^ round.rotate_left(32)),
        )))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// 1..=MAX_BLOCKS blocks, small sizes as likely as large ones.
    fn blocks(&mut self) -> u64 {
        let lo = 1u64 << self.below(9);
        (lo + self.below(lo)).min(MAX_BLOCKS)
    }
}

const MAGIC: [u8; 4] = *b"VSsk";
/// A block that is neither zeros nor a whole block of one write.
const GARBAGE: u32 = u32::MAX;

/// Block `blk` (index in the volume) as write `id` leaves it.
fn fill_block(out: &mut [u8], id: u32, blk: u32) {
    out[..4].copy_from_slice(&MAGIC);
    out[4..8].copy_from_slice(&id.to_le_bytes());
    out[8..12].copy_from_slice(&blk.to_le_bytes());
    out[12..16].copy_from_slice(&(id ^ blk ^ 0x5a5a_5a5a).to_le_bytes());
    conformance::Rng::new((u64::from(id) << 32) | u64::from(blk)).fill(&mut out[16..BLOCK]);
}

/// The write a block read back at `blk` came from: 0 for zeros (never
/// written), `GARBAGE` for anything else that is not exactly one write's
/// block `blk`.
fn decode_block(b: &[u8], blk: u32, scratch: &mut [u8]) -> u32 {
    if b[..4] != MAGIC {
        return if b.iter().all(|&x| x == 0) {
            0
        } else {
            GARBAGE
        };
    }
    let id = u32::from_le_bytes(b[4..8].try_into().unwrap());
    if id == 0 || id == GARBAGE {
        return GARBAGE;
    }
    fill_block(scratch, id, blk);
    if scratch == b { id } else { GARBAGE }
}

/// What a `GARBAGE` block holds, for a report.
fn describe_garbage(b: &[u8], blk: u32) -> String {
    if b[..4] != MAGIC {
        let nonzero = b.iter().filter(|&&x| x != 0).count();
        return format!("no block header ({nonzero} non-zero bytes)");
    }
    let id = u32::from_le_bytes(b[4..8].try_into().unwrap());
    let at = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if at != blk {
        return format!("write {id}'s block {at} (misplaced)");
    }
    let mut want = vec![0u8; BLOCK];
    fill_block(&mut want, id, blk);
    let first = b.iter().zip(&want).position(|(x, y)| x != y).unwrap_or(0);
    let last = b.iter().zip(&want).rposition(|(x, y)| x != y).unwrap_or(0);
    format!("write {id}'s header, bytes {first}..={last} differ (torn)")
}

/// The blocks of a whole export, as write ids, with descriptions of up to
/// a few garbage blocks.
struct Image {
    ids: Vec<u32>,
    notes: BTreeMap<usize, String>,
}

impl Image {
    fn decode(&mut self, first_blk: usize, bytes: &[u8], scratch: &mut [u8]) {
        for (i, b) in bytes.chunks_exact(BLOCK).enumerate() {
            let blk = first_blk + i;
            let id = decode_block(b, blk as u32, scratch);
            if id == GARBAGE && self.notes.len() < 8 {
                self.notes.insert(blk, describe_garbage(b, blk as u32));
            }
            self.ids[blk] = id;
        }
    }

    fn show(&self, blk: usize) -> String {
        match self.ids[blk] {
            GARBAGE => self
                .notes
                .get(&blk)
                .cloned()
                .unwrap_or_else(|| "garbage".into()),
            id => show(id),
        }
    }
}

/// A block's value as a report names it.
fn show(id: u32) -> String {
    match id {
        0 => "zeros".into(),
        GARBAGE => "garbage".into(),
        id => format!("write {id}"),
    }
}

/// Reads a whole export over NBD.
fn read_export(socket: &Path, export: &str) -> Result<Image, String> {
    let mut conn = Raw::try_go(socket, export, IO_TIMEOUT).map_err(|e| e.to_string())?;
    read_all(&mut conn)
}

fn read_all(conn: &mut Raw) -> Result<Image, String> {
    let mut img = Image {
        ids: vec![0; BLOCKS],
        notes: BTreeMap::new(),
    };
    let (mut data, mut scratch) = (Vec::new(), vec![0u8; BLOCK]);
    let piece = MAX_BLOCKS as usize;
    for first in (0..BLOCKS).step_by(piece) {
        let len = (piece * BLOCK) as u32;
        match conn.cmd(NBD_CMD_READ, 0, (first * BLOCK) as u64, len, &[], &mut data) {
            Ok(0) => img.decode(first, &data, &mut scratch),
            Ok(e) => return Err(format!("READ at {} failed: NBD error {e}", first * BLOCK)),
            Err(e) => return Err(format!("READ at {}: {e}", first * BLOCK)),
        }
    }
    Ok(img)
}

/// Reads a whole shadow copy through `volshadow read` (the control socket).
fn read_cli(dir: &Path, id: &str) -> Result<Image, String> {
    let file = dir.join("shadow-read.raw");
    let out = vs_raw(
        dir,
        &[
            "read",
            "--for",
            IMG,
            "--shadow",
            id,
            "--offset",
            "0",
            "--length",
            "64M",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    if !out.status.success() {
        return Err(format!("volshadow read: {}", stderr(&out)));
    }
    let bytes = std::fs::read(&file).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&file);
    if bytes.len() != IMG_SIZE as usize {
        return Err(format!("volshadow read gave {} bytes", bytes.len()));
    }
    let mut img = Image {
        ids: vec![0; BLOCKS],
        notes: BTreeMap::new(),
    };
    img.decode(0, &bytes, &mut vec![0u8; BLOCK]);
    Ok(img)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

// ---------------------------------------------------------------- model

#[derive(Debug, Clone, Copy)]
enum Op {
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
struct Lane {
    /// Which writer: its region starts at block `index * REGION`.
    index: usize,
    /// At the start of the round (read back and flushed): durable.
    base: Vec<u32>,
    /// After every acknowledged write.
    cur: Vec<u32>,
    /// Requests in the order sent; each is pushed before it is sent.
    log: Vec<Op>,
    /// `log[..acked]` were acknowledged; `log[acked]`, if any, was in
    /// flight when the server died.
    acked: usize,
}

impl Lane {
    fn start(&self) -> usize {
        self.index * REGION
    }

    /// Per block of the region, every value it may hold after a crash: its
    /// durable value first, then values written since.
    fn allowed(&self) -> Vec<Vec<u32>> {
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
    fn steps(&self, from: usize, to: usize) -> Vec<(u32, u32, u32)> {
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
enum Expect {
    /// Write id per volume block.
    Exact(Arc<Vec<u32>>),
    /// Taken while writers ran: per region, `base` plus some prefix of
    /// that writer's `steps`.
    Range(Arc<RangeExpect>),
}

#[derive(Debug)]
struct RangeExpect {
    base: Vec<u32>,
    steps: Vec<Vec<(u32, u32, u32)>>,
}

/// Finds, per region, the prefix of the writer's steps that `got` shows.
fn resolve_range(r: &RangeExpect, got: &Image) -> Result<Vec<u32>, String> {
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
fn check_shadow(expect: &Expect, got: &Image) -> Result<Arc<Vec<u32>>, String> {
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
enum Life {
    Live,
    /// Its delete was in flight at a kill.
    Deleting,
}

#[derive(Debug)]
struct Shadow {
    id: String,
    persistent: bool,
    expect: Expect,
    life: Life,
    /// Readers using it; it is not deleted meanwhile.
    pins: usize,
}

/// A create in flight (at most one: the churn thread is sequential).
#[derive(Debug)]
enum Pending {
    /// Contents known (writers parked), or bounded once the round ended.
    Known { persistent: bool, expect: Expect },
    /// Taken while writers ran, from the lanes' positions `from`; the
    /// writes it may hold are settled when the round ends.
    Open { base: Vec<u32>, from: Vec<usize> },
}

/// A shadow copy that must never be listed again.
#[derive(Debug)]
struct Gone {
    id: String,
    how: String,
    /// What it held, to tell a resurrected copy's state in the report.
    expect: Expect,
}

#[derive(Debug, Default)]
struct Book {
    shadows: Vec<Shadow>,
    pending: Option<Pending>,
    /// Gone for good, with how it went: the delete returned success, or
    /// it was in flight at a kill and the copy was not listed after the
    /// restart. Never listed again.
    deleted: Vec<Gone>,
}

#[derive(Debug, Default)]
struct Pause {
    requested: bool,
    flush: bool,
    epoch: u64,
    /// Writers parked in this epoch.
    parked: usize,
    /// Writers still running this round.
    alive: usize,
}

#[derive(Debug, Default)]
struct Stats {
    writes: AtomicU64,
    write_bytes: AtomicU64,
    fua: AtomicU64,
    flushes: AtomicU64,
    created_persistent: AtomicU64,
    created_non_persistent: AtomicU64,
    created_while_writing: AtomicU64,
    deleted: AtomicU64,
    creates_cut: AtomicU64,
    creates_cut_kept: AtomicU64,
    deletes_cut: AtomicU64,
    deletes_cut_kept: AtomicU64,
    checked: AtomicU64,
    checked_bytes: AtomicU64,
    read_under_load: AtomicU64,
    /// Blocks whose last acknowledged (unflushed) write was not seen after
    /// a kill: allowed, counted for the report.
    unflushed_lost: AtomicU64,
    /// Successful churn commands and their total time (µs), by kind.
    cmds: [AtomicU64; 3],
    cmd_us: [AtomicU64; 3],
}

const IDLE: u8 = 0;
const CREATING: u8 = 1;
const DELETING: u8 = 2;

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Shared {
    dir: PathBuf,
    socket: PathBuf,
    seed: u64,
    non_persistent: bool,
    round: AtomicU64,
    killed: AtomicBool,
    next_id: AtomicU32,
    lanes: Vec<Mutex<Lane>>,
    pause: Mutex<Pause>,
    pause_cv: Condvar,
    pause_flag: AtomicBool,
    /// What command the churn thread runs: `IDLE`, `CREATING`, `DELETING`.
    busy: AtomicU8,
    book: Mutex<Book>,
    stats: Stats,
    /// `events.log` in the run's directory: creates, deletes, kills,
    /// restarts, listings, with milliseconds since the start.
    events: Mutex<std::fs::File>,
    started: Instant,
    violations: Mutex<Vec<String>>,
}

impl Shared {
    fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    fn violation(&self, msg: String) {
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

    fn event(&self, msg: &str) {
        use std::io::Write;
        let ms = self.started.elapsed().as_millis();
        let _ = writeln!(lock(&self.events), "{ms:>8} {msg}");
    }

    fn vs(&self, args: &[&str]) -> Output {
        vs_raw(&self.dir, args)
    }

    /// A create or delete by the churn thread (the kill may aim at it),
    /// timed.
    fn churn_cmd(&self, kind: u8, args: &[&str]) -> Output {
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
    fn cmd_ms(&self, kind: u8) -> u64 {
        let k = usize::from(kind);
        (get(&self.stats.cmd_us[k]) / get(&self.stats.cmds[k]).max(1) / 1000).max(1)
    }

    /// Parks every writer (after a FLUSH if `flush`); false if the server
    /// was killed meanwhile.
    fn quiesce(&self, flush: bool) -> bool {
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

    fn resume(&self) {
        let mut p = lock(&self.pause);
        p.requested = false;
        p.parked = 0;
        p.epoch += 1;
        self.pause_flag.store(false, Ordering::SeqCst);
        self.pause_cv.notify_all();
    }

    /// The volume's blocks as every writer last had acknowledged them.
    fn acked_state(&self) -> (Vec<u32>, Vec<usize>) {
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

// ---------------------------------------------------------------- threads

/// One writer: its own connection, its own region, one request at a time.
fn writer(sh: &Shared, w: usize, mut rng: Rng) {
    let mut conn = match Raw::try_go(&sh.socket, "live", IO_TIMEOUT) {
        Ok(c) => Some(c),
        Err(e) => {
            if !sh.killed() {
                sh.violation(format!("writer {w}: cannot connect: {e}"));
            }
            None
        }
    };
    if let Some(conn) = &mut conn {
        write_loop(sh, w, &mut rng, conn);
    }
    let mut p = lock(&sh.pause);
    p.alive -= 1;
    sh.pause_cv.notify_all();
}

fn write_loop(sh: &Shared, w: usize, rng: &mut Rng, conn: &mut Raw) {
    let mut buf = Vec::with_capacity(MAX_BLOCKS as usize * BLOCK);
    let mut reply = Vec::new();
    loop {
        if sh.killed() {
            return;
        }
        if sh.pause_flag.load(Ordering::SeqCst) && !park(sh, w, conn) {
            return;
        }
        let op = if rng.one_in(12) {
            Op::Flush
        } else {
            let n = rng.blocks();
            let first = (w * REGION) as u64 + rng.below(REGION as u64 - n + 1);
            Op::Write {
                id: sh.next_id.fetch_add(1, Ordering::Relaxed),
                first: first as u32,
                n: n as u32,
                fua: rng.one_in(5),
            }
        };
        if !send(sh, w, conn, op, &mut buf, &mut reply) {
            return;
        }
    }
}

/// Logs `op`, sends it, waits for the reply; false if the connection is
/// over.
fn send(
    sh: &Shared,
    w: usize,
    conn: &mut Raw,
    op: Op,
    buf: &mut Vec<u8>,
    reply: &mut Vec<u8>,
) -> bool {
    lock(&sh.lanes[w]).log.push(op);
    let r = match op {
        Op::Write { id, first, n, fua } => {
            buf.resize(n as usize * BLOCK, 0);
            for (i, b) in buf.chunks_exact_mut(BLOCK).enumerate() {
                fill_block(b, id, first + i as u32);
            }
            let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
            conn.cmd(
                NBD_CMD_WRITE,
                flags,
                u64::from(first) * BLOCK as u64,
                buf.len() as u32,
                buf,
                reply,
            )
        }
        Op::Flush => conn.cmd(NBD_CMD_FLUSH, 0, 0, 0, &[], reply),
    };
    match r {
        Ok(0) => {
            let mut l = lock(&sh.lanes[w]);
            l.acked += 1;
            if let Op::Write { id, first, n, .. } = op {
                let start = w * REGION;
                for b in first..first + n {
                    l.cur[b as usize - start] = id;
                }
            }
            true
        }
        Ok(e) => {
            sh.violation(format!("writer {w}: {op:?} failed with NBD error {e}"));
            false
        }
        Err(e) => {
            if !sh.killed() {
                sh.violation(format!(
                    "writer {w}: {op:?} got no reply from a running server: {e}"
                ));
            }
            false
        }
    }
}

/// Parks until the churn thread resumes the writers; false if the
/// connection is over.
fn park(sh: &Shared, w: usize, conn: &mut Raw) -> bool {
    let (flush, epoch) = {
        let p = lock(&sh.pause);
        if !p.requested {
            return true;
        }
        (p.flush, p.epoch)
    };
    if flush && !send(sh, w, conn, Op::Flush, &mut Vec::new(), &mut Vec::new()) {
        return false;
    }
    let mut p = lock(&sh.pause);
    if p.epoch != epoch {
        return true;
    }
    p.parked += 1;
    sh.pause_cv.notify_all();
    while p.epoch == epoch && !sh.killed() {
        p = sh
            .pause_cv
            .wait_timeout(p, Duration::from_millis(50))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    !sh.killed()
}

fn sleep_unless_killed(sh: &Shared, ms: u64) -> bool {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        if sh.killed() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    !sh.killed()
}

/// Creates and deletes shadow copies through the command line.
fn churn(sh: &Shared, mut rng: Rng) {
    while sleep_unless_killed(sh, rng.range(100, 700)) {
        let (live, deletable) = {
            let b = lock(&sh.book);
            let live = b.shadows.iter().filter(|s| s.life == Life::Live).count();
            let deletable = b
                .shadows
                .iter()
                .filter(|s| s.life == Life::Live && s.pins == 0)
                .count();
            (live, deletable)
        };
        let pick = rng.below(10);
        if live >= MAX_SHADOWS || (deletable > 0 && pick < 3) {
            if deletable > 0 {
                delete_one(sh, &mut rng);
            }
        } else if pick < 6 {
            create_quiesced(sh, &mut rng, true);
        } else if pick < 8 {
            create_while_writing(sh);
        } else if sh.non_persistent {
            create_quiesced(sh, &mut rng, false);
        } else {
            create_quiesced(sh, &mut rng, true);
        }
    }
}

fn create_cmd(sh: &Shared, persistent: bool) -> Result<String, String> {
    let mut args = vec!["create", "shadow", "--for", IMG, "--json"];
    if !persistent {
        args.push("--non-persistent");
    }
    let out = sh.churn_cmd(CREATING, &args);
    if !out.status.success() {
        return Err(stderr(&out));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("create printed no JSON ({e})"))?;
    let shadow = &v["shadow"];
    if shadow["persistent"].as_bool() != Some(persistent) {
        return Err(format!("create answered {v}"));
    }
    shadow["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("create answered {v}"))
}

/// Writers parked (after a FLUSH or not), then a create: the copy's
/// contents are the acknowledged state.
fn create_quiesced(sh: &Shared, rng: &mut Rng, persistent: bool) {
    if sh.quiesce(rng.one_in(2)) {
        let (state, at) = sh.acked_state();
        for (w, lane) in sh.lanes.iter().enumerate() {
            let l = lock(lane);
            assert_eq!(l.acked, l.log.len(), "writer {w} not parked");
            assert_eq!(l.acked, at[w]);
        }
        let want = Arc::new(state);
        lock(&sh.book).pending = Some(Pending::Known {
            persistent,
            expect: Expect::Exact(want.clone()),
        });
        let r = create_cmd(sh, persistent);
        finish_create(sh, r, persistent, Expect::Exact(want));
    }
    sh.resume();
}

/// A create while the writers keep writing.
fn create_while_writing(sh: &Shared) {
    let (base, from) = sh.acked_state();
    lock(&sh.book).pending = Some(Pending::Open {
        base: base.clone(),
        from: from.clone(),
    });
    let r = create_cmd(sh, true);
    let steps = sh
        .lanes
        .iter()
        .zip(&from)
        .map(|(lane, &f)| {
            let l = lock(lane);
            l.steps(f, l.log.len())
        })
        .collect();
    let expect = Expect::Range(Arc::new(RangeExpect { base, steps }));
    let Some(id) = finish_create(sh, r, true, expect.clone()) else {
        return;
    };
    add(&sh.stats.created_while_writing, 1);
    // Pin down its contents now, before any crash.
    match read_export(&sh.socket, &id) {
        Ok(got) => match check_shadow(&expect, &got) {
            Ok(exact) => set_expect(sh, &id, Expect::Exact(exact)),
            Err(e) => {
                sh.violation(format!(
                    "shadow copy {id} taken while writers ran, read at once: {e}"
                ));
                set_expect(sh, &id, Expect::Exact(Arc::new(got.ids)));
            }
        },
        Err(e) => {
            if !sh.killed() {
                sh.violation(format!("shadow copy {id}: cannot read it: {e}"));
            }
        }
    }
}

fn set_expect(sh: &Shared, id: &str, expect: Expect) {
    if let Some(s) = lock(&sh.book).shadows.iter_mut().find(|s| s.id == id) {
        s.expect = expect;
    }
}

fn finish_create(
    sh: &Shared,
    r: Result<String, String>,
    persistent: bool,
    expect: Expect,
) -> Option<String> {
    let mut b = lock(&sh.book);
    match r {
        Ok(id) => {
            b.pending = None;
            b.shadows.push(Shadow {
                id: id.clone(),
                persistent,
                expect,
                life: Life::Live,
                pins: 0,
            });
            if persistent {
                add(&sh.stats.created_persistent, 1);
            } else {
                add(&sh.stats.created_non_persistent, 1);
            }
            Some(id)
        }
        Err(e) => {
            // Killed meanwhile: it stays pending (it may exist).
            if !sh.killed() {
                b.pending = None;
                drop(b);
                sh.violation(format!("create shadow failed while serve ran: {e}"));
            }
            None
        }
    }
}

fn delete_one(sh: &Shared, rng: &mut Rng) {
    let id = {
        let mut b = lock(&sh.book);
        let idle: Vec<usize> = (0..b.shadows.len())
            .filter(|&i| b.shadows[i].life == Life::Live && b.shadows[i].pins == 0)
            .collect();
        if idle.is_empty() {
            return;
        }
        let i = idle[rng.below(idle.len() as u64) as usize];
        b.shadows[i].life = Life::Deleting;
        b.shadows[i].id.clone()
    };
    let out = sh.churn_cmd(
        DELETING,
        &["delete", "shadows", "--for", IMG, "--shadow", &id],
    );
    let mut b = lock(&sh.book);
    if out.status.success() {
        let i = b.shadows.iter().position(|s| s.id == id).unwrap();
        let s = b.shadows.remove(i);
        let round = sh.round.load(Ordering::SeqCst);
        b.deleted.push(Gone {
            id,
            how: format!("its delete succeeded in round {round}"),
            expect: s.expect,
        });
        add(&sh.stats.deleted, 1);
    } else if !sh.killed() {
        if let Some(s) = b.shadows.iter_mut().find(|s| s.id == id) {
            s.life = Life::Live;
        }
        drop(b);
        sh.violation(format!(
            "delete of shadow copy {id} failed while serve ran: {}",
            stderr(&out)
        ));
    }
}

/// Reads shadow copies over NBD while the writers and the churn run.
fn reader(sh: &Shared, mut rng: Rng) {
    while !sh.killed() {
        let picked = {
            let mut b = lock(&sh.book);
            let ready: Vec<usize> = (0..b.shadows.len())
                .filter(|&i| {
                    b.shadows[i].life == Life::Live
                        && matches!(b.shadows[i].expect, Expect::Exact(_))
                })
                .collect();
            match ready.len() {
                0 => None,
                n => {
                    let s = &mut b.shadows[ready[rng.below(n as u64) as usize]];
                    match &s.expect {
                        Expect::Exact(want) => {
                            s.pins += 1;
                            Some((s.id.clone(), want.clone()))
                        }
                        Expect::Range(_) => None,
                    }
                }
            }
        };
        let Some((id, want)) = picked else {
            sleep_unless_killed(sh, 50);
            continue;
        };
        if let Err(e) = read_some(sh, &mut rng, &id, &want)
            && !sh.killed()
        {
            sh.violation(format!("shadow copy {id} read while serving: {e}"));
        }
        let mut b = lock(&sh.book);
        if let Some(s) = b.shadows.iter_mut().find(|s| s.id == id) {
            s.pins -= 1;
        }
    }
}

/// A few random reads of shadow copy `id`, each compared with `want`.
fn read_some(sh: &Shared, rng: &mut Rng, id: &str, want: &[u32]) -> Result<(), String> {
    let mut conn =
        Raw::try_go(&sh.socket, id, IO_TIMEOUT).map_err(|e| format!("cannot open it: {e}"))?;
    let (mut data, mut scratch) = (Vec::new(), vec![0u8; BLOCK]);
    for _ in 0..rng.range(4, 16) {
        let n = rng.blocks() as usize;
        let first = rng.below((BLOCKS - n + 1) as u64) as usize;
        let len = (n * BLOCK) as u32;
        let offset = (first * BLOCK) as u64;
        match conn.cmd(NBD_CMD_READ, 0, offset, len, &[], &mut data) {
            Ok(0) => {}
            Ok(e) => return Err(format!("READ at {offset} failed with NBD error {e}")),
            Err(e) => return Err(format!("READ at {offset} got no reply: {e}")),
        }
        add(&sh.stats.read_under_load, u64::from(len));
        for (i, blk) in data.chunks_exact(BLOCK).enumerate() {
            let b = first + i;
            let got = decode_block(blk, b as u32, &mut scratch);
            if got != want[b] {
                let what = match got {
                    GARBAGE => describe_garbage(blk, b as u32),
                    id => show(id),
                };
                return Err(format!(
                    "block {b} (offset {}) holds {what}, expected {}",
                    b * BLOCK,
                    show(want[b])
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- checks

/// After a restart: the live volume against the lanes of the round that
/// ended; then the lanes' bases are what was read (flushed).
fn check_live(sh: &Shared) {
    let mut conn = match Raw::try_go(&sh.socket, "live", IO_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return sh.violation(format!("after restart: cannot open the live export: {e}")),
    };
    let got = match read_all(&mut conn) {
        Ok(g) => g,
        Err(e) => return sh.violation(format!("after restart: reading the live volume: {e}")),
    };
    for (w, lane) in sh.lanes.iter().enumerate() {
        let mut l = lock(lane);
        let start = w * REGION;
        let allowed = l.allowed();
        let in_flight = l.log.get(l.acked).copied();
        let mut bad = Vec::new();
        let mut lost = 0;
        for (i, (&v, ok)) in got.ids[start..start + REGION]
            .iter()
            .zip(&allowed)
            .enumerate()
        {
            if !ok.contains(&v) {
                bad.push(i);
            }
            let flying = matches!(in_flight, Some(Op::Write { id, first, n, .. })
                if id == v && (first..first + n).contains(&((start + i) as u32)));
            if v != l.cur[i] && !flying {
                lost += 1;
            }
        }
        add(&sh.stats.unflushed_lost, lost);
        if !bad.is_empty() {
            let mut msg = format!(
                "live volume after restart: {} blocks of region {w} hold a value they cannot:",
                bad.len()
            );
            for &i in bad.iter().take(4) {
                let _ = write!(
                    msg,
                    " block {} (offset {}) holds {}, allowed {:?} (durable first);",
                    start + i,
                    (start + i) * BLOCK,
                    got.show(start + i),
                    allowed[i]
                );
            }
            sh.violation(msg);
        }
        l.base = got.ids[start..start + REGION].to_vec();
    }
    match conn.cmd(NBD_CMD_FLUSH, 0, 0, 0, &[], &mut Vec::new()) {
        Ok(0) => {}
        r => sh.violation(format!("after restart: FLUSH failed: {r:?}")),
    }
}

/// After a restart: the listed shadow copies against the book.
fn check_shadows(sh: &Shared, rng: &mut Rng) {
    let out = sh.vs(&["list", "shadows", "--for", IMG, "--json"]);
    if !out.status.success() {
        return sh.violation(format!("list shadows after restart: {}", stderr(&out)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    sh.event(&format!(
        "listed after restart: {}",
        v["shadows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!(
                "{} seq {} persistent {}",
                s["id"], s["seq"], s["persistent"]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut listed: BTreeMap<String, bool> = v["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["persistent"].as_bool().unwrap(),
            )
        })
        .collect();
    let mut b = lock(&sh.book);
    let mut verify = |id: &str, expect: &Expect, what: &str| -> Option<Arc<Vec<u32>>> {
        let cli = rng.one_in(4);
        let got = if cli {
            read_cli(&sh.dir, id)
        } else {
            read_export(&sh.socket, id)
        };
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                sh.violation(format!("{what} shadow copy {id}: cannot read it: {e}"));
                return None;
            }
        };
        add(&sh.stats.checked, 1);
        add(&sh.stats.checked_bytes, IMG_SIZE);
        match check_shadow(expect, &got) {
            Ok(exact) => Some(exact),
            Err(e) => {
                let how = if cli { "volshadow read" } else { "NBD" };
                sh.violation(format!(
                    "{what} shadow copy {id} after restart ({how}): {e}"
                ));
                Some(Arc::new(got.ids))
            }
        }
    };
    let mut keep = Vec::new();
    for mut s in std::mem::take(&mut b.shadows) {
        let present = listed.remove(&s.id);
        match (s.persistent, s.life, present) {
            (false, _, Some(_)) => sh.violation(format!(
                "non-persistent shadow copy {} survived the kill",
                s.id
            )),
            (false, _, None) => {}
            (true, Life::Live, None) => sh.violation(format!(
                "persistent shadow copy {} (create acknowledged) is gone after restart",
                s.id
            )),
            (true, life, Some(persistent)) => {
                if !persistent {
                    sh.violation(format!("shadow copy {} is listed as non-persistent", s.id));
                }
                let what = if life == Life::Deleting {
                    add(&sh.stats.deletes_cut_kept, 1);
                    "(delete in flight at the kill)"
                } else {
                    "persistent"
                };
                if let Some(exact) = verify(&s.id, &s.expect, what) {
                    s.expect = Expect::Exact(exact);
                }
                s.life = Life::Live;
                keep.push(s);
            }
            (true, Life::Deleting, None) => {
                let round = sh.round.load(Ordering::SeqCst);
                b.deleted.push(Gone {
                    id: s.id,
                    how: format!(
                        "its delete was in flight at round {round}'s kill and it was not \
                         listed after that restart"
                    ),
                    expect: s.expect,
                });
            }
        }
    }
    b.shadows = keep;
    for g in &b.deleted {
        if listed.remove(&g.id).is_some() {
            let contents = match read_export(&sh.socket, &g.id) {
                Ok(got) => match check_shadow(&g.expect, &got) {
                    Ok(_) => "it reads its old contents intact".to_string(),
                    Err(e) => format!("its contents differ: {e}"),
                },
                Err(e) => format!("it cannot be read: {e}"),
            };
            sh.violation(format!(
                "shadow copy {} is listed again after restart, but {}; {contents}",
                g.id, g.how
            ));
        }
    }
    // An unknown id may be the create in flight at the kill (one at most).
    let mut pending = b.pending.take();
    for (id, persistent) in listed {
        let expect = match pending.take() {
            Some(Pending::Known {
                persistent: true,
                expect,
            }) if persistent => expect,
            Some(Pending::Open { .. }) => {
                unreachable!("open creates are settled when the round ends")
            }
            other => {
                pending = other;
                sh.violation(format!(
                    "unknown shadow copy {id} (persistent: {persistent}) after restart"
                ));
                continue;
            }
        };
        add(&sh.stats.creates_cut_kept, 1);
        let exact = verify(&id, &expect, "(create in flight at the kill)");
        b.shadows.push(Shadow {
            id,
            persistent: true,
            expect: Expect::Exact(exact.unwrap_or_else(|| Arc::new(vec![GARBAGE; BLOCKS]))),
            life: Life::Live,
            pins: 0,
        });
    }
    drop(b);
    let out = sh.vs(&["verify", "--for", IMG, "--json"]);
    if !out.status.success() {
        sh.violation(format!(
            "verify after restart: {} {}",
            stderr(&out),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
}

// ---------------------------------------------------------------- run

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
