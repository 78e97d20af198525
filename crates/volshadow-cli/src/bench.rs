//! `volshadow bench`: an in-process I/O loop comparable to `qemu-img
//! bench`, on the COW volume or (`--raw`) on the bare image file.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use volshadow_block::{BlockDevice, FileImage};
use volshadow_cow::SnapshotOptions;

const MAX_BLOCK: u64 = 64 << 20;
const MAX_DEPTH: usize = 1024;
/// 16 bytes of latency per op: at most 160 MB of samples.
const MAX_COUNT: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Consecutive blocks from the start.
    Seq,
    /// Uniformly random blocks.
    Rand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Write the blocks.
    Write,
    /// Read the blocks.
    Read,
}

#[derive(Debug)]
pub struct BenchArgs {
    pub pattern: Pattern,
    pub mode: Mode,
    pub block_size: u64,
    pub depth: usize,
    pub count: u64,
    pub snapshots_first: usize,
    pub persistent: bool,
    pub raw: bool,
    /// Read from the newest snapshot instead of the live volume.
    pub from_snapshot: bool,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub target: String,
    pub ops: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub iops: f64,
    pub latency_us: Percentiles,
    /// Mean time of the snapshot creations before the loop.
    pub snapshot_create_us: Option<f64>,
    /// After the loop: preserved chunk versions and the heap bytes of the
    /// engine's metadata (index tables by their capacity, two bitmaps).
    pub preserved_chunks: Option<u64>,
    pub metadata_bytes: Option<u64>,
    pub origin_chunks: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn run(img: &Path, args: &BenchArgs) -> Result<BenchResult> {
    if args.block_size == 0 || args.depth == 0 || args.count == 0 {
        bail!("block size, depth and count must be positive");
    }
    // Each thread holds one block and each op one latency sample: bounded
    // so no argument makes the loop allocate without limit.
    if args.block_size > MAX_BLOCK || args.depth > MAX_DEPTH || args.count > MAX_COUNT {
        bail!(
            "block size at most {MAX_BLOCK}, depth at most {MAX_DEPTH}, count at most {MAX_COUNT}"
        );
    }
    let mut create_us = None;
    let mut volume = None;
    let (dev, target): (Arc<dyn BlockDevice>, String) = if args.raw {
        (
            Arc::new(FileImage::open(img)?),
            format!("raw file {}", img.display()),
        )
    } else {
        let vol = crate::storage::open_volume(img)?;
        volume = Some(vol.clone());
        let t0 = Instant::now();
        for _ in 0..args.snapshots_first {
            vol.create_snapshot(SnapshotOptions {
                persistent: args.persistent,
                ..Default::default()
            })?;
        }
        if args.snapshots_first > 0 {
            create_us = Some(t0.elapsed().as_secs_f64() * 1e6 / args.snapshots_first as f64);
        }
        let target = format!(
            "volshadow volume {} ({} snapshot(s), {})",
            img.display(),
            args.snapshots_first,
            if args.persistent {
                "persistent"
            } else {
                "non-persistent"
            }
        );
        if args.from_snapshot {
            let Some(s) = vol.snapshots().last().cloned() else {
                bail!("--from-snapshot needs a snapshot (use --snapshot-first)");
            };
            (
                Arc::new(vol.snapshot(s.id)?),
                format!("{target}, reading its newest snapshot"),
            )
        } else {
            (Arc::new(vol), target)
        }
    };
    let len = dev.len();
    let bs = args.block_size;
    let blocks = len / bs;
    if blocks == 0 {
        bail!("block size {bs} is larger than the device ({len} bytes)");
    }
    if args.count > blocks && args.pattern == Pattern::Seq {
        bail!(
            "{} sequential blocks of {bs} do not fit in {len} bytes",
            args.count
        );
    }
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let lat: Vec<Vec<Duration>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.depth)
            .map(|t| {
                let dev = dev.clone();
                let next = next.clone();
                let mut rng = args.seed ^ (t as u64) << 32;
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut buf = vec![0xA5u8; bs as usize];
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= args.count {
                            return Ok(lat);
                        }
                        let block = match args.pattern {
                            Pattern::Seq => i,
                            Pattern::Rand => splitmix(&mut rng) % blocks,
                        };
                        let t0 = Instant::now();
                        match args.mode {
                            Mode::Write => dev.write_at(&buf, block * bs)?,
                            Mode::Read => dev.read_at(&mut buf, block * bs)?,
                        }
                        lat.push(t0.elapsed());
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("bench thread panicked")))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    if args.mode == Mode::Write {
        dev.flush()?;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut all: Vec<Duration> = lat.into_iter().flatten().collect();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let bytes = args.count * bs;
    let usage = volume.as_ref().map(|v| v.usage());
    Ok(BenchResult {
        snapshot_create_us: create_us,
        preserved_chunks: usage.as_ref().map(|u| u.preserved_chunks),
        metadata_bytes: volume.as_ref().map(|v| v.metadata_bytes() as u64),
        origin_chunks: usage.as_ref().map(|u| len.div_ceil(u.chunk_size as u64)),
        target,
        ops: args.count,
        bytes,
        seconds: secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        iops: args.count as f64 / secs,
        latency_us: Percentiles {
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            max: pct(1.0),
        },
    })
}

/// `bench`: runs the loop and prints its result (one JSON line with `json`).
pub fn report(volume: &Path, args: &BenchArgs, json: bool) -> Result<()> {
    let r = run(volume, args)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}
  {} ops of {} in {:.3} s: {:.1} MB/s, {:.0} IOPS
  latency us: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            r.target,
            r.ops,
            crate::ops::human_size(args.block_size),
            r.seconds,
            r.mb_per_s,
            r.iops,
            r.latency_us.p50,
            r.latency_us.p90,
            r.latency_us.p99,
            r.latency_us.max
        );
    }
    Ok(())
}
