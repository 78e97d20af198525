//! Windows console control events (Ctrl+C, Ctrl+Break, the console window
//! closed, log-off, shutdown) as one stop callback.
//!
//! The callback runs on the thread the system starts for the event, and
//! the handler returns only after it: for a closed console the system ends
//! the process as soon as the handler returns, so a stop that ran on
//! another thread (the way a signal-to-channel handler works) could be cut
//! half way. A callback that ends the process itself never returns.

use std::io;
use std::sync::OnceLock;

use windows_sys::Win32::System::Console::SetConsoleCtrlHandler;
use windows_sys::core::BOOL;

type Stop = Box<dyn Fn() + Send + Sync>;

static STOP: OnceLock<Stop> = OnceLock::new();

unsafe extern "system" fn handler(_event: u32) -> BOOL {
    match STOP.get() {
        Some(stop) => {
            stop();
            1
        }
        // Not ours to handle: the default handler ends the process.
        None => 0,
    }
}

/// Runs `stop` on every console control event. Once per process: a second
/// call fails with `AlreadyExists`.
pub fn on_console_stop(stop: impl Fn() + Send + Sync + 'static) -> io::Result<()> {
    if STOP.set(Box::new(stop)).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a console stop handler is already installed",
        ));
    }
    // SAFETY: `handler` is a plain function valid for the life of the
    // process and touches only the process-wide `STOP`.
    if unsafe { SetConsoleCtrlHandler(Some(handler), 1) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
