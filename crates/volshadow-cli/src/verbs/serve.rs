//! `serve`: the volume over NBD, its control channel for the other verbs,
//! and a clean stop on a signal.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use volshadow_cow::Volume;
use volshadow_nbd::{ServeOptions, TlsMode};

use crate::args::{ServeArgs, TlsPolicy};
use crate::ops::resolve;
use crate::{control_server, exports, one_line, report, storage};

/// Deletions by NBD writes are logged within this long.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    let img = args.volume.as_path();
    let socket = args.socket.clone();
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
    #[cfg(not(unix))]
    if socket.is_some() {
        bail!("--socket needs a Unix system; use --listen");
    }
    let options = serve_options(&args)?;
    let addr = args
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:10809".to_string());
    if socket.is_none() {
        refuse_open_network(&addr, &options, args.insecure)?;
    }
    let vol = storage::open_volume(img)?;
    let only = offered_exports(&vol, &args.exports)?;
    let reporter = Arc::new(report::Reporter::new(vol.clone()));
    control_server::serve(img, reporter.clone())?;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(REPORT_EVERY);
            reporter.drain();
        }
    });
    stop_on_signal(img, vol.clone(), socket.clone())?;
    let exports: Arc<dyn volshadow_nbd::Exports> = Arc::new(exports::VolumeExports::new(vol, only));
    let tls = match &options.tls {
        TlsMode::Off => "",
        TlsMode::Allow(_) => ", TLS offered",
        TlsMode::Require(_) => ", TLS required",
    };
    let ro = if options.read_only { ", read-only" } else { "" };
    #[cfg(unix)]
    if let Some(path) = socket {
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let scheme = if tls.is_empty() {
            "nbd+unix"
        } else {
            "nbds+unix"
        };
        eprintln!(
            "Serving {} on {scheme}:///live?socket={} (shadow copies: export name = id{tls}{ro}).",
            img.display(),
            path.display()
        );
        volshadow_nbd::serve(listener, exports, options);
    }
    let listener =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    let scheme = if tls.is_empty() { "nbd" } else { "nbds" };
    eprintln!(
        "Serving {} on {scheme}://{}/live (shadow copies: export name = id{tls}{ro}).",
        img.display(),
        listener.local_addr()?
    );
    volshadow_nbd::serve(listener, exports, options)
}

/// What `--tls-creds`, `--tls`, `--tls-verify-peer` and `--read-only` ask.
fn serve_options(args: &ServeArgs) -> Result<ServeOptions> {
    let tls = match &args.tls_creds {
        None => TlsMode::Off,
        Some(dir) => {
            let config = volshadow_nbd::tls::load_x509(dir, args.tls_verify_peer)?;
            match args.tls.unwrap_or(TlsPolicy::Require) {
                TlsPolicy::Require => TlsMode::Require(config),
                TlsPolicy::Allow => TlsMode::Allow(config),
            }
        }
    };
    Ok(ServeOptions {
        tls,
        read_only: args.read_only,
        max_connections: args.max_connections as usize,
        ..ServeOptions::default()
    })
}

/// Without TLS required, anyone who reaches a TCP port may read and write
/// the volume: that is only the default on loopback.
fn refuse_open_network(addr: &str, options: &ServeOptions, insecure: bool) -> Result<()> {
    if insecure || matches!(options.tls, TlsMode::Require(_)) {
        return Ok(());
    }
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot listen on {addr}"))?
        .collect();
    if addrs.iter().all(|a| a.ip().is_loopback()) {
        return Ok(());
    }
    bail!(
        "refusing to listen on {addr} without TLS: anyone who can reach it could read and \
         write the volume. Give --tls-creds DIR (TLS required), listen on 127.0.0.1, \
         or add --insecure if the network is trusted"
    )
}

/// The export names `--export` asks for (`live`, full shadow copy ids),
/// or `None` for all.
fn offered_exports(vol: &Volume, asked: &[String]) -> Result<Option<Vec<String>>> {
    if asked.is_empty() {
        return Ok(None);
    }
    let mut names = Vec::new();
    for name in asked {
        let name = if name == "live" {
            name.clone()
        } else {
            resolve(vol, name)
                .with_context(|| format!("--export {name}"))?
                .to_string()
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(Some(names))
}

/// On SIGINT, SIGTERM or SIGHUP, or on Windows Ctrl+C, Ctrl+Break, the
/// console closed, log-off or shutdown: writes still in flight finish,
/// the volume is closed cleanly (flushed, journal marked), the sockets are
/// removed, and the process exits 0. Non-persistent shadow copies end
/// with the process, as they would at a crash, and recovery releases them
/// at the next open.
fn stop_on_signal(img: &Path, vol: Volume, socket: Option<PathBuf>) -> Result<()> {
    let img = img.to_path_buf();
    let stop = move || {
        eprintln!("volshadow: stopping: closing the volume");
        let code = match vol.close() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("volshadow: {}", one_line(&anyhow::Error::from(e)));
                1
            }
        };
        crate::channel::remove(&img);
        if let Some(s) = &socket {
            let _ = std::fs::remove_file(s);
        }
        std::process::exit(code);
    };
    // ctrlc hands a Windows console event to another thread and returns at
    // once, and for a closed console Windows ends the process as soon as
    // the handler returns: the close could be cut short. The block layer's
    // handler runs the stop before returning.
    #[cfg(windows)]
    let installed = volshadow_block::on_console_stop(stop).map_err(anyhow::Error::from);
    #[cfg(unix)]
    let installed = ctrlc::set_handler(stop).map_err(anyhow::Error::from);
    installed.context("cannot install the stop handler")
}
