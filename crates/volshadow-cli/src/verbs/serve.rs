//! `serve`: the volume over NBD, its control socket for the other verbs,
//! and a clean stop on a signal.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use volshadow_cow::Volume;

use crate::{control, control_server, exports, one_line, report, storage};

/// Deletions by NBD writes are logged within this long.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

pub(crate) fn serve(img: &Path, socket: Option<PathBuf>, listen: Option<String>) -> Result<()> {
    #[cfg(unix)]
    if let Some(path) = &socket {
        // The stale socket is removed before binding: never remove
        // anything else.
        crate::guard::refuse_volume_file(path, &[img.to_path_buf()], "the NBD socket")?;
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path)
            && !m.file_type().is_socket()
        {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
    }
    let vol = storage::open_volume(img)?;
    let reporter = Arc::new(report::Reporter::new(vol.clone()));
    control_server::serve(img, reporter.clone())?;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(REPORT_EVERY);
            reporter.drain();
        }
    });
    stop_on_signal(img, vol.clone(), socket.clone())?;
    let exports: Arc<dyn volshadow_nbd::Exports> = Arc::new(exports::VolumeExports::new(vol));
    let stop = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    if let Some(path) = socket {
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        eprintln!(
            "Serving {} on nbd+unix:///live?socket={} (shadow copies: export name = id).",
            img.display(),
            path.display()
        );
        volshadow_nbd::serve_unix(listener, exports, stop);
        return Ok(());
    }
    #[cfg(not(unix))]
    if socket.is_some() {
        bail!("--socket needs a Unix system; use --listen");
    }
    let addr = listen.unwrap_or_else(|| "127.0.0.1:10809".to_string());
    let listener =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!(
        "Serving {} on nbd://{}/live (shadow copies: export name = id).",
        img.display(),
        listener.local_addr()?
    );
    volshadow_nbd::serve_tcp(listener, exports, stop);
    Ok(())
}

/// On SIGINT, SIGTERM or SIGHUP (Ctrl+C or console close on Windows):
/// writes still in flight finish, the volume is closed cleanly (flushed,
/// journal marked), the sockets are removed, and the process exits 0.
/// Non-persistent shadow copies end with the process, as they would at a
/// crash, and recovery releases them at the next open.
fn stop_on_signal(img: &Path, vol: Volume, socket: Option<PathBuf>) -> Result<()> {
    let control = control::socket_path(img);
    ctrlc::set_handler(move || {
        eprintln!("volshadow: stopping: closing the volume");
        let code = match vol.close() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("volshadow: {}", one_line(&anyhow::Error::from(e)));
                1
            }
        };
        let _ = std::fs::remove_file(&control);
        if let Some(s) = &socket {
            let _ = std::fs::remove_file(s);
        }
        std::process::exit(code);
    })
    .context("cannot install the stop handler")
}
