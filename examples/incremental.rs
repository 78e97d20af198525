//! Incremental copies driven by changed-block tracking: one full copy of a
//! snapshot to another file, then, round after round, only the extents
//! changed since the previous snapshot. Each round the copy is compared
//! with the snapshot it should now equal, byte for byte.
//!
//! `cargo run --release --example incremental`

use std::error::Error;
use std::sync::Arc;

use volshadow::block::{BlockDevice, FileImage};
use volshadow::cow::{Extent, SnapshotOptions, Target, Volume, VolumeOptions};

const VOLUME: u64 = 64 << 20;
const PIECE: usize = 1 << 20;

/// Copies `extents` of `from` to the same offsets of `to`, a megabyte at a
/// time; returns the bytes copied.
fn copy_extents(
    from: &dyn BlockDevice,
    to: &dyn BlockDevice,
    extents: &[Extent],
) -> Result<u64, Box<dyn Error>> {
    let mut buf = vec![0u8; PIECE];
    let mut copied = 0;
    for e in extents {
        let mut offset = e.offset;
        let end = e.offset + e.len;
        while offset < end {
            let n = (end - offset).min(PIECE as u64) as usize;
            from.read_at(&mut buf[..n], offset)?;
            to.write_at(&buf[..n], offset)?;
            offset += n as u64;
            copied += n as u64;
        }
    }
    to.flush()?;
    Ok(copied)
}

/// True when both devices hold the same bytes.
fn same(a: &dyn BlockDevice, b: &dyn BlockDevice) -> Result<bool, Box<dyn Error>> {
    let (mut x, mut y) = (vec![0u8; PIECE], vec![0u8; PIECE]);
    let mut offset = 0;
    while offset < a.len() {
        let n = (a.len() - offset).min(PIECE as u64) as usize;
        a.read_at(&mut x[..n], offset)?;
        b.read_at(&mut y[..n], offset)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        offset += n as u64;
    }
    Ok(a.len() == b.len())
}

/// Writes `count` 4 KiB blocks at pseudo-random places, seeded.
fn scribble(volume: &Volume, seed: u64, count: u64) -> Result<(), Box<dyn Error>> {
    let mut x = seed | 1;
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % (VOLUME / 4096);
        volume.write_at(&[(x >> 56) as u8 | 1; 4096], block * 4096)?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let volume = Volume::create(
        Arc::new(FileImage::create(dir.path().join("disk.img"), VOLUME)?),
        Arc::new(FileImage::create(dir.path().join("disk.diff"), 32 << 20)?),
        VolumeOptions::default(),
    )?;
    let persistent = SnapshotOptions {
        persistent: true,
        ..Default::default()
    };
    // The copy: a sparse file on "backup media" of the volume's size.
    let replica = FileImage::create(dir.path().join("replica.raw"), VOLUME)?;

    // Full copy: only what the snapshot holds data in (never-written
    // ranges of a sparse image read as zeros and are left as holes).
    scribble(&volume, 1, 2000)?;
    let mut base = volume.create_snapshot(persistent.clone())?;
    let allocated = volume.allocated_extents(base.id)?;
    let full = copy_extents(&volume.snapshot(base.id)?, &replica, &allocated)?;
    if !same(&volume.snapshot(base.id)?, &replica)? {
        return Err("the full copy differs from its snapshot".into());
    }
    println!(
        "incremental: full copy of snapshot 1: {} MiB of a {} MiB volume",
        full >> 20,
        VOLUME >> 20
    );

    for round in 2..=4 {
        scribble(&volume, round, 150)?;
        let next = volume.create_snapshot(persistent.clone())?;
        let changed = volume.changed_extents(base.id, Target::Snapshot(next.id))?;
        let copied = copy_extents(&volume.snapshot(next.id)?, &replica, &changed)?;
        if !same(&volume.snapshot(next.id)?, &replica)? {
            return Err(
                format!("after round {round} the copy differs from snapshot {round}").into(),
            );
        }
        println!(
            "incremental: snapshot {} -> {}: {} extents, {} KiB copied ({:.1}% of the volume); copy equals snapshot {}",
            base.seq,
            next.seq,
            changed.len(),
            copied >> 10,
            copied as f64 * 100.0 / VOLUME as f64,
            next.seq
        );
        // The copy now stands for `next`; the older snapshot can go.
        volume.delete_snapshot(base.id)?;
        base = next;
    }
    volume.close()?;
    Ok(())
}
