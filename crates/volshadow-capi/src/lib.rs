//! A C ABI for volshadow, for programs written in C, C++ or Go.
//!
//! The header `include/volshadow.h` is generated from this crate by
//! cbindgen (`cbindgen --config cbindgen.toml --output include/volshadow.h`
//! in this directory); CI fails when the committed header is stale.
//!
//! # Conventions
//!
//! - Every function returns a [`vs_status`]: [`VS_OK`] (0) or a `VS_ERR_*`
//!   code. After a failure, [`vs_last_error_code`] and
//!   [`vs_last_error_message`] tell what failed and where, per thread.
//! - No Rust panic crosses the boundary: one is caught and returned as
//!   [`VS_ERR_PANIC`].
//! - A volume is an opaque [`vs_volume`] handle, made by
//!   [`vs_volume_create`] or [`vs_volume_open`] and freed by
//!   [`vs_volume_close`]. It may be used from several threads at once;
//!   nothing may use it during or after `vs_volume_close`.
//! - Text is UTF-8 and NUL-terminated; paths name file images, Linux block
//!   devices or Windows volumes (`\\.\D:`). Snapshot ids are 16 bytes
//!   ([`VS_ID_LEN`]); [`vs_id_format`] and [`vs_id_parse`] convert them.
//! - Arrays the library fills are the caller's: pass a capacity, get the
//!   count; when it does not fit the call fails with
//!   [`VS_ERR_BUFFER_TOO_SMALL`] and the count says how many to make room
//!   for.
//!
//! # Example
//!
//! The same calls a C program makes, here from Rust:
//!
//! ```
//! use std::ffi::CString;
//! use volshadow_capi::*;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let img = CString::new(dir.path().join("disk.img").to_str().unwrap()).unwrap();
//! let dif = CString::new(dir.path().join("disk.diff").to_str().unwrap()).unwrap();
//! let mut vol = std::ptr::null_mut();
//! let mut snap = vs_snapshot_info::default();
//! // SAFETY: valid NUL-terminated paths, a valid out pointer, a handle
//! // used only before it is closed.
//! unsafe {
//!     assert_eq!(vs_image_create(img.as_ptr(), 1 << 20), VS_OK);
//!     assert_eq!(vs_image_create(dif.as_ptr(), vs_diff_area_len_for(1 << 20, 0)), VS_OK);
//!     assert_eq!(vs_volume_create(img.as_ptr(), dif.as_ptr(), std::ptr::null(), &mut vol), VS_OK);
//!     assert_eq!(vs_snapshot_create(vol, true, &mut snap), VS_OK);
//!     assert_eq!(vs_volume_write(vol, 0, b"new".as_ptr(), 3), VS_OK);
//!     let mut old = [1u8; 3];
//!     assert_eq!(vs_snapshot_read(vol, snap.id.as_ptr(), 0, old.as_mut_ptr(), 3), VS_OK);
//!     assert_eq!(old, [0; 3]);
//!     assert_eq!(vs_volume_close(vol), VS_OK);
//! }
//! ```
#![allow(non_camel_case_types)]

mod error;
mod ptr;
mod snapshot;
mod volume;

use std::ffi::c_char;

use uuid::Uuid;
use volshadow_block::{BlockDevice, FileImage};

pub use error::*;
pub use snapshot::*;
pub use volume::*;

/// Bytes of a snapshot id.
pub const VS_ID_LEN: usize = 16;
/// Bytes of an id as text, with its NUL: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub const VS_ID_STRING_LEN: usize = 37;

/// A volume: an origin device behind the copy-on-write layer, with its
/// diff area. Opaque; see `vs_volume_create`.
#[derive(Debug)]
pub struct vs_volume {
    volume: volshadow_cow::Volume,
}

/// The library's version, e.g. "0.1.0" (static, never freed).
#[unsafe(no_mangle)]
pub extern "C" fn vs_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Creates a sparse file image of `size` bytes at `path`, for an origin or
/// a diff area. Fails with `VS_ERR_EXISTS` if `path` exists (nothing is
/// ever truncated).
///
/// # Safety
/// `path` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_image_create(path: *const c_char, size: u64) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promise about `path`.
        let path = unsafe { ptr::text(path, "path") }?;
        let image = FileImage::create(path, size)?;
        image.flush()?;
        Ok(())
    })
}

/// The size to give a diff-area device so that it holds `capacity` bytes
/// of old data in chunks of `chunk_size` bytes (0: the default, 16 KiB).
#[unsafe(no_mangle)]
pub extern "C" fn vs_diff_area_len_for(capacity: u64, chunk_size: u32) -> u64 {
    let chunk = if chunk_size == 0 {
        volshadow_cow::DEFAULT_CHUNK_SIZE
    } else {
        chunk_size
    };
    volshadow_cow::Volume::diff_area_len_for(capacity, chunk)
}

/// Writes the id at `id` (16 bytes) as lowercase hyphenated text with a
/// NUL into `out`, which holds `VS_ID_STRING_LEN` bytes.
///
/// # Safety
/// `id` is null or points to 16 readable bytes; `out` is null or points to
/// `VS_ID_STRING_LEN` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_id_format(id: *const u8, out: *mut c_char) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promise about `id`.
        let id = unsafe { ptr::id(id, "id") }?;
        // SAFETY: the caller's promise about `out`.
        let out = unsafe { ptr::bytes_mut(out.cast(), VS_ID_STRING_LEN, "out") }?;
        id.hyphenated()
            .encode_lower(&mut out[..VS_ID_STRING_LEN - 1]);
        out[VS_ID_STRING_LEN - 1] = 0;
        Ok(())
    })
}

/// Parses an id written as text (hyphenated or not) into `out` (16 bytes).
///
/// # Safety
/// `text` is null or a NUL-terminated string; `out` is null or points to
/// 16 writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_id_parse(text: *const c_char, out: *mut u8) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promise about `text`.
        let text = unsafe { ptr::text(text, "text") }?;
        let id = Uuid::parse_str(text)
            .map_err(|e| Failure::invalid(format!("{text:?} is not an id: {e}")))?;
        // SAFETY: the caller's promise about `out`.
        let out = unsafe { ptr::bytes_mut(out, VS_ID_LEN, "out") }?;
        out.copy_from_slice(id.as_bytes());
        Ok(())
    })
}
