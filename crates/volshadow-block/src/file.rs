//! A regular (normally sparse) file used as a block device.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::align::{is_aligned, write_whole_sectors};
use crate::{BlockDevice, Error, Op, Result, check_range, sys};

/// A file image. `create` makes it sparse; writes and reads are positional;
/// `flush` is `fdatasync` (`FlushFileBuffers` on Windows); `discard` punches
/// a hole where the file system can and writes zeros where it cannot.
///
/// The file is locked for the life of the value: exclusively for a
/// read-write open, shared for a read-only one, so a second writer (in this
/// process or another) gets [`Error::InUse`] instead of silently sharing.
#[derive(Debug)]
pub struct FileImage {
    file: File,
    path: PathBuf,
    len: AtomicU64,
    block_size: u32,
    read_only: bool,
    /// A second, unbuffered handle for whole aligned blocks (see
    /// [`with_direct_writes`](FileImage::with_direct_writes)).
    direct: Option<Direct>,
}

/// Smallest write sent unbuffered. Smaller ones stay in the page cache:
/// an unbuffered write waits for the device every time, while cached small
/// writes are written back together by the next flush.
const DIRECT_MIN: usize = 128 << 10;

#[derive(Debug)]
struct Direct {
    file: File,
    /// Alignment unbuffered I/O needs on this file.
    align: u32,
}

impl FileImage {
    /// Creates a new sparse image of `size` bytes. Fails if `path` exists,
    /// so an existing image is never truncated by mistake.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| Error::Path {
                path: path.to_owned(),
                op: Op::Open,
                source,
            })?;
        let image = Self::from_file(file, path, false)?;
        let io = |source| Error::io(&image.name(), Op::Write, 0, source);
        sys::make_sparse(&image.file).map_err(io)?;
        image.file.set_len(size).map_err(io)?;
        image.len.store(size, Ordering::Release);
        Ok(image)
    }

    /// Opens an existing image read-write.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Opens an existing image read-only (writes fail with [`Error::ReadOnly`]).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, true)
    }

    fn open_with(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Path {
                path: path.to_owned(),
                op: Op::Open,
                source,
            })?;
        Self::from_file(file, path, read_only)
    }

    fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self> {
        lock_file(&file, path, read_only)?;
        let len = file
            .metadata()
            .map_err(|source| Error::Path {
                path: path.to_owned(),
                op: Op::Query,
                source,
            })?
            .len();
        Ok(FileImage {
            file,
            path: path.to_owned(),
            len: AtomicU64::new(len),
            block_size: 512,
            read_only,
            direct: None,
        })
    }

    /// Writes large aligned runs (at least 128 KiB, offset and length
    /// multiples of the file-system block) through a second, unbuffered handle
    /// (`O_DIRECT`, Linux); other writes and every read stay buffered. For a diff area:
    /// its chunk copies are written once and rarely read back, and on many
    /// disks writing them unbuffered and flushing the device cache is
    /// several times faster than writing back dirty pages at `fdatasync`.
    /// The kernel keeps the page cache coherent with the unbuffered writes;
    /// `flush` still makes both durable. Where the file system refuses
    /// unbuffered I/O (tmpfs, other systems), the image stays buffered.
    /// On Windows too: the image's lock (`LockFileEx` over the whole file)
    /// is mandatory there and would refuse a second handle's writes.
    pub fn with_direct_writes(mut self) -> Self {
        if self.read_only || self.direct.is_some() || cfg!(windows) {
            return self;
        }
        let opened = sys::open_raw(&self.path, false, true, false).and_then(|file| {
            let meta = file.metadata()?;
            // The path must still name the file this image has open.
            if sys::identity(&file) != sys::identity(&self.file) {
                return Err(std::io::Error::other("the path now names another file"));
            }
            Ok((file, sys::file_direct_alignment(&meta)))
        });
        match opened {
            Ok((file, align)) => self.direct = Some(Direct { file, align }),
            Err(e) => tracing::debug!(
                file = %self.path.display(),
                error = %e,
                "unbuffered writes unavailable; writing through the page cache"
            ),
        }
        self
    }

    /// True when whole aligned blocks are written unbuffered.
    pub fn writes_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grows or shrinks the image (a growable diff area uses this). Growing
    /// adds a hole that reads as zeros.
    pub fn set_len(&self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                device: self.name(),
            });
        }
        self.file
            .set_len(size)
            .map_err(|source| Error::io(&self.name(), Op::Write, size, source))?;
        self.len.store(size, Ordering::Release);
        Ok(())
    }
}

/// Takes the open-time lock: exclusive for writers, shared for readers.
/// `flock` / `LockFileEx` locks belong to the open file description, so a
/// second open in the same process conflicts too.
pub(crate) fn lock_file(file: &File, path: &Path, read_only: bool) -> Result<()> {
    let locked = if read_only {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match locked {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(Error::InUse {
            device: path.display().to_string(),
        }),
        Err(TryLockError::Error(source)) => Err(Error::Path {
            path: path.to_owned(),
            op: Op::Lock,
            source,
        }),
    }
}

impl BlockDevice for FileImage {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self, Op::Read, offset, buf.len() as u64)?;
        sys::read_exact_at(&self.file, buf, offset)
            .map_err(|source| Error::io(&self.name(), Op::Read, offset, source))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                device: self.name(),
            });
        }
        check_range(self, Op::Write, offset, buf.len() as u64)?;
        let io = |source| Error::io(&self.name(), Op::Write, offset, source);
        if let Some(d) = &self.direct
            && buf.len() >= DIRECT_MIN
            && is_aligned(0, offset, buf.len(), d.align)
        {
            return write_whole_sectors(&d.file, buf, offset, d.align).map_err(io);
        }
        sys::write_all_at(&self.file, buf, offset).map_err(io)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        sys::sync_data(&self.file).map_err(|source| Error::io(&self.name(), Op::Flush, 0, source))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                device: self.name(),
            });
        }
        check_range(self, Op::Discard, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let punched = sys::punch_hole(&self.file, offset, len)
            .map_err(|source| Error::io(&self.name(), Op::Discard, offset, source))?;
        if punched {
            Ok(())
        } else {
            self.write_zeroes(offset, len)
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Option<Vec<crate::Extent>>> {
        check_range(self, Op::Query, offset, len)?;
        sys::allocation(&self.file, offset, len)
            .map_err(|source| Error::io(&self.name(), Op::Query, offset, source))
    }

    fn identity(&self) -> Option<[u8; 32]> {
        sys::identity(&self.file)
    }

    /// `FICLONERANGE` from `src`'s file where both ranges are whole
    /// file-system blocks on one file system that shares extents.
    fn clone_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> Result<bool> {
        if self.read_only {
            return Err(Error::ReadOnly {
                device: self.name(),
            });
        }
        check_range(self, Op::Write, offset, len)?;
        check_range(src, Op::Read, src_offset, len)?;
        let Some(from) = src.file() else {
            return Ok(false);
        };
        sys::clone_range(from, src_offset, &self.file, offset, len)
            .map_err(|source| Error::io(&self.name(), Op::Write, offset, source))
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}
