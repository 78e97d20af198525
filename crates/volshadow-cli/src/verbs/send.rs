//! `send`: a shadow copy (or what changed since an older one) as a
//! self-describing stream (docs/FORMAT.md) to a file or standard output,
//! or to object storage (`--to s3://…`). Read through the volume's server
//! when one holds it, a megabyte at a time.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use uuid::Uuid;
use volshadow_replica::{Header, Kind, StreamWriter};

use crate::ops::{self, Reply, Request, ShadowRow};
use crate::output::progress;
use crate::session::Session;
use crate::{guard, storage};

/// Changed extents are asked for a window of the volume at a time, so
/// their list stays small whatever the volume's size.
const WINDOW: u64 = 1 << 30;
/// Pieces read ahead of the stream's writer.
const AHEAD: usize = 4;

/// What is being sent, and the session to read it through.
pub(crate) struct Source {
    pub(crate) session: Session,
    pub(crate) volume_id: Uuid,
    pub(crate) len: u64,
    pub(crate) chunk_size: u32,
    pub(crate) shadow: ShadowRow,
    pub(crate) base: Option<Uuid>,
}

impl Source {
    pub(crate) fn open(img: &Path, shadow: &str, since: Option<&str>) -> Result<Self> {
        let (binding, _) = storage::read_binding(img)?;
        let mut session = Session::new(img);
        let shadows = match session.call(&Request::ListShadows, &[])?.0 {
            Reply::Shadows { shadows } => shadows,
            other => bail!("unexpected answer {other:?} to a listing"),
        };
        let id = ops::resolve_among(&shadows, shadow)?;
        let Some(row) = shadows.iter().find(|s| s.id == id).cloned() else {
            bail!("no shadow copy {id}");
        };
        let base = match since {
            Some(b) => {
                let b = ops::resolve_among(&shadows, b)?;
                let older = shadows.iter().any(|s| s.id == b && s.seq < row.seq);
                if !older {
                    bail!("--since {b} must be a shadow copy older than {id}");
                }
                Some(b)
            }
            None => None,
        };
        let chunk_size = match session.call(&Request::Usage, &[])?.0 {
            Reply::Usage { usage, .. } => usage.chunk_size,
            other => bail!("unexpected answer {other:?} to a usage request"),
        };
        let len = session.size()?;
        Ok(Source {
            session,
            volume_id: binding.volume_id,
            len,
            chunk_size,
            shadow: row,
            base,
        })
    }

    pub(crate) fn created_ns(&self) -> u64 {
        (self.shadow.created * 1e9) as u64
    }

    /// The changed extents of `offset..offset+length` (all of it for a
    /// full send).
    pub(crate) fn extents_in(&mut self, offset: u64, length: u64) -> Result<Vec<(u64, u64)>> {
        let end = (offset + length).min(self.len);
        let Some(base) = self.base else {
            return Ok(vec![(offset, end - offset)]);
        };
        let req = Request::DiffIn {
            from: base.to_string(),
            to: Some(self.shadow.id.to_string()),
            offset,
            length: end - offset,
        };
        match self.session.call(&req, &[])?.0 {
            Reply::Extents { extents, .. } => {
                Ok(extents.into_iter().map(|e| (e.offset, e.len)).collect())
            }
            other => bail!("unexpected answer {other:?} to a diff"),
        }
    }

    /// `length` bytes (at most [`ops::MAX_PIECE`]) of the shadow copy.
    pub(crate) fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>> {
        let req = Request::Read {
            shadow: Some(self.shadow.id.to_string()),
            offset,
            length,
        };
        let (_, data) = self.session.call(&req, &[])?;
        if data.len() as u64 != length {
            bail!(
                "asked for {length} bytes at offset {offset}, got {}",
                data.len()
            );
        }
        Ok(data)
    }

    /// Bytes a send reads: the volume, or what changed since the base.
    pub(crate) fn total(&mut self) -> Result<u64> {
        let mut total = 0;
        let mut w = 0;
        while w < self.len {
            total += self.extents_in(w, WINDOW)?.iter().map(|e| e.1).sum::<u64>();
            w += WINDOW;
        }
        Ok(total)
    }

    /// Calls `f` with every piece (at most `piece` bytes, not crossing a
    /// multiple of `piece`) of the extents to send, in offset order. The
    /// reads run on a second thread, a few pieces ahead of `f` (hashing
    /// and writing), so the two overlap in bounded memory.
    pub(crate) fn each_piece(
        &mut self,
        piece: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(AHEAD);
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut read_all = || -> Result<()> {
                    let mut w = 0;
                    while w < self.len {
                        for (off, len) in self.extents_in(w, WINDOW)? {
                            let mut at = off;
                            while at < off + len {
                                let n = (off + len - at).min(piece - at % piece);
                                let data = self.read(at, n)?;
                                if tx.send(Ok((at, data))).is_err() {
                                    // The consumer stopped; its error wins.
                                    return Ok(());
                                }
                                at += n;
                            }
                        }
                        w += WINDOW;
                    }
                    Ok(())
                };
                if let Err(e) = read_all() {
                    let _ = tx.send(Err(e));
                }
            });
            for item in rx {
                let (at, data) = item?;
                f(at, &data)?;
            }
            Ok(())
        })
    }
}

/// `send` to a file or standard output.
pub(crate) fn send(
    img: &Path,
    shadow: &str,
    since: Option<&str>,
    output: Option<&Path>,
    json: bool,
) -> Result<()> {
    let to_stdout = output.is_none_or(|p| p == Path::new("-"));
    if to_stdout && std::io::stdout().is_terminal() {
        bail!("refusing to write a stream to a terminal; give --output FILE or pipe it");
    }
    let mut src = Source::open(img, shadow, since)?;
    let header = Header {
        kind: Kind::Stream,
        chunk_size: src.chunk_size,
        volume_len: src.len,
        volume_id: src.volume_id,
        shadow_id: src.shadow.id,
        base_id: src.base,
        created_ns: src.created_ns(),
        piece: ops::PIECE as u32,
    };
    let total = src.total()?;
    let bar = progress(total, "sending");
    // A regular file (new or replaced) is flushed at the end and removed
    // if the send fails; anything else (a pipe, a device) is only written.
    let file = output.filter(|p| !to_stdout && std::fs::metadata(p).map_or(true, |m| m.is_file()));
    let out: Box<dyn Write> = match output.filter(|_| !to_stdout) {
        Some(p) => {
            guard::refuse_volume_file(p, &[img.to_path_buf()], "the stream")?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(file.is_some())
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?;
            Box::new(f)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let out = std::io::BufWriter::with_capacity(256 << 10, out);
    let sent = (|| -> Result<u64> {
        let mut w = StreamWriter::new(out, header)?;
        src.each_piece(ops::PIECE, |at, data| {
            w.push(at, data)?;
            bar.inc(data.len() as u64);
            Ok(())
        })?;
        let covered = w.covered();
        let out = w.finish()?;
        if let Some(p) = file {
            drop(out);
            // Windows flushes only through a handle open for writing.
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)?
                .sync_all()?;
        }
        Ok(covered)
    })();
    bar.finish_and_clear();
    let covered = match sent {
        Ok(c) => c,
        Err(e) => {
            if let Some(p) = file {
                let _ = std::fs::remove_file(p);
                return Err(e.context(format!("sending to {} (removed)", p.display())));
            }
            return Err(e);
        }
    };
    let what = if src.base.is_some() {
        "incremental"
    } else {
        "full"
    };
    // Standard output may be the stream itself.
    let report = |line: String| {
        if to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    if json {
        report(
            serde_json::json!({"kind": "sent", "shadow": src.shadow.id, "since": src.base,
                "bytes": covered, "stream": what})
            .to_string(),
        );
    } else {
        report(format!(
            "Sent shadow copy {} ({what}, {} of the volume).",
            src.shadow.id,
            ops::human_size(covered)
        ));
    }
    Ok(())
}
