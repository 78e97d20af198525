//! Power-loss devices for crash harnesses: an origin and a diff area, each a
//! `FaultyDevice<MemDevice>`, on one power "rail" that counts every write,
//! discard and flush of either device (from any thread). At the armed
//! count the power goes off for both and stays off; a power cut then
//! decides what of the unflushed writes reached the media.
//!
//! Used by every crash harness: `crash.rs`, `crash_concurrent/` and
//! `set_crash.rs` (two rigs sharing one rail).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use volshadow_block::conformance::Rng;
use volshadow_block::{BlockDevice, Error as BlockError, FaultyDevice, MemDevice, PowerCut};
use volshadow_cow::{Volume, VolumeOptions};

/// Counts write-like operations of both devices; at `crash_at` the power
/// goes off for both and stays off.
#[derive(Debug, Default)]
pub struct Rail {
    count: AtomicU64,
    crash_at: AtomicU64,
    off: AtomicBool,
}

impl Rail {
    /// Restarts the count; the power fails at operation `at` (0-based).
    pub fn arm(&self, at: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.crash_at.store(at, Ordering::SeqCst);
        self.off.store(false, Ordering::SeqCst);
    }

    /// Power on, never failing.
    pub fn disarm(&self) {
        self.arm(u64::MAX);
    }

    /// Operations counted since the last `arm` (including the one that
    /// found the power off).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    pub fn is_off(&self) -> bool {
        self.off.load(Ordering::SeqCst)
    }

    /// Counts one operation; false if the power is off for it.
    fn tick(&self) -> bool {
        if self.off.load(Ordering::SeqCst) {
            return false;
        }
        if self.count.fetch_add(1, Ordering::SeqCst) >= self.crash_at.load(Ordering::SeqCst) {
            self.off.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }
}

/// A device on the rail.
#[derive(Debug)]
pub struct Powered {
    pub dev: Arc<FaultyDevice<MemDevice>>,
    pub rail: Arc<Rail>,
}

impl Powered {
    fn dead(&self) -> BlockError {
        BlockError::Layer {
            device: self.name(),
            kind: std::io::ErrorKind::Other,
            source: "power is off".into(),
        }
    }
}

impl BlockDevice for Powered {
    fn len(&self) -> u64 {
        self.dev.len()
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        if self.rail.is_off() {
            return Err(self.dead());
        }
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> volshadow_block::Result<()> {
        if !self.rail.tick() {
            return Err(self.dead());
        }
        self.dev.write_at(buf, offset)
    }
    fn flush(&self) -> volshadow_block::Result<()> {
        if !self.rail.tick() {
            return Err(self.dead());
        }
        self.dev.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
        if !self.rail.tick() {
            return Err(self.dead());
        }
        self.dev.discard(offset, len)
    }
    fn clone_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> volshadow_block::Result<bool> {
        if !self.rail.tick() {
            return Err(self.dead());
        }
        self.dev.clone_from(src, src_offset, offset, len)
    }
    fn name(&self) -> String {
        self.dev.name()
    }
}

/// An origin and a diff area on one rail.
#[derive(Debug)]
pub struct PowerRig {
    pub origin: Arc<FaultyDevice<MemDevice>>,
    pub diff: Arc<FaultyDevice<MemDevice>>,
    pub rail: Arc<Rail>,
}

impl PowerRig {
    pub fn new(origin_len: u64, diff_len: u64) -> Self {
        PowerRig {
            origin: Arc::new(FaultyDevice::new(MemDevice::new(origin_len))),
            diff: Arc::new(FaultyDevice::new(MemDevice::new(diff_len))),
            rail: Arc::new(Rail::default()),
        }
    }

    /// Lets the diff area take copies as extent clones (as on XFS or
    /// btrfs): a clone is an unflushed write of the origin's bytes as they
    /// read at that moment, so the harness checks its ordering too.
    pub fn with_clones(self, yes: bool) -> Self {
        self.diff.set_clones(yes);
        self
    }

    /// The two devices as the engine sees them (through the rail).
    pub fn devices(&self) -> (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) {
        (
            Arc::new(Powered {
                dev: self.origin.clone(),
                rail: self.rail.clone(),
            }),
            Arc::new(Powered {
                dev: self.diff.clone(),
                rail: self.rail.clone(),
            }),
        )
    }

    pub fn create(&self, options: VolumeOptions) -> Volume {
        let (o, d) = self.devices();
        Volume::create(o, d, options).expect("create")
    }

    pub fn open(&self) -> volshadow_cow::Result<Volume> {
        let (o, d) = self.devices();
        Volume::open(o, d)
    }

    /// Cuts the power of both devices. `variant` 0 drops every unflushed
    /// write; 1 keeps an in-order prefix whose last write is torn at a
    /// 512-byte boundary; 2 keeps a random subset (an out-of-order cache).
    pub fn cut(&self, rng: &mut Rng, variant: u64) {
        for dev in [&self.origin, &self.diff] {
            let pending = dev.unflushed().len();
            let cut = match variant {
                0 => PowerCut::DropUnflushed,
                1 => PowerCut::InOrder {
                    kept: rng.below(pending as u64 + 1) as usize,
                    tear_last: Some(rng.below(9)),
                },
                _ => PowerCut::Subset((0..pending).filter(|_| rng.below(2) == 0).collect()),
            };
            dev.power_cut(cut).expect("power cut");
        }
    }
}
