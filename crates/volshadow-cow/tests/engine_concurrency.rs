//! The engine under concurrency: snapshot sets, write holds, clean cuts
//! under concurrent writers, group commit.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_cow::{Error, SnapshotOptions, SnapshotSet, Volume, VolumeOptions};

#[test]
fn snapshot_sets_are_all_or_nothing() {
    let a = Rig::small();
    let b = Rig::small();
    fill(&a.vol, 0, 100, 1);
    fill(&b.vol, 0, 100, 2);
    let set = SnapshotSet::create(&[&a.vol, &b.vol], persistent(), Duration::from_secs(5)).unwrap();
    assert_eq!(set.snapshots.len(), 2);
    assert!(set.snapshots.iter().all(|s| s.set_id == Some(set.id)));
    // Make the second volume refuse: its snapshot limit is reached.
    b.vol.set_snapshot_limit(1);
    let err =
        SnapshotSet::create(&[&a.vol, &b.vol], persistent(), Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, Error::TooManySnapshots(1)), "{err}");
    assert_eq!(a.vol.snapshots().len(), 1, "partial set left behind");
    assert_eq!(b.vol.snapshots().len(), 1);
}

/// An origin whose writes block while `stall` is set: a writer stuck
/// inside the volume, as a hung disk would leave it.
struct Stalling {
    inner: MemDevice,
    stall: Arc<AtomicBool>,
}

impl BlockDevice for Stalling {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> volshadow_block::Result<()> {
        while self.stall.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> volshadow_block::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
        self.inner.discard(offset, len)
    }
    fn name(&self) -> String {
        "stalling".into()
    }
}

#[test]
fn snapshot_set_hold_times_out_on_a_stuck_writer() {
    let stall = Arc::new(AtomicBool::new(false));
    let origin = Arc::new(Stalling {
        inner: MemDevice::new(1 << 20),
        stall: stall.clone(),
    });
    let a = Volume::create(
        origin,
        Arc::new(MemDevice::new(4 << 20)),
        VolumeOptions::default(),
    )
    .unwrap();
    let b = Rig::small();
    stall.store(true, Ordering::SeqCst);
    let v = a.clone();
    let writer = std::thread::spawn(move || v.write_at(&[1u8; 512], 0));
    std::thread::sleep(Duration::from_millis(50));
    let err =
        SnapshotSet::create(&[&b.vol, &a], persistent(), Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert!(a.snapshots().is_empty() && b.vol.snapshots().is_empty());
    // The hold was released: other writes to b go on; once the stuck
    // writer finishes a set succeeds.
    fill(&b.vol, 0, 10, 1);
    stall.store(false, Ordering::SeqCst);
    writer.join().unwrap().unwrap();
    SnapshotSet::create(&[&b.vol, &a], persistent(), Duration::from_secs(5)).unwrap();
    assert_eq!(a.snapshots().len(), 1);
}

/// Writers keep writing while snapshots are taken: each snapshot must be a
/// clean cut of each writer's sequence, containing every write completed
/// before the call and none started after it returned.
#[test]
fn snapshots_under_concurrent_writes_are_clean_cuts() {
    const BLOCKS: u64 = 32;
    let r = Rig::new(
        2 * BLOCKS * 4096,
        8 << 20,
        VolumeOptions {
            chunk_size: CHUNK,
            ..Default::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let vol = r.vol.clone();
            let stop = stop.clone();
            let done = done[w as usize].clone();
            std::thread::spawn(move || {
                let mut i = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    let block = w * BLOCKS + i % BLOCKS;
                    vol.write_at(&i.to_le_bytes(), block * 4096).unwrap();
                    done.store(i, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(2));
        let before: Vec<u64> = done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
        let s = r.vol.create_snapshot(SnapshotOptions::default()).unwrap();
        let after: Vec<u64> = done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
        let view = r.vol.snapshot(s.id).unwrap();
        for w in 0..2u64 {
            let vals: Vec<u64> = (0..BLOCKS)
                .map(|b| {
                    let mut x = [0u8; 8];
                    view.read_at(&mut x, (w * BLOCKS + b) * 4096).unwrap();
                    u64::from_le_bytes(x)
                })
                .collect();
            let cut = *vals.iter().max().unwrap();
            assert!(
                cut >= before[w as usize],
                "write {} missing",
                before[w as usize]
            );
            assert!(
                cut <= after[w as usize] + 1,
                "write {cut} started after the snapshot"
            );
            // A clean cut: every block holds the last write <= cut to it.
            for (b, &v) in vals.iter().enumerate() {
                let want = if cut < b as u64 {
                    0
                } else {
                    cut - (cut + BLOCKS - b as u64) % BLOCKS
                };
                assert_eq!(v, want, "writer {w} block {b} in a cut at {cut}");
            }
        }
        r.vol.delete_snapshot(s.id).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.join().unwrap();
    }
}

#[test]
fn concurrent_first_writes_share_group_commit_flushes() {
    let r = Rig::new(
        16 << 20,
        64 << 20,
        VolumeOptions {
            chunk_size: CHUNK,
            ..Default::default()
        },
    );
    r.vol.create_snapshot(persistent()).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let vol = r.vol.clone();
            std::thread::spawn(move || {
                for i in 0..128u64 {
                    vol.write_at(&[1u8; 512], (t * 128 + i) * CHUNK as u64)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let flushes = r.vol.group_commit_flushes();
    let copies = r.vol.usage().preserved_chunks;
    assert_eq!(copies, 1024);
    assert!(flushes <= copies, "{flushes} flushes for {copies} copies");
    eprintln!("group commit: {flushes} flushes for {copies} preserved chunks");
}
