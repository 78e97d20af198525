//! Copies as extent clones: where the diff area can share the origin's
//! extents (`BlockDevice::clone_from`, as a file image on XFS or btrfs
//! does), runs of whole chunks are cloned instead of written; where it
//! cannot, the engine writes them, and stops asking after the first "no".
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_cow::{Volume, VolumeOptions};

/// A diff area that counts clone requests and data writes; it clones
/// (copies the source's bytes, as a clone would show them) when allowed.
#[derive(Debug)]
struct Counting {
    mem: MemDevice,
    can_clone: AtomicBool,
    clones: AtomicU64,
    cloned_bytes: AtomicU64,
    large_writes: AtomicU64,
}

impl Counting {
    fn new(len: u64, can_clone: bool) -> Self {
        Counting {
            mem: MemDevice::new(len),
            can_clone: AtomicBool::new(can_clone),
            clones: AtomicU64::new(0),
            cloned_bytes: AtomicU64::new(0),
            large_writes: AtomicU64::new(0),
        }
    }
}

impl BlockDevice for Counting {
    fn len(&self) -> u64 {
        self.mem.len()
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> volshadow_block::Result<()> {
        // Chunk data: whole chunks; journal and hash entries are smaller
        // or unaligned.
        if buf.len() >= CHUNK as usize && buf.len().is_multiple_of(CHUNK as usize) {
            self.large_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> volshadow_block::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
        self.mem.discard(offset, len)
    }
    fn clone_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> volshadow_block::Result<bool> {
        self.clones.fetch_add(1, Ordering::SeqCst);
        if !self.can_clone.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut bytes = vec![0u8; len as usize];
        src.read_at(&mut bytes, src_offset)?;
        self.mem.write_at(&bytes, offset)?;
        self.cloned_bytes.fetch_add(len, Ordering::SeqCst);
        Ok(true)
    }
    fn name(&self) -> String {
        "counting".into()
    }
}

/// Origin of 1 MiB + 1000 bytes (its last chunk is partial) filled with a
/// pattern, a persistent snapshot, and the diff area's counters reset.
fn volume(can_clone: bool) -> (Arc<MemDevice>, Arc<Counting>, Volume, Vec<u8>) {
    let len = (1 << 20) + 1000;
    let origin = Arc::new(MemDevice::new(len));
    let diff = Arc::new(Counting::new(4 << 20, can_clone));
    let vol = Volume::create(
        origin.clone(),
        diff.clone(),
        VolumeOptions {
            chunk_size: CHUNK,
            ..Default::default()
        },
    )
    .unwrap();
    let before: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    vol.write_at(&before, 0).unwrap();
    vol.create_snapshot(persistent()).unwrap();
    vol.flush().unwrap();
    diff.clones.store(0, Ordering::SeqCst);
    diff.large_writes.store(0, Ordering::SeqCst);
    (origin, diff, vol, before)
}

#[test]
fn whole_chunks_are_cloned_where_the_diff_area_can() {
    let (_origin, diff, vol, before) = volume(true);
    // A 64-chunk batch, a one-byte write, and the partial last chunk.
    fill(&vol, 4096 * 10, 64 * 4096, 0xaa);
    fill(&vol, 900_000, 1, 0xbb);
    fill(&vol, (1 << 20) + 10, 100, 0xcc);
    vol.flush().unwrap();
    assert!(diff.clones.load(Ordering::SeqCst) >= 2);
    // Whole chunks: 64 + 1 cloned; the partial last chunk is written.
    assert_eq!(diff.cloned_bytes.load(Ordering::SeqCst), 65 * 4096);
    assert_eq!(
        diff.large_writes.load(Ordering::SeqCst),
        1,
        "only the partial chunk is written"
    );
    let snap = vol.snapshot(vol.snapshots()[0].id).unwrap();
    assert_eq!(all(&snap), before);
    let report = vol.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn copies_are_written_after_the_diff_area_first_cannot_clone() {
    let (_origin, diff, vol, before) = volume(false);
    for i in 0..8u64 {
        fill(&vol, i * 40_000, 5000, i as u8);
    }
    vol.flush().unwrap();
    assert_eq!(
        diff.clones.load(Ordering::SeqCst),
        1,
        "asked again after a no"
    );
    assert!(diff.large_writes.load(Ordering::SeqCst) >= 8);
    let snap = vol.snapshot(vol.snapshots()[0].id).unwrap();
    assert_eq!(all(&snap), before);
}
