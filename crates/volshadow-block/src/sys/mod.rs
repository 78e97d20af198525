//! Operating-system specific code. The only place in the workspace allowed
//! to contain `unsafe`, and each block says why it is sound.

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub(crate) use unix::*;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub(crate) use windows::*;

#[cfg(windows)]
mod console;
#[cfg(windows)]
mod pipe;
#[cfg(windows)]
pub use console::on_console_stop;
#[cfg(windows)]
pub use pipe::{PipeListener, PipeStream};
