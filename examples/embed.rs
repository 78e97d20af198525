//! Embedding the engine in an appliance: a volume over a block device of
//! your own, snapshots on a schedule with retention, and a snapshot read
//! back and checked against what was written.
//!
//! The custom backend here counts the I/O that reaches the storage (a real
//! one would talk to a LUN, a partition or an object-store cache). The
//! schedule runs on a simulated clock so the example finishes at once.
//!
//! `cargo run --release --example embed`

use std::collections::VecDeque;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use volshadow::block::{BlockDevice, FileImage, MemDevice, Op, Result as BlockResult, check_range};
use volshadow::cow::{DEFAULT_CHUNK_SIZE, SnapshotInfo, SnapshotOptions, Volume, VolumeOptions};

/// A backend that counts reads and writes reaching the device it wraps.
#[derive(Debug)]
struct CountingDevice<D> {
    inner: D,
    label: &'static str,
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
}

impl<D: BlockDevice> CountingDevice<D> {
    fn new(inner: D, label: &'static str) -> Self {
        CountingDevice {
            inner,
            label,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        }
    }
}

impl<D: BlockDevice> BlockDevice for CountingDevice<D> {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self, Op::Read, offset, buf.len() as u64)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        check_range(self, Op::Write, offset, buf.len() as u64)?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> BlockResult<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range(self, Op::Discard, offset, len)?;
        self.inner.discard(offset, len)
    }
    fn identity(&self) -> Option<[u8; 32]> {
        // The diff area records its origin's identity; pass the storage's.
        self.inner.identity()
    }
    fn name(&self) -> String {
        format!("{} ({})", self.label, self.inner.name())
    }
}

const VOLUME: u64 = 8 << 20;
const BLOCK: usize = 64 << 10;
/// Snapshots kept; older ones are deleted as new ones are taken.
const RETAIN: usize = 3;
/// Simulated minutes between snapshots, and how long the example runs.
const EVERY_MINUTES: u64 = 15;
const RUN_MINUTES: u64 = 120;

/// A small deterministic generator for the workload.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    // The origin is a file image behind the counting backend; the diff
    // area, to show any backend works, lives in RAM here.
    let origin = Arc::new(CountingDevice::new(
        FileImage::create(dir.path().join("appliance.img"), VOLUME)?,
        "origin",
    ));
    let diff = Arc::new(CountingDevice::new(
        MemDevice::new(Volume::diff_area_len_for(16 << 20, DEFAULT_CHUNK_SIZE)),
        "diff area",
    ));
    let volume = Volume::create(origin.clone(), diff.clone(), VolumeOptions::default())?;

    // What the volume held at each kept snapshot: (snapshot id, bytes).
    let mut kept: VecDeque<(SnapshotInfo, Vec<u8>)> = VecDeque::new();
    let mut model = vec![0u8; VOLUME as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut taken = 0;
    for minute in 1..=RUN_MINUTES {
        // The appliance's workload: two 64 KiB writes a minute.
        for _ in 0..2 {
            let block = (next(&mut rng) % (VOLUME / BLOCK as u64)) as usize;
            let byte = (next(&mut rng) & 0xff) as u8;
            let data = vec![byte; BLOCK];
            volume.write_at(&data, (block * BLOCK) as u64)?;
            model[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&data);
        }
        if minute % EVERY_MINUTES == 0 {
            let snap = volume.create_snapshot(SnapshotOptions {
                persistent: true,
                ..Default::default()
            })?;
            taken += 1;
            kept.push_back((snap, model.clone()));
            if kept.len() > RETAIN
                && let Some((old, _)) = kept.pop_front()
            {
                volume.delete_snapshot(old.id)?;
            }
        }
    }

    // The diff area was sized for the retention, so the full policy
    // (delete the oldest) never had to step in.
    let auto_deleted = volume.take_auto_deleted();
    if !auto_deleted.is_empty() {
        return Err(format!("{} snapshots were deleted to make room", auto_deleted.len()).into());
    }
    // Every kept snapshot reads exactly what the volume held when it was
    // taken, streamed in 1 MiB pieces.
    const PIECE: usize = 1 << 20;
    let mut buf = vec![0u8; PIECE];
    for (snap, expected) in &kept {
        let view = volume.snapshot(snap.id)?;
        for (i, want) in expected.chunks(PIECE).enumerate() {
            view.read_at(&mut buf[..want.len()], (i * PIECE) as u64)?;
            if &buf[..want.len()] != want {
                return Err(format!("snapshot {} differs at piece {i}", snap.id).into());
            }
        }
    }
    let listed: Vec<_> = volume.snapshots().iter().map(|s| s.id).collect();
    let expected: Vec<_> = kept.iter().map(|(snap, _)| snap.id).collect();
    if listed != expected {
        return Err("the volume lists other snapshots than the ones kept".into());
    }
    let report = volume.verify()?;
    if !report.is_clean() {
        return Err(format!("verify found damage: {report:?}").into());
    }
    volume.close()?;

    let usage = volume.usage();
    println!(
        "embed: {taken} snapshots taken every {EVERY_MINUTES} simulated minutes, {} kept, each read back equal",
        kept.len()
    );
    println!(
        "embed: origin saw {} writes ({} MiB), diff area {} writes ({} MiB); {} chunks preserved, {} KiB of old data",
        origin.writes.load(Ordering::Relaxed),
        origin.bytes_written.load(Ordering::Relaxed) >> 20,
        diff.writes.load(Ordering::Relaxed),
        diff.bytes_written.load(Ordering::Relaxed) >> 20,
        usage.preserved_chunks,
        usage.used_bytes >> 10,
    );
    println!(
        "embed: verify checked {} preserved chunks, clean",
        report.checked
    );
    Ok(())
}
