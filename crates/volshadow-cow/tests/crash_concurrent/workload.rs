//! The workload: regions, operations, rounds, policies, from a seed.

use super::*;

pub(crate) const CHUNK: usize = 4096;
/// Writer regions (offset, length): one thread each.
pub(crate) const REGIONS: [(usize, usize); 3] =
    [(0, 1 << 20), (1 << 20, 512 << 10), (1536 << 10, 512 << 10)];
pub(crate) const LEN: usize = 2 << 20;
/// 683 slots of 4 KiB: a checkpoint of a full index still fits in a half.
pub(crate) const DIFF_LEN: u64 = 3 << 20;
pub(crate) const JOURNAL_HALF: u64 = 8192;
pub(crate) const ROUNDS: usize = 6;
pub(crate) const MAX_SNAPS: usize = 5;

/// One operation of a writer thread.
#[derive(Debug, Clone)]
pub(crate) enum WOp {
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
pub(crate) enum BOp {
    Flush,
    Create { persistent: bool },
    Delete { pick: usize },
}

#[derive(Debug, Clone)]
pub(crate) struct Round {
    pub(crate) barrier: Vec<BOp>,
    pub(crate) writers: Vec<Vec<WOp>>,
    /// Lockstep: the seeded order in which writers take turns.
    pub(crate) turns: Option<Vec<usize>>,
}

pub(crate) fn policy_of(seed: u64) -> (FullPolicy, Option<u64>) {
    let slot = CHUNK as u64;
    match seed % 3 {
        0 => (FullPolicy::DeleteOldest, Some(320 * slot)),
        1 => (FullPolicy::FailWrites, Some(400 * slot)),
        _ => (FullPolicy::Grow { max: 600 * slot }, Some(200 * slot)),
    }
}

/// Seeds whose writers take seeded turns: one in four, or all with
/// `VOLSHADOW_CONCURRENT_CRASH_LOCKSTEP=1` (to reproduce a point exactly).
pub(crate) fn lockstep(seed: u64) -> bool {
    static ALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    seed % 4 == 3 || *ALL.get_or_init(|| env("VOLSHADOW_CONCURRENT_CRASH_LOCKSTEP", 0) == 1)
}

pub(crate) fn writer_op(rng: &mut Rng, (start, len): (usize, usize)) -> WOp {
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

pub(crate) fn workload(seed: u64) -> Vec<Round> {
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
