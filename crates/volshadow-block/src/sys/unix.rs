//! Unix: positional I/O through std, hole punching and block-device queries
//! through rustix.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};

pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

/// `fdatasync`: data and the metadata needed to read it back.
pub(crate) fn sync_data(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// Deallocates a range so it reads back as zeros. Returns `Ok(false)` when
/// the file system or device cannot, so the caller writes zeros instead.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    use rustix::fs::{FallocateFlags, fallocate};
    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match fallocate(file, mode, offset, len) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn punch_hole(_file: &File, _offset: u64, _len: u64) -> io::Result<bool> {
    Ok(false)
}

/// A new regular file is sparse on every unix file system that supports
/// holes; nothing to do.
pub(crate) fn make_sparse(_file: &File) -> io::Result<()> {
    Ok(())
}

pub(crate) fn is_block_device(meta: &Metadata) -> bool {
    meta.file_type().is_block_device()
}

/// Size in bytes and logical sector size of an open block device.
#[cfg(target_os = "linux")]
pub(crate) fn block_device_geometry(file: &File) -> io::Result<(u64, u32)> {
    use rustix::ioctl::{Getter, ioctl, opcode};
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t) in <linux/fs.h>.
    const BLKGETSIZE64: rustix::ioctl::Opcode = opcode::read::<usize>(0x12, 114);
    // SAFETY: BLKGETSIZE64 writes exactly one size_t (u64 on every 64-bit
    // Linux, usize in general) into the pointer the Getter provides; the
    // opcode is the kernel's and `file` is an open descriptor.
    let size: usize = unsafe { ioctl(file, Getter::<BLKGETSIZE64, usize>::new()) }?;
    let sector = rustix::fs::ioctl_blksszget(file)?;
    Ok((size as u64, sector))
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn block_device_geometry(_file: &File) -> io::Result<(u64, u32)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "raw block devices are supported on Linux and Windows only",
    ))
}

/// Opens a raw volume: read-write unless `read_only`, `O_EXCL` on block
/// devices (Linux refuses it while the device is mounted or held by another
/// exclusive opener), `O_DIRECT` when asked.
pub(crate) fn open_raw(
    path: &std::path::Path,
    read_only: bool,
    direct: bool,
    block_device: bool,
) -> io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(!read_only);
    let mut flags = 0;
    if block_device && !read_only {
        flags |= libc_o_excl();
    }
    if direct {
        flags |= o_direct()?;
    }
    opts.custom_flags(flags);
    opts.open(path)
}

fn libc_o_excl() -> i32 {
    rustix::fs::OFlags::EXCL.bits() as i32
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn o_direct() -> io::Result<i32> {
    Ok(rustix::fs::OFlags::DIRECT.bits() as i32)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn o_direct() -> io::Result<i32> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "O_DIRECT is not available on this system",
    ))
}

/// Alignment that unbuffered I/O on this file needs when it is not a block
/// device (a regular file opened with O_DIRECT): the file system's block
/// size covers every device sector size below it.
pub(crate) fn file_direct_alignment(meta: &Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    (meta.blksize() as u32).clamp(512, 4096)
}

/// Volume locking and dismounting are Windows notions; on unix exclusivity
/// comes from `O_EXCL` and `flock`.
pub(crate) fn lock_volume(_file: &File, _dismount: bool) -> io::Result<()> {
    Ok(())
}

/// On unix a device is recognised by its file type, not its name.
pub(crate) fn is_device_path(_path: &std::path::Path) -> bool {
    false
}

/// Data and hole ranges of a regular file via `SEEK_DATA` / `SEEK_HOLE`.
/// `None` where the system or file system cannot say.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn allocation(
    file: &File,
    offset: u64,
    len: u64,
) -> io::Result<Option<Vec<crate::Extent>>> {
    use rustix::fs::{SeekFrom, seek};
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            // ENXIO: no data at or after `pos`.
            Err(e) if e == rustix::io::Errno::NXIO => end,
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::OPNOTSUPP => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(end),
            Err(e) => return Err(e.into()),
        };
        crate::push_extent(
            &mut out,
            crate::Extent {
                offset: data,
                len: hole - data,
            },
        );
        pos = hole;
    }
    Ok(Some(out))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn allocation(
    _file: &File,
    _offset: u64,
    _len: u64,
) -> io::Result<Option<Vec<crate::Extent>>> {
    Ok(None)
}

/// `FIFREEZE` (`freeze = true`) or `FITHAW` on the file system mounted at
/// the directory `mount`.
#[cfg(target_os = "linux")]
pub(crate) fn fs_freeze(mount: &std::path::Path, freeze: bool) -> io::Result<()> {
    use rustix::ioctl::{NoArg, ioctl, opcode};
    // FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int) in
    // <linux/fs.h>; the kernel ignores the argument.
    const FIFREEZE: rustix::ioctl::Opcode = opcode::read_write::<i32>(b'X', 119);
    const FITHAW: rustix::ioctl::Opcode = opcode::read_write::<i32>(b'X', 120);
    let dir = File::open(mount)?;
    if freeze {
        // SAFETY: FIFREEZE takes no pointer the kernel dereferences; `dir`
        // is an open descriptor for the life of the call.
        unsafe { ioctl(&dir, NoArg::<FIFREEZE>::new()) }?;
    } else {
        // SAFETY: as above, for FITHAW.
        unsafe { ioctl(&dir, NoArg::<FITHAW>::new()) }?;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn fs_freeze(_mount: &std::path::Path, _freeze: bool) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "FIFREEZE is Linux only",
    ))
}

/// `FICLONE`: makes `dst` share `src`'s extents (btrfs, xfs with reflink).
#[cfg(target_os = "linux")]
pub(crate) fn reflink(src: &File, dst: &File) -> io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn reflink(_src: &File, _dst: &File) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "FICLONE is Linux only",
    ))
}

/// `FICLONERANGE`: makes `len` bytes at `dst_offset` of `dst` share the
/// extents of `src` at `src_offset` (btrfs, xfs with reflink). `Ok(false)`
/// where the file systems cannot (another file system, no reflink,
/// unaligned range, no room or quota for the clone, not Linux): nothing
/// was changed and the caller copies.
#[cfg(target_os = "linux")]
pub(crate) fn clone_range(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
) -> io::Result<bool> {
    use std::os::fd::AsRawFd;

    use rustix::io::Errno;
    use rustix::ioctl::{Setter, ioctl, opcode};
    /// `struct file_clone_range` of <linux/fs.h>.
    #[repr(C)]
    struct FileCloneRange {
        src_fd: i64,
        src_offset: u64,
        src_length: u64,
        dest_offset: u64,
    }
    // FICLONERANGE = _IOW(0x94, 13, struct file_clone_range).
    const FICLONERANGE: rustix::ioctl::Opcode = opcode::write::<FileCloneRange>(0x94, 13);
    if len == 0 {
        // A zero length means "to the end of the source" to the kernel.
        return Ok(true);
    }
    let arg = FileCloneRange {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset,
        src_length: len,
        dest_offset: dst_offset,
    };
    // SAFETY: FICLONERANGE reads exactly one `struct file_clone_range`,
    // whose layout `FileCloneRange` repeats (four 64-bit fields); the
    // Setter passes a pointer to `arg`, which lives across the call; `dst`
    // and `src` are open descriptors borrowed for the call.
    match unsafe { ioctl(dst, Setter::<FICLONERANGE, FileCloneRange>::new(arg)) } {
        Ok(()) => Ok(true),
        Err(e)
            if [
                Errno::XDEV,
                Errno::OPNOTSUPP,
                Errno::INVAL,
                Errno::NOTTY,
                Errno::BADF,
                Errno::PERM,
                Errno::ISDIR,
                // No room for the clone's metadata: the caller writes the
                // copy into space the diff area already has.
                Errno::NOSPC,
                Errno::DQUOT,
            ]
            .contains(&e) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn clone_range(
    _src: &File,
    _src_offset: u64,
    _dst: &File,
    _dst_offset: u64,
    _len: u64,
) -> io::Result<bool> {
    Ok(false)
}

/// Identity of an open file: kind 1 (regular file: device, inode) or 2
/// (block device: its device number).
pub(crate) fn identity(file: &File) -> Option<[u8; 32]> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata().ok()?;
    let mut id = [0u8; 32];
    if meta.file_type().is_block_device() {
        id[0] = 2;
        id[8..16].copy_from_slice(&meta.rdev().to_le_bytes());
    } else {
        id[0] = 1;
        id[8..16].copy_from_slice(&meta.dev().to_le_bytes());
        id[16..24].copy_from_slice(&meta.ino().to_le_bytes());
    }
    Some(id)
}
