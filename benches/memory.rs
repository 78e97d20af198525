//! RAM per preserved chunk, counted by an allocation-tracking global
//! allocator (dhat), not estimated: heap bytes held after preserving N
//! chunks minus before. What a volume holds whatever it preserves (the
//! `preserved` bitmap, the copy hint, buffers) is counted at creation and
//! reported apart, per origin chunk.
//!
//! `cargo bench --bench memory` (VOLSHADOW_BENCH_QUICK=1: smaller N).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use volshadow::block::{BlockDevice, MemDevice};
use volshadow::cow::{SnapshotOptions, Volume, VolumeOptions};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn heap() -> u64 {
    dhat::HeapStats::get().curr_bytes as u64
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let quick = std::env::var_os("VOLSHADOW_BENCH_QUICK").is_some();
    let n: u64 = if quick { 20_000 } else { 500_000 };
    let chunk = 4096u64;
    let origin_len = n * chunk * 2;
    // Devices whose data lives outside the counted heap would be ideal;
    // MemDevice data is counted, so it is measured and subtracted below.
    let origin = Arc::new(MemDevice::new(origin_len));
    let diff = Arc::new(MemDevice::new(n * chunk * 3 + (64 << 20)));
    // Touch every device segment first so their memory is not counted.
    let buf = vec![0u8; 1 << 20];
    for dev in [&origin, &diff] {
        for off in (0..dev.len()).step_by(1 << 20) {
            let n = (dev.len() - off).min(1 << 20) as usize;
            dev.write_at(&buf[..n], off).unwrap();
        }
    }
    let unopened = heap();
    let vol = Volume::create(
        origin.clone(),
        diff.clone(),
        VolumeOptions {
            chunk_size: chunk as u32,
            ..Default::default()
        },
    )
    .unwrap();
    let fixed = heap() - unopened;
    let persistent = SnapshotOptions {
        persistent: true,
        ..Default::default()
    };
    vol.create_snapshot(persistent.clone()).unwrap();
    let before = heap();
    // Half the copies under one snapshot, half under the next (frozen and
    // hot tables both counted).
    for i in 0..n {
        if i == n / 2 {
            vol.create_snapshot(persistent.clone()).unwrap();
        }
        vol.write_at(&[1u8; 512], i * 2 * chunk).unwrap();
    }
    let second_half = heap();
    vol.create_snapshot(persistent).unwrap();
    let after = heap();
    assert_eq!(vol.usage().preserved_chunks, n);
    let per = (after as f64 - before as f64) / n as f64;
    let hot = (second_half as f64 - before as f64) / n as f64;
    let origin_chunks = origin_len / chunk;
    println!("preserved chunks: {n}");
    println!(
        "heap growth while preserving (newest tag still a hash map): {hot:.2} bytes per chunk"
    );
    println!("heap held once frozen by the next snapshot: {per:.2} bytes per preserved chunk");
    println!(
        "held by the volume at creation: {fixed} bytes for {origin_chunks} origin chunks ({:.3} bits each)",
        fixed as f64 * 8.0 / origin_chunks as f64
    );
    println!(
        "engine's own estimate (metadata_bytes): {} bytes",
        vol.metadata_bytes()
    );
}
