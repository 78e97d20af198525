//! An NBD server (fixed newstyle) for volshadow: the live volume is served
//! read-write, each snapshot read-only.
//!
//! Options: GO, INFO, LIST, ABORT, STARTTLS, STRUCTURED_REPLY,
//! LIST_META_CONTEXT and SET_META_CONTEXT with `base:allocation` and
//! `volshadow:changed`. Commands: READ, WRITE (FUA), FLUSH, TRIM,
//! WRITE_ZEROES, BLOCK_STATUS, CACHE, DISC. Each connection runs on its own
//! thread; the requests of one connection run concurrently on a few
//! workers (`transmission`). TLS (rustls) with x509 credentials, optional
//! or required (`tls`); the handshake has a time limit (`deadline`).
//!
//! # Guide
//!
//! Implement [`Exports`] to say what is offered: each [`Export`] is any
//! [`BlockDevice`](volshadow_block::BlockDevice) (a `Volume` for the live
//! volume, a `SnapshotView` for a snapshot; a read-only device is exported
//! read-only) and, optionally, a [`ChangedFn`] answering the
//! `volshadow:changed` context. Then serve a TCP or Unix listener with
//! [`serve`] (TLS and the other [`ServeOptions`] included), or one
//! connection you accepted yourself with [`serve_connection`]. Clients such as `nbdcopy`,
//! `qemu-img` or the kernel's `nbd-client` connect to it.
//!
//! # Example
//!
//! One export served on one connection, and a client reading 512 bytes
//! the NBD way (old-style `NBD_OPT_EXPORT_NAME`, one simple reply):
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use std::sync::Arc;
//! use volshadow_block::{BlockDevice, MemDevice};
//! use volshadow_nbd::proto::*;
//! use volshadow_nbd::{Export, Exports, serve_connection};
//!
//! struct One(Arc<MemDevice>);
//!
//! impl Exports for One {
//!     fn names(&self) -> Vec<String> {
//!         vec!["disk".into()]
//!     }
//!     fn open(&self, name: &str) -> Option<Export> {
//!         (name.is_empty() || name == "disk").then(|| Export {
//!             name: "disk".into(),
//!             description: "a RAM disk".into(),
//!             device: self.0.clone(),
//!             changed: None,
//!         })
//!     }
//! }
//!
//! # fn main() -> std::io::Result<()> {
//! let disk = Arc::new(MemDevice::new(1 << 20));
//! disk.write_at(&[0xAB; 512], 4096).map_err(std::io::Error::other)?;
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr()?;
//! let server = std::thread::spawn(move || {
//!     let (stream, _) = listener.accept()?;
//!     serve_connection(&One(disk), stream.try_clone()?, &stream)
//!         .map_err(std::io::Error::other)
//! });
//!
//! let mut c = TcpStream::connect(addr)?;
//! let mut greeting = [0u8; 18];
//! c.read_exact(&mut greeting)?;
//! assert_eq!(greeting[..8], NBDMAGIC.to_be_bytes());
//! c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
//! c.write_all(&IHAVEOPT.to_be_bytes())?;
//! c.write_all(&OPT_EXPORT_NAME.to_be_bytes())?;
//! c.write_all(&0u32.to_be_bytes())?; // "" is the default export
//! let mut size_flags = [0u8; 10];
//! c.read_exact(&mut size_flags)?;
//! assert_eq!(u64::from_be_bytes(size_flags[..8].try_into().unwrap()), 1 << 20);
//!
//! // READ 512 bytes at 4096, cookie 7.
//! c.write_all(&REQUEST_MAGIC.to_be_bytes())?;
//! c.write_all(&0u16.to_be_bytes())?;
//! c.write_all(&CMD_READ.to_be_bytes())?;
//! c.write_all(&7u64.to_be_bytes())?;
//! c.write_all(&4096u64.to_be_bytes())?;
//! c.write_all(&512u32.to_be_bytes())?;
//! let mut reply = [0u8; 16 + 512];
//! c.read_exact(&mut reply)?;
//! assert_eq!(reply[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
//! assert_eq!(reply[4..8], [0; 4]); // no error
//! assert_eq!(reply[8..16], 7u64.to_be_bytes());
//! assert!(reply[16..].iter().all(|&b| b == 0xAB));
//!
//! drop(c); // the server sees the client leave
//! let _ = server.join();
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod deadline;
mod export;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
mod listen;
pub mod proto;
mod server;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod test_certs;
pub mod tls;
mod transmission;

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use tracing::{info, warn};

pub use export::{ChangedFn, Error, Export, Exports};
pub use listen::{Listener, Stream};
pub use server::{
    ConnectionOptions, ServeOptions, serve_connection, serve_connection_with, serve_stream,
};
pub use tls::TlsMode;

/// Accepts clients on a TCP or Unix listener for ever, each on its own
/// thread. A client that fails (a broken handshake, a protocol violation,
/// a lost connection) ends only its own connection. With
/// [`ServeOptions::max_connections`] clients being served, a new one waits
/// up to 2 s for one of them to end, else it is closed before the
/// greeting. The process stops it (`volshadow serve` closes the volume and
/// exits on a signal).
///
/// # Example
///
/// The live volume of a copy-on-write volume, read-write, on a port the
/// system picks, plaintext (TLS: [`ServeOptions::tls`] from
/// [`tls::load_x509`]):
///
/// ```
/// use std::io::Read;
/// use std::net::{TcpListener, TcpStream};
/// use std::sync::Arc;
/// use volshadow_block::MemDevice;
/// use volshadow_cow::{Volume, VolumeOptions};
/// use volshadow_nbd::{Export, Exports, ServeOptions, proto::NBDMAGIC, serve};
///
/// #[derive(Debug)]
/// struct Live(Volume);
///
/// impl Exports for Live {
///     fn names(&self) -> Vec<String> {
///         vec!["live".into()]
///     }
///     fn open(&self, name: &str) -> Option<Export> {
///         matches!(name, "" | "live").then(|| Export {
///             name: "live".into(),
///             description: "live volume".into(),
///             device: Arc::new(self.0.clone()),
///             changed: None,
///         })
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let volume = Volume::create(
///     Arc::new(MemDevice::new(1 << 20)),
///     Arc::new(MemDevice::new(8 << 20)),
///     VolumeOptions::default(),
/// )?;
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let addr = listener.local_addr()?;
/// let exports = Arc::new(Live(volume));
/// std::thread::spawn(move || serve(listener, exports, ServeOptions::default()));
/// // ... `nbdcopy nbd://{addr}/live out.raw` ...
/// let mut greeting = [0u8; 8];
/// TcpStream::connect(addr)?.read_exact(&mut greeting)?;
/// assert_eq!(greeting, NBDMAGIC.to_be_bytes());
/// # Ok(())
/// # }
/// ```
pub fn serve<L: Listener>(listener: L, exports: Arc<dyn Exports>, options: ServeOptions) -> ! {
    let options = Arc::new(options);
    let slots = Arc::new(Slots::new(options.max_connections.max(1)));
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                warn!(error = %e, "cannot accept an NBD client");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream.peer();
        // A client that just left may still be flushing on its way out: a
        // new one waits a moment for its slot before it is turned away.
        let Some(slot) = Slots::take(&slots, SLOT_WAIT) else {
            warn!(%peer, limit = options.max_connections, "too many NBD clients; closing the new one");
            continue;
        };
        let (exports, options) = (exports.clone(), options.clone());
        let spawned = std::thread::Builder::new()
            .name("volshadow-nbd".into())
            .spawn({
                let peer = peer.clone();
                move || {
                    let _slot = slot;
                    match serve_stream(&*exports, stream, &options) {
                        Ok(()) => info!(%peer, "NBD client left"),
                        Err(e) => warn!(%peer, error = %e, "NBD connection closed"),
                    }
                }
            });
        if let Err(e) = spawned {
            // The closure (stream and slot) is dropped: the client is
            // closed and its count given back.
            warn!(%peer, error = %e, "cannot start a thread for an NBD client");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// How long a new client waits for a slot when every one is taken.
const SLOT_WAIT: Duration = Duration::from_secs(2);

/// The connections `serve` may run at once.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            free: Mutex::new(n),
            freed: Condvar::new(),
        }
    }

    /// A slot, waiting up to `wait` for one; `None` if none came free.
    fn take(slots: &Arc<Slots>, wait: Duration) -> Option<Slot> {
        let free = slots.free.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut free, _) = slots
            .freed
            .wait_timeout_while(free, wait, |n| *n == 0)
            .unwrap_or_else(PoisonError::into_inner);
        if *free == 0 {
            return None;
        }
        *free -= 1;
        Some(Slot(slots.clone()))
    }
}

/// One connection's slot; given back when its thread ends, however.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}
