//! A format-v1 diff area checked into `tests/fixtures/v1/`, opened by every
//! build: a format change that cannot read it fails here, so changes are
//! deliberate (bump the version and keep reading v1, or say why not).
//!
//! Regenerate (only for a deliberate new fixture) with
//! `VOLSHADOW_WRITE_FIXTURE=1 cargo test -p volshadow-cow --test fixture`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use volshadow_block::{BlockDevice, FileImage};
use volshadow_cow::{SnapshotOptions, Target, Volume, VolumeOptions};

const ORIGIN_LEN: u64 = 256 << 10;
const DIFF_LEN: u64 = 1 << 20;
const CHUNK: u32 = 4096;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/v1")
}

/// Deterministic contents of each stage.
fn stage(n: u8) -> Vec<u8> {
    let mut v = vec![0u8; ORIGIN_LEN as usize];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(n.wrapping_mul(101));
    }
    v
}

/// Stage 1: all of `stage(1)`. Snapshot s1 (persistent). Stage 2: bytes
/// 10_000..50_000 from `stage(2)`. Snapshot s2 (persistent), then a
/// non-persistent s3. Stage 3: bytes 100_000..110_000 from `stage(3)`.
fn expected() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let s1 = stage(1);
    let mut s2 = s1.clone();
    s2[10_000..50_000].copy_from_slice(&stage(2)[10_000..50_000]);
    let mut live = s2.clone();
    live[100_000..110_000].copy_from_slice(&stage(3)[100_000..110_000]);
    (s1, s2, live)
}

fn write_fixture() {
    let d = dir();
    std::fs::create_dir_all(&d).unwrap();
    for f in ["origin.img", "diff.img", "ids.txt"] {
        let _ = std::fs::remove_file(d.join(f));
    }
    let origin = Arc::new(FileImage::create(d.join("origin.img"), ORIGIN_LEN).unwrap());
    let diff = Arc::new(FileImage::create(d.join("diff.img"), DIFF_LEN).unwrap());
    let vol = Volume::create(
        origin,
        diff,
        VolumeOptions {
            chunk_size: CHUNK,
            journal_half: Some(16384),
            ..Default::default()
        },
    )
    .unwrap();
    let persistent = SnapshotOptions {
        persistent: true,
        ..Default::default()
    };
    vol.write_at(&stage(1), 0).unwrap();
    let s1 = vol.create_snapshot(persistent.clone()).unwrap();
    vol.write_at(&stage(2)[10_000..50_000], 10_000).unwrap();
    let s2 = vol.create_snapshot(persistent).unwrap();
    vol.create_snapshot(SnapshotOptions::default()).unwrap();
    vol.write_at(&stage(3)[100_000..110_000], 100_000).unwrap();
    vol.flush().unwrap();
    std::fs::write(d.join("ids.txt"), format!("{}\n{}\n", s1.id, s2.id)).unwrap();
}

#[test]
fn format_v1_fixture_opens_and_reads_back() {
    if std::env::var_os("VOLSHADOW_WRITE_FIXTURE").is_some() {
        write_fixture();
    }
    // Opening runs recovery, which writes; work on copies.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["origin.img", "diff.img"] {
        std::fs::copy(dir().join(f), tmp.path().join(f)).unwrap();
    }
    let ids: Vec<uuid::Uuid> = std::fs::read_to_string(dir().join("ids.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let origin = Arc::new(FileImage::open(tmp.path().join("origin.img")).unwrap());
    let diff = Arc::new(FileImage::open(tmp.path().join("diff.img")).unwrap());
    let vol = Volume::open(origin, diff).unwrap();
    let (s1, s2, live) = expected();
    let listed: Vec<_> = vol.snapshots().into_iter().map(|s| s.id).collect();
    assert_eq!(listed, ids, "the non-persistent snapshot must be gone");
    let read = |d: &dyn BlockDevice| {
        let mut b = vec![0u8; ORIGIN_LEN as usize];
        d.read_at(&mut b, 0).unwrap();
        b
    };
    assert!(read(&vol) == live);
    assert!(read(&vol.snapshot(ids[0]).unwrap()) == s1);
    assert!(read(&vol.snapshot(ids[1]).unwrap()) == s2);
    let changed = vol
        .changed_extents(ids[0], Target::Snapshot(ids[1]))
        .unwrap();
    assert_eq!(changed.first().map(|e| e.offset), Some(8192));
    assert!(vol.verify().unwrap().mismatches.is_empty());
}
