//! Corruption fuzzing: one byte of a real diff area is changed at random,
//! then the volume is opened normally and for salvage. For every flip the
//! outcome must be a clean error, or every snapshot listed reads, chunk by
//! chunk, exactly its point-in-time bytes or fails; a normal open must
//! list exactly the snapshots that exist, and report any damage it serves
//! errors for in `verify`.
//!
//! Two histories are damaged: one closed cleanly, and one whose last step
//! ended as by kill -9. In the second, the records after the last
//! committed mark are not flipped: such a record is indistinguishable
//! from an append cut by a crash (docs/RELIABILITY.md, "Known limits").
//!
//! `VOLSHADOW_CORRUPTION_FLIPS` sets the number of flips (default 10 000);
//! the test prints `flips: N, …, violations: M` and fails if M > 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use common::*;
use uuid::Uuid;
use volshadow_block::conformance::Rng;
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_cow::format::{self, FORMAT_VERSION, Superblock};
use volshadow_cow::{OpenMode, SnapshotOptions, Volume, VolumeOptions};

const ORIGIN: usize = 1 << 20;
const DIFF: u64 = 3 << 20;

/// A damaged-able history: the devices' bytes and every persistent
/// snapshot ever made with its bytes (`live` says which still exist).
struct History {
    origin: Vec<u8>,
    diff: Vec<u8>,
    snaps: BTreeMap<Uuid, Vec<u8>>,
    live: Vec<Uuid>,
    /// Byte ranges worth damaging, with weights.
    regions: Vec<(u64, u64, u64)>,
}

fn write(vol: &Volume, rng: &mut Rng, model: &mut [u8]) {
    let off = rng.below(ORIGIN as u64 - 40_000) as usize;
    let len = 1 + rng.below(40_000) as usize;
    let byte = rng.below(256) as u8;
    vol.write_at(&vec![byte; len], off as u64).unwrap();
    model[off..off + len].fill(byte);
}

fn history(crash_last: bool) -> History {
    let origin = Arc::new(MemDevice::new(ORIGIN as u64));
    let diff = Arc::new(MemDevice::new(DIFF));
    let mut rng = Rng::new(if crash_last { 7 } else { 5 });
    let mut model: Vec<u8> = (0..ORIGIN).map(|i| (i * 7 % 251) as u8).collect();
    origin.write_at(&model, 0).unwrap();
    let opts = VolumeOptions {
        chunk_size: CHUNK,
        journal_half: Some(32 << 10),
        ..Default::default()
    };
    let mut snaps = BTreeMap::new();
    let mut live: Vec<Uuid> = Vec::new();
    Volume::create(origin.clone(), diff.clone(), opts).unwrap();
    let steps = 7;
    let mut used_slots = 0;
    for step in 0..steps {
        let vol = Volume::open(origin.clone(), diff.clone()).unwrap();
        let s = vol.create_snapshot(persistent()).unwrap();
        snaps.insert(s.id, model.clone());
        live.push(s.id);
        if step % 3 == 1 {
            vol.create_snapshot(SnapshotOptions::default()).unwrap();
        }
        for _ in 0..6 {
            write(&vol, &mut rng, &mut model);
        }
        if step == 3 {
            let gone = live.remove(1);
            vol.delete_snapshot(gone).unwrap();
        }
        vol.flush().unwrap();
        used_slots = vol.usage().used_bytes / CHUNK as u64 + 8;
        if crash_last && step == steps - 1 {
            std::mem::forget(vol);
        }
    }
    let image = diff.to_vec();
    let sb = (0..2)
        .filter_map(|c| Superblock::decode(&image[c * 4096..(c + 1) * 4096]).ok())
        .max_by_key(|s| s.generation)
        .unwrap();
    // The active half up to its last committed record.
    let base = sb.journal_offset + sb.active_half as u64 * sb.journal_half;
    let half = &image[base as usize..(base + sb.journal_half) as usize];
    let (mut at, mut seq, mut ends) = (0usize, 0u64, Vec::new());
    let mut committed = 0;
    while let Ok(d) = format::decode_record(&half[at..], sb.epoch, seq, FORMAT_VERSION) {
        committed = committed.max(d.committed);
        at += d.len;
        ends.push(at as u64);
        seq += 1;
    }
    let covered = if committed == 0 {
        0
    } else {
        ends[committed as usize - 1]
    };
    let other = sb.journal_offset + (1 - sb.active_half as u64) * sb.journal_half;
    let regions = vec![
        (0, 8192, 15),
        (base, covered, 35),
        (other, sb.journal_half, 5),
        (sb.hash_offset, used_slots * 32, 20),
        (sb.data_offset, used_slots * CHUNK as u64, 25),
    ];
    History {
        origin: origin.to_vec(),
        diff: image,
        snaps,
        live,
        regions,
    }
}

fn devices(h: &History, at: u64, mask: u8) -> (Arc<MemDevice>, Arc<MemDevice>) {
    let o = Arc::new(MemDevice::new(h.origin.len() as u64));
    o.write_at(&h.origin, 0).unwrap();
    let mut image = h.diff.clone();
    image[at as usize] ^= mask;
    let d = Arc::new(MemDevice::new(image.len() as u64));
    d.write_at(&image, 0).unwrap();
    (o, d)
}

/// Reads every listed snapshot chunk by chunk: each chunk exact or an
/// error. Returns how many reads failed.
fn check_reads(vol: &Volume, h: &History) -> Result<u64, String> {
    let mut failed = 0;
    let mut buf = vec![0u8; CHUNK as usize];
    for s in vol.snapshots() {
        let want = h
            .snaps
            .get(&s.id)
            .ok_or_else(|| format!("unknown snapshot {}", s.id))?;
        let view = vol.snapshot(s.id).map_err(|e| e.to_string())?;
        for c in 0..ORIGIN / CHUNK as usize {
            let off = c * CHUNK as usize;
            match view.read_at(&mut buf, off as u64) {
                Ok(()) if buf[..] == want[off..off + CHUNK as usize] => {}
                Ok(()) => return Err(format!("snapshot {} chunk {c} read wrong bytes", s.id)),
                Err(_) => failed += 1,
            }
        }
    }
    Ok(failed)
}

/// One flip; `Err` is a violation. Returns (opened, reads failed).
fn flip(h: &History, at: u64, mask: u8) -> Result<(bool, u64), String> {
    let (o, d) = devices(h, at, mask);
    let opened = match Volume::open(o, d) {
        Err(_) => false,
        Ok(vol) => {
            let mut listed: Vec<Uuid> = vol.snapshots().iter().map(|s| s.id).collect();
            let mut want = h.live.clone();
            listed.sort();
            want.sort();
            if listed != want {
                return Err(format!("lists {listed:?}, expected {want:?}"));
            }
            let failed = check_reads(&vol, h)?;
            let report = vol.verify().map_err(|e| format!("verify: {e}"))?;
            if failed > 0 && report.is_clean() {
                return Err(format!("{failed} reads failed but verify is clean"));
            }
            true
        }
    };
    let (o, d) = devices(h, at, mask);
    let mut failed = 0;
    if let Ok(vol) = Volume::open_with(o, d, OpenMode::Salvage) {
        failed = check_reads(&vol, h).map_err(|e| format!("salvage: {e}"))?;
    }
    Ok((opened, failed))
}

#[test]
fn random_flips_never_read_wrong_bytes() {
    let target: u64 = std::env::var("VOLSHADOW_CORRUPTION_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let start = Instant::now();
    let histories = [history(false), history(true)];
    // Two threads, each its own share of the flips (seeded apart).
    let results: Vec<(u64, u64, u64, Vec<String>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u64)
            .map(|w| {
                let histories = &histories;
                s.spawn(move || {
                    let mut rng = Rng::new(11 + w);
                    let (mut opened, mut refused, mut failed_reads) = (0u64, 0u64, 0u64);
                    let mut violations = Vec::new();
                    for n in (w..target).step_by(2) {
                        let h = &histories[(n / 2 % 2) as usize];
                        let total: u64 = h.regions.iter().map(|r| r.2).sum();
                        let mut pick = rng.below(total);
                        let &(base, len, _) = h
                            .regions
                            .iter()
                            .find(|r| {
                                if pick < r.2 {
                                    true
                                } else {
                                    pick -= r.2;
                                    false
                                }
                            })
                            .unwrap();
                        if len == 0 {
                            continue;
                        }
                        let at = base + rng.below(len);
                        let mask = 1 + rng.below(255) as u8;
                        match flip(h, at, mask) {
                            Ok((true, f)) => {
                                opened += 1;
                                failed_reads += f;
                            }
                            Ok((false, f)) => {
                                refused += 1;
                                failed_reads += f;
                            }
                            Err(e) => violations
                                .push(format!("history {} byte {at} ^ {mask:#x}: {e}", n / 2 % 2)),
                        }
                    }
                    (opened, refused, failed_reads, violations)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let opened: u64 = results.iter().map(|r| r.0).sum();
    let refused: u64 = results.iter().map(|r| r.1).sum();
    let failed_reads: u64 = results.iter().map(|r| r.2).sum();
    let violations: Vec<String> = results.into_iter().flat_map(|r| r.3).collect();
    for v in violations.iter().take(10) {
        eprintln!("violation: {v}");
    }
    println!(
        "flips: {target}, opened: {opened}, refused: {refused}, reads failed (not served): {failed_reads}, violations: {} ({:.1} s)",
        violations.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(violations.is_empty(), "{} violations", violations.len());
}
