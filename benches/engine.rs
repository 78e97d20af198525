//! Engine benchmarks (criterion). Sizes come from the environment so CI
//! runs them tiny and a user runs them large:
//!
//! - `VOLSHADOW_BENCH_QUICK=1`: small sizes, few samples (CI);
//! - `VOLSHADOW_BENCH_MB` (default 256): image size for write/read benches;
//! - `VOLSHADOW_BENCH_DIR`: where the image files go (default: temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use volshadow::block::{BlockDevice, FileImage, MemDevice};
use volshadow::cow::{SnapshotOptions, Volume, VolumeOptions};

fn quick() -> bool {
    std::env::var_os("VOLSHADOW_BENCH_QUICK").is_some()
}

fn image_mb() -> u64 {
    std::env::var("VOLSHADOW_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick() { 16 } else { 256 })
}

fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("VOLSHADOW_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn opts(persistent: bool) -> SnapshotOptions {
    SnapshotOptions {
        persistent,
        ..Default::default()
    }
}

/// A volume over files with the origin fully written (no allocation cost).
fn file_volume(dir: &std::path::Path, mb: u64) -> Volume {
    let origin = Arc::new(FileImage::create(dir.join("o.img"), mb << 20).unwrap());
    let chunk = vec![0x5Au8; 1 << 20];
    for i in 0..mb {
        origin.write_at(&chunk, i << 20).unwrap();
    }
    origin.flush().unwrap();
    let diff = Arc::new(FileImage::create(dir.join("d.img"), (mb * 3) << 20).unwrap());
    Volume::create(origin, diff, VolumeOptions::default()).unwrap()
}

fn kind(persistent: bool) -> &'static str {
    if persistent {
        "persistent"
    } else {
        "non_persistent"
    }
}

/// Creates and deletes snapshots on `vol`, timing only the creation.
fn time_creates(vol: &Volume, persistent: bool, iters: u64) -> Duration {
    let mut t = Duration::ZERO;
    for _ in 0..iters {
        let t0 = Instant::now();
        let s = vol.create_snapshot(opts(persistent)).unwrap();
        t += t0.elapsed();
        vol.delete_snapshot(s.id).unwrap();
    }
    t
}

fn snapshot_create(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot_create");
    let sizes: &[u64] = if quick() {
        &[1 << 30]
    } else {
        &[1 << 30, 64 << 30, 1 << 40]
    };
    for &size in sizes {
        let vol = Volume::create(
            Arc::new(MemDevice::new(size)),
            Arc::new(MemDevice::new(256 << 20)),
            VolumeOptions::default(),
        )
        .unwrap();
        for persistent in [false, true] {
            g.bench_function(
                BenchmarkId::new(kind(persistent), format!("{}GiB_sparse", size >> 30)),
                |b| b.iter_custom(|iters| time_creates(&vol, persistent, iters)),
            );
        }
    }
    // With data written: every chunk of the origin holds data and a copy
    // for an older snapshot, so creation must reset a full bitmap.
    let mb = image_mb();
    let dir = tempdir();
    let vol = file_volume(dir.path(), mb);
    vol.create_snapshot(opts(true)).unwrap();
    let chunk = vec![0xC3u8; 1 << 20];
    for i in 0..mb {
        vol.write_at(&chunk, i << 20).unwrap();
    }
    vol.flush().unwrap();
    for persistent in [false, true] {
        g.bench_function(
            BenchmarkId::new(kind(persistent), format!("{mb}MiB_written_and_preserved")),
            |b| b.iter_custom(|iters| time_creates(&vol, persistent, iters)),
        );
    }
    g.finish();
}

fn first_write(c: &mut Criterion) {
    let mb = image_mb();
    let dir = tempdir();
    let vol = file_volume(dir.path(), mb);
    let mut g = c.benchmark_group("first_write");
    for (name, bs) in [("seq_1MiB", 1u64 << 20), ("rand_4KiB", 4096)] {
        let count = if bs == 4096 { 2048 } else { mb.min(64) };
        g.throughput(Throughput::Bytes(count * bs));
        for mode in ["no_snapshot", "non_persistent", "persistent"] {
            g.bench_function(BenchmarkId::new(name, mode), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    let buf = vec![1u8; bs as usize];
                    let blocks = (mb << 20) / bs;
                    let mut rng = volshadow::block::conformance::Rng::new(12345);
                    for _ in 0..iters {
                        for s in vol.snapshots() {
                            vol.delete_snapshot(s.id).unwrap();
                        }
                        if mode != "no_snapshot" {
                            vol.create_snapshot(opts(mode == "persistent")).unwrap();
                        }
                        let t0 = Instant::now();
                        for i in 0..count {
                            let blk = if bs == 4096 { rng.below(blocks) } else { i };
                            vol.write_at(&buf, blk * bs).unwrap();
                        }
                        vol.flush().unwrap();
                        t += t0.elapsed();
                    }
                    t
                })
            });
        }
    }
    g.finish();
}

fn overwrite_and_reads(c: &mut Criterion) {
    let mb = image_mb().min(64);
    let dir = tempdir();
    let vol = file_volume(dir.path(), mb);
    let snap = vol.create_snapshot(opts(true)).unwrap();
    let buf = vec![2u8; 1 << 20];
    for i in 0..mb {
        vol.write_at(&buf, i << 20).unwrap();
    }
    let mut g = c.benchmark_group("preserved");
    g.throughput(Throughput::Bytes(mb << 20));
    g.bench_function("overwrite_1MiB", |b| {
        b.iter(|| {
            for i in 0..mb {
                vol.write_at(&buf, i << 20).unwrap();
            }
        })
    });
    let view = vol.snapshot(snap.id).unwrap();
    let mut rbuf = vec![0u8; 1 << 20];
    g.bench_function("snapshot_read_1MiB", |b| {
        b.iter(|| {
            for i in 0..mb {
                view.read_at(&mut rbuf, i << 20).unwrap();
            }
        })
    });
    g.bench_function("live_read_1MiB", |b| {
        b.iter(|| {
            for i in 0..mb {
                vol.read_at(&mut rbuf, i << 20).unwrap();
            }
        })
    });
    g.finish();
}

fn write_cost_vs_snapshots(c: &mut Criterion) {
    let mut g = c.benchmark_group("first_write_vs_snapshot_count");
    let size = 256u64 << 20;
    for n in [1usize, 8, 64] {
        g.throughput(Throughput::Bytes(1024 * 4096));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                let vol = Volume::create(
                    Arc::new(MemDevice::new(size)),
                    Arc::new(MemDevice::new(1 << 30)),
                    VolumeOptions::default(),
                )
                .unwrap();
                let buf = [3u8; 4096];
                for it in 0..iters {
                    for s in vol.snapshots() {
                        vol.delete_snapshot(s.id).unwrap();
                    }
                    for _ in 0..n {
                        vol.create_snapshot(opts(false)).unwrap();
                    }
                    let t0 = Instant::now();
                    for i in 0..1024u64 {
                        vol.write_at(&buf, ((i * 7919 + it) % (size / 16384)) * 16384)
                            .unwrap();
                    }
                    t += t0.elapsed();
                }
                t
            })
        });
    }
    g.finish();
}

fn recovery(c: &mut Criterion) {
    let mut g = c.benchmark_group("open_recovery");
    let counts: &[u64] = if quick() {
        &[1000]
    } else {
        &[1000, 10_000, 50_000]
    };
    for &copies in counts {
        let origin = Arc::new(MemDevice::new(copies * 4096 * 2));
        let diff = Arc::new(MemDevice::new(copies * 4096 * 3 + (64 << 20)));
        let vol = Volume::create(
            origin.clone(),
            diff.clone(),
            VolumeOptions {
                chunk_size: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        vol.create_snapshot(opts(true)).unwrap();
        for i in 0..copies {
            vol.write_at(&[1u8; 512], i * 4096).unwrap();
        }
        vol.flush().unwrap();
        let metadata = vol.metadata_bytes() as f64;
        let bitmaps = 2.0 * (origin.len() / 4096).div_ceil(64) as f64 * 8.0;
        eprintln!(
            "RAM: {copies} preserved chunks, {:.1} bytes each (index), plus {} bytes of bitmaps",
            (metadata - bitmaps) / copies as f64,
            bitmaps
        );
        drop(vol);
        g.bench_with_input(
            BenchmarkId::new("preserved_chunks", copies),
            &copies,
            |b, _| b.iter(|| Volume::open(origin.clone(), diff.clone()).unwrap()),
        );
    }
    g.finish();
}

fn config() -> Criterion {
    let c = Criterion::default();
    if quick() {
        c.sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
    } else {
        c.sample_size(20).measurement_time(Duration::from_secs(3))
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = snapshot_create, first_write, overwrite_and_reads, write_cost_vs_snapshots, recovery
}
criterion_main!(benches);
