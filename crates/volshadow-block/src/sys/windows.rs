//! Windows: positional I/O through std (`seek_read` / `seek_write` on a
//! handle opened without `FILE_FLAG_OVERLAPPED` do not depend on the file
//! pointer's previous value), volume and disk control codes through
//! `windows-sys`.

use std::ffi::c_void;
use std::fs::{File, Metadata};
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::fs::FileExt;
use std::os::windows::io::{AsRawHandle, FromRawHandle};
use std::path::Path;

use windows_sys::Win32::Foundation::{
    ERROR_MORE_DATA, GENERIC_READ, GENERIC_WRITE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Storage::FileSystem::{
    BY_HANDLE_FILE_INFORMATION, CreateFileW, FILE_ATTRIBUTE_NORMAL, FILE_FLAG_NO_BUFFERING,
    FILE_FLAG_WRITE_THROUGH, FILE_SHARE_READ, FILE_SHARE_WRITE, GetFileInformationByHandle,
    OPEN_EXISTING,
};
use windows_sys::Win32::System::IO::DeviceIoControl;
use windows_sys::Win32::System::Ioctl::{
    DISK_GEOMETRY, FILE_ALLOCATED_RANGE_BUFFER, FILE_ZERO_DATA_INFORMATION, FSCTL_DISMOUNT_VOLUME,
    FSCTL_LOCK_VOLUME, FSCTL_QUERY_ALLOCATED_RANGES, FSCTL_SET_SPARSE, FSCTL_SET_ZERO_DATA,
    GET_LENGTH_INFORMATION, IOCTL_DISK_GET_DRIVE_GEOMETRY, IOCTL_DISK_GET_LENGTH_INFO,
};

pub(crate) fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the file",
                ));
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.seek_write(buf, offset) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `FlushFileBuffers`.
pub(crate) fn sync_data(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// Issues one `DeviceIoControl`.
///
/// # Safety
/// `I` and `O` must be the input and output structures that `code` is
/// documented to take (or `()` for none); the kernel reads
/// `size_of::<I>()` bytes from `input` and writes at most `size_of::<O>()`
/// bytes into `output`.
unsafe fn device_io_control<I, O>(
    file: &File,
    code: u32,
    input: Option<&I>,
    output: Option<&mut O>,
) -> io::Result<()> {
    // SAFETY: the caller's contract is this function's.
    unsafe { device_io_control_returning(file, code, input, output) }.0
}

/// [`device_io_control`], also returning how many output bytes were
/// written, which a call that fails with `ERROR_MORE_DATA` still reports.
///
/// # Safety
/// As for [`device_io_control`].
unsafe fn device_io_control_returning<I, O>(
    file: &File,
    code: u32,
    input: Option<&I>,
    output: Option<&mut O>,
) -> (io::Result<()>, usize) {
    let (in_ptr, in_len) = match input {
        Some(i) => ((i as *const I).cast::<c_void>(), size_of::<I>() as u32),
        None => (std::ptr::null(), 0),
    };
    let (out_ptr, out_len) = match output {
        Some(o) => ((o as *mut O).cast::<c_void>(), size_of::<O>() as u32),
        None => (std::ptr::null_mut(), 0),
    };
    let mut returned = 0u32;
    // SAFETY: the handle is open for the life of `file`; the buffers are
    // valid for the sizes given (caller's contract); the call is synchronous
    // (no OVERLAPPED), so nothing outlives this frame.
    let ok = unsafe {
        DeviceIoControl(
            file.as_raw_handle(),
            code,
            in_ptr,
            in_len,
            out_ptr,
            out_len,
            &mut returned,
            std::ptr::null_mut(),
        )
    };
    let result = if ok == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    (result, (returned as usize).min(out_len as usize))
}

/// Deallocates (sparse file) or zeroes a range with `FSCTL_SET_ZERO_DATA`.
/// Returns `Ok(false)` where the file system does not support it.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    let info = FILE_ZERO_DATA_INFORMATION {
        FileOffset: offset as i64,
        BeyondFinalZero: (offset + len) as i64,
    };
    // SAFETY: FSCTL_SET_ZERO_DATA takes a FILE_ZERO_DATA_INFORMATION and
    // returns nothing.
    match unsafe { device_io_control::<_, ()>(file, FSCTL_SET_ZERO_DATA, Some(&info), None) } {
        Ok(()) => Ok(true),
        Err(e) if is_unsupported(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Marks a new image file sparse so unwritten ranges take no space.
pub(crate) fn make_sparse(file: &File) -> io::Result<()> {
    // SAFETY: FSCTL_SET_SPARSE with no input buffer means "set sparse".
    match unsafe { device_io_control::<(), ()>(file, FSCTL_SET_SPARSE, None, None) } {
        Err(e) if !is_unsupported(&e) => Err(e),
        _ => Ok(()),
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    // ERROR_INVALID_FUNCTION (1), ERROR_NOT_SUPPORTED (50),
    // ERROR_INVALID_PARAMETER (87) come back from file systems without the
    // control code.
    matches!(e.raw_os_error(), Some(1 | 50 | 87))
}

/// Windows has no "block device" file type; devices are named by path.
pub(crate) fn is_block_device(_meta: &Metadata) -> bool {
    false
}

/// Length and sector size of a volume or disk; for a plain file (tests,
/// images opened as raw) the file's length and a 4096-byte alignment, which
/// satisfies unbuffered I/O on any sector size up to 4 KiB.
pub(crate) fn block_device_geometry(file: &File) -> io::Result<(u64, u32)> {
    let mut len = GET_LENGTH_INFORMATION { Length: 0 };
    // SAFETY: IOCTL_DISK_GET_LENGTH_INFO writes one GET_LENGTH_INFORMATION.
    let size = match unsafe {
        device_io_control::<(), _>(file, IOCTL_DISK_GET_LENGTH_INFO, None, Some(&mut len))
    } {
        Ok(()) => len.Length as u64,
        Err(_) => file.metadata()?.len(),
    };
    // SAFETY: DISK_GEOMETRY is plain data; all-zero is a valid value.
    let mut geo: DISK_GEOMETRY = unsafe { std::mem::zeroed() };
    // SAFETY: IOCTL_DISK_GET_DRIVE_GEOMETRY writes one DISK_GEOMETRY.
    let sector = match unsafe {
        device_io_control::<(), _>(file, IOCTL_DISK_GET_DRIVE_GEOMETRY, None, Some(&mut geo))
    } {
        Ok(()) if geo.BytesPerSector.is_power_of_two() => geo.BytesPerSector,
        _ => 4096,
    };
    Ok((size, sector))
}

/// Opens a volume, disk or file unbuffered and write-through, as the engine
/// needs for a raw volume: every completed write is on the device.
pub(crate) fn open_raw(
    path: &Path,
    read_only: bool,
    _direct: bool,
    _block_device: bool,
) -> io::Result<File> {
    let wide: Vec<u16> = path.as_os_str().encode_wide().chain(Some(0)).collect();
    let access = if read_only {
        GENERIC_READ
    } else {
        GENERIC_READ | GENERIC_WRITE
    };
    // SAFETY: `wide` is a NUL-terminated UTF-16 path that outlives the call;
    // null security attributes and template handle are allowed.
    let handle = unsafe {
        CreateFileW(
            wide.as_ptr(),
            access,
            FILE_SHARE_READ | FILE_SHARE_WRITE,
            std::ptr::null(),
            OPEN_EXISTING,
            FILE_ATTRIBUTE_NORMAL | FILE_FLAG_NO_BUFFERING | FILE_FLAG_WRITE_THROUGH,
            std::ptr::null_mut(),
        )
    };
    if handle == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `handle` was just returned by CreateFileW, is valid and owned
    // by nobody else; File takes ownership and closes it once.
    Ok(unsafe { File::from_raw_handle(handle) })
}

/// Unbuffered I/O alignment for a plain file opened as a raw volume.
pub(crate) fn file_direct_alignment(_meta: &Metadata) -> u32 {
    4096
}

/// `FSCTL_LOCK_VOLUME`, then `FSCTL_DISMOUNT_VOLUME` if asked: the engine
/// owns the volume, no file system may have it mounted underneath.
pub(crate) fn lock_volume(file: &File, dismount: bool) -> io::Result<()> {
    // SAFETY: both control codes take no input and produce no output.
    unsafe {
        device_io_control::<(), ()>(file, FSCTL_LOCK_VOLUME, None, None)?;
        if dismount {
            device_io_control::<(), ()>(file, FSCTL_DISMOUNT_VOLUME, None, None)?;
        }
    }
    Ok(())
}

/// Device paths (`\\.\X:`, `\\.\PhysicalDriveN`, `\\?\Volume{..}`) name
/// volumes and disks rather than files.
pub(crate) fn is_device_path(path: &Path) -> bool {
    let s = path.as_os_str().to_string_lossy();
    s.starts_with(r"\\.\") || (s.starts_with(r"\\?\Volume{") && !s.ends_with('\\'))
}

/// Data and hole ranges of a file via `FSCTL_QUERY_ALLOCATED_RANGES`
/// (ranges of a sparse file that hold clusters; a file that is not sparse
/// is all data). `None` where the file system cannot say.
pub(crate) fn allocation(
    file: &File,
    offset: u64,
    len: u64,
) -> io::Result<Option<Vec<crate::Extent>>> {
    const BATCH: usize = 64;
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let query = FILE_ALLOCATED_RANGE_BUFFER {
            FileOffset: pos as i64,
            Length: (end - pos) as i64,
        };
        let mut ranges = [FILE_ALLOCATED_RANGE_BUFFER::default(); BATCH];
        // SAFETY: FSCTL_QUERY_ALLOCATED_RANGES takes one
        // FILE_ALLOCATED_RANGE_BUFFER and fills an array of them.
        let (result, returned) = unsafe {
            device_io_control_returning(
                file,
                FSCTL_QUERY_ALLOCATED_RANGES,
                Some(&query),
                Some(&mut ranges),
            )
        };
        let more = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(ERROR_MORE_DATA as i32) => true,
            Err(e) if is_unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let filled = &ranges[..returned / size_of::<FILE_ALLOCATED_RANGE_BUFFER>()];
        let before = pos;
        for r in filled {
            // Clamp to what was asked; ranges come sorted and disjoint.
            let start = (r.FileOffset.max(0) as u64).clamp(pos, end);
            let stop = (r.FileOffset.saturating_add(r.Length).max(0) as u64).clamp(start, end);
            if stop == start {
                continue;
            }
            crate::push_extent(
                &mut out,
                crate::Extent {
                    offset: start,
                    len: stop - start,
                },
            );
            pos = stop;
        }
        // Without more data (or without progress, which would loop), the
        // rest of the range holds no clusters.
        if !more || pos == before {
            break;
        }
    }
    Ok(Some(out))
}

/// File-system freeze is a Linux ioctl; VSS writers do this on Windows.
pub(crate) fn fs_freeze(_mount: &Path, _freeze: bool) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "FIFREEZE is Linux only",
    ))
}

/// Block cloning (`FSCTL_DUPLICATE_EXTENTS_TO_FILE`) is not wired up yet.
pub(crate) fn reflink(_src: &File, _dst: &File) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reflink copies are Linux only for now",
    ))
}

/// Extent clones of a range (ReFS `FSCTL_DUPLICATE_EXTENTS_TO_FILE`) are
/// not wired up: the caller copies.
pub(crate) fn clone_range(
    _src: &File,
    _src_offset: u64,
    _dst: &File,
    _dst_offset: u64,
    _len: u64,
) -> io::Result<bool> {
    Ok(false)
}

/// Identity of an open file or volume: kind 3, the volume serial number
/// and the file index (both fixed for the life of the file).
pub(crate) fn identity(file: &File) -> Option<[u8; 32]> {
    // SAFETY: an all-zero BY_HANDLE_FILE_INFORMATION is a valid value of
    // this plain C struct.
    let mut info: BY_HANDLE_FILE_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: the handle is open for the life of `file`; `info` is a valid
    // out pointer of the right type.
    let ok = unsafe { GetFileInformationByHandle(file.as_raw_handle() as _, &mut info) };
    if ok == 0 {
        return None;
    }
    let mut id = [0u8; 32];
    id[0] = 3;
    id[8..12].copy_from_slice(&info.dwVolumeSerialNumber.to_le_bytes());
    id[12..16].copy_from_slice(&info.nFileIndexHigh.to_le_bytes());
    id[16..20].copy_from_slice(&info.nFileIndexLow.to_le_bytes());
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device control helpers on a plain file handle, the one place
    /// Windows (and Wine) lets a test reach them without a spare disk: the
    /// disk IOCTLs fail on a file and fall back to its length; sparse and
    /// zero-data either work or report "unsupported".
    #[test]
    fn ioctl_helpers_on_a_file_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        make_sparse(&f).unwrap();
        f.set_len(1 << 20).unwrap();
        write_all_at(&f, &[7u8; 8192], 0).unwrap();
        let (len, sector) = block_device_geometry(&f).unwrap();
        assert_eq!(len, 1 << 20);
        assert!(sector.is_power_of_two() && sector >= 512);
        if punch_hole(&f, 0, 4096).unwrap() {
            let mut buf = [1u8; 4096];
            read_exact_at(&f, &mut buf, 0).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        }
        let mut rest = [0u8; 4096];
        read_exact_at(&f, &mut rest, 4096).unwrap();
        assert!(rest.iter().all(|&b| b == 7));
        match allocation(&f, 0, 1 << 20).unwrap() {
            Some(ext) => {
                assert!(
                    ext.windows(2).all(|w| w[0].end() < w[1].offset),
                    "sorted, disjoint, merged: {ext:?}"
                );
                let written = |e: &&crate::Extent| e.offset <= 4096 && e.end() >= 8192;
                assert!(ext.iter().any(|e| written(&e)), "{ext:?}");
                // The sparse file's tail was never written.
                assert!(ext.last().is_some_and(|e| e.end() < 1 << 20), "{ext:?}");
                eprintln!("allocated ranges: {ext:?}");
            }
            None => eprintln!("SKIP: this file system does not report allocated ranges"),
        }
        drop(f);
        let raw = open_raw(&path, false, true, false).unwrap();
        let mut buf = crate::align::AlignedBuf::new(4096, 4096);
        read_exact_at(&raw, buf.as_mut_slice(), 4096).unwrap();
        assert!(buf.as_slice().iter().all(|&b| b == 7));
        assert!(is_device_path(Path::new(r"\\.\C:")));
        assert!(is_device_path(Path::new(r"\\.\PhysicalDrive0")));
        assert!(!is_device_path(Path::new(r"C:\images\a.img")));
    }
}
