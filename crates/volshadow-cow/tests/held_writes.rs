//! First writes after a persistent snapshot are held until their copies'
//! flush: the write returns without waiting for it, the origin is not
//! touched before it, reads see the held data, and everything that needs
//! the origin current (flush, snapshots, close) waits for the held writes.
//! A diff area whose flush the test holds shut makes each step observable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use common::*;
use volshadow_block::{
    BlockDevice, Fault, FaultAction, FaultError, FaultyDevice, MemDevice, OpKind,
};
use volshadow_cow::{Error, Volume, VolumeOptions};

/// A device whose `flush` waits until the test opens it.
#[derive(Debug)]
struct GatedFlush {
    mem: MemDevice,
    open: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicUsize,
}

impl GatedFlush {
    fn new(len: u64) -> Self {
        GatedFlush {
            mem: MemDevice::new(len),
            open: Mutex::new(true),
            opened: Condvar::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    fn set_open(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.opened.notify_all();
    }

    /// Waits until some flush is waiting at the gate.
    fn wait_for_a_flush(&self) {
        for _ in 0..2000 {
            if self.waiting.load(Ordering::SeqCst) > 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no flush reached the gate");
    }
}

impl BlockDevice for GatedFlush {
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
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> volshadow_block::Result<()> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
        self.mem.discard(offset, len)
    }
    fn name(&self) -> String {
        "gated".into()
    }
}

struct Gated {
    origin: Arc<MemDevice>,
    diff: Arc<GatedFlush>,
    vol: Volume,
}

/// A volume of `len` bytes filled with 0x11, with a persistent snapshot;
/// the diff area's flush is shut afterwards.
fn gated(len: u64, chunk: u32) -> Gated {
    let origin = Arc::new(MemDevice::new(len));
    let diff_len = Volume::diff_area_len_for(len + (len >> 2), chunk);
    let diff = Arc::new(GatedFlush::new(diff_len));
    let vol = Volume::create(
        origin.clone(),
        diff.clone(),
        VolumeOptions {
            chunk_size: chunk,
            ..Default::default()
        },
    )
    .unwrap();
    fill(&vol, 0, len as usize, 0x11);
    vol.create_snapshot(persistent()).unwrap();
    diff.set_open(false);
    Gated { origin, diff, vol }
}

/// Runs `f` on another thread and returns its result, or `None` if it has
/// not finished within `wait`.
fn within<T: Send + 'static>(
    wait: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (Option<T>, mpsc::Receiver<T>) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    (rx.recv_timeout(wait).ok(), rx)
}

#[test]
fn a_first_write_returns_before_its_copies_flush_and_the_origin_waits_for_it() {
    let g = gated(1 << 20, CHUNK);
    let vol = g.vol.clone();
    let (done, _) = within(Duration::from_secs(10), move || {
        fill(&vol, 5000, 10_000, 0x22);
    });
    assert!(done.is_some(), "the write waited for the diff area's flush");
    g.diff.wait_for_a_flush();
    // The origin must not be written before the copies are durable.
    assert!(read(&*g.origin, 0, 1 << 20).iter().all(|&b| b == 0x11));
    // Readers see the write.
    let live = read(&g.vol, 0, 1 << 20);
    assert!(live[5000..15_000].iter().all(|&b| b == 0x22));
    assert!(
        live[..5000]
            .iter()
            .chain(&live[15_000..])
            .all(|&b| b == 0x11)
    );
    // A flush waits for the held write, and then the origin has it.
    let vol = g.vol.clone();
    let (flushed, rx) = within(Duration::from_millis(200), move || vol.flush());
    assert!(
        flushed.is_none(),
        "flush returned before the copies were durable"
    );
    g.diff.set_open(true);
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(read(&*g.origin, 0, 1 << 20), live);
}

#[test]
fn held_data_shows_in_the_allocation_map_where_the_origin_has_a_hole() {
    let origin = Arc::new(MemDevice::new(1 << 20));
    let diff = Arc::new(GatedFlush::new(4 << 20));
    let vol = Volume::create(origin.clone(), diff.clone(), VolumeOptions::default()).unwrap();
    vol.create_snapshot(persistent()).unwrap();
    diff.set_open(false);
    fill(&vol, 128 << 10, 4096, 0x33);
    diff.wait_for_a_flush();
    let map = vol.allocation(0, 1 << 20).unwrap().unwrap();
    let covered = map
        .iter()
        .any(|e| e.offset <= 128 << 10 && e.end() >= (128 << 10) + 4096);
    assert!(covered, "held data reported as a hole: {map:?}");
    diff.set_open(true);
    vol.flush().unwrap();
}

#[test]
fn later_writes_to_a_held_chunk_stay_behind_it() {
    let g = gated(1 << 20, CHUNK);
    let mut model = vec![0x11u8; 1 << 20];
    // First write copies chunks 1..=2 and is held.
    let writes: [(usize, usize, u8); 5] = [
        (4096, 8192, 0x21),
        // Same chunk, overlapping bytes: held behind the first.
        (6000, 100, 0x22),
        // Same chunk, other bytes: held too (the chunk's copy is not durable).
        (4096 + 8000, 100, 0x23),
        // Untouched chunk far away: copied and held on its own.
        (512 << 10, 4096, 0x24),
        // Again the first range, fully: last one wins.
        (4096, 4096, 0x25),
    ];
    for &(off, len, byte) in &writes {
        fill(&g.vol, off as u64, len, byte);
        model[off..off + len].fill(byte);
        assert_eq!(read(&g.vol, 0, 1 << 20), model, "after writing {byte:#x}");
    }
    assert!(read(&*g.origin, 0, 1 << 20).iter().all(|&b| b == 0x11));
    g.diff.set_open(true);
    g.vol.flush().unwrap();
    assert_eq!(read(&*g.origin, 0, 1 << 20), model);
}

#[test]
fn a_snapshot_waits_for_held_writes_and_includes_them() {
    let g = gated(1 << 20, CHUNK);
    fill(&g.vol, 0, 8192, 0x44);
    let vol = g.vol.clone();
    let (made, rx) = within(Duration::from_millis(200), move || {
        vol.create_snapshot(persistent())
    });
    assert!(
        made.is_none(),
        "a snapshot was taken with writes still held"
    );
    g.diff.set_open(true);
    let s2 = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    let snap = read(&g.vol.snapshot(s2.id).unwrap(), 0, 16384);
    assert!(snap[..8192].iter().all(|&b| b == 0x44));
    assert!(snap[8192..].iter().all(|&b| b == 0x11));
}

#[test]
fn held_memory_is_bounded_while_the_flush_is_stuck() {
    // 96 writes of 1 MiB, each a first write of a new chunk.
    const MIB: u64 = 1 << 20;
    let g = gated(96 * MIB, 1 << 20);
    let done = Arc::new(AtomicUsize::new(0));
    let (vol, d) = (g.vol.clone(), done.clone());
    let writer = std::thread::spawn(move || {
        for i in 0..96u64 {
            fill(&vol, i * MIB, MIB as usize, 0x55);
            d.fetch_add(1, Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let stalled_at = done.load(Ordering::SeqCst);
    assert!(
        (1..=65).contains(&stalled_at),
        "{stalled_at} MiB of writes returned while none could be applied"
    );
    g.diff.set_open(true);
    writer.join().unwrap();
    g.vol.flush().unwrap();
    assert!(
        read(&*g.origin, 0, 96 * MIB as usize)
            .iter()
            .all(|&b| b == 0x55)
    );
}

#[test]
fn a_failed_copy_flush_fails_reads_instead_of_returning_stale_data() {
    let origin = Arc::new(MemDevice::new(1 << 20));
    let diff = Arc::new(FaultyDevice::new(MemDevice::new(4 << 20)));
    let vol = Volume::create(
        origin.clone(),
        diff.clone(),
        VolumeOptions {
            chunk_size: CHUNK,
            ..Default::default()
        },
    )
    .unwrap();
    fill(&vol, 0, 1 << 20, 0x11);
    vol.create_snapshot(persistent()).unwrap();
    // The next flush of the diff area fails.
    diff.set_fault(Fault::on(
        OpKind::Flush,
        0,
        FaultAction::Fail(FaultError::Eio),
    ));
    // Acknowledged: the failure comes later, at the applier's flush.
    fill(&vol, 0, 4096, 0x66);
    assert!(
        vol.flush().is_err(),
        "a flush succeeded after its copies failed"
    );
    let mut buf = vec![0u8; 4096];
    assert!(vol.read_at(&mut buf, 0).is_err(), "a stale read was served");
    assert!(vol.needs_recovery());
    // The origin was never overwritten without its copy being durable.
    assert!(read(&*origin, 0, 4096).iter().all(|&b| b == 0x11));
    assert!(matches!(
        vol.create_snapshot(persistent()),
        Err(Error::NeedsRecovery)
    ));
}

#[test]
fn close_applies_held_writes_before_it_closes() {
    let g = gated(1 << 20, CHUNK);
    fill(&g.vol, 100_000, 50_000, 0x77);
    let diff = g.diff.clone();
    let opener = std::thread::spawn(move || {
        diff.wait_for_a_flush();
        std::thread::sleep(Duration::from_millis(100));
        diff.set_open(true);
    });
    g.vol.close().unwrap();
    opener.join().unwrap();
    let origin = read(&*g.origin, 0, 1 << 20);
    assert!(origin[100_000..150_000].iter().all(|&b| b == 0x77));
    assert!(origin[..100_000].iter().all(|&b| b == 0x11));
    // Closed: later writes are refused, and close again is a no-op.
    assert!(g.vol.write_at(&[1], 0).is_err());
    g.vol.close().unwrap();
}
