//! Status codes, each thread's last error, and the guard every exported
//! function runs in (a panic becomes `VS_ERR_PANIC`, never unwinds into C).

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// What every function returns: `VS_OK` (0) or one of the `VS_ERR_*` codes.
pub type vs_status = i32;

/// Success.
pub const VS_OK: vs_status = 0;
/// A null pointer, text that is not UTF-8, an unknown constant, or options
/// the engine refuses.
pub const VS_ERR_INVALID_ARGUMENT: vs_status = 1;
/// No such snapshot, file or device.
pub const VS_ERR_NOT_FOUND: vs_status = 2;
/// The operating system reported an I/O error.
pub const VS_ERR_IO: vs_status = 3;
/// Another process (or handle) holds the file or device.
pub const VS_ERR_IN_USE: vs_status = 4;
/// A write to a snapshot, a read-only open or a closed volume.
pub const VS_ERR_READ_ONLY: vs_status = 5;
/// The diff area is full (fail-writes policy), or the snapshot limit.
pub const VS_ERR_NO_SPACE: vs_status = 6;
/// Damaged or foreign data: not a diff area, a newer format, a checksum
/// that does not match.
pub const VS_ERR_CORRUPT: vs_status = 7;
/// A range outside the volume. Nothing was read or written.
pub const VS_ERR_OUT_OF_RANGE: vs_status = 8;
/// Writes could not be held in time for a snapshot.
pub const VS_ERR_TIMEOUT: vs_status = 9;
/// An output array was too small; the count says how many are needed.
pub const VS_ERR_BUFFER_TOO_SMALL: vs_status = 10;
/// The file to create exists already.
pub const VS_ERR_EXISTS: vs_status = 11;
/// The diff area was made for another origin (or the origin was resized).
pub const VS_ERR_WRONG_ORIGIN: vs_status = 12;
/// An internal error (a Rust panic) was caught. Close the volume handle;
/// reopening runs recovery.
pub const VS_ERR_PANIC: vs_status = 99;

/// A failed call: its code and a message naming what failed and where.
#[derive(Debug)]
pub(crate) struct Failure {
    code: vs_status,
    message: String,
}

impl Failure {
    pub(crate) fn new(code: vs_status, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Failure::new(VS_ERR_INVALID_ARGUMENT, message)
    }

    pub(crate) fn null(what: &str) -> Self {
        Failure::invalid(format!("{what} is a null pointer"))
    }
}

fn code_of_kind(kind: io::ErrorKind) -> vs_status {
    use io::ErrorKind as K;
    match kind {
        K::InvalidInput => VS_ERR_INVALID_ARGUMENT,
        K::NotFound => VS_ERR_NOT_FOUND,
        K::AlreadyExists => VS_ERR_EXISTS,
        K::ResourceBusy | K::WouldBlock => VS_ERR_IN_USE,
        K::StorageFull | K::QuotaExceeded => VS_ERR_NO_SPACE,
        K::TimedOut => VS_ERR_TIMEOUT,
        K::InvalidData => VS_ERR_CORRUPT,
        _ => VS_ERR_IO,
    }
}

fn code_of_cow(e: &volshadow_cow::Error) -> vs_status {
    use volshadow_cow::Error as E;
    match e {
        E::Block(b) => code_of_block(b),
        E::InvalidOptions(_) => VS_ERR_INVALID_ARGUMENT,
        E::SnapshotNotFound(_) => VS_ERR_NOT_FOUND,
        E::DiffAreaFull { .. } | E::JournalTooSmall { .. } | E::TooManySnapshots(_) => {
            VS_ERR_NO_SPACE
        }
        E::ReadOnly(_) | E::SalvageReadOnly | E::Closed => VS_ERR_READ_ONLY,
        E::OriginMismatch { .. } => VS_ERR_WRONG_ORIGIN,
        E::Timeout(_) => VS_ERR_TIMEOUT,
        other => code_of_kind(other.kind()),
    }
}

fn code_of_block(e: &volshadow_block::Error) -> vs_status {
    use volshadow_block::Error as E;
    match e {
        E::OutOfRange { .. } => VS_ERR_OUT_OF_RANGE,
        E::ReadOnly { .. } => VS_ERR_READ_ONLY,
        E::InUse { .. } => VS_ERR_IN_USE,
        E::Invalid { .. } => VS_ERR_INVALID_ARGUMENT,
        // The volume and its snapshot views report the engine's errors
        // through the block layer; keep the engine's code.
        E::Layer { source, kind, .. } => source
            .downcast_ref::<volshadow_cow::Error>()
            .map_or_else(|| code_of_kind(*kind), code_of_cow),
        other => code_of_kind(other.kind()),
    }
}

impl From<volshadow_cow::Error> for Failure {
    fn from(e: volshadow_cow::Error) -> Self {
        Failure::new(code_of_cow(&e), e.to_string())
    }
}

impl From<volshadow_block::Error> for Failure {
    fn from(e: volshadow_block::Error) -> Self {
        Failure::new(code_of_block(&e), e.to_string())
    }
}

thread_local! {
    /// The last failure on this thread; replaced by the next one only, so
    /// a successful call leaves it readable (like `errno`).
    static LAST: RefCell<(vs_status, CString)> = RefCell::new((VS_OK, CString::default()));
}

fn record(failure: Failure) -> vs_status {
    // A message is text for people: a NUL inside it would cut it short.
    let message = CString::new(failure.message.replace('\0', " ")).unwrap_or_default();
    // `try_with`: during thread teardown the code is still returned.
    let _ = LAST.try_with(|last| *last.borrow_mut() = (failure.code, message));
    failure.code
}

/// Runs the body of an exported function: its failure is recorded as the
/// thread's last error, and a panic is caught and turned into
/// `VS_ERR_PANIC` (unwinding into C is undefined behaviour).
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Failure>) -> vs_status {
    // AssertUnwindSafe: after a panic the caller is told to close the
    // handle; nothing here is used again on the unwound state.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => VS_OK,
        Ok(Err(failure)) => record(failure),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            record(Failure::new(
                VS_ERR_PANIC,
                format!("internal error (a panic was caught): {what}"),
            ))
        }
    }
}

/// The code of the last failed call on this thread (`VS_OK` if none).
#[unsafe(no_mangle)]
pub extern "C" fn vs_last_error_code() -> vs_status {
    LAST.try_with(|last| last.borrow().0).unwrap_or(VS_OK)
}

/// The message of the last failed call on this thread: UTF-8, never null
/// (empty if none). Owned by the library: valid until the next call into
/// the library on this thread; copy it to keep it.
#[unsafe(no_mangle)]
pub extern "C" fn vs_last_error_message() -> *const c_char {
    LAST.try_with(|last| last.borrow().1.as_ptr())
        .unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    fn last_message() -> String {
        // SAFETY: never null, NUL-terminated, valid until the next call on
        // this thread.
        unsafe { CStr::from_ptr(vs_last_error_message()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = guard(|| panic!("boom at chunk 7"));
        assert_eq!(status, VS_ERR_PANIC);
        assert_eq!(vs_last_error_code(), VS_ERR_PANIC);
        assert!(
            last_message().contains("boom at chunk 7"),
            "{}",
            last_message()
        );
    }

    #[test]
    fn a_success_keeps_the_last_error_and_messages_lose_no_text() {
        assert_eq!(
            guard(|| Err(Failure::new(VS_ERR_IO, "disk\0gone"))),
            VS_ERR_IO
        );
        assert_eq!(guard(|| Ok(())), VS_OK);
        assert_eq!(vs_last_error_code(), VS_ERR_IO);
        assert_eq!(last_message(), "disk gone");
    }

    #[test]
    fn engine_errors_keep_their_code_through_the_block_layer() {
        let id = uuid::Uuid::nil();
        let layered = volshadow_cow::Error::SnapshotNotFound(id);
        let wrapped = volshadow_block::Error::Layer {
            device: "vol".into(),
            kind: layered.kind(),
            source: Box::new(layered),
        };
        assert_eq!(code_of_block(&wrapped), VS_ERR_NOT_FOUND);
        let full = volshadow_cow::Error::DiffAreaFull { used: 1, max: 1 };
        assert_eq!(code_of_cow(&full), VS_ERR_NO_SPACE);
    }
}
