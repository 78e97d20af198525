//! An NBD server (fixed newstyle) for volshadow: the live volume is served
//! read-write, each snapshot read-only.
//!
//! Options: GO, INFO, LIST, ABORT, STRUCTURED_REPLY, LIST_META_CONTEXT and
//! SET_META_CONTEXT with `base:allocation` and `volshadow:changed`.
//! Commands: READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS,
//! CACHE, DISC. Each connection runs on its own thread; the requests of
//! one connection run concurrently on a few workers (`transmission`).
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

/// Accepts clients on a Unix socket until `stop` is set.
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
