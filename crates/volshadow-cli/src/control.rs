//! The control socket of `volshadow serve`: other invocations hand their
//! operation to the server holding the volume instead of opening it.
//!
//! One request per connection: a JSON line, then `payload_len` raw bytes;
//! the answer likewise (`{"ok": reply}` or `{"error": "..."}`).

use std::path::Path;

use anyhow::Result;
#[cfg(unix)]
use anyhow::{anyhow, bail};
#[cfg(unix)]
use serde::{Deserialize, Serialize};
#[cfg(unix)]
use std::io::{BufRead, BufReader, Write};
use volshadow_cow::Volume;

use crate::ops::{Reply, Request};

#[cfg(unix)]
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    payload_len: u64,
}

/// Largest payload accepted over the socket.
#[cfg(unix)]
const MAX_PAYLOAD: u64 = 1 << 30;

#[cfg(unix)]
fn send<T: Serialize>(w: &mut impl Write, env: &Envelope<T>, payload: &[u8]) -> Result<()> {
    let mut line = serde_json::to_vec(env)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

#[cfg(unix)]
fn receive<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead) -> Result<(Envelope<T>, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("the control socket closed without an answer");
    }
    let env: Envelope<T> = serde_json::from_str(&line)?;
    if env.payload_len > MAX_PAYLOAD {
        bail!("payload of {} bytes is too large", env.payload_len);
    }
    let mut payload = vec![0u8; env.payload_len as usize];
    r.read_exact(&mut payload)?;
    Ok((env, payload))
}

/// Sends `req` to the server on `socket`. `Ok(None)` when no server is
/// listening there (a stale socket file), so the caller opens the volume.
#[cfg(unix)]
pub fn call(socket: &Path, req: &Request, payload: &[u8]) -> Result<Option<(Reply, Vec<u8>)>> {
    use std::os::unix::net::UnixStream;
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let mut w = &stream;
    send(
        &mut w,
        &Envelope {
            ok: Some(req),
            error: None,
            payload_len: payload.len() as u64,
        },
        payload,
    )?;
    let (env, data) = receive::<Reply>(&mut BufReader::new(&stream))?;
    match (env.ok, env.error) {
        (Some(reply), _) => Ok(Some((reply, data))),
        (None, Some(e)) => Err(anyhow!(e)),
        (None, None) => bail!("the server sent an empty answer"),
    }
}

#[cfg(not(unix))]
pub fn call(_socket: &Path, _req: &Request, _payload: &[u8]) -> Result<Option<(Reply, Vec<u8>)>> {
    Ok(None)
}

/// Serves control requests for `vol` until the process ends.
#[cfg(unix)]
pub fn serve(socket: &Path, vol: Volume) -> Result<()> {
    use std::os::unix::net::{UnixListener, UnixStream};
    if UnixStream::connect(socket).is_ok() {
        bail!(
            "another server is already listening on {}",
            socket.display()
        );
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(|e| anyhow!("cannot listen on {}: {e}", socket.display()))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let vol = vol.clone();
            std::thread::spawn(move || {
                if let Err(e) = handle(&vol, &stream) {
                    tracing::warn!(error = %e, "control request failed");
                }
            });
        }
    });
    Ok(())
}

#[cfg(not(unix))]
pub fn serve(_socket: &Path, _vol: Volume) -> Result<()> {
    Ok(())
}

#[cfg(unix)]
fn handle(vol: &Volume, stream: &std::os::unix::net::UnixStream) -> Result<()> {
    let (env, payload) = receive::<Request>(&mut BufReader::new(stream))?;
    let Some(req) = env.ok else {
        bail!("request without an operation");
    };
    let mut w = stream;
    match crate::ops::execute(vol, &req, &payload) {
        Ok((reply, data)) => send(
            &mut w,
            &Envelope {
                ok: Some(reply),
                error: None,
                payload_len: data.len() as u64,
            },
            &data,
        ),
        Err(e) => send::<Reply>(
            &mut w,
            &Envelope {
                ok: None,
                error: Some(format!("{e:#}")),
                payload_len: 0,
            },
            &[],
        ),
    }
}
