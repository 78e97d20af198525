//! Volumes: create, open, close, the live volume's I/O, verify, revert.

use std::ffi::c_char;
use std::sync::Arc;

use volshadow_block::{BlockDevice, OpenOptions, open_device};
use volshadow_cow::{FullPolicy, Volume, VolumeOptions};

use crate::error::{Failure, guard, vs_status};
use crate::{ptr, vs_volume};

/// When the diff area is full, delete the oldest snapshot and go on
/// (the default, as VSS).
pub const VS_POLICY_DELETE_OLDEST: u32 = 0;
/// When the diff area is full, refuse the write (`VS_ERR_NO_SPACE`) and
/// keep every snapshot.
pub const VS_POLICY_FAIL_WRITES: u32 = 1;

/// Options of a new volume. Start from `vs_volume_options_default()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct vs_volume_options {
    /// Bytes per chunk, a power of two from 4 KiB to 1 MiB (0: 16 KiB).
    pub chunk_size: u32,
    /// `VS_POLICY_DELETE_OLDEST` or `VS_POLICY_FAIL_WRITES`.
    pub policy: u32,
    /// Most bytes of old data kept (0: all the diff area holds).
    pub max_bytes: u64,
    /// Replace a diff area already on the device (else refused).
    pub overwrite: bool,
}

/// Result of `vs_volume_verify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct vs_verify_report {
    /// Preserved chunks reread and checked.
    pub checked: u64,
    /// Of those, chunks with a checksum but no blake3 hash.
    pub unhashed: u64,
    /// Chunks whose bytes do not match.
    pub mismatches: u64,
    /// Damage found outside the chunks (superblock, journal).
    pub problems: u64,
    /// True when nothing is damaged.
    pub clean: bool,
}

/// The default options: 16 KiB chunks, delete-oldest, no limit.
#[unsafe(no_mangle)]
pub extern "C" fn vs_volume_options_default() -> vs_volume_options {
    vs_volume_options {
        chunk_size: 0,
        policy: VS_POLICY_DELETE_OLDEST,
        max_bytes: 0,
        overwrite: false,
    }
}

fn engine_options(o: &vs_volume_options) -> Result<VolumeOptions, Failure> {
    let defaults = VolumeOptions::default();
    let policy = match o.policy {
        VS_POLICY_DELETE_OLDEST => FullPolicy::DeleteOldest,
        VS_POLICY_FAIL_WRITES => FullPolicy::FailWrites,
        other => return Err(Failure::invalid(format!("unknown policy {other}"))),
    };
    Ok(VolumeOptions {
        chunk_size: if o.chunk_size == 0 {
            defaults.chunk_size
        } else {
            o.chunk_size
        },
        max_bytes: (o.max_bytes != 0).then_some(o.max_bytes),
        policy,
        overwrite: o.overwrite,
        ..defaults
    })
}

/// Opens a file image, a block device or a Windows volume read-write.
fn device(path: &str) -> Result<Arc<dyn BlockDevice>, Failure> {
    Ok(Arc::from(open_device(path, &OpenOptions::new())?))
}

fn into_handle(volume: Volume) -> *mut vs_volume {
    Box::into_raw(Box::new(vs_volume { volume }))
}

/// Makes a new volume: writes a diff area on `diff_path` for the origin
/// at `origin_path` (both existing files or devices; see
/// `vs_image_create` and `vs_diff_area_len_for`) and opens it. `options`
/// may be null for the defaults. On success `*out` is a handle to close
/// with `vs_volume_close`; on failure it is left alone.
///
/// # Safety
/// The paths are null or NUL-terminated strings; `options` is null or
/// points to a `vs_volume_options`; `out` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_create(
    origin_path: *const c_char,
    diff_path: *const c_char,
    options: *const vs_volume_options,
    out: *mut *mut vs_volume,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about the paths.
        let (origin, diff) = unsafe {
            (
                ptr::text(origin_path, "origin_path")?,
                ptr::text(diff_path, "diff_path")?,
            )
        };
        // SAFETY: null or a readable `vs_volume_options`, by the caller's
        // promise.
        let options = unsafe { options.as_ref() }
            .copied()
            .unwrap_or_else(|| vs_volume_options_default());
        let options = engine_options(&options)?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let volume = Volume::create(device(origin)?, device(diff)?, options)?;
        // SAFETY: checked not null above; writable by the caller's promise.
        unsafe { ptr::store(out, into_handle(volume), "out") }
    })
}

/// Opens an existing volume, running recovery (a torn journal tail is cut,
/// non-persistent snapshots are dropped, an interrupted revert finishes).
/// The origin must be the one the diff area was made for.
///
/// # Safety
/// The paths are null or NUL-terminated strings; `out` is null or valid
/// for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_open(
    origin_path: *const c_char,
    diff_path: *const c_char,
    out: *mut *mut vs_volume,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about the paths.
        let (origin, diff) = unsafe {
            (
                ptr::text(origin_path, "origin_path")?,
                ptr::text(diff_path, "diff_path")?,
            )
        };
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let volume = Volume::open(device(origin)?, device(diff)?)?;
        // SAFETY: checked not null above; writable by the caller's promise.
        unsafe { ptr::store(out, into_handle(volume), "out") }
    })
}

/// Closes the volume (marks the journal clean, flushes) and frees the
/// handle, which is invalid afterwards whatever the status. Null is a
/// no-op. A close that fails still frees: the next open recovers.
///
/// # Safety
/// `volume` is null or a handle not yet closed, which no other thread uses
/// during or after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_close(volume: *mut vs_volume) -> vs_status {
    guard(|| {
        if volume.is_null() {
            return Ok(());
        }
        // SAFETY: a pointer from `into_handle` (a `Box`) not freed before,
        // and used by nobody else from here on: the caller's promise.
        let handle = unsafe { Box::from_raw(volume) };
        handle.volume.close()?;
        Ok(())
    })
}

/// Stores the volume's size in bytes in `*out`.
///
/// # Safety
/// `volume` is null or a live handle; `out` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_size(volume: *const vs_volume, out: *mut u64) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about `volume` and `out`.
        unsafe {
            let v = ptr::volume(volume)?;
            ptr::store(out, v.len(), "out")
        }
    })
}

/// Reads `len` bytes of the live volume at `offset` into `buf`.
///
/// # Safety
/// `volume` is null or a live handle; `buf` is null with `len` 0 or has
/// `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_read(
    volume: *const vs_volume,
    offset: u64,
    buf: *mut u8,
    len: usize,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about `volume` and `buf`.
        let (v, buf) = unsafe { (ptr::volume(volume)?, ptr::bytes_mut(buf, len, "buf")?) };
        v.read_at(buf, offset)?;
        Ok(())
    })
}

/// Writes `len` bytes from `buf` to the live volume at `offset`, through
/// the copy-on-write layer (old data is kept for the snapshots). A range
/// past the end fails with `VS_ERR_OUT_OF_RANGE` and writes nothing.
///
/// # Safety
/// `volume` is null or a live handle; `buf` is null with `len` 0 or has
/// `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_write(
    volume: *const vs_volume,
    offset: u64,
    buf: *const u8,
    len: usize,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about `volume` and `buf`.
        let (v, buf) = unsafe { (ptr::volume(volume)?, ptr::bytes(buf, len, "buf")?) };
        v.write_at(buf, offset)?;
        Ok(())
    })
}

/// Makes every completed write durable.
///
/// # Safety
/// `volume` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_flush(volume: *const vs_volume) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promise about `volume`.
        let v = unsafe { ptr::volume(volume) }?;
        v.flush()?;
        Ok(())
    })
}

/// Rereads every preserved chunk and checks it and the metadata; `*out`
/// (may be null) gets the counts. Damage is reported in `*out`, not as a
/// failure: the call fails only when verifying itself could not run.
///
/// # Safety
/// `volume` is null or a live handle; `out` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_verify(
    volume: *const vs_volume,
    out: *mut vs_verify_report,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promise about `volume`.
        let v = unsafe { ptr::volume(volume) }?;
        let report = v.verify()?;
        let summary = vs_verify_report {
            checked: report.checked,
            unhashed: report.unhashed,
            mismatches: report.mismatches.len() as u64,
            problems: report.problems.len() as u64,
            clean: report.is_clean(),
        };
        // SAFETY: the caller's promise about `out`.
        unsafe { ptr::store_if(out, summary) };
        Ok(())
    })
}

/// Rolls the live volume back to persistent snapshot `id` (16 bytes).
/// Newer snapshots stay readable; a crash part way resumes at open.
///
/// # Safety
/// `volume` is null or a live handle; `id` is null or has 16 readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_volume_revert(volume: *const vs_volume, id: *const u8) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about `volume` and `id`.
        let (v, id) = unsafe { (ptr::volume(volume)?, ptr::id(id, "id")?) };
        v.revert(id)?;
        Ok(())
    })
}
