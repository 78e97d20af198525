//! Block devices for volshadow.
//!
//! [`BlockDevice`] is the one interface the engine, the NBD server and the
//! tests speak. Every method takes `&self` so one device is shared by many
//! threads; I/O is positional (`pread`/`pwrite`, `seek_read`/`seek_write`),
//! never through a shared cursor, and never through a memory map on a write
//! path (a mapped file that shrinks or fails I/O turns into SIGBUS).
//!
//! Backends: [`FileImage`] (regular or sparse file), [`MemDevice`] (RAM),
//! [`RawVolume`] (Linux block device or Windows volume / disk handle) and,
//! with the `testing` feature, `FaultyDevice` for crash and fault tests.
//! [`open_device`] picks the backend from what a path is.
//!
//! # Example
//!
//! A sparse file image, written and read back through the trait:
//!
//! ```
//! use volshadow_block::{BlockDevice, FileImage};
//!
//! # fn main() -> volshadow_block::Result<()> {
//! let dir = tempfile::tempdir().expect("temporary directory");
//! let image = FileImage::create(dir.path().join("disk.img"), 1 << 20)?;
//! image.write_at(b"hello", 4096)?;
//! image.flush()?;
//!
//! let mut buf = [0u8; 5];
//! image.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! // Never-written ranges read as zeros.
//! image.read_at(&mut buf, 0)?;
//! assert_eq!(buf, [0; 5]);
//! # Ok(())
//! # }
//! ```
//!
//! # Your own backend
//!
//! Implement [`BlockDevice`] to put the engine over storage of your own (a
//! SAN LUN, an object store cache, a counting wrapper). Only six methods
//! are required; check the contract with the `conformance` suite (feature
//! `testing`) in a test. The repository's `examples/embed.rs` runs the
//! engine over such a device.
//!
//! `unsafe` lives only in `sys/`, one small function per OS call.
#![deny(unsafe_code)]

mod align;
mod error;
mod file;
mod fsops;
mod mem;
mod open;
mod raw;
#[allow(unsafe_code)]
mod sys;

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
mod faulty;

pub use align::{AlignedBuf, BufferPool};
pub use error::{Error, Op, Result};
pub use file::FileImage;
pub use fsops::{freeze_filesystem, probe_extent_clones, reflink_file, thaw_filesystem};
pub use mem::MemDevice;
pub use open::{DeviceKind, OpenOptions, device_kind, open_device};
pub use raw::RawVolume;

/// Windows only: the named pipe a local control channel uses (owner-only
/// security, first instance only, no remote clients) and the console's
/// stop events.
#[cfg(windows)]
pub use sys::{PipeListener, PipeStream, on_console_stop};

#[cfg(feature = "testing")]
pub use faulty::{Fault, FaultAction, FaultError, FaultyDevice, OpKind, OpRecord, PowerCut};

use std::sync::Arc;

/// Bytes of zeros written at a time where zeros are written out
/// (`write_zeroes`, a discard without hole punching).
pub(crate) const ZERO_RUN: u64 = 1 << 20;

/// A random-access block device shared by many threads.
///
/// Contract for every implementation (checked by the `conformance`
/// suite, feature `testing`):
/// - a request must lie entirely inside `0..len()`; otherwise it fails with
///   [`Error::OutOfRange`] and nothing is read or written (also when
///   `offset + len` overflows);
/// - zero-length reads and writes at any offset `<= len()` succeed and do
///   nothing;
/// - `read_at` fills the whole buffer or fails; `write_at` writes the whole
///   buffer or fails;
/// - after `flush` returns, every write that returned before `flush` was
///   called is durable;
/// - after `discard(off, len)` the range reads back as zeros.
///
/// Offsets and lengths need not be aligned to `block_size`; backends that
/// need alignment (O_DIRECT, `FILE_FLAG_NO_BUFFERING`) bounce internally.
///
/// # Example
///
/// A backend of your own: a device that counts the writes reaching an
/// inner one (a real one would talk to its storage instead). Range checks
/// come first, so a refused request touches nothing.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use volshadow_block::{BlockDevice, MemDevice, Op, Result, check_range};
///
/// #[derive(Debug)]
/// struct Counting {
///     inner: MemDevice,
///     writes: AtomicU64,
/// }
///
/// impl BlockDevice for Counting {
///     fn len(&self) -> u64 { self.inner.len() }
///     fn block_size(&self) -> u32 { self.inner.block_size() }
///     fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
///         check_range(self, Op::Read, offset, buf.len() as u64)?;
///         self.inner.read_at(buf, offset)
///     }
///     fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
///         check_range(self, Op::Write, offset, buf.len() as u64)?;
///         self.writes.fetch_add(1, Ordering::Relaxed);
///         self.inner.write_at(buf, offset)
///     }
///     fn flush(&self) -> Result<()> { self.inner.flush() }
///     fn discard(&self, offset: u64, len: u64) -> Result<()> {
///         check_range(self, Op::Discard, offset, len)?;
///         self.inner.discard(offset, len)
///     }
///     fn name(&self) -> String { "counting".into() }
/// }
///
/// let dev = Counting { inner: MemDevice::new(1 << 20), writes: AtomicU64::new(0) };
/// dev.write_at(&[7; 4096], 0)?;
/// assert!(dev.write_at(&[7; 4096], 1 << 20).is_err()); // past the end
/// assert_eq!(dev.writes.load(Ordering::Relaxed), 1);
/// # Ok::<(), volshadow_block::Error>(())
/// ```
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Logical sector size in bytes (512 or 4096).
    fn block_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable (`fdatasync` / `FlushFileBuffers`).
    fn flush(&self) -> Result<()>;
    /// Tells the device `len` bytes at `offset` are no longer needed; they
    /// read back as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// The parts of `offset..offset + len` that may hold data: sorted,
    /// disjoint, merged [`Extent`]s inside the range. The rest of the range
    /// is holes, which read as zeros. `None` when the device cannot tell
    /// (then everything counts as data).
    fn allocation(&self, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> {
        let _ = (offset, len);
        Ok(None)
    }
    /// Writes `len` zero bytes at `offset` (allocated, unlike `discard`),
    /// a megabyte at a time through `write_at`; backends with a cheaper way
    /// override it.
    fn write_zeroes(&self, mut offset: u64, mut len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(ZERO_RUN) as usize];
        while len > 0 {
            let n = len.min(zeros.len() as u64);
            self.write_at(&zeros[..n as usize], offset)?;
            offset += n;
            len -= n;
        }
        Ok(())
    }

    /// A stable identity of the storage behind this device (a file's
    /// device and inode, a block device's number), or `None` when it has
    /// none worth recording (memory, layered devices). A diff area records
    /// its origin's identity and refuses another one, so two equal-sized
    /// images can never be swapped unnoticed. Kind in byte 0, then fields.
    fn identity(&self) -> Option<[u8; 32]> {
        None
    }

    /// Makes `len` bytes at `offset` of this device hold `src`'s bytes at
    /// `src_offset`, as if read from `src` now and written here: durable
    /// after a later `flush` of this device, like a write. Devices that can
    /// share the extents instead of copying (a [`FileImage`] on XFS or
    /// btrfs, from another file image on the same file system) do so and
    /// return `true`; the default does nothing and returns `false`, and
    /// the caller copies the bytes itself.
    fn clone_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        let _ = (src, src_offset, offset, len);
        Ok(false)
    }

    /// The open file behind this device, if it is one (a file image, a
    /// raw volume): what [`clone_from`](Self::clone_from) shares extents
    /// with.
    fn file(&self) -> Option<&std::fs::File> {
        None
    }

    /// True for devices that refuse writes.
    fn is_read_only(&self) -> bool {
        false
    }
    /// A short human-readable name (a path, "memory", a snapshot id).
    fn name(&self) -> String;
    /// `len() == 0`.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for dyn BlockDevice + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("name", &self.name())
            .field("len", &self.len())
            .finish()
    }
}

macro_rules! forward_block_device {
    ($($ptr:ty),*) => {$(
        impl<D: BlockDevice + ?Sized> BlockDevice for $ptr {
            fn len(&self) -> u64 { (**self).len() }
            fn block_size(&self) -> u32 { (**self).block_size() }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> { (**self).read_at(buf, offset) }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> { (**self).write_at(buf, offset) }
            fn flush(&self) -> Result<()> { (**self).flush() }
            fn discard(&self, offset: u64, len: u64) -> Result<()> { (**self).discard(offset, len) }
            fn is_read_only(&self) -> bool { (**self).is_read_only() }
            fn identity(&self) -> Option<[u8; 32]> { (**self).identity() }
            fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> { (**self).write_zeroes(offset, len) }
            fn allocation(&self, offset: u64, len: u64) -> Result<Option<Vec<Extent>>> { (**self).allocation(offset, len) }
            fn clone_from(&self, src: &dyn BlockDevice, src_offset: u64, offset: u64, len: u64) -> Result<bool> { (**self).clone_from(src, src_offset, offset, len) }
            fn file(&self) -> Option<&std::fs::File> { (**self).file() }
            fn name(&self) -> String { (**self).name() }
        }
    )*};
}
forward_block_device!(Arc<D>, Box<D>, &D);

/// A byte range of a device or a volume: what the allocation map, changed
/// block tracking and the NBD server's block status all speak of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    /// The first byte after the range.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Appends a range to ranges kept in order of their start, merging it with
/// the last one when they touch or overlap. Empty ranges are dropped.
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if e.offset <= last.end() => last.len = last.len.max(e.end() - last.offset),
        _ => out.push(e),
    }
}

/// Checks that `len` bytes at `offset` fit in a device of `size` bytes.
///
/// Every backend calls this before touching data, so an out-of-range request
/// never performs a partial write.
pub fn check_range(device: &dyn BlockDevice, op: Op, offset: u64, len: u64) -> Result<()> {
    let size = device.len();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            device: device.name(),
            op,
            offset,
            len,
            size,
        }),
    }
}
