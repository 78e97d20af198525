//! Where the control channel of a running `serve` is, and the stream it
//! speaks over; the protocol on top (`control`, `control_server`,
//! `member`) is the same on every system.
//!
//! - Unix: a socket beside the image, `IMG.vshadow.sock` (a device's is
//!   in the state directory, see `storage::sidecar_base`), mode 0600. A
//!   socket file left by a crashed server answers no one; the next server
//!   removes it.
//! - Windows: a named pipe, `\\.\pipe\volshadow-<volume id>-<tag>`, the
//!   volume id read from `IMG.vshadow` and the tag derived from the
//!   image's full path (copies of a volume bound again with `rebind` keep
//!   its id, and each must reach its own server). Only the user, the
//!   Administrators and SYSTEM may open it, one server owns the name
//!   (`volshadow_block::PipeListener`), and a client refuses a pipe
//!   someone else owns. A pipe dies with its process: a crash leaves
//!   nothing to clean up.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use uuid::Uuid;

/// One control connection.
#[cfg(unix)]
pub(crate) type Stream = std::os::unix::net::UnixStream;
#[cfg(windows)]
pub(crate) type Stream = volshadow_block::PipeStream;

/// `IMG.vshadow.sock`: the control socket of a running `serve`.
#[cfg(unix)]
pub fn socket_path(img: &Path) -> std::path::PathBuf {
    let mut s = crate::storage::sidecar_base(img).into_os_string();
    s.push(".vshadow.sock");
    std::path::PathBuf::from(s)
}

/// The control pipe of the server of `img` holding volume `volume_id`.
#[cfg(windows)]
pub(crate) fn pipe_name(img: &Path, volume_id: Uuid) -> String {
    // Both ends spell the image the same way whatever path they were
    // given; a device path (`\\.\D:`) that cannot be resolved is taken
    // as written.
    let full = std::fs::canonicalize(img)
        .or_else(|_| std::path::absolute(img))
        .unwrap_or_else(|_| img.to_path_buf());
    let key = full.to_string_lossy().to_lowercase();
    let tag = Uuid::new_v5(&volume_id, key.as_bytes())
        .simple()
        .to_string();
    format!(r"\\.\pipe\volshadow-{volume_id}-{}", &tag[..12])
}

/// A connection to the server holding `img`, or `None` when none runs
/// (also when a socket file or a binding was left by one that crashed).
#[cfg(unix)]
pub(crate) fn connect(img: &Path) -> Result<Option<Stream>> {
    Ok(Stream::connect(socket_path(img)).ok())
}

/// How long a client waits while every instance of a pipe is busy (the
/// server makes the next one as soon as it accepts).
#[cfg(windows)]
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(windows)]
pub(crate) fn connect(img: &Path) -> Result<Option<Stream>> {
    // Without a binding there is no volume, and no server; opening it
    // says why.
    let Ok((binding, _)) = crate::storage::read_binding(img) else {
        return Ok(None);
    };
    let name = pipe_name(img, binding.volume_id);
    match Stream::connect(&name, BUSY_WAIT) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => bail!(
            "cannot reach the server of {} through {name}: {e}",
            img.display()
        ),
    }
}

/// The server's end: accepts control connections.
#[derive(Debug)]
pub(crate) struct Listener {
    #[cfg(unix)]
    inner: std::os::unix::net::UnixListener,
    #[cfg(windows)]
    inner: volshadow_block::PipeListener,
}

impl Listener {
    /// Listens for the server of `img`, which holds volume `volume_id`;
    /// refused while another server listens for it.
    #[cfg(unix)]
    pub(crate) fn bind(img: &Path, _volume_id: Uuid) -> Result<Listener> {
        use std::os::unix::fs::PermissionsExt;
        let socket = &socket_path(img);
        if Stream::connect(socket).is_ok() {
            bail!(
                "another server is already listening on {}",
                socket.display()
            );
        }
        // Nothing answers: a stale socket file (or none).
        let _ = std::fs::remove_file(socket);
        let inner = std::os::unix::net::UnixListener::bind(socket)
            .map_err(|e| anyhow!("cannot listen on {}: {e}", socket.display()))?;
        // Connecting needs write permission: only the owner.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| anyhow!("cannot restrict {}: {e}", socket.display()))?;
        Ok(Listener { inner })
    }

    #[cfg(windows)]
    pub(crate) fn bind(img: &Path, volume_id: Uuid) -> Result<Listener> {
        let name = pipe_name(img, volume_id);
        match volshadow_block::PipeListener::bind(&name) {
            Ok(inner) => Ok(Listener { inner }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
                "another server is already listening on {name} (for {})",
                img.display()
            ),
            Err(e) => Err(anyhow!("cannot listen on {name}: {e}")),
        }
    }

    /// The next client.
    pub(crate) fn accept(&mut self) -> std::io::Result<Stream> {
        #[cfg(unix)]
        return self.inner.accept().map(|(s, _)| s);
        #[cfg(windows)]
        return self.inner.accept();
    }
}

/// Removes what a stopping server leaves behind: its socket file on Unix;
/// a pipe ends with its process.
pub(crate) fn remove(img: &Path) {
    #[cfg(unix)]
    let _ = std::fs::remove_file(socket_path(img));
    #[cfg(windows)]
    let _ = img;
}
