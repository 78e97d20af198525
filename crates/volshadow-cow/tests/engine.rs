//! Scenario tests of the engine, each compared byte for byte with what the
//! volume must show.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use volshadow_block::{BlockDevice, MemDevice, conformance};
use volshadow_cow::{Error, Extent, FullPolicy, SnapshotOptions, Target, Volume, VolumeOptions};

#[test]
fn snapshot_keeps_old_bytes_and_survives_reopen() {
    let mut r = Rig::small();
    fill(&r.vol, 0, 1 << 20, 0x11);
    let s1 = r.vol.create_snapshot(persistent()).unwrap();
    let before = all(&r.vol);
    // Unaligned overwrite across chunk boundaries.
    fill(&r.vol, 4000, 10_000, 0x22);
    let snap = r.vol.snapshot(s1.id).unwrap();
    assert_eq!(all(&snap), before);
    let live = all(&r.vol);
    assert!(live[4000..14_000].iter().all(|&b| b == 0x22));
    assert_eq!(live[3999], 0x11);
    r.vol.flush().unwrap();
    r.reopen();
    assert_eq!(all(&r.vol.snapshot(s1.id).unwrap()), before);
    assert_eq!(all(&r.vol), live);
    assert_eq!(r.vol.snapshots(), vec![s1]);
}

#[test]
fn snapshot_with_a_given_id_keeps_it_and_refuses_a_duplicate() {
    let mut r = Rig::small();
    let id = uuid::Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
    fill(&r.vol, 0, 8192, 7);
    let s = r.vol.create_snapshot_with_id(persistent(), id).unwrap();
    assert_eq!(s.id, id);
    assert!(matches!(
        r.vol.create_snapshot_with_id(persistent(), id),
        Err(Error::InvalidOptions(_))
    ));
    assert_eq!(r.vol.snapshots().len(), 1);
    fill(&r.vol, 0, 8192, 8);
    r.vol.flush().unwrap();
    r.reopen();
    assert_eq!(r.vol.snapshots(), vec![s]);
    assert!(
        read(&r.vol.snapshot(id).unwrap(), 0, 8192)
            .iter()
            .all(|&b| b == 7)
    );
}

#[test]
fn non_persistent_snapshots_are_dropped_at_recovery() {
    let mut r = Rig::small();
    let p = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 8192, 1);
    let np = r.vol.create_snapshot(SnapshotOptions::default()).unwrap();
    assert!(!np.persistent);
    fill(&r.vol, 0, 16384, 2);
    let p_view = all(&r.vol.snapshot(p.id).unwrap());
    assert!(p_view[..16384].iter().all(|&b| b == 0));
    r.vol.flush().unwrap();
    r.reopen();
    let ids: Vec<_> = r.vol.snapshots().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![p.id]);
    // The persistent one still reads its bytes, including chunks whose
    // copies were tagged for the dropped snapshot.
    assert_eq!(all(&r.vol.snapshot(p.id).unwrap()), p_view);
    assert!(matches!(
        r.vol.snapshot(np.id),
        Err(Error::SnapshotNotFound(_))
    ));
}

#[test]
fn one_copy_per_chunk_however_many_snapshots() {
    let r = Rig::small();
    for _ in 0..64 {
        r.vol.create_snapshot(SnapshotOptions::default()).unwrap();
    }
    fill(&r.vol, 0, 3 * CHUNK as usize, 9);
    assert_eq!(r.vol.usage().preserved_chunks, 3);
    // Overwriting again in the same interval copies nothing.
    fill(&r.vol, 100, 5000, 8);
    assert_eq!(r.vol.usage().preserved_chunks, 3);
    for s in r.vol.snapshots() {
        assert!(all(&r.vol.snapshot(s.id).unwrap()).iter().all(|&b| b == 0));
    }
}

#[test]
fn delete_frees_exactly_what_no_snapshot_needs() {
    let r = Rig::small();
    let a = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 2 * CHUNK as usize, 1); // chunks 0,1 tagged a
    let b = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 3 * CHUNK as usize, 2); // chunks 0,1,2 tagged b
    let c = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 2 * CHUNK as u64, CHUNK as usize, 3); // chunk 2 tagged c
    let views = |v: &Volume| -> Vec<Vec<u8>> {
        v.snapshots()
            .iter()
            .map(|s| all(&v.snapshot(s.id).unwrap()))
            .collect()
    };
    let before = views(&r.vol);
    assert_eq!(r.vol.usage().preserved_chunks, 6);
    // Deleting b: its copies of chunks 0 and 1 are not needed (a has its
    // own); its copy of chunk 2 still serves a and moves to it.
    r.vol.delete_snapshot(b.id).unwrap();
    assert_eq!(r.vol.usage().preserved_chunks, 4);
    assert_eq!(views(&r.vol), vec![before[0].clone(), before[2].clone()]);
    // Freed slots are reused: new copies do not grow the used bytes.
    let used = r.vol.usage().used_bytes;
    let d = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 10 * CHUNK as u64, 2 * CHUNK as usize, 4);
    assert_eq!(r.vol.usage().used_bytes, used + 2 * CHUNK as u64);
    r.vol.delete_snapshot(a.id).unwrap();
    r.vol.delete_snapshot(c.id).unwrap();
    r.vol.delete_snapshot(d.id).unwrap();
    assert_eq!(r.vol.usage().used_bytes, 0);
    assert_eq!(r.vol.usage().preserved_chunks, 0);
}

#[test]
fn changed_extents_are_exact_across_deletes_and_recovery() {
    let mut r = Rig::small();
    let c = CHUNK as u64;
    let a = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 5 * c + 10, 10, 1); // chunk 5
    let b = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 6 * c, 2 * c as usize, 1); // chunks 6, 7
    let m = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 20 * c, 1, 1); // chunk 20
    let d = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 30 * c, 1, 1); // chunk 30 (after d: live only)
    let ext = |off: u64, len: u64| Extent {
        offset: off * c,
        len: len * c,
    };
    let check = |v: &Volume| {
        assert_eq!(
            v.changed_extents(a.id, Target::Snapshot(d.id)).unwrap(),
            vec![ext(5, 3), ext(20, 1)]
        );
        assert_eq!(
            v.changed_extents(b.id, Target::Snapshot(d.id)).unwrap(),
            vec![ext(6, 2), ext(20, 1)]
        );
        assert_eq!(
            v.changed_extents(a.id, Target::Live).unwrap(),
            vec![ext(5, 3), ext(20, 1), ext(30, 1)]
        );
        assert_eq!(
            v.changed_extents(d.id, Target::Live).unwrap(),
            vec![ext(30, 1)]
        );
    };
    check(&r.vol);
    r.vol.delete_snapshot(m.id).unwrap();
    check(&r.vol);
    r.vol.flush().unwrap();
    r.reopen();
    check(&r.vol);
    assert!(r.vol.changed_extents(d.id, Target::Snapshot(a.id)).is_err());
}

#[test]
fn revert_rolls_back_and_keeps_newer_snapshots() {
    let mut r = Rig::small();
    fill(&r.vol, 0, 1 << 20, 0xaa);
    let s1 = r.vol.create_snapshot(persistent()).unwrap();
    let v1 = all(&r.vol);
    fill(&r.vol, 12_345, 100_000, 0xbb);
    let s2 = r.vol.create_snapshot(persistent()).unwrap();
    let v2 = all(&r.vol);
    fill(&r.vol, 500_000, 9_000, 0xcc);
    r.vol.revert(s1.id).unwrap();
    assert_eq!(all(&r.vol), v1);
    assert_eq!(all(&r.vol.snapshot(s1.id).unwrap()), v1);
    assert_eq!(all(&r.vol.snapshot(s2.id).unwrap()), v2);
    r.vol.revert(s2.id).unwrap();
    assert_eq!(all(&r.vol), v2);
    r.reopen();
    assert_eq!(all(&r.vol), v2);
    assert_eq!(all(&r.vol.snapshot(s1.id).unwrap()), v1);
    let np = r.vol.create_snapshot(SnapshotOptions::default()).unwrap();
    assert!(matches!(r.vol.revert(np.id), Err(Error::InvalidOptions(_))));
}

fn tiny(policy: FullPolicy, max_chunks: u64) -> Rig {
    Rig::new(
        1 << 20,
        4 << 20,
        VolumeOptions {
            chunk_size: CHUNK,
            max_bytes: Some(max_chunks * CHUNK as u64),
            policy,
            ..Default::default()
        },
    )
}

#[test]
fn full_delete_oldest_drops_the_oldest_and_goes_on() {
    let r = tiny(FullPolicy::DeleteOldest, 4);
    let s1 = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 3 * CHUNK as usize, 1);
    let s2 = r.vol.create_snapshot(persistent()).unwrap();
    let v2 = all(&r.vol);
    // Needs 3 more slots; only 1 left: s1 goes, s2 stays whole.
    fill(&r.vol, 0, 3 * CHUNK as usize, 2);
    let ids: Vec<_> = r.vol.snapshots().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![s2.id]);
    assert!(matches!(
        r.vol.snapshot(s1.id),
        Err(Error::SnapshotNotFound(_))
    ));
    assert_eq!(all(&r.vol.snapshot(s2.id).unwrap()), v2);
    assert!(r.vol.usage().used_bytes <= 4 * CHUNK as u64);
    // When even the last snapshot cannot fit, it goes too and writes go on.
    fill(&r.vol, 100 * CHUNK as u64, 8 * CHUNK as usize, 3);
    assert!(r.vol.snapshots().is_empty());
    assert!(
        read(&r.vol, 100 * CHUNK as u64, 8 * CHUNK as usize)
            .iter()
            .all(|&b| b == 3)
    );
}

#[test]
fn full_fail_writes_refuses_and_changes_nothing() {
    let r = tiny(FullPolicy::FailWrites, 2);
    let s = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 2 * CHUNK as usize, 1);
    let live = all(&r.vol);
    let err = r.vol.write_at(&[7u8; 100], 5 * CHUNK as u64).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
    assert!(err.to_string().contains("full"), "{err}");
    assert_eq!(all(&r.vol), live);
    assert!(all(&r.vol.snapshot(s.id).unwrap()).iter().all(|&b| b == 0));
    // Writes to already-preserved chunks still work.
    fill(&r.vol, 0, 100, 5);
    // Raising the limit lets writes through again.
    r.vol.resize(8 * CHUNK as u64, None).unwrap();
    fill(&r.vol, 5 * CHUNK as u64, 100, 7);
}

#[test]
fn full_grow_raises_the_limit_up_to_its_max() {
    let r = tiny(
        FullPolicy::Grow {
            max: 40 * CHUNK as u64,
        },
        2,
    );
    r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 30 * CHUNK as usize, 1);
    let u = r.vol.usage();
    assert_eq!(u.used_bytes, 30 * CHUNK as u64);
    assert!(u.max_bytes >= u.used_bytes && u.max_bytes <= 40 * CHUNK as u64);
    let err = r
        .vol
        .write_at(&vec![1u8; 20 * CHUNK as usize], 100 * CHUNK as u64);
    assert!(err.is_err());
    assert_eq!(r.vol.usage().max_bytes, 40 * CHUNK as u64);
}

#[test]
fn resize_shrinks_by_deleting_oldest() {
    let r = tiny(FullPolicy::DeleteOldest, 16);
    let s1 = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 6 * CHUNK as usize, 1);
    let s2 = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 2 * CHUNK as usize, 2);
    let u = r.vol.resize(4 * CHUNK as u64, None).unwrap();
    assert_eq!(u.max_bytes, 4 * CHUNK as u64);
    assert!(u.used_bytes <= u.max_bytes);
    assert_eq!(
        r.vol
            .snapshots()
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        vec![s2.id]
    );
    // The deletion is told, once.
    let told: Vec<_> = r
        .vol
        .take_auto_deleted()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(told, vec![s1.id]);
    assert!(r.vol.take_auto_deleted().is_empty());
    assert!(r.vol.resize(1 << 40, None).is_err());
}

#[test]
fn wrong_origin_and_bad_diff_areas_are_clear_errors() {
    let r = Rig::small();
    drop(r.vol);
    let other = Arc::new(MemDevice::new(2 << 20));
    let err = Volume::open(other, r.diff.clone()).unwrap_err();
    assert!(matches!(err, Error::OriginMismatch { .. }), "{err}");
    assert!(err.to_string().contains("resized"), "{err}");
    // Creating over an existing diff area is refused unless asked.
    let again = Volume::create(r.origin.clone(), r.diff.clone(), VolumeOptions::default());
    assert!(matches!(again, Err(Error::InvalidOptions(_))));
    // Blank device.
    let blank = Arc::new(MemDevice::new(4 << 20));
    let err = Volume::open(r.origin.clone(), blank).unwrap_err();
    assert!(matches!(err, Error::NotADiffArea { .. }), "{err}");
    // Both superblock copies damaged.
    let diff = r.diff.to_vec();
    let broken = Arc::new(MemDevice::new(4 << 20));
    broken.write_at(&diff, 0).unwrap();
    broken.write_at(&[0xff; 8], 16).unwrap();
    broken.write_at(&[0xff; 8], 4096 + 16).unwrap();
    let err = Volume::open(r.origin.clone(), broken.clone()).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // One copy damaged: the other still opens.
    broken.write_at(&diff[4096..8192], 4096).unwrap();
    Volume::open(r.origin.clone(), broken).unwrap();
}

#[test]
fn journal_damage_never_panics() {
    let mut r = Rig::small();
    let s = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 64 * CHUNK as usize, 3);
    r.vol.flush().unwrap();
    let _ = s;
    let image = r.diff.to_vec();
    // Flip every 97th byte of the journal region, one at a time: each open
    // either succeeds (the damage cut a tail) or reports corruption.
    let mut outcomes = (0, 0);
    for at in (8192..8192 + 6000).step_by(97) {
        let dev = Arc::new(MemDevice::new(image.len() as u64));
        dev.write_at(&image, 0).unwrap();
        let mut byte = [0u8];
        dev.read_at(&mut byte, at).unwrap();
        dev.write_at(&[byte[0] ^ 0x5a], at).unwrap();
        match Volume::open(r.origin.clone(), dev) {
            Ok(_) => outcomes.0 += 1,
            Err(e) => {
                assert!(matches!(e, Error::Corrupt { .. }), "{e}");
                outcomes.1 += 1;
            }
        }
    }
    assert!(outcomes.0 + outcomes.1 > 10);
    r.diff.write_at(&image, 0).unwrap();
    r.reopen();
}

#[test]
fn verify_finds_a_damaged_copy_and_names_its_snapshots() {
    let r = Rig::small();
    let s1 = r.vol.create_snapshot(persistent()).unwrap();
    let s2 = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 4 * CHUNK as usize, 1);
    let report = r.vol.verify().unwrap();
    assert_eq!(report.checked, 4);
    assert!(report.mismatches.is_empty());
    // Damage slot 0 (the first copy made) behind the engine's back.
    let first_slot = find_data_offset(&r);
    r.diff.write_at(&[0x42], first_slot + 17).unwrap();
    let report = r.vol.verify().unwrap();
    assert_eq!(report.mismatches.len(), 1, "{report:?}");
    let m = &report.mismatches[0];
    let mut ids = m.snapshots.clone();
    ids.sort();
    let mut want = vec![s1.id, s2.id];
    want.sort();
    assert_eq!(ids, want);
}

#[test]
fn copies_only_non_persistent_snapshots_read_carry_no_hash() {
    let mut r = Rig::small();
    let np = r.vol.create_snapshot(SnapshotOptions::default()).unwrap();
    fill(&r.vol, 0, 2 * CHUNK as usize, 1);
    let report = r.vol.verify().unwrap();
    // Checked by their read checksum; no blake3 recorded.
    assert_eq!((report.checked, report.unhashed), (2, 2), "{report:?}");
    // From here on a persistent snapshot exists: copies are hashed and
    // journaled, also those the older non-persistent one shares.
    let p = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 3 * CHUNK as usize, 2);
    let report = r.vol.verify().unwrap();
    assert_eq!((report.checked, report.unhashed), (5, 2), "{report:?}");
    let np_view = read(&r.vol.snapshot(np.id).unwrap(), 0, 3 * CHUNK as usize);
    assert_eq!(np_view, vec![0u8; 3 * CHUNK as usize]);
    let p_view = read(&r.vol.snapshot(p.id).unwrap(), 0, 3 * CHUNK as usize);
    let mut want = vec![1u8; 2 * CHUNK as usize];
    want.extend(vec![0u8; CHUNK as usize]);
    assert_eq!(p_view, want);
    // On reopen the non-persistent snapshot and the copies only it read
    // are gone; the persistent one reads as before.
    r.reopen();
    assert_eq!(r.vol.snapshots().len(), 1);
    let report = r.vol.verify().unwrap();
    assert_eq!((report.checked, report.unhashed), (3, 0), "{report:?}");
    assert_eq!(
        read(&r.vol.snapshot(p.id).unwrap(), 0, 3 * CHUNK as usize),
        want
    );
}

/// Found by the model test: copies made for a non-persistent snapshot are
/// not journaled, so deleting a persistent snapshot freed slots in memory
/// that a replay of the journal still thought in use, and reusing them made
/// the journal say "slot used twice". A persistent snapshot now writes a
/// checkpoint first when unjournaled copies exist.
#[test]
fn slots_freed_next_to_unjournaled_copies_replay_cleanly() {
    for delete_first in [false, true] {
        let mut r = Rig::small();
        let c = CHUNK as usize;
        let n = r.vol.create_snapshot(SnapshotOptions::default()).unwrap();
        fill(&r.vol, 0, 4 * c, 1);
        let p1 = r.vol.create_snapshot(persistent()).unwrap();
        fill(&r.vol, 2 * CHUNK as u64, 4 * c, 2);
        r.vol
            .delete_snapshot(if delete_first { n.id } else { p1.id })
            .unwrap();
        let p2 = r.vol.create_snapshot(persistent()).unwrap();
        let before = read(&r.vol, 0, 10 * c);
        fill(&r.vol, 0, 10 * c, 3);
        r.vol.flush().unwrap();
        r.reopen();
        assert_eq!(read(&r.vol.snapshot(p2.id).unwrap(), 0, 10 * c), before);
        assert!(r.vol.verify().unwrap().mismatches.is_empty());
    }
}

/// The data region starts at the superblock's `data_offset` (byte 104).
fn find_data_offset(r: &Rig) -> u64 {
    let mut b = [0u8; 8];
    r.diff.read_at(&mut b, 104).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn snapshot_views_are_read_only_and_die_with_their_snapshot() {
    let r = Rig::small();
    let s = r.vol.create_snapshot(SnapshotOptions::default()).unwrap();
    let view = r.vol.snapshot(s.id).unwrap();
    assert!(view.is_read_only());
    let e = view.write_at(&[1], 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(view.discard(0, 4096).is_err());
    r.vol.delete_snapshot(s.id).unwrap();
    let e = view.read_at(&mut [0u8; 16], 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
}

#[test]
fn live_volume_passes_the_block_conformance_suite_under_cow() {
    let r = Rig::new(
        conformance::MIN_LEN,
        16 << 20,
        VolumeOptions {
            chunk_size: 16384,
            ..Default::default()
        },
    );
    let s = r.vol.create_snapshot(persistent()).unwrap();
    let failures = conformance::run_all(&r.vol);
    assert!(failures.is_empty(), "{failures:#?}");
    // The snapshot still reads the zeros it was taken with.
    assert!(all(&r.vol.snapshot(s.id).unwrap()).iter().all(|&b| b == 0));
}

#[test]
fn allocated_extents_report_holes_of_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let origin =
        Arc::new(volshadow_block::FileImage::create(dir.path().join("o"), 4 << 20).unwrap());
    // Where the file system cannot report holes (Windows, for now), every
    // range counts as data and there is nothing to check.
    if origin.allocation(0, 4096).unwrap().is_none() {
        eprintln!("SKIP: this platform reports no allocation map for files");
        return;
    }
    let diff = Arc::new(MemDevice::new(8 << 20));
    let vol = Volume::create(origin, diff, VolumeOptions::default()).unwrap();
    vol.write_at(&[1u8; 4096], 1 << 20).unwrap();
    let s = vol.create_snapshot(persistent()).unwrap();
    vol.write_at(&[2u8; 4096], 3 << 20).unwrap();
    let ext = vol.allocated_extents(s.id).unwrap();
    let covers = |off: u64| ext.iter().any(|e| e.offset <= off && off < e.end());
    assert!(covers(1 << 20), "{ext:?}");
    assert!(!covers(2 << 20), "a hole reported as data: {ext:?}");
    // The snapshot sees chunk 3 MiB through its preserved copy.
    assert!(covers(3 << 20), "{ext:?}");
    let live = vol.allocation(0, 4 << 20).unwrap();
    if let Some(live) = live {
        assert!(
            live.iter()
                .any(|e| e.offset <= (3 << 20) && (3 << 20) < e.end())
        );
    }
}

/// Regression (found by fault injection): a write spanning several chunks
/// copied some, then failed on another; the next write to the copied ones
/// journaled duplicate copies, which recovery rejected as corruption.
/// Copies of one write are now made all or nothing (every origin read
/// first), and a chunk already copied for the newest snapshot is never
/// copied again.
#[test]
fn a_failed_multi_chunk_write_does_not_duplicate_copies() {
    use volshadow_block::{Fault, FaultAction, FaultError, FaultyDevice, OpKind};
    let origin = Arc::new(FaultyDevice::new(MemDevice::new(1 << 20)));
    let diff = Arc::new(MemDevice::new(4 << 20));
    let vol = Volume::create(
        origin.clone(),
        diff.clone(),
        VolumeOptions {
            chunk_size: CHUNK,
            ..Default::default()
        },
    )
    .unwrap();
    let s = vol.create_snapshot(persistent()).unwrap();
    fill(&vol, CHUNK as u64, 10, 1); // chunk 1 copied
    // Chunks 0 and 2 need copies: two runs, two origin reads; fail the 2nd.
    origin.set_fault(Fault::on(
        OpKind::Read,
        1,
        FaultAction::Fail(FaultError::Eio),
    ));
    assert!(vol.write_at(&[1u8; 3 * CHUNK as usize], 0).is_err());
    assert_eq!(
        vol.usage().preserved_chunks,
        1,
        "a failed write left copies behind"
    );
    fill(&vol, 0, 100, 2);
    fill(&vol, 0, 3 * CHUNK as usize, 3);
    assert_eq!(vol.usage().preserved_chunks, 3);
    vol.flush().unwrap();
    drop(vol);
    let vol = Volume::open(origin, diff).unwrap();
    assert!(all(&vol.snapshot(s.id).unwrap()).iter().all(|&b| b == 0));
}

/// Found by fuzzing: a revert through the copy-on-write path could run out
/// of diff area half way (newer snapshots need copies of what it
/// overwrites), leaving the volume partly reverted and a journaled revert
/// that could never finish. It is now refused up front.
#[test]
fn revert_that_cannot_fit_is_refused_and_changes_nothing() {
    let r = tiny(FullPolicy::FailWrites, 6);
    let s1 = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 4 * CHUNK as usize, 1); // 4 copies for s1
    let s2 = r.vol.create_snapshot(persistent()).unwrap();
    let live = all(&r.vol);
    // Reverting to s1 rewrites 4 chunks, which s2 needs copied: 4 > 2 free.
    let err = r.vol.revert(s1.id).unwrap_err();
    assert!(matches!(err, Error::DiffAreaFull { .. }), "{err}");
    assert_eq!(all(&r.vol), live);
    assert_eq!(r.vol.snapshots().len(), 2);
    // With room it works, and s2 keeps its bytes.
    r.vol.resize(16 * CHUNK as u64, None).unwrap();
    r.vol.revert(s1.id).unwrap();
    assert!(all(&r.vol).iter().all(|&b| b == 0));
    assert_eq!(all(&r.vol.snapshot(s2.id).unwrap()), live);
}

/// A revert leaves chunks that already hold the target's bytes alone, so
/// they are not copied again for newer snapshots nor listed as changed.
#[test]
fn revert_skips_chunks_that_already_hold_the_target_bytes() {
    let r = Rig::small();
    fill(&r.vol, 0, 1 << 20, 0xaa);
    let s1 = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 0, 4 * CHUNK as usize, 0xbb);
    // Chunks 2 and 3 are written back to what S1 holds.
    fill(&r.vol, 2 * CHUNK as u64, 2 * CHUNK as usize, 0xaa);
    let s2 = r.vol.create_snapshot(persistent()).unwrap();
    let used = r.vol.usage().used_bytes;
    r.vol.revert(s1.id).unwrap();
    assert_eq!(all(&r.vol), all(&r.vol.snapshot(s1.id).unwrap()));
    assert_eq!(
        r.vol.changed_extents(s2.id, Target::Live).unwrap(),
        vec![Extent {
            offset: 0,
            len: 2 * CHUNK as u64
        }]
    );
    assert_eq!(r.vol.usage().used_bytes, used + 2 * CHUNK as u64);
    // Reverting again changes nothing at all.
    let s3 = r.vol.create_snapshot(persistent()).unwrap();
    r.vol.revert(s1.id).unwrap();
    assert_eq!(r.vol.changed_extents(s3.id, Target::Live).unwrap(), vec![]);
}

/// `changed_extents_in` is `changed_extents` clipped to the window, for
/// windows that start and end inside, across and outside changed runs.
#[test]
fn changed_extents_in_a_window_are_the_whole_list_clipped() {
    let r = Rig::small();
    let s1 = r.vol.create_snapshot(persistent()).unwrap();
    for (off, len) in [
        (0u64, 3 * CHUNK as usize),
        (40_000, 9000),
        (200_000, 70_000),
    ] {
        fill(&r.vol, off, len, 5);
    }
    let s2 = r.vol.create_snapshot(persistent()).unwrap();
    fill(&r.vol, 500_000, 20_000, 6);
    for to in [Target::Snapshot(s2.id), Target::Live] {
        let whole = r.vol.changed_extents(s1.id, to).unwrap();
        for (off, len) in [
            (0u64, 1u64 << 20),
            (5000, 100),
            (6000, 200_000),
            (210_000, 1),
            (900_000, 500_000),
        ] {
            let end = (off + len).min(1 << 20);
            let want: Vec<Extent> = whole
                .iter()
                .filter_map(|e| {
                    let (lo, hi) = (e.offset.max(off), (e.offset + e.len).min(end));
                    (lo < hi).then(|| Extent {
                        offset: lo,
                        len: hi - lo,
                    })
                })
                .collect();
            assert_eq!(
                r.vol.changed_extents_in(s1.id, to, off, len).unwrap(),
                want,
                "window {off}+{len}"
            );
        }
    }
}
