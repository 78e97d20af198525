//! `FaultyDevice`: a device wrapper for crash and fault-injection tests.
//!
//! It models a disk with a volatile write cache. The wrapped device holds
//! exactly what is *durable*; writes and discards that no flush has covered
//! yet are kept in issue order in a pending list and overlaid on reads. A
//! flush applies the pending list to the wrapped device and flushes it.
//!
//! A power cut ([`FaultyDevice::power_cut`]) decides which pending writes
//! reached the media — none, a prefix in issue order with the last one
//! optionally torn at 512-byte granularity, or any subset — applies those,
//! and forgets the rest. The wrapped device is then the disk as it would be
//! found after reboot, and the same `FaultyDevice` serves as that disk.
//!
//! Faults ([`Fault`]) make the n-th operation of a kind fail with EIO or
//! ENOSPC, once or from then on, or turn the power off at that operation.
//! A failed operation has no effect at all.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{BlockDevice, Error, Op, Result, check_range};

/// Tear granularity: a torn write lands in whole 512-byte sectors.
pub const SECTOR: u64 = 512;

/// Kinds of operation, for faults and the operation log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
}

impl OpKind {
    fn op(self) -> Op {
        match self {
            OpKind::Read => Op::Read,
            OpKind::Write => Op::Write,
            OpKind::Flush => Op::Flush,
            OpKind::Discard => Op::Discard,
        }
    }
}

/// One entry of the operation log. Every operation that reached the device
/// is logged, failed ones included (with `failed = true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRecord {
    /// Position among all operations since creation (or the last
    /// [`FaultyDevice::clear_log`]), starting at 0.
    pub index: u64,
    pub kind: OpKind,
    pub offset: u64,
    pub len: u64,
    pub failed: bool,
}

/// The error an injected fault produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultError {
    /// EIO: a media or transport error.
    Eio,
    /// ENOSPC: no space left (thin device, full file system).
    Enospc,
}

impl FaultError {
    fn to_io(self) -> io::Error {
        match self {
            FaultError::Eio => io::Error::other("injected EIO"),
            FaultError::Enospc => io::Error::new(io::ErrorKind::StorageFull, "injected ENOSPC"),
        }
    }
}

/// What happens when a fault triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// That one operation fails; later ones succeed.
    Fail(FaultError),
    /// That operation and every later one fails (a dead disk).
    FailFromNowOn(FaultError),
    /// The power goes off just before that operation: it and every later
    /// one fail with EIO until [`FaultyDevice::power_cut`] "reboots".
    PowerOff,
}

/// A fault armed on a device: trigger at the `nth` (0-based) matching
/// operation counted from when it was armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Which operations count; empty means all.
    pub on: Vec<OpKind>,
    pub nth: u64,
    pub action: FaultAction,
}

impl Fault {
    /// The `nth` operation of any kind.
    pub fn at(nth: u64, action: FaultAction) -> Self {
        Fault {
            on: Vec::new(),
            nth,
            action,
        }
    }

    /// The `nth` operation of kind `kind`.
    pub fn on(kind: OpKind, nth: u64, action: FaultAction) -> Self {
        Fault {
            on: vec![kind],
            nth,
            action,
        }
    }

    fn matches(&self, kind: OpKind) -> bool {
        self.on.is_empty() || self.on.contains(&kind)
    }
}

/// Which unflushed writes survive a power cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerCut {
    /// Only what a flush made durable survives.
    DropUnflushed,
    /// The first `kept` unflushed operations (in issue order) landed; if
    /// `tear_last` is `Some(s)` and the last kept one is a write, only its
    /// first `s` 512-byte sectors landed.
    InOrder { kept: usize, tear_last: Option<u64> },
    /// Exactly the unflushed operations with these indices (0-based, in
    /// issue order) landed: models a cache that writes back out of order.
    Subset(Vec<usize>),
}

#[derive(Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    Discard { offset: u64, len: u64 },
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<Pending>,
    log: Vec<OpRecord>,
    next_index: u64,
    fault: Option<(Fault, u64)>,
    dead: Option<FaultError>,
    powered_off: bool,
    counts: [u64; 4],
}

/// A fault-injecting, power-cut-simulating wrapper. See the module docs.
#[derive(Debug)]
pub struct FaultyDevice<D> {
    inner: D,
    state: Mutex<State>,
    /// Accepts `clone_from` (as a write of the source's bytes), like a
    /// file system that shares extents.
    clones: AtomicBool,
}

impl<D: BlockDevice> FaultyDevice<D> {
    /// Wraps `inner`, whose current contents count as durable.
    pub fn new(inner: D) -> Self {
        FaultyDevice {
            inner,
            state: Mutex::new(State::default()),
            clones: AtomicBool::new(false),
        }
    }

    /// Makes `clone_from` succeed, the way a clone on XFS or btrfs
    /// behaves: the source's bytes as they read now become an unflushed
    /// write here (lost, kept, torn or reordered by a power cut like any
    /// write). Off by default: the device cannot clone.
    pub fn set_clones(&self, yes: bool) {
        self.clones.store(yes, Ordering::Relaxed);
    }

    /// The durable contents.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Arms `fault`, replacing any armed one.
    pub fn set_fault(&self, fault: Fault) {
        self.state().fault = Some((fault, 0));
    }

    /// Disarms faults and revives a device failed "from now on". Does not
    /// restore power: that is [`FaultyDevice::power_cut`].
    pub fn clear_fault(&self) {
        let mut st = self.state();
        st.fault = None;
        st.dead = None;
    }

    /// True after a `PowerOff` fault triggered and before the power cut.
    pub fn is_powered_off(&self) -> bool {
        self.state().powered_off
    }

    /// The operation log.
    pub fn log(&self) -> Vec<OpRecord> {
        self.state().log.clone()
    }

    /// Empties the log and restarts its numbering.
    pub fn clear_log(&self) {
        let mut st = self.state();
        st.log.clear();
        st.next_index = 0;
    }

    /// Operations of `kind` that succeeded since creation.
    pub fn count(&self, kind: OpKind) -> u64 {
        self.state().counts[kind as usize]
    }

    /// Unflushed writes and discards, oldest first, as (kind, offset, len).
    pub fn unflushed(&self) -> Vec<(OpKind, u64, u64)> {
        self.state()
            .pending
            .iter()
            .map(|p| match p {
                Pending::Write { offset, data } => (OpKind::Write, *offset, data.len() as u64),
                Pending::Discard { offset, len } => (OpKind::Discard, *offset, *len),
            })
            .collect()
    }

    /// Cuts the power: applies the surviving unflushed operations to the
    /// durable device as `cut` says, drops the rest, and powers back on
    /// with faults cleared. The durable device is flushed, so the result is
    /// itself durable.
    pub fn power_cut(&self, cut: PowerCut) -> Result<()> {
        let mut st = self.state();
        let pending = std::mem::take(&mut st.pending);
        let n = pending.len();
        let keep: Vec<(usize, Option<u64>)> = match cut {
            PowerCut::DropUnflushed => Vec::new(),
            PowerCut::InOrder { kept, tear_last } => {
                let kept = kept.min(n);
                (0..kept)
                    .map(|i| (i, if i + 1 == kept { tear_last } else { None }))
                    .collect()
            }
            PowerCut::Subset(mut idx) => {
                idx.sort_unstable();
                idx.dedup();
                idx.into_iter()
                    .filter(|&i| i < n)
                    .map(|i| (i, None))
                    .collect()
            }
        };
        for (i, tear) in keep {
            match &pending[i] {
                Pending::Write { offset, data } => {
                    let len = match tear {
                        Some(sectors) => (sectors.saturating_mul(SECTOR) as usize).min(data.len()),
                        None => data.len(),
                    };
                    self.inner.write_at(&data[..len], *offset)?;
                }
                Pending::Discard { offset, len } => self.inner.discard(*offset, *len)?,
            }
        }
        self.inner.flush()?;
        st.fault = None;
        st.dead = None;
        st.powered_off = false;
        Ok(())
    }

    /// Logs the operation and decides whether it fails.
    fn begin(&self, st: &mut State, kind: OpKind, offset: u64, len: u64) -> Result<()> {
        let index = st.next_index;
        st.next_index += 1;
        let mut failure = if st.powered_off {
            Some(io::Error::other("device lost power"))
        } else {
            st.dead.map(FaultError::to_io)
        };
        if failure.is_none()
            && let Some((fault, seen)) = st.fault.as_mut()
            && fault.matches(kind)
        {
            let hit = *seen == fault.nth;
            *seen += 1;
            if hit {
                let action = fault.action;
                st.fault = None;
                failure = Some(match action {
                    FaultAction::Fail(e) => e.to_io(),
                    FaultAction::FailFromNowOn(e) => {
                        st.dead = Some(e);
                        e.to_io()
                    }
                    FaultAction::PowerOff => {
                        st.powered_off = true;
                        io::Error::other("device lost power")
                    }
                });
            }
        }
        st.log.push(OpRecord {
            index,
            kind,
            offset,
            len,
            failed: failure.is_some(),
        });
        match failure {
            Some(source) => Err(Error::io(&self.name(), kind.op(), offset, source)),
            None => {
                st.counts[kind as usize] += 1;
                Ok(())
            }
        }
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self, Op::Read, offset, buf.len() as u64)?;
        let mut st = self.state();
        self.begin(&mut st, OpKind::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        for p in &st.pending {
            let (p_off, p_len) = match p {
                Pending::Write { offset, data } => (*offset, data.len() as u64),
                Pending::Discard { offset, len } => (*offset, *len),
            };
            let lo = p_off.max(offset);
            let hi = (p_off + p_len).min(end);
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match p {
                Pending::Write { data, .. } => {
                    dst.copy_from_slice(&data[(lo - p_off) as usize..(hi - p_off) as usize]);
                }
                Pending::Discard { .. } => dst.fill(0),
            }
        }
        Ok(())
    }

    fn clone_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        if !self.clones.load(Ordering::Relaxed) {
            return Ok(false);
        }
        check_range(self, Op::Write, offset, len)?;
        let mut bytes = vec![0u8; len as usize];
        src.read_at(&mut bytes, src_offset)?;
        self.write_at(&bytes, offset)?;
        Ok(true)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self, Op::Write, offset, buf.len() as u64)?;
        let mut st = self.state();
        self.begin(&mut st, OpKind::Write, offset, buf.len() as u64)?;
        if !buf.is_empty() {
            st.pending.push(Pending::Write {
                offset,
                data: buf.to_vec(),
            });
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.state();
        self.begin(&mut st, OpKind::Flush, 0, 0)?;
        for p in std::mem::take(&mut st.pending) {
            match p {
                Pending::Write { offset, data } => self.inner.write_at(&data, offset)?,
                Pending::Discard { offset, len } => self.inner.discard(offset, len)?,
            }
        }
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self, Op::Discard, offset, len)?;
        let mut st = self.state();
        self.begin(&mut st, OpKind::Discard, offset, len)?;
        if len > 0 {
            st.pending.push(Pending::Discard { offset, len });
        }
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn name(&self) -> String {
        format!("faulty({})", self.inner.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    fn dev() -> FaultyDevice<MemDevice> {
        FaultyDevice::new(MemDevice::new(8192))
    }

    fn read(d: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn unflushed_writes_are_visible_but_not_durable() {
        let d = dev();
        d.write_at(&[1u8; 1024], 0).unwrap();
        assert_eq!(read(&d, 0, 1024), vec![1u8; 1024]);
        assert_eq!(read(d.inner(), 0, 1024), vec![0u8; 1024]);
        d.flush().unwrap();
        assert_eq!(read(d.inner(), 0, 1024), vec![1u8; 1024]);
        assert!(d.unflushed().is_empty());
    }

    #[test]
    fn drop_unflushed_keeps_only_flushed() {
        let d = dev();
        d.write_at(&[1u8; 512], 0).unwrap();
        d.flush().unwrap();
        d.write_at(&[2u8; 512], 0).unwrap();
        d.discard(1024, 512).unwrap();
        d.power_cut(PowerCut::DropUnflushed).unwrap();
        assert_eq!(read(&d, 0, 512), vec![1u8; 512]);
        assert!(d.unflushed().is_empty());
    }

    #[test]
    fn in_order_prefix_with_torn_last_write() {
        let d = dev();
        d.write_at(&[1u8; 2048], 0).unwrap();
        d.write_at(&[2u8; 2048], 2048).unwrap();
        d.write_at(&[3u8; 2048], 4096).unwrap();
        d.power_cut(PowerCut::InOrder {
            kept: 2,
            tear_last: Some(3),
        })
        .unwrap();
        assert_eq!(read(&d, 0, 2048), vec![1u8; 2048]);
        let mut want = vec![2u8; 1536];
        want.extend_from_slice(&[0u8; 512]);
        assert_eq!(read(&d, 2048, 2048), want);
        assert_eq!(read(&d, 4096, 2048), vec![0u8; 2048]);
    }

    #[test]
    fn subset_applies_in_issue_order() {
        let d = dev();
        d.write_at(&[1u8; 512], 0).unwrap();
        d.write_at(&[2u8; 512], 0).unwrap();
        d.write_at(&[3u8; 512], 512).unwrap();
        d.power_cut(PowerCut::Subset(vec![2, 0])).unwrap();
        assert_eq!(read(&d, 0, 512), vec![1u8; 512]);
        assert_eq!(read(&d, 512, 512), vec![3u8; 512]);
    }

    #[test]
    fn discard_overlays_and_survives_flush() {
        let d = dev();
        d.write_at(&[7u8; 4096], 0).unwrap();
        d.flush().unwrap();
        d.discard(1000, 100).unwrap();
        let got = read(&d, 0, 4096);
        assert!(got[1000..1100].iter().all(|&b| b == 0));
        assert!(got[..1000].iter().all(|&b| b == 7));
        d.flush().unwrap();
        assert_eq!(read(d.inner(), 0, 4096), got);
    }

    #[test]
    fn nth_operation_fails_once_without_effect() {
        let d = dev();
        d.set_fault(Fault::on(
            OpKind::Write,
            1,
            FaultAction::Fail(FaultError::Enospc),
        ));
        d.write_at(&[1u8; 512], 0).unwrap();
        let e = d.write_at(&[2u8; 512], 512).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        d.write_at(&[3u8; 512], 1024).unwrap();
        assert_eq!(read(&d, 512, 512), vec![0u8; 512]);
        let log = d.log();
        assert_eq!(log.len(), 4);
        assert!(log[1].failed && !log[0].failed && !log[2].failed);
        assert_eq!(log[1].kind, OpKind::Write);
        assert_eq!(d.count(OpKind::Write), 2);
    }

    #[test]
    fn fail_from_now_on_is_sticky_until_cleared() {
        let d = dev();
        d.set_fault(Fault::on(
            OpKind::Flush,
            0,
            FaultAction::FailFromNowOn(FaultError::Eio),
        ));
        d.write_at(&[1u8; 512], 0).unwrap();
        assert!(d.flush().is_err());
        assert!(d.write_at(&[1u8; 512], 0).is_err());
        assert!(d.read_at(&mut [0u8; 512], 0).is_err());
        d.clear_fault();
        d.flush().unwrap();
        assert_eq!(read(d.inner(), 0, 512), vec![1u8; 512]);
    }

    #[test]
    fn power_off_stops_everything_until_cut() {
        let d = dev();
        d.write_at(&[1u8; 512], 0).unwrap();
        d.flush().unwrap();
        d.set_fault(Fault::at(1, FaultAction::PowerOff));
        d.write_at(&[2u8; 512], 0).unwrap();
        assert!(d.flush().is_err());
        assert!(d.is_powered_off());
        assert!(d.write_at(&[3u8; 512], 0).is_err());
        assert_eq!(d.unflushed().len(), 1);
        d.power_cut(PowerCut::InOrder {
            kept: 1,
            tear_last: None,
        })
        .unwrap();
        assert!(!d.is_powered_off());
        assert_eq!(read(&d, 0, 512), vec![2u8; 512]);
    }

    #[test]
    fn out_of_range_is_not_logged_and_not_applied() {
        let d = dev();
        assert!(matches!(
            d.write_at(&[1u8; 512], 8000),
            Err(Error::OutOfRange { .. })
        ));
        assert!(d.log().is_empty());
        assert!(d.unflushed().is_empty());
    }
}
