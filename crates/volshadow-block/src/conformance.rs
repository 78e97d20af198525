//! The conformance suite every [`BlockDevice`] must pass.
//!
//! Each check takes a read-write device of at least [`MIN_LEN`] bytes whose
//! contents it may destroy, compares what it reads against a model of what
//! it wrote, and returns a description of the first difference. Crates that
//! implement `BlockDevice` (the COW volume, for one) run the same list.

use crate::{BlockDevice, Error, Extent};

/// Smallest device the suite accepts.
pub const MIN_LEN: u64 = 4 << 20;

/// A failed check: what differed and where.
pub type CheckResult = Result<(), String>;

/// A named check.
pub type Check = (&'static str, fn(&dyn BlockDevice) -> CheckResult);

/// Every check, in a fixed order.
pub fn checks() -> &'static [Check] {
    &[
        ("geometry", geometry),
        ("zero_length_io", zero_length_io),
        ("read_after_write", read_after_write),
        ("out_of_range_rejected", out_of_range_rejected),
        ("flush_keeps_data", flush_keeps_data),
        ("discard_reads_zero", discard_reads_zero),
        ("concurrent_disjoint_writers", concurrent_disjoint_writers),
        ("allocation_is_consistent", allocation_is_consistent),
    ]
}

/// Runs every check, returning the names and messages of those that failed.
pub fn run_all(dev: &dyn BlockDevice) -> Vec<(&'static str, String)> {
    checks()
        .iter()
        .filter_map(|(name, check)| check(dev).err().map(|e| (*name, e)))
        .collect()
}

/// splitmix64: deterministic data and offsets without a dependency; the
/// one generator of every test, harness and benchmark.
#[derive(Debug, Clone)]
pub struct Rng(u64);

/// splitmix64's increment.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's finaliser: a well-spread 64-bit hash of `z`.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn io<T>(what: &str, r: crate::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn read_all(dev: &dyn BlockDevice, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    io(
        &format!("read {len} at {offset}"),
        dev.read_at(&mut buf, offset),
    )?;
    Ok(buf)
}

fn compare(what: &str, got: &[u8], want: &[u8], base: u64) -> CheckResult {
    if got.len() != want.len() {
        return Err(format!("{what}: length {} != {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: byte at offset {} is {:#04x}, expected {:#04x}",
            base + i as u64,
            got[i],
            want[i]
        )),
    }
}

fn test_len(dev: &dyn BlockDevice) -> Result<u64, String> {
    if dev.len() < MIN_LEN {
        return Err(format!(
            "device has {} bytes, the suite needs {MIN_LEN}",
            dev.len()
        ));
    }
    Ok(MIN_LEN)
}

fn geometry(dev: &dyn BlockDevice) -> CheckResult {
    let bs = dev.block_size();
    if !(bs == 512 || bs == 4096) {
        return Err(format!("block size {bs} is neither 512 nor 4096"));
    }
    if !dev.len().is_multiple_of(bs as u64) {
        return Err(format!(
            "length {} is not a multiple of the block size {bs}",
            dev.len()
        ));
    }
    if dev.is_read_only() {
        return Err("the suite needs a writable device".into());
    }
    Ok(())
}

fn zero_length_io(dev: &dyn BlockDevice) -> CheckResult {
    let len = dev.len();
    let before = read_all(dev, 0, 4096)?;
    for off in [0, 1, len / 2, len - 1, len] {
        io("zero-length write", dev.write_at(&[], off))?;
        io("zero-length read", dev.read_at(&mut [], off))?;
        io("zero-length discard", dev.discard(off, 0))?;
    }
    compare(
        "after zero-length I/O",
        &read_all(dev, 0, 4096)?,
        &before,
        0,
    )
}

fn read_after_write(dev: &dyn BlockDevice) -> CheckResult {
    let n = test_len(dev)?;
    let mut model = read_all(dev, 0, n as usize)?;
    let mut rng = Rng::new(0x5eed);
    // Aligned, unaligned, sector-straddling, tiny and large writes, and one
    // across the 1 MiB boundary where segmented backends split requests.
    let mut requests: Vec<(u64, usize)> = vec![
        (0, 4096),
        (4096 + 1, 1),
        (8192 - 3, 7),
        (511, 1026),
        ((1 << 20) - 700, 5000),
        (n - 512, 512),
        (n - 1, 1),
    ];
    for _ in 0..64 {
        let len = 1 + rng.below(70_000) as usize;
        let off = rng.below(n - len as u64);
        requests.push((off, len));
    }
    for (off, len) in requests {
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        io(&format!("write {len} at {off}"), dev.write_at(&data, off))?;
        model[off as usize..off as usize + len].copy_from_slice(&data);
        // Read back through a misaligned buffer too.
        let mut back = vec![0u8; len + 1];
        io("read back", dev.read_at(&mut back[1..], off))?;
        compare("read back", &back[1..], &data, off)?;
    }
    compare("whole device", &read_all(dev, 0, n as usize)?, &model, 0)
}

fn expect_out_of_range(what: &str, r: crate::Result<()>) -> CheckResult {
    match r {
        Err(Error::OutOfRange { .. }) => Ok(()),
        Err(e) => Err(format!("{what}: expected an out-of-range error, got: {e}")),
        Ok(()) => Err(format!(
            "{what}: expected an out-of-range error, got success"
        )),
    }
}

fn out_of_range_rejected(dev: &dyn BlockDevice) -> CheckResult {
    let len = dev.len();
    let tail_before = read_all(dev, len - 4096, 4096)?;
    let data = vec![0xabu8; 8192];
    expect_out_of_range("write across the end", dev.write_at(&data, len - 4096))?;
    expect_out_of_range("write past the end", dev.write_at(&data[..1], len))?;
    expect_out_of_range("write at u64::MAX", dev.write_at(&data[..16], u64::MAX - 8))?;
    expect_out_of_range(
        "zero-length write beyond the end",
        dev.write_at(&[], len + 1),
    )?;
    let mut buf = vec![0u8; 8192];
    expect_out_of_range("read across the end", dev.read_at(&mut buf, len - 4096))?;
    expect_out_of_range(
        "read at u64::MAX",
        dev.read_at(&mut buf[..16], u64::MAX - 8),
    )?;
    expect_out_of_range("discard across the end", dev.discard(len - 4096, 8192))?;
    expect_out_of_range("discard overflowing", dev.discard(4096, u64::MAX))?;
    compare(
        "tail after rejected requests (no partial write)",
        &read_all(dev, len - 4096, 4096)?,
        &tail_before,
        len - 4096,
    )
}

fn flush_keeps_data(dev: &dyn BlockDevice) -> CheckResult {
    let mut data = vec![0u8; 12_345];
    Rng::new(7).fill(&mut data);
    io("write", dev.write_at(&data, 77_777))?;
    io("flush", dev.flush())?;
    io("second flush", dev.flush())?;
    compare(
        "after flush",
        &read_all(dev, 77_777, data.len())?,
        &data,
        77_777,
    )
}

fn discard_reads_zero(dev: &dyn BlockDevice) -> CheckResult {
    let n = test_len(dev)?;
    let base = n / 2;
    let span = 1 << 20;
    let mut model = vec![0u8; span];
    Rng::new(99).fill(&mut model);
    io("write", dev.write_at(&model, base))?;
    // Aligned whole blocks, an unaligned range and one sector-straddling byte run.
    for (off, len) in [(0u64, 65_536u64), (100_000, 33_333), (300_001, 1)] {
        io(
            &format!("discard {len} at {}", base + off),
            dev.discard(base + off, len),
        )?;
        model[off as usize..(off + len) as usize].fill(0);
    }
    compare("after discard", &read_all(dev, base, span)?, &model, base)
}

fn concurrent_disjoint_writers(dev: &dyn BlockDevice) -> CheckResult {
    let n = test_len(dev)?;
    const THREADS: u64 = 4;
    let region = n / THREADS;
    let results: Vec<Result<Vec<u8>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || -> Result<Vec<u8>, String> {
                    let start = t * region;
                    let mut model = read_all(dev, start, region as usize)?;
                    let mut rng = Rng::new(1000 + t);
                    for _ in 0..200 {
                        let len = 1 + rng.below(20_000) as usize;
                        let off = rng.below(region - len as u64);
                        let mut data = vec![0u8; len];
                        rng.fill(&mut data);
                        io("concurrent write", dev.write_at(&data, start + off))?;
                        model[off as usize..off as usize + len].copy_from_slice(&data);
                    }
                    Ok(model)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("writer thread panicked".into()))
            })
            .collect()
    });
    for (t, model) in results.into_iter().enumerate() {
        let model = model?;
        let start = t as u64 * region;
        compare(
            &format!("region of thread {t}"),
            &read_all(dev, start, region as usize)?,
            &model,
            start,
        )?;
    }
    Ok(())
}

fn allocation_is_consistent(dev: &dyn BlockDevice) -> CheckResult {
    let n = test_len(dev)?;
    io("write", dev.write_at(&[0x77; 8192], 1 << 20))?;
    io("discard", dev.discard(2 << 20, 1 << 20))?;
    for (off, len) in [(0u64, n), (4095, 1 << 20), (2 << 20, 1 << 20)] {
        let Some(extents) = io("allocation", dev.allocation(off, len))? else {
            return Ok(());
        };
        // Holes: the gaps before each extent and after the last.
        let mut holes = Vec::new();
        let mut at = off;
        for e in &extents {
            if e.len == 0 || e.offset < at || e.end() > off + len {
                return Err(format!(
                    "extents not sorted, disjoint and inside {off}+{len}: {extents:?}"
                ));
            }
            holes.push((at, e.offset - at));
            at = e.end();
        }
        holes.push((at, off + len - at));
        for (h, n) in holes.into_iter().filter(|h| h.1 > 0) {
            let zeros = read_all(dev, h, n.min(1 << 20) as usize)?;
            if zeros.iter().any(|&b| b != 0) {
                return Err(format!("hole at {h} (+{n}) does not read as zeros"));
            }
        }
    }
    let Some(ext) = io("allocation", dev.allocation(1 << 20, 8192))? else {
        return Ok(());
    };
    if ext
        != [Extent {
            offset: 1 << 20,
            len: 8192,
        }]
    {
        return Err(format!(
            "written range reported (partly) as a hole: {ext:?}"
        ));
    }
    Ok(())
}
