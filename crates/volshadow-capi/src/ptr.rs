//! Checked conversions of the raw pointers C hands in. Every function here
//! is `unsafe` with the caller's promise spelled out; each one checks what
//! can be checked (null, length limits, UTF-8) and returns a `Failure`
//! naming the argument otherwise.

use std::ffi::{CStr, c_char};

use uuid::Uuid;
use volshadow_cow::Volume;

use crate::error::{Failure, VS_ERR_BUFFER_TOO_SMALL};
use crate::vs_volume;

/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid and
/// unchanged for `'a`.
pub(crate) unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not null, and NUL-terminated and live for 'a by the caller's
    // promise.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| Failure::invalid(format!("{what} is not UTF-8")))
}

/// # Safety
/// `p` is null or a handle from `vs_volume_create` / `vs_volume_open` not
/// yet given to `vs_volume_close`.
pub(crate) unsafe fn volume<'a>(p: *const vs_volume) -> Result<&'a Volume, Failure> {
    // SAFETY: null or a live handle (a `Box<vs_volume>` turned into a
    // pointer by `into_handle`), by the caller's promise.
    let handle = unsafe { p.as_ref() }.ok_or_else(|| Failure::null("volume"))?;
    Ok(&handle.volume)
}

/// A snapshot id: 16 bytes, as `vs_snapshot_info.id` holds it.
///
/// # Safety
/// `p` is null or points to 16 readable bytes.
pub(crate) unsafe fn id(p: *const u8, what: &str) -> Result<Uuid, Failure> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: 16 readable bytes by the caller's promise; `[u8; 16]` has
    // alignment 1, and read_unaligned copies them out.
    let bytes = unsafe { p.cast::<[u8; 16]>().read_unaligned() };
    Ok(Uuid::from_bytes(bytes))
}

fn check_len(len: usize, what: &str) -> Result<(), Failure> {
    if len > isize::MAX as usize {
        return Err(Failure::invalid(format!(
            "{what}: length {len} is too large"
        )));
    }
    Ok(())
}

/// # Safety
/// `p` is null with `len == 0`, or points to `len` readable bytes that
/// nothing writes for `'a`.
pub(crate) unsafe fn bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    check_len(len, what)?;
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not null, `len` readable bytes unchanged for 'a (the
    // caller's promise), `len` at most isize::MAX (checked).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// # Safety
/// `p` is null with `len == 0`, or points to `len` writable bytes that
/// nothing else touches for `'a`.
pub(crate) unsafe fn bytes_mut<'a>(
    p: *mut u8,
    len: usize,
    what: &str,
) -> Result<&'a mut [u8], Failure> {
    check_len(len, what)?;
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not null, `len` writable bytes used by nobody else for 'a
    // (the caller's promise), `len` at most isize::MAX (checked).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// Stores `value` in `*out`, or fails if `out` is null.
///
/// # Safety
/// `out` is null or valid for a write of a `T` (aligned).
pub(crate) unsafe fn store<T>(out: *mut T, value: T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not null, valid and aligned for a write by the caller's
    // promise; `write` does not drop the old (possibly uninitialised) value.
    unsafe { out.write(value) };
    Ok(())
}

/// Stores `value` in `*out` if `out` is not null (optional outputs).
///
/// # Safety
/// As [`store`].
pub(crate) unsafe fn store_if<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: not null, valid and aligned for a write by the caller's
        // promise.
        unsafe { out.write(value) };
    }
}

/// The caller-sized array convention: `*count` is set to how many items
/// there are; when `capacity` holds them all they are copied to `out`,
/// otherwise nothing is copied and the call fails with
/// `VS_ERR_BUFFER_TOO_SMALL` (ask again with a larger array).
///
/// # Safety
/// `count` is valid for a write of a `usize`; `out` is null with
/// `capacity == 0`, or valid for writes of `capacity` items.
pub(crate) unsafe fn fill<T: Copy>(
    items: &[T],
    out: *mut T,
    capacity: usize,
    count: *mut usize,
) -> Result<(), Failure> {
    // SAFETY: forwarded from the caller's promise about `count`.
    unsafe { store(count, items.len(), "count") }?;
    if items.len() > capacity {
        return Err(Failure::new(
            VS_ERR_BUFFER_TOO_SMALL,
            format!(
                "{} items do not fit in an array of {capacity}; *count says how many",
                items.len()
            ),
        ));
    }
    if items.is_empty() {
        return Ok(());
    }
    if out.is_null() {
        return Err(Failure::null("out"));
    }
    // SAFETY: `out` is valid for `capacity >= items.len()` writes by the
    // caller's promise, and cannot overlap `items`, which Rust owns.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), out, items.len()) };
    Ok(())
}
