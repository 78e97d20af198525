//! Integrity: damage to any part of a diff area gives a clear error or the
//! exact bytes, never wrong ones; journal compaction never loses a record.
//! Each test reproduces a finding, from a new user's trial, that once
//! returned wrong data or lost shadow copies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use uuid::Uuid;
use volshadow_block::{BlockDevice, FileImage, MemDevice};
use volshadow_cow::format::{self, FORMAT_VERSION, Record, SlotEntry, Superblock};
use volshadow_cow::{Error, OpenMode, SnapshotOptions, Volume, VolumeOptions};

const MIB: u64 = 1 << 20;

/// An origin and a diff area in memory that outlive the volumes opened on
/// them, as files outlive processes.
struct Pair {
    origin: Arc<MemDevice>,
    diff: Arc<MemDevice>,
}

impl Pair {
    fn open(&self) -> volshadow_cow::Result<Volume> {
        Volume::open(self.origin.clone(), self.diff.clone())
    }

    fn salvage(&self) -> Volume {
        Volume::open_with(self.origin.clone(), self.diff.clone(), OpenMode::Salvage)
            .expect("salvage open")
    }

    /// A copy of both devices, to damage one without touching the other.
    fn copy(&self) -> Pair {
        let dup = |d: &MemDevice| {
            let m = MemDevice::new(d.len());
            m.write_at(&d.to_vec(), 0).unwrap();
            Arc::new(m)
        };
        Pair {
            origin: dup(&self.origin),
            diff: dup(&self.diff),
        }
    }

    fn flip(&self, at: u64, mask: u8) {
        let mut b = [0u8];
        self.diff.read_at(&mut b, at).unwrap();
        self.diff.write_at(&[b[0] ^ mask], at).unwrap();
    }

    fn superblock(&self) -> Superblock {
        let image = self.diff.to_vec();
        (0..2)
            .filter_map(|c| Superblock::decode(&image[c * 4096..(c + 1) * 4096]).ok())
            .max_by_key(|s| s.generation)
            .unwrap()
    }

    /// Byte offsets of the records of the active journal half.
    fn records(&self) -> Vec<(u64, Record)> {
        let sb = self.superblock();
        let base = sb.journal_offset + sb.active_half as u64 * sb.journal_half;
        let image = self.diff.to_vec();
        let half = &image[base as usize..(base + sb.journal_half) as usize];
        let (mut at, mut seq, mut out) = (0usize, 0u64, Vec::new());
        while let Ok(d) = format::decode_record(&half[at..], sb.epoch, seq, FORMAT_VERSION) {
            out.push((base + at as u64, d.record));
            at += d.len;
            seq += 1;
        }
        out
    }

    /// The slot holding `chunk`'s newest copy, by its entry.
    fn slot_of(&self, chunk: u32) -> u64 {
        let sb = self.superblock();
        let image = self.diff.to_vec();
        (0..sb.slots)
            .filter(|&s| {
                let at = (sb.hash_offset + s * 32) as usize;
                let mut e = [0u8; 32];
                e.copy_from_slice(&image[at..at + 32]);
                SlotEntry::decode(&e).is_some_and(|e| e.chunk == chunk)
            })
            .max()
            .expect("a slot for the chunk")
    }

    fn slot_offset(&self, slot: u64) -> u64 {
        let sb = self.superblock();
        sb.data_offset + slot * sb.chunk_size as u64
    }
}

/// Reads `dev` chunk by chunk: `Err` where the read failed.
fn chunks(dev: &dyn BlockDevice) -> Vec<Result<Vec<u8>, String>> {
    (0..dev.len() / CHUNK as u64)
        .map(|c| {
            let mut b = vec![0u8; CHUNK as usize];
            dev.read_at(&mut b, c * CHUNK as u64)
                .map(|_| b)
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Every chunk reads exactly `want` or fails; returns the failed chunks.
fn exact_or_failed(dev: &dyn BlockDevice, want: &[u8]) -> Vec<usize> {
    let mut failed = Vec::new();
    for (c, got) in chunks(dev).into_iter().enumerate() {
        let w = &want[c * CHUNK as usize..(c + 1) * CHUNK as usize];
        match got {
            Ok(b) => assert!(b == w, "chunk {c} read wrong bytes"),
            Err(_) => failed.push(c),
        }
    }
    failed
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 12) as u8)
        .collect()
}

/// The setup of the integrity findings, one volume open per step as the
/// CLI does: 16 MiB, 4 KiB chunks; S1; 64 KiB written at 0; S2; 32 KiB at
/// 1 MiB; a listing; 32 KiB at 2 MiB. Returns the pair, S1 and S2 with
/// their bytes. `crash_last`: the last step ends without a clean close.
fn findings_setup(crash_last: bool) -> (Pair, [(Uuid, Vec<u8>); 2]) {
    findings_setup_then(crash_last, false)
}

/// As [`findings_setup`]; with `more`, the last session also writes at
/// 3 MiB and flushes before it ends, so the 2 MiB copies' records are
/// followed by records whose committed mark covers them.
fn findings_setup_then(crash_last: bool, more: bool) -> (Pair, [(Uuid, Vec<u8>); 2]) {
    let pair = Pair {
        origin: Arc::new(MemDevice::new(16 * MIB)),
        diff: Arc::new(MemDevice::new(16 * MIB)),
    };
    pair.origin.write_at(&pattern(16 << 20, 1), 0).unwrap();
    Volume::create(
        pair.origin.clone(),
        pair.diff.clone(),
        VolumeOptions {
            chunk_size: CHUNK,
            ..Default::default()
        },
    )
    .unwrap();
    let s1 = pair.open().unwrap().create_snapshot(persistent()).unwrap();
    let b1 = pattern(16 << 20, 1);
    pair.open()
        .unwrap()
        .write_at(&pattern(64 << 10, 2), 0)
        .unwrap();
    let s2 = pair.open().unwrap().create_snapshot(persistent()).unwrap();
    let mut b2 = b1.clone();
    b2[..64 << 10].copy_from_slice(&pattern(64 << 10, 2));
    pair.open()
        .unwrap()
        .write_at(&pattern(32 << 10, 3), MIB)
        .unwrap();
    assert_eq!(pair.open().unwrap().snapshots().len(), 2);
    let vol = pair.open().unwrap();
    vol.write_at(&pattern(32 << 10, 4), 2 * MIB).unwrap();
    vol.flush().unwrap();
    if more {
        vol.write_at(&pattern(32 << 10, 5), 3 * MIB).unwrap();
        vol.flush().unwrap();
    }
    if crash_last {
        // As a kill -9: no clean close.
        std::mem::forget(vol);
    } else {
        drop(vol);
    }
    (pair, [(s1.id, b1), (s2.id, b2)])
}

fn check_all_exact(vol: &Volume, snaps: &[(Uuid, Vec<u8>)]) {
    for (id, want) in snaps {
        let view = vol.snapshot(*id).unwrap();
        assert!(all(&view) == *want, "snapshot {id} differs");
    }
}

#[test]
fn a_damaged_newest_copy_fails_its_reads_and_verify() {
    let (pair, snaps) = findings_setup(false);
    let slot = pair.slot_of((2 * MIB / CHUNK as u64) as u32 + 7);
    pair.flip(pair.slot_offset(slot) + 100, 0x10);
    let vol = pair.open().unwrap();
    for (id, want) in &snaps {
        let failed = exact_or_failed(&vol.snapshot(*id).unwrap(), want);
        assert_eq!(failed, vec![519], "snapshot {id}");
    }
    let report = vol.verify().unwrap();
    assert_eq!(report.mismatches.len(), 1, "{report:?}");
    assert!(!report.is_clean());
}

#[test]
fn a_damaged_unflushed_looking_copy_is_reported_not_dropped() {
    // After a crash the last copies are not covered by any committed mark;
    // one whose data is wrong while the origin was overwritten is damage.
    let (pair, snaps) = findings_setup(true);
    let slot = pair.slot_of((2 * MIB / CHUNK as u64) as u32 + 7);
    pair.flip(pair.slot_offset(slot) + 100, 0x10);
    let err = pair.copy().open().unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { reason, .. } if reason.contains("chunk 519")),
        "{err}"
    );
    let vol = pair.salvage();
    for (id, want) in &snaps {
        assert_eq!(
            exact_or_failed(&vol.snapshot(*id).unwrap(), want),
            vec![519]
        );
    }
    assert!(vol.write_at(&[1], 0).is_err(), "salvage must not write");
}

#[test]
fn an_undamaged_unflushed_copy_after_a_crash_still_opens() {
    let (pair, snaps) = findings_setup(true);
    let vol = pair.open().unwrap();
    check_all_exact(&vol, &snaps);
    assert!(vol.verify().unwrap().is_clean());
}

#[test]
fn a_flipped_journal_record_followed_by_committed_ones_is_corruption() {
    // A crash after later, flushed records: the damaged one is covered by
    // their committed mark. (A clean close leaves a checkpoint instead.)
    let (pair, snaps) = findings_setup_then(true, true);
    let records = pair.records();
    let (at, _) = records
        .iter()
        .find(|(_, r)| matches!(r, Record::Preserve { .. }))
        .expect("a copy record after the checkpoint");
    pair.flip(at + format::RECORD_HEADER as u64 + 3, 0x04);
    let err = pair.copy().open().unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { reason, .. } if reason.contains("committed")),
        "{err}"
    );
    // Salvage: the copies recorded after the damage are unknown to the
    // index, but their slot entries name their chunks, so snapshot reads of
    // those chunks fail instead of reading the new live bytes.
    let vol = pair.salvage();
    for (id, want) in &snaps {
        let failed = exact_or_failed(&vol.snapshot(*id).unwrap(), want);
        assert!(
            (512..520).all(|c| failed.contains(&c)),
            "snapshot {id}: {failed:?}"
        );
    }
    assert!(!vol.verify().unwrap().is_clean());
}

#[test]
fn a_damaged_newer_superblock_falls_back_only_to_what_the_journal_proves() {
    let (pair, snaps) = findings_setup(false);
    let sb = pair.superblock();
    pair.flip((sb.generation % 2) * 4096 + 70, 0x01);
    let vol = pair.open().unwrap();
    check_all_exact(&vol, &snaps);
    assert!(
        vol.recovery_notes()
            .iter()
            .any(|n| n.contains("superblock copy")),
        "{:?}",
        vol.recovery_notes()
    );
    // Recovery rewrote the damaged copy.
    drop(vol);
    let vol = pair.open().unwrap();
    assert!(vol.verify().unwrap().is_clean());
}

#[test]
fn a_damaged_older_copy_is_never_served() {
    let (pair, snaps) = findings_setup(false);
    let slot = pair.slot_of(0);
    pair.flip(pair.slot_offset(slot) + 5, 0x80);
    let vol = pair.open().unwrap();
    // S1 reads chunk 0 from that slot; S2 from the origin (written before
    // S2, never since).
    let [(s1, b1), (s2, b2)] = &snaps;
    assert_eq!(exact_or_failed(&vol.snapshot(*s1).unwrap(), b1), vec![0]);
    assert_eq!(exact_or_failed(&vol.snapshot(*s2).unwrap(), b2), vec![]);
    let mut whole = vec![0u8; 64 << 10];
    let err = vol
        .snapshot(*s1)
        .unwrap()
        .read_at(&mut whole, 0)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("chunk 0"), "{err}");
}

#[test]
fn a_diff_area_is_bound_to_its_origin_not_to_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let a = Arc::new(FileImage::create(p("a.img"), 4 * MIB).unwrap());
    let b = Arc::new(FileImage::create(p("b.img"), 4 * MIB).unwrap());
    b.write_at(&[9u8; 4096], 0).unwrap();
    let diff = Arc::new(FileImage::create(p("a.diff"), 8 * MIB).unwrap());
    let vol = Volume::create(a.clone(), diff.clone(), VolumeOptions::default()).unwrap();
    let s = vol.create_snapshot(persistent()).unwrap();
    drop(vol);
    drop(diff);
    std::fs::copy(p("a.diff"), p("b.diff")).unwrap();
    let bdiff = Arc::new(FileImage::open(p("b.diff")).unwrap());
    let err = Volume::open(b.clone(), bdiff.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::OriginMismatch { detail, .. } if detail.contains("rebind")),
        "{err}"
    );
    // Moving both files keeps the binding (same file). Closed first:
    // Windows renames no open file.
    drop(a);
    std::fs::rename(p("a.img"), p("moved.img")).unwrap();
    std::fs::rename(p("a.diff"), p("moved.diff")).unwrap();
    let moved = Arc::new(FileImage::open(p("moved.img")).unwrap());
    let md = Arc::new(FileImage::open(p("moved.diff")).unwrap());
    assert_eq!(Volume::open(moved, md).unwrap().snapshots()[0].id, s.id);
    // A copied pair is rebound on request, then opens normally.
    let vol = Volume::open_with(b.clone(), bdiff.clone(), OpenMode::Rebind).unwrap();
    assert_eq!(vol.snapshots()[0].id, s.id);
    drop(vol);
    Volume::open(b, bdiff).unwrap();
}

/// A 64 MiB volume of 4 KiB chunks with 64 MiB of shadow storage, as the
/// issue's reproductions used.
fn sixty_four_mib() -> (Pair, Volume) {
    let pair = Pair {
        origin: Arc::new(MemDevice::new(64 * MIB)),
        diff: Arc::new(MemDevice::new(Volume::diff_area_len_for(64 * MIB, CHUNK))),
    };
    let vol = Volume::create(
        pair.origin.clone(),
        pair.diff.clone(),
        VolumeOptions {
            chunk_size: CHUNK,
            ..Default::default()
        },
    )
    .unwrap();
    (pair, vol)
}

/// Issue: one 48 MiB write after a snapshot of a 64 MiB volume with a
/// 64 MiB diff area: the batch outgrew a journal half, a compaction ran in
/// its middle from an index without the batch, and 10 405 of 16 384 chunks
/// of the snapshot read the new data.
#[test]
fn a_batch_larger_than_a_journal_half_keeps_every_record() {
    let origin_len = 64 * MIB;
    let (pair, vol) = sixty_four_mib();
    vol.write_at(&vec![b'A'; origin_len as usize], 0).unwrap();
    let s = vol.create_snapshot(persistent()).unwrap();
    vol.write_at(&vec![b'B'; 48 << 20], 0).unwrap();
    vol.flush().unwrap();
    drop(vol);
    let vol = pair.open().unwrap();
    let snap = all(&vol.snapshot(s.id).unwrap());
    let wrong = snap.chunks(CHUNK as usize).filter(|c| c[0] != b'A').count();
    assert_eq!(wrong, 0, "chunks of the snapshot read the new data");
    assert!(vol.verify().unwrap().is_clean());
    // And after a crash instead of a clean close.
    vol.write_at(&vec![b'C'; 8 << 20], 56 << 20).unwrap();
    vol.flush().unwrap();
    std::mem::forget(vol);
    let vol = pair.open().unwrap();
    assert!(all(&vol.snapshot(s.id).unwrap()).iter().all(|&b| b == b'A'));
}

/// Issue: 12 000 single-chunk first writes filled journal halves with
/// records whose durable mark came from the half before the compaction;
/// the next open failed with "durable mark beyond the record itself".
#[test]
fn many_small_first_writes_across_compactions_reopen() {
    let (pair, vol) = sixty_four_mib();
    let s = vol.create_snapshot(persistent()).unwrap();
    let before = all(&vol);
    let chunks = (64 * MIB / CHUNK as u64) as usize;
    for i in 0..12_000 {
        // Spread over the volume so every write is a first write.
        let c = (i * 7919) % chunks;
        vol.write_at(&[0xEE; 4096], (c * CHUNK as usize) as u64)
            .unwrap();
    }
    vol.flush().unwrap();
    std::mem::forget(vol);
    let vol = pair.open().unwrap();
    assert!(all(&vol.snapshot(s.id).unwrap()) == before);
    assert!(vol.verify().unwrap().is_clean());
}

#[test]
fn salvage_writes_nothing() {
    let (pair, _) = findings_setup(false);
    let before = pair.diff.to_vec();
    let vol = pair.salvage();
    assert!(vol.create_snapshot(SnapshotOptions::default()).is_err());
    assert!(vol.delete_oldest().is_err());
    assert!(vol.write_at(&[0], 0).is_err());
    vol.verify().unwrap();
    drop(vol);
    assert!(
        pair.diff.to_vec() == before,
        "salvage changed the diff area"
    );
}

/// What one damaged diff area did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Opened; every snapshot listed and read exactly.
    Exact,
    /// Opened; some reads failed (never wrong), and `verify` says so.
    ReadsFail,
    /// Open refused with a clear error.
    Refused,
}

/// Damages a copy of the findings' diff area with `damage`, opens it, and
/// classifies what happened; panics on a wrong byte, a missing or extra
/// snapshot, or failed reads that `verify` does not report.
fn outcome(pair: &Pair, snaps: &[(Uuid, Vec<u8>)], damage: impl FnOnce(&Pair)) -> Outcome {
    let p = pair.copy();
    damage(&p);
    let Ok(vol) = p.open() else {
        return Refused;
    };
    let mut listed: Vec<Uuid> = vol.snapshots().iter().map(|s| s.id).collect();
    let mut want: Vec<Uuid> = snaps.iter().map(|s| s.0).collect();
    listed.sort();
    want.sort();
    assert_eq!(listed, want, "the listing changed");
    let failed: usize = snaps
        .iter()
        .map(|(id, bytes)| exact_or_failed(&vol.snapshot(*id).unwrap(), bytes).len())
        .sum();
    if failed == 0 {
        return Exact;
    }
    assert!(
        !vol.verify().unwrap().is_clean(),
        "reads failed, verify clean"
    );
    ReadsFail
}

/// Runs the three damages of the corruption matrix on `range` (bit flips
/// at several places, a zeroed 4 KiB block, the bytes it held before the
/// last step) and returns the outcomes seen for each.
fn matrix_row(range: impl Fn(&Pair) -> (u64, u64)) -> [Vec<Outcome>; 3] {
    let (pair, snaps) = findings_setup(false);
    let before = pair.diff.to_vec();
    // One more step, so `before` is the same diff area one step older.
    let vol = pair.open().unwrap();
    vol.write_at(&pattern(16 << 10, 9), 3 * MIB).unwrap();
    drop(vol);
    let (start, len) = range(&pair);
    let mut flips: Vec<Outcome> = (0..16u64)
        .map(|k| {
            let at = start + (k * 7919 * 13) % len;
            outcome(&pair, &snaps, |p| p.flip(at, 1 << (k % 8)))
        })
        .collect();
    let zero = |p: &Pair| {
        let at = start + len / 2 / 4096 * 4096;
        let n = 4096.min(start + len - at);
        p.diff.write_at(&vec![0u8; n as usize], at).unwrap();
    };
    let stale = |p: &Pair| {
        p.diff
            .write_at(&before[start as usize..(start + len) as usize], start)
            .unwrap();
    };
    let mut zeroed = vec![outcome(&pair, &snaps, zero)];
    let mut old = vec![outcome(&pair, &snaps, stale)];
    for v in [&mut flips, &mut zeroed, &mut old] {
        v.sort();
        v.dedup();
    }
    [flips, zeroed, old]
}

use Outcome::{Exact, ReadsFail, Refused};

fn superblock_copy(newest: bool) -> impl Fn(&Pair) -> (u64, u64) {
    move |p: &Pair| {
        let g = p.superblock().generation;
        let copy = if newest { g % 2 } else { 1 - g % 2 };
        (copy * 4096, 4096)
    }
}

#[test]
fn matrix_newest_superblock_copy() {
    // The other copy plus the journal's proof: always exact.
    assert_eq!(
        matrix_row(superblock_copy(true)),
        [vec![Exact], vec![Exact], vec![Exact]]
    );
}

#[test]
fn matrix_older_superblock_copy() {
    assert_eq!(
        matrix_row(superblock_copy(false)),
        [vec![Exact], vec![Exact], vec![Exact]]
    );
}

fn active_half(p: &Pair) -> (u64, u64) {
    let sb = p.superblock();
    // The part holding records (the rest of the half is unused).
    let end = p.records().last().map_or(4096, |(at, _)| at + 64);
    let base = sb.journal_offset + sb.active_half as u64 * sb.journal_half;
    (base, end - base)
}

#[test]
fn matrix_active_journal_half() {
    // Damage to a committed record or the checkpoint is refused; the
    // closing mark itself may be cut like a torn tail.
    let [flips, zeroed, old] = matrix_row(active_half);
    assert!(
        flips.iter().all(|o| [Exact, Refused].contains(o)),
        "{flips:?}"
    );
    assert!(flips.contains(&Refused));
    assert_eq!(zeroed, vec![Refused]);
    // One step older: another epoch, so no whole checkpoint is current.
    assert_eq!(old, vec![Refused]);
}

fn inactive_half(p: &Pair) -> (u64, u64) {
    let sb = p.superblock();
    (
        sb.journal_offset + (1 - sb.active_half as u64) * sb.journal_half,
        sb.journal_half,
    )
}

#[test]
fn matrix_inactive_journal_half() {
    assert_eq!(
        matrix_row(inactive_half),
        [vec![Exact], vec![Exact], vec![Exact]]
    );
}

fn entries(p: &Pair) -> (u64, u64) {
    let sb = p.superblock();
    (sb.hash_offset, 33 * 32)
}

#[test]
fn matrix_slot_entries() {
    let [flips, zeroed, old] = matrix_row(entries);
    // A flip in an entry's blake3 part leaves reads exact (the crc and the
    // data agree); `verify` reports it.
    assert!(flips.contains(&ReadsFail), "{flips:?}");
    assert!(
        flips.iter().all(|o| [Exact, ReadsFail].contains(o)),
        "{flips:?}"
    );
    assert_eq!(zeroed, vec![ReadsFail]);
    // One step older: the newest copy's entry is missing.
    assert_eq!(old, vec![ReadsFail]);
}

fn data_slots(p: &Pair) -> (u64, u64) {
    let sb = p.superblock();
    (sb.data_offset, 33 * sb.chunk_size as u64)
}

#[test]
fn matrix_data_slots() {
    let [flips, zeroed, old] = matrix_row(data_slots);
    assert_eq!(flips, vec![ReadsFail]);
    assert_eq!(zeroed, vec![ReadsFail]);
    assert_eq!(old, vec![ReadsFail]);
}

/// After a clean close the journal ends in a checkpoint the superblock
/// names: zeroing its end (a few bytes, a record, a 4 KiB block) is never
/// taken for a crash that cut copies off, whose chunks would then be read
/// from the overwritten origin. Every case opens exact or is refused.
#[test]
fn a_zeroed_journal_end_after_a_clean_close_is_never_read_as_a_crash() {
    let (pair, snaps) = findings_setup(false);
    let records = pair.records();
    // Ranges that take the journal's last record (the checkpoint's end)
    // and what precedes it.
    let (last, _) = *records.last().expect("a checkpoint");
    for (from, to) in [
        (last, last + 64),
        (last - 96, last + 64),
        (last.saturating_sub(4096) + 64, last + 64),
        (records[0].0, last + 64),
    ] {
        let p = pair.copy();
        p.diff
            .write_at(&vec![0u8; (to - from) as usize], from)
            .unwrap();
        match p.open() {
            Ok(vol) => check_all_exact(&vol, &snaps),
            Err(e) => assert!(matches!(e, Error::Corrupt { .. }), "{from}..{to}: {e}"),
        }
    }
}
