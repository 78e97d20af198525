//! The control channel of `volshadow serve`: other invocations hand their
//! operation to the server holding the volume instead of opening it. The
//! same protocol runs over a Unix socket or a Windows named pipe
//! (`channel`).
//!
//! One request per connection (except a snapshot set's conversation,
//! `member`): a JSON line, then `payload_len` raw bytes; the answer likewise (`{"ok": reply}` or `{"error": "..."}`, with the
//! shadow copies the delete-oldest policy removed meanwhile). Every
//! length a peer sends is checked before anything is allocated for it:
//! the request line, the payload and a read's length are bounded, so
//! nothing a client sends can make the server allocate without limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::channel::{self, Stream};
use crate::ops::{Answer, Request};

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Envelope<T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ok: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) payload_len: u64,
    /// Shadow copies deleted to make room while the request ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) auto_deleted: Vec<crate::ops::ShadowRow>,
}

/// Longest request line the server reads: requests are small JSON objects.
pub(crate) const MAX_REQUEST_LINE: u64 = 64 << 10;
/// Longest reply line a client reads (a diff of a large, fragmented volume
/// lists many extents); a guard against a broken server, not a quota.
pub(crate) const MAX_REPLY_LINE: u64 = 1 << 30;

pub(crate) fn send<T: Serialize>(
    w: &mut impl Write,
    env: &Envelope<T>,
    payload: &[u8],
) -> Result<()> {
    let mut line = serde_json::to_vec(env)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Reads one envelope: a line of at most `max_line` bytes, then a payload
/// of at most [`crate::ops::MAX_PIECE`] bytes.
pub(crate) fn receive<T: for<'de> Deserialize<'de>>(
    r: &mut impl BufRead,
    max_line: u64,
) -> Result<(Envelope<T>, Vec<u8>)> {
    let mut line = Vec::new();
    r.take(max_line).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        bail!("the control channel closed without a message");
    }
    if line.last() != Some(&b'\n') {
        bail!("control message line longer than {max_line} bytes or cut short");
    }
    let env: Envelope<T> = serde_json::from_slice(&line)?;
    if env.payload_len > crate::ops::MAX_PIECE {
        bail!(
            "payload of {} bytes is more than the control channel's limit of {} bytes",
            env.payload_len,
            crate::ops::MAX_PIECE
        );
    }
    let mut payload = vec![0u8; env.payload_len as usize];
    r.read_exact(&mut payload)?;
    Ok((env, payload))
}

/// Sends `req` to the server holding `img`. `Ok(None)` when no server is
/// listening (none, or a stale socket file), so the caller opens the volume.
/// A refused request is an answer too (`result` holds the error), so the
/// shadow copies deleted meanwhile are still told.
pub fn call(img: &Path, req: &Request, payload: &[u8]) -> Result<Option<Answer>> {
    let Some(stream) = channel::connect(img)? else {
        return Ok(None);
    };
    let mut w = &stream;
    send(
        &mut w,
        &Envelope {
            ok: Some(req),
            error: None,
            payload_len: payload.len() as u64,
            auto_deleted: Vec::new(),
        },
        payload,
    )?;
    let (env, data) = receive::<crate::ops::Reply>(&mut BufReader::new(&stream), MAX_REPLY_LINE)?;
    match (env.ok, env.error) {
        (Some(reply), _) => Ok(Some(Answer {
            result: Ok((reply, data)),
            auto_deleted: env.auto_deleted,
        })),
        (None, Some(e)) => Ok(Some(Answer {
            result: Err(anyhow!(e)),
            auto_deleted: env.auto_deleted,
        })),
        (None, None) => bail!("the server sent an empty answer"),
    }
}

/// A connection kept open for several requests: a snapshot set's
/// conversation with a server.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: Stream,
    reader: BufReader<Stream>,
}

impl Connection {
    /// `None` when no server holds `img`.
    pub(crate) fn open(img: &Path) -> Result<Option<Self>> {
        let Some(stream) = channel::connect(img)? else {
            return Ok(None);
        };
        // A server that stops answering (stopped, wedged) must not keep
        // the coordinator, and the volumes it opened, waiting for ever:
        // no step of a set takes longer than a hold may last.
        let step = Some(std::time::Duration::from_secs(75));
        stream.set_read_timeout(step)?;
        stream.set_write_timeout(step)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Some(Connection { stream, reader }))
    }

    /// One request and its answer; a refusal is an error.
    pub(crate) fn call(&mut self, req: &Request) -> Result<crate::ops::Reply> {
        send(
            &mut &self.stream,
            &Envelope {
                ok: Some(req),
                error: None,
                payload_len: 0,
                auto_deleted: Vec::new(),
            },
            &[],
        )?;
        let (env, _) = receive::<crate::ops::Reply>(&mut self.reader, MAX_REPLY_LINE)?;
        match (env.ok, env.error) {
            (Some(reply), _) => Ok(reply),
            (None, Some(e)) => Err(anyhow!(e)),
            (None, None) => bail!("the server sent an empty answer"),
        }
    }
}
