//! A raw volume: a Linux block device (`/dev/loopN`, `/dev/sdX`) or a
//! Windows volume / disk (`\\.\X:`, `\\.\PhysicalDriveN`), optionally
//! unbuffered. A regular file may be opened the same way, which is how the
//! unbuffered code paths are tested where no spare disk exists.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use crate::align::{AlignedBuf, is_aligned, widen, write_whole_sectors};
use crate::file::lock_file;
use crate::{BlockDevice, Error, Op, OpenOptions, Result, check_range, sys};

/// A block device or volume handle. With unbuffered I/O (`O_DIRECT`, or
/// always on Windows: `FILE_FLAG_NO_BUFFERING | FILE_FLAG_WRITE_THROUGH`)
/// requests whose buffer, offset or length are not sector-aligned go through
/// an aligned bounce buffer; partial-sector writes are read-modify-write.
#[derive(Debug)]
pub struct RawVolume {
    file: File,
    path: PathBuf,
    len: u64,
    sector: u32,
    /// Alignment unbuffered I/O needs; 1 when the OS buffers for us.
    align: u32,
    read_only: bool,
    /// Read-modify-write of a partial sector holds this exclusively; aligned
    /// writes hold it shared. Without it an aligned write landing between an
    /// RMW's read and its write would be undone.
    rmw: RwLock<()>,
}

impl RawVolume {
    /// Opens `path` as a raw volume.
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let path_err = |op, source| Error::Path {
            path: path.to_owned(),
            op,
            source,
        };
        let meta = std::fs::metadata(path).map_err(|e| path_err(Op::Open, e))?;
        let block_device = sys::is_block_device(&meta) || sys::is_device_path(path);
        let file =
            sys::open_raw(path, options.read_only, options.direct, block_device).map_err(|e| {
                if e.raw_os_error() == Some(16) && cfg!(unix) {
                    // EBUSY from O_EXCL: mounted or held by another opener.
                    Error::InUse {
                        device: path.display().to_string(),
                    }
                } else {
                    path_err(Op::Open, e)
                }
            })?;
        if !(block_device && cfg!(windows)) {
            lock_file(&file, path, options.read_only)?;
        }
        if block_device && (options.lock_volume || options.dismount) {
            sys::lock_volume(&file, options.dismount).map_err(|e| path_err(Op::Lock, e))?;
        }
        let (len, sector) = if block_device {
            sys::block_device_geometry(&file).map_err(|e| path_err(Op::Query, e))?
        } else {
            (meta.len(), options.block_size.unwrap_or(512))
        };
        let unbuffered = options.direct || cfg!(windows);
        let align = if !unbuffered {
            1
        } else if block_device {
            sector
        } else {
            sys::file_direct_alignment(&meta).max(sector)
        };
        if !len.is_multiple_of(align as u64) {
            return Err(Error::Invalid {
                device: path.display().to_string(),
                reason: format!(
                    "length {len} is not a multiple of the {align}-byte unbuffered I/O alignment"
                ),
            });
        }
        Ok(RawVolume {
            file,
            path: path.to_owned(),
            len,
            sector,
            align,
            read_only: options.read_only,
            rmw: RwLock::new(()),
        })
    }

    /// Alignment the OS requires for this handle's I/O (1 when buffered).
    pub fn io_alignment(&self) -> u32 {
        self.align
    }

    fn io_err(&self, op: Op, offset: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::io(&self.name(), op, offset, source)
    }

    fn aligned(&self, addr: usize, offset: u64, len: usize) -> bool {
        self.align == 1 || is_aligned(addr, offset, len, self.align)
    }

    fn write_unaligned(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _guard = self.rmw.write().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = widen(offset, buf.len(), self.align);
        let mut bounce = AlignedBuf::new((end - start) as usize, self.align as usize);
        let head = (offset - start) as usize;
        let tail = head + buf.len();
        // Only the partial sectors at either end need their old contents.
        let a = self.align as usize;
        if head != 0 || tail < a {
            sys::read_exact_at(&self.file, &mut bounce.as_mut_slice()[..a], start)
                .map_err(self.io_err(Op::Read, start))?;
        }
        let total = bounce.as_slice().len();
        if !tail.is_multiple_of(a) && total > a {
            let last = total - a;
            sys::read_exact_at(
                &self.file,
                &mut bounce.as_mut_slice()[last..],
                start + last as u64,
            )
            .map_err(self.io_err(Op::Read, start + last as u64))?;
        }
        bounce.as_mut_slice()[head..tail].copy_from_slice(buf);
        sys::write_all_at(&self.file, bounce.as_slice(), start)
            .map_err(self.io_err(Op::Write, start))
    }
}

impl BlockDevice for RawVolume {
    fn len(&self) -> u64 {
        self.len
    }

    fn block_size(&self) -> u32 {
        self.sector
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self, Op::Read, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.aligned(buf.as_ptr() as usize, offset, buf.len()) {
            return sys::read_exact_at(&self.file, buf, offset)
                .map_err(self.io_err(Op::Read, offset));
        }
        let (start, end) = widen(offset, buf.len(), self.align);
        let mut bounce = AlignedBuf::new((end - start) as usize, self.align as usize);
        sys::read_exact_at(&self.file, bounce.as_mut_slice(), start)
            .map_err(self.io_err(Op::Read, start))?;
        let head = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[head..head + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                device: self.name(),
            });
        }
        check_range(self, Op::Write, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.align == 1 {
            return sys::write_all_at(&self.file, buf, offset)
                .map_err(self.io_err(Op::Write, offset));
        }
        if is_aligned(0, offset, buf.len(), self.align) {
            let _guard = self.rmw.read().unwrap_or_else(PoisonError::into_inner);
            return write_whole_sectors(&self.file, buf, offset, self.align)
                .map_err(self.io_err(Op::Write, offset));
        }
        self.write_unaligned(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        sys::sync_data(&self.file).map_err(self.io_err(Op::Flush, 0))
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
        let punched = {
            let _guard = self.rmw.write().unwrap_or_else(PoisonError::into_inner);
            sys::punch_hole(&self.file, offset, len).unwrap_or(false)
        };
        if punched {
            return Ok(());
        }
        let step = crate::ZERO_RUN.min(len) as usize;
        let zeros = AlignedBuf::new(step, self.align.max(1) as usize);
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(step as u64) as usize;
            self.write_at(&zeros.as_slice()[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn identity(&self) -> Option<[u8; 32]> {
        sys::identity(&self.file)
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}
