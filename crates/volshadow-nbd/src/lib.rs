//! An NBD server (fixed newstyle) for volshadow: the live volume is served
//! read-write, each snapshot read-only.
//!
//! Options: GO, INFO, LIST, ABORT, STRUCTURED_REPLY, LIST_META_CONTEXT and
//! SET_META_CONTEXT with `base:allocation` and `volshadow:changed`.
//! Commands: READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS,
//! CACHE, DISC. Each connection runs on its own thread; the requests of
//! one connection run concurrently on a few workers (`transmission`).
//!
//! # Guide
//!
//! Implement [`Exports`] to say what is offered: each [`Export`] is any
//! [`BlockDevice`](volshadow_block::BlockDevice) (a `Volume` for the live
//! volume, a `SnapshotView` for a snapshot; a read-only device is exported
//! read-only) and, optionally, a [`ChangedFn`] answering the
//! `volshadow:changed` context. Then serve a [`TcpListener`] with
//! [`serve_tcp`], a Unix socket with `serve_unix`, or one connection you
//! accepted yourself with [`serve_connection`]. Clients such as `nbdcopy`,
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

#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;
mod server;
mod transmission;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{info, warn};

pub use server::{
    ChangedFn, ConnectionError, ConnectionOptions, Export, Exports, serve_connection,
    serve_connection_with,
};

/// Accepts TCP clients until `stop` is set, one thread each.
///
/// `stop` is looked at when a client arrives, so after setting it connect
/// once more to make the loop return.
///
/// # Example
///
/// The live volume of a copy-on-write volume, read-write, on a port the
/// system picks:
///
/// ```
/// use std::net::{TcpListener, TcpStream};
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use volshadow_block::MemDevice;
/// use volshadow_cow::{Volume, VolumeOptions};
/// use volshadow_nbd::{Export, Exports, serve_tcp};
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
/// let stop = Arc::new(AtomicBool::new(false));
/// let server = {
///     let stop = stop.clone();
///     std::thread::spawn(move || serve_tcp(listener, Arc::new(Live(volume)), stop))
/// };
/// // ... `nbdcopy nbd://{addr}/live out.raw` ...
/// stop.store(true, Ordering::Relaxed);
/// drop(TcpStream::connect(addr)?); // wakes the accept loop
/// server.join().expect("server thread");
/// # Ok(())
/// # }
/// ```
pub fn serve_tcp(listener: TcpListener, exports: Arc<dyn Exports>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let exports = exports.clone();
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        std::thread::spawn(move || {
            let Ok(reader) = stream.try_clone() else {
                return;
            };
            match serve_connection(&*exports, reader, &stream) {
                Ok(()) => info!(%peer, "NBD client left"),
                Err(e) => warn!(%peer, error = %e, "NBD connection closed"),
            }
        });
    }
}

/// Accepts clients on a Unix socket until `stop` is set (looked at when a
/// client arrives, as for [`serve_tcp`]). Clients name it as
/// `nbd+unix:///live?socket=PATH`.
///
/// # Example
///
/// ```
/// use std::os::unix::net::{UnixListener, UnixStream};
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use volshadow_block::MemDevice;
/// use volshadow_nbd::{Export, Exports, serve_unix};
///
/// struct Disk(Arc<MemDevice>);
///
/// impl Exports for Disk {
///     fn names(&self) -> Vec<String> {
///         vec!["disk".into()]
///     }
///     fn open(&self, _name: &str) -> Option<Export> {
///         Some(Export {
///             name: "disk".into(),
///             description: String::new(),
///             device: self.0.clone(),
///             changed: None,
///         })
///     }
/// }
///
/// # fn main() -> std::io::Result<()> {
/// let socket = std::env::temp_dir().join(format!("volshadow-doc-{}.sock", std::process::id()));
/// let _ = std::fs::remove_file(&socket);
/// let listener = UnixListener::bind(&socket)?;
/// let stop = Arc::new(AtomicBool::new(false));
/// let server = {
///     let stop = stop.clone();
///     let exports = Arc::new(Disk(Arc::new(MemDevice::new(1 << 20))));
///     std::thread::spawn(move || serve_unix(listener, exports, stop))
/// };
/// // ... `nbdinfo "nbd+unix:///disk?socket=$SOCKET"` ...
/// stop.store(true, Ordering::Relaxed);
/// drop(UnixStream::connect(&socket)?); // wakes the accept loop
/// server.join().expect("server thread");
/// std::fs::remove_file(&socket)?;
/// # Ok(())
/// # }
/// ```
#[cfg(unix)]
pub fn serve_unix(
    listener: std::os::unix::net::UnixListener,
    exports: Arc<dyn Exports>,
    stop: Arc<AtomicBool>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let exports = exports.clone();
        std::thread::spawn(move || {
            let Ok(reader) = stream.try_clone() else {
                return;
            };
            if let Err(e) = serve_connection(&*exports, reader, &stream) {
                warn!(error = %e, "NBD connection closed");
            }
        });
    }
}
