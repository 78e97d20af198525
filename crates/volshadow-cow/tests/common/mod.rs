//! Shared helpers of the engine's tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod power;

use std::sync::Arc;

use volshadow_block::{BlockDevice, MemDevice};
use volshadow_cow::{SnapshotOptions, Volume, VolumeOptions};

pub const CHUNK: u32 = 4096;

pub struct Rig {
    pub origin: Arc<MemDevice>,
    pub diff: Arc<MemDevice>,
    pub vol: Volume,
}

impl Rig {
    pub fn new(origin_len: u64, diff_len: u64, opts: VolumeOptions) -> Self {
        let origin = Arc::new(MemDevice::new(origin_len));
        let diff = Arc::new(MemDevice::new(diff_len));
        let vol = Volume::create(origin.clone(), diff.clone(), opts).unwrap();
        Rig { origin, diff, vol }
    }

    pub fn small() -> Self {
        Self::new(
            1 << 20,
            4 << 20,
            VolumeOptions {
                chunk_size: CHUNK,
                ..Default::default()
            },
        )
    }

    pub fn reopen(&mut self) {
        let vol = Volume::open(self.origin.clone(), self.diff.clone()).unwrap();
        self.vol = vol;
    }
}

pub fn persistent() -> SnapshotOptions {
    SnapshotOptions {
        persistent: true,
        ..Default::default()
    }
}

pub fn read(dev: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, off).unwrap();
    b
}

pub fn all(dev: &dyn BlockDevice) -> Vec<u8> {
    read(dev, 0, dev.len() as usize)
}

pub fn fill(dev: &dyn BlockDevice, off: u64, len: usize, byte: u8) {
    dev.write_at(&vec![byte; len], off).unwrap();
}

/// The extents a model expects from `changed_extents`: chunks written at a
/// logical time strictly between `from` and `to`, merged.
pub fn model_changed(
    writes: &[(u64, usize)],
    from: u64,
    to: u64,
    chunk: usize,
) -> Vec<volshadow_cow::Extent> {
    let chunks: std::collections::BTreeSet<usize> = writes
        .iter()
        .filter(|(t, _)| *t > from && *t < to)
        .map(|&(_, c)| c)
        .collect();
    let mut out: Vec<volshadow_cow::Extent> = Vec::new();
    for c in chunks {
        let off = (c * chunk) as u64;
        match out.last_mut() {
            Some(e) if e.offset + e.len == off => e.len += chunk as u64,
            _ => out.push(volshadow_cow::Extent {
                offset: off,
                len: chunk as u64,
            }),
        }
    }
    out
}
