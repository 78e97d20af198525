//! Windows named pipes for a local control channel: the equivalent of a
//! Unix socket with mode 0600 in a directory only its user reaches.
//!
//! - The pipe's security descriptor admits only the creating user,
//!   Administrators and SYSTEM, and names the user as owner; everyone else
//!   can neither connect nor add instances of the name.
//! - The first instance is created with `FILE_FLAG_FIRST_PIPE_INSTANCE`,
//!   so a name already served (by this user or by anyone squatting it) is
//!   refused instead of shared; `PIPE_REJECT_REMOTE_CLIENTS` keeps the
//!   pipe off the network.
//! - A client checks the owner of the pipe it reached (the current user,
//!   Administrators or SYSTEM) before it sends a byte, and connects at the
//!   identification impersonation level only.
//! - All I/O is overlapped, so reads and writes can time out (the control
//!   protocol bounds every step) and a read and a write may run at once
//!   from two threads.
//!
//! A pipe lives as long as a handle to it: one left by a crashed server
//! does not exist, so there is nothing stale to remove.

use std::ffi::c_void;
use std::io::{self, Read, Write};
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use windows_sys::Win32::Foundation::{
    ERROR_ACCESS_DENIED, ERROR_BROKEN_PIPE, ERROR_FILE_NOT_FOUND, ERROR_IO_PENDING, ERROR_NO_DATA,
    ERROR_PIPE_BUSY, ERROR_PIPE_CONNECTED, ERROR_SUCCESS, GENERIC_READ, GENERIC_WRITE, HANDLE,
    HLOCAL, INVALID_HANDLE_VALUE, LocalFree, WAIT_OBJECT_0, WAIT_TIMEOUT,
};
use windows_sys::Win32::Security::Authorization::{
    ConvertSecurityDescriptorToStringSecurityDescriptorW, ConvertSidToStringSidW,
    ConvertStringSecurityDescriptorToSecurityDescriptorW, GetSecurityInfo, SDDL_REVISION_1,
    SE_KERNEL_OBJECT,
};
use windows_sys::Win32::Security::{
    DACL_SECURITY_INFORMATION, EqualSid, GetTokenInformation, IsWellKnownSid,
    OWNER_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID, SECURITY_ATTRIBUTES, TOKEN_QUERY,
    TOKEN_USER, TokenUser, WinBuiltinAdministratorsSid, WinLocalSystemSid,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, FILE_FLAG_FIRST_PIPE_INSTANCE, FILE_FLAG_OVERLAPPED, OPEN_EXISTING,
    PIPE_ACCESS_DUPLEX, ReadFile, SECURITY_IDENTIFICATION, SECURITY_SQOS_PRESENT, WriteFile,
};
use windows_sys::Win32::System::IO::{CancelIoEx, GetOverlappedResult, OVERLAPPED};
use windows_sys::Win32::System::Pipes::{
    ConnectNamedPipe, CreateNamedPipeW, PIPE_READMODE_BYTE, PIPE_REJECT_REMOTE_CLIENTS,
    PIPE_TYPE_BYTE, PIPE_UNLIMITED_INSTANCES, PIPE_WAIT, WaitNamedPipeW,
};
use windows_sys::Win32::System::Threading::{
    CreateEventW, GetCurrentProcess, INFINITE, OpenProcessToken, WaitForSingleObject,
};

/// Buffer sizes the system is asked for in each direction (a hint).
const BUFFER: u32 = 64 << 10;

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(Some(0)).collect()
}

/// Memory the system allocated with `LocalAlloc`, freed once.
struct Local(*mut c_void);

impl Drop for Local {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from a call documented to allocate
            // with LocalAlloc and is freed only here.
            unsafe { LocalFree(self.0 as HLOCAL) };
        }
    }
}

/// A NUL-terminated UTF-16 string the system allocated, as a `String`.
fn take_wide(p: *mut u16) -> String {
    let owned = Local(p.cast());
    if p.is_null() {
        return String::new();
    }
    let mut len = 0;
    // SAFETY: `p` points to a NUL-terminated UTF-16 string the system
    // wrote; we read up to (not past) its terminator.
    while unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` units before the terminator are initialised and stay
    // allocated until `owned` drops below.
    let s = String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(p, len) });
    drop(owned);
    s
}

/// The current process's user: its `TOKEN_USER` buffer (the SID inside
/// points into it).
struct CurrentUser {
    buf: Vec<u64>,
}

impl CurrentUser {
    fn get() -> io::Result<CurrentUser> {
        let mut token: HANDLE = std::ptr::null_mut();
        // SAFETY: the pseudo-handle of the current process needs no
        // closing; `token` is a valid out pointer.
        if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: OpenProcessToken succeeded, so `token` is an open handle
        // owned by nobody else.
        let token = unsafe { OwnedHandle::from_raw_handle(token) };
        let mut needed = 0u32;
        // SAFETY: a size query: no buffer, `needed` receives the size.
        unsafe {
            GetTokenInformation(
                token.as_raw_handle(),
                TokenUser,
                std::ptr::null_mut(),
                0,
                &mut needed,
            )
        };
        if needed == 0 {
            return Err(io::Error::last_os_error());
        }
        // u64 units: TOKEN_USER holds pointers, so the buffer is aligned.
        let mut buf = vec![0u64; (needed as usize).div_ceil(8)];
        // SAFETY: `buf` has at least `needed` writable bytes, aligned for
        // TOKEN_USER.
        let ok = unsafe {
            GetTokenInformation(
                token.as_raw_handle(),
                TokenUser,
                buf.as_mut_ptr().cast(),
                (buf.len() * 8) as u32,
                &mut needed,
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(CurrentUser { buf })
    }

    fn sid(&self) -> PSID {
        // SAFETY: GetTokenInformation filled the buffer with a TOKEN_USER,
        // whose SID pointer points into the same buffer (alive with self).
        unsafe { (*self.buf.as_ptr().cast::<TOKEN_USER>()).User.Sid }
    }

    fn sid_string(&self) -> io::Result<String> {
        let mut s: *mut u16 = std::ptr::null_mut();
        // SAFETY: `sid()` is a valid SID; `s` receives a LocalAlloc'd
        // string that take_wide frees.
        if unsafe { ConvertSidToStringSidW(self.sid(), &mut s) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(take_wide(s))
    }
}

/// The security descriptor every instance of a control pipe gets.
struct Descriptor(Local);

// SAFETY: the descriptor is a block of memory owned by this value and
// never written after it is built; the system only reads it when an
// instance is created, so it may move to and be read from any thread.
unsafe impl Send for Descriptor {}
// SAFETY: as above: only ever read.
unsafe impl Sync for Descriptor {}

impl Descriptor {
    /// Protected DACL: full access for the user, Administrators and
    /// SYSTEM, nothing for anyone else; the user as owner, named outright
    /// (a token's default owner may be a group: Administrators when
    /// elevated, a users group under Wine), so a client can tell its own
    /// user's pipe from one another user made.
    fn owner_only() -> io::Result<Descriptor> {
        let user = CurrentUser::get()?.sid_string()?;
        Descriptor::from_sddl(&format!(
            "O:{user}D:P(A;;GA;;;{user})(A;;GA;;;BA)(A;;GA;;;SY)"
        ))
    }

    fn from_sddl(sddl: &str) -> io::Result<Descriptor> {
        let sddl = wide(sddl);
        let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
        // SAFETY: `sddl` is NUL-terminated and outlives the call; `sd`
        // receives a LocalAlloc'd descriptor that Local frees.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                sddl.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Descriptor(Local(sd)))
    }
}

/// The security descriptor of an open kernel object, as SDDL, with the
/// parts `info` asks for.
fn security_sddl(handle: HANDLE, info: u32) -> io::Result<String> {
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `handle` is open; only the descriptor out pointer is asked
    // for, and it receives a LocalAlloc'd block freed by `_sd` below.
    let err = unsafe {
        GetSecurityInfo(
            handle,
            SE_KERNEL_OBJECT,
            info,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    if err != ERROR_SUCCESS {
        return Err(io::Error::from_raw_os_error(err as i32));
    }
    let _sd = Local(sd);
    let mut s: *mut u16 = std::ptr::null_mut();
    // SAFETY: `sd` is a valid descriptor until `_sd` drops; `s` receives
    // a LocalAlloc'd string that take_wide frees.
    let ok = unsafe {
        ConvertSecurityDescriptorToStringSecurityDescriptorW(
            sd,
            SDDL_REVISION_1,
            info,
            &mut s,
            std::ptr::null_mut(),
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(take_wide(s))
}

/// Refuses a pipe whose owner is not the current user, Administrators or
/// SYSTEM: someone else created that name to hear what we would say.
fn check_owner(handle: HANDLE, name: &str) -> io::Result<()> {
    let mut owner: PSID = std::ptr::null_mut();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `handle` is open; `owner` points into the descriptor
    // returned in `sd`, which `_sd` frees after the last use of `owner`.
    let err = unsafe {
        GetSecurityInfo(
            handle,
            SE_KERNEL_OBJECT,
            OWNER_SECURITY_INFORMATION,
            &mut owner,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    if err != ERROR_SUCCESS {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "cannot tell who owns {name} ({}); refusing to talk to it",
                io::Error::from_raw_os_error(err as i32)
            ),
        ));
    }
    let _sd = Local(sd);
    let user = CurrentUser::get()?;
    // SAFETY: both SIDs are valid for the duration of these calls.
    let trusted = unsafe {
        !owner.is_null()
            && (EqualSid(owner, user.sid()) != 0
                || IsWellKnownSid(owner, WinBuiltinAdministratorsSid) != 0
                || IsWellKnownSid(owner, WinLocalSystemSid) != 0)
    };
    if trusted {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{name} is owned by another user; refusing to talk to it"),
        ))
    }
}

/// Runs one overlapped operation on `handle` to completion or until
/// `timeout`; returns the bytes transferred. The OVERLAPPED lives in this
/// frame, and the function never returns while the operation may still
/// use it (a timed-out one is cancelled and waited for).
fn overlapped(
    handle: HANDLE,
    timeout: Option<Duration>,
    start: impl FnOnce(*mut OVERLAPPED) -> i32,
) -> io::Result<u32> {
    // SAFETY: a manual-reset, unnamed, unsignalled event with default
    // security; the result is checked before use.
    let event = unsafe { CreateEventW(std::ptr::null(), 1, 0, std::ptr::null()) };
    if event.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CreateEventW succeeded; the handle is owned by nobody else.
    let event = unsafe { OwnedHandle::from_raw_handle(event) };
    // SAFETY: OVERLAPPED is plain data; all-zero is its documented
    // initial state (offsets are ignored for pipes).
    let mut ov: OVERLAPPED = unsafe { std::mem::zeroed() };
    ov.hEvent = event.as_raw_handle();
    let mut n = 0u32;
    if start(&mut ov) == 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(ERROR_IO_PENDING as i32) {
            // Failed at once: nothing is pending on `ov`.
            return Err(e);
        }
        let ms = timeout.map_or(INFINITE, |t| {
            u32::try_from(t.as_millis()).unwrap_or(INFINITE - 1).max(1)
        });
        // SAFETY: `event` is open for the duration of the wait.
        let waited = unsafe { WaitForSingleObject(event.as_raw_handle(), ms) };
        if waited == WAIT_TIMEOUT {
            // SAFETY: `ov` is the pending operation's; cancelling one that
            // has just completed is harmless.
            unsafe { CancelIoEx(handle, &ov) };
            // SAFETY: waits until the system is done with `ov` and `n`.
            if unsafe { GetOverlappedResult(handle, &ov, &mut n, 1) } == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the pipe's peer did not answer in time",
                ));
            }
            return Ok(n);
        }
        if waited != WAIT_OBJECT_0 {
            let e = io::Error::last_os_error();
            // SAFETY: as above: the operation must end before `ov` goes.
            unsafe {
                CancelIoEx(handle, &ov);
                GetOverlappedResult(handle, &ov, &mut n, 1);
            }
            return Err(e);
        }
    }
    // SAFETY: the operation has completed (synchronously or signalled);
    // this only collects its result.
    if unsafe { GetOverlappedResult(handle, &ov, &mut n, 1) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// The server end of a control pipe: accepts clients one at a time.
pub struct PipeListener {
    name: String,
    descriptor: Descriptor,
    /// The instance the next client connects to.
    next: OwnedHandle,
}

impl std::fmt::Debug for PipeListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeListener")
            .field("name", &self.name)
            .finish()
    }
}

fn create_instance(name: &str, sd: &Descriptor, first: bool) -> io::Result<OwnedHandle> {
    let wname = wide(name);
    let sa = SECURITY_ATTRIBUTES {
        nLength: size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: sd.0.0,
        bInheritHandle: 0,
    };
    let first_flag = if first {
        FILE_FLAG_FIRST_PIPE_INSTANCE
    } else {
        0
    };
    // SAFETY: `wname` is NUL-terminated and `sa` (and the descriptor it
    // points to) outlive the call; the result is checked.
    let h = unsafe {
        CreateNamedPipeW(
            wname.as_ptr(),
            PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED | first_flag,
            PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
            PIPE_UNLIMITED_INSTANCES,
            BUFFER,
            BUFFER,
            0,
            &sa,
        )
    };
    if h == INVALID_HANDLE_VALUE {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(c)
                if first && (c == ERROR_ACCESS_DENIED as i32 || c == ERROR_PIPE_BUSY as i32) =>
            {
                in_use(name)
            }
            _ => e,
        });
    }
    // SAFETY: CreateNamedPipeW succeeded; the handle is owned by nobody else.
    Ok(unsafe { OwnedHandle::from_raw_handle(h) })
}

fn in_use(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("{name} already exists: another process serves it"),
    )
}

/// Whether any instance of the pipe `name` exists, without connecting.
fn exists(name: &str) -> bool {
    let wname = wide(name);
    // SAFETY: `wname` is NUL-terminated and outlives the call.
    let free = unsafe { WaitNamedPipeW(wname.as_ptr(), 1) } != 0;
    free || io::Error::last_os_error().raw_os_error() != Some(ERROR_FILE_NOT_FOUND as i32)
}

impl PipeListener {
    /// Creates the pipe `name` (`\\.\pipe\...`). Fails with
    /// `AddrInUse` when any process already has an instance of that name.
    pub fn bind(name: &str) -> io::Result<PipeListener> {
        // FILE_FLAG_FIRST_PIPE_INSTANCE makes this atomic on Windows; Wine
        // ignores the flag, so a name that exists is refused here first.
        if exists(name) {
            return Err(in_use(name));
        }
        let sd = Descriptor::owner_only()?;
        let next = create_instance(name, &sd, true)?;
        Ok(PipeListener {
            name: name.to_string(),
            descriptor: sd,
            next,
        })
    }

    /// Waits for the next client; a new instance takes its place first,
    /// so clients arriving meanwhile wait for it rather than fail.
    pub fn accept(&mut self) -> io::Result<PipeStream> {
        let h = self.next.as_raw_handle();
        // SAFETY: `h` is this listener's open instance; ConnectNamedPipe
        // is given the OVERLAPPED `overlapped` owns until completion.
        let connected = overlapped(h, None, |ov| unsafe { ConnectNamedPipe(h, ov) });
        match connected {
            Ok(_) => {}
            // A client connected between CreateNamedPipe and Connect.
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_CONNECTED as i32) => {}
            // A client that came and went before being served: this
            // instance is spent; the caller's next accept gets a fresh one.
            Err(e) if e.raw_os_error() == Some(ERROR_NO_DATA as i32) => {
                self.next = create_instance(&self.name, &self.descriptor, false)?;
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "a client left before it was served",
                ));
            }
            Err(e) => return Err(e),
        }
        let fresh = create_instance(&self.name, &self.descriptor, false)?;
        let client = std::mem::replace(&mut self.next, fresh);
        Ok(PipeStream::new(client))
    }

    /// The pipe's owner and DACL as SDDL (`O:...D:P(A;;GA;;;...)...`).
    pub fn security(&self) -> io::Result<String> {
        security_sddl(
            self.next.as_raw_handle(),
            OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
        )
    }
}

#[derive(Debug)]
struct Timeouts {
    read: Option<Duration>,
    write: Option<Duration>,
}

/// One connected end of a control pipe: `Read` and `Write` (also through
/// `&PipeStream`), with time limits like a socket's.
#[derive(Debug, Clone)]
pub struct PipeStream {
    handle: Arc<OwnedHandle>,
    timeouts: Arc<Mutex<Timeouts>>,
}

impl PipeStream {
    fn new(handle: OwnedHandle) -> PipeStream {
        PipeStream {
            handle: Arc::new(handle),
            timeouts: Arc::new(Mutex::new(Timeouts {
                read: None,
                write: None,
            })),
        }
    }

    /// Connects to the pipe `name`, waiting up to `wait` while every
    /// instance is busy. `NotFound` when nothing serves that name;
    /// `PermissionDenied` when it is not ours (or not for us).
    pub fn connect(name: &str, wait: Duration) -> io::Result<PipeStream> {
        let wname = wide(name);
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: `wname` is NUL-terminated and outlives the call;
            // null security attributes and template are allowed.
            let h = unsafe {
                CreateFileW(
                    wname.as_ptr(),
                    GENERIC_READ | GENERIC_WRITE,
                    0,
                    std::ptr::null(),
                    OPEN_EXISTING,
                    FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
                    std::ptr::null_mut(),
                )
            };
            if h != INVALID_HANDLE_VALUE {
                // SAFETY: CreateFileW succeeded; nobody else owns `h`.
                let handle = unsafe { OwnedHandle::from_raw_handle(h) };
                check_owner(handle.as_raw_handle(), name)?;
                return Ok(PipeStream::new(handle));
            }
            let e = io::Error::last_os_error();
            let left = deadline.saturating_duration_since(Instant::now());
            match e.raw_os_error() {
                Some(c) if c == ERROR_PIPE_BUSY as i32 && !left.is_zero() => {
                    let ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1);
                    // SAFETY: `wname` is NUL-terminated; the result only
                    // says whether to try again, which the loop does anyway.
                    unsafe { WaitNamedPipeW(wname.as_ptr(), ms) };
                }
                Some(c) if c == ERROR_FILE_NOT_FOUND as i32 => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("nothing serves {name}"),
                    ));
                }
                _ => return Err(e),
            }
        }
    }

    /// Limit for each read; `None` waits for ever.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.lock().read = t;
        Ok(())
    }

    /// Limit for each write; `None` waits for ever.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.lock().write = t;
        Ok(())
    }

    /// Another handle on the same connection (sharing its time limits,
    /// as a socket's clones do).
    pub fn try_clone(&self) -> io::Result<PipeStream> {
        Ok(self.clone())
    }

    /// The pipe's DACL and owner as SDDL.
    pub fn security(&self) -> io::Result<String> {
        security_sddl(
            self.handle.as_raw_handle(),
            OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Timeouts> {
        self.timeouts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Read for &PipeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let timeout = self.lock().read;
        let h = self.handle.as_raw_handle();
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let ptr = buf.as_mut_ptr();
        // SAFETY: `buf` is valid for `len` bytes and outlives the
        // operation, which `overlapped` waits for before returning.
        let read = overlapped(h, timeout, |ov| unsafe {
            ReadFile(h, ptr, len, std::ptr::null_mut(), ov)
        });
        match read {
            Ok(n) => Ok(n as usize),
            // The peer closed its end: end of stream.
            Err(e) if e.raw_os_error() == Some(ERROR_BROKEN_PIPE as i32) => Ok(0),
            Err(e) => Err(e),
        }
    }
}

impl Write for &PipeStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let timeout = self.lock().write;
        let h = self.handle.as_raw_handle();
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let ptr = buf.as_ptr();
        // SAFETY: `buf` is valid for `len` bytes and outlives the
        // operation, which `overlapped` waits for before returning.
        let wrote = overlapped(h, timeout, |ov| unsafe {
            WriteFile(h, ptr, len, std::ptr::null_mut(), ov)
        });
        match wrote {
            Ok(n) => Ok(n as usize),
            Err(e) if matches!(e.raw_os_error(), Some(c) if c == ERROR_BROKEN_PIPE as i32 || c == ERROR_NO_DATA as i32) => {
                Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the pipe's peer closed it",
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// Written bytes are in the pipe once `write` returns.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for PipeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for PipeStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[path = "pipe_tests.rs"]
mod tests;
