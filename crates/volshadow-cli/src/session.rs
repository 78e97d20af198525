//! One command's conversation with a volume: through its server when one
//! holds it, otherwise in-process. Large reads and writes go as pieces of
//! [`ops::PIECE`] bytes, so memory stays flat whatever the length.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use volshadow_cow::Volume;

use crate::ops::{self, Answer, Reply, Request, ShadowRow};
use crate::{control, report, storage};

#[derive(Debug)]
pub struct Session {
    img: PathBuf,
    /// Opened on the first request no server answered.
    local: Option<Volume>,
    /// Every shadow copy deleted to make room during this command.
    auto_deleted: Vec<ShadowRow>,
}

impl Session {
    pub fn new(img: &Path) -> Self {
        Session {
            img: img.to_path_buf(),
            local: None,
            auto_deleted: Vec::new(),
        }
    }

    /// Carries out one request; each shadow copy the delete-oldest policy
    /// removed meanwhile gets one stderr line, whether or not it failed.
    pub fn call(&mut self, req: &Request, payload: &[u8]) -> Result<(Reply, Vec<u8>)> {
        let answer = match &self.local {
            Some(vol) => local(vol, req, payload),
            None => match control::call(&self.img, req, payload)? {
                Some(a) => a,
                None => {
                    let vol = storage::open_volume(&self.img)?;
                    let a = local(&vol, req, payload);
                    self.local = Some(vol);
                    a
                }
            },
        };
        for s in &answer.auto_deleted {
            eprintln!("{}", report::stderr_line(s));
        }
        self.auto_deleted.extend(answer.auto_deleted);
        answer.result
    }

    /// Whether a server answered (the volume was not opened here).
    pub fn served(&self) -> bool {
        self.local.is_none()
    }

    /// Ids of the shadow copies deleted to make room so far, for `--json`.
    pub fn auto_deleted_ids(&self) -> Vec<uuid::Uuid> {
        self.auto_deleted.iter().map(|s| s.id).collect()
    }

    /// The volume's size in bytes.
    pub fn size(&mut self) -> Result<u64> {
        match self.call(&Request::Size, &[])?.0 {
            Reply::Size { bytes } => Ok(bytes),
            other => bail!("unexpected answer {other:?} to a size request"),
        }
    }

    /// Streams `length` bytes at `offset` (of `shadow`, or the live volume)
    /// into `out`, one piece at a time. The range is checked first, so a
    /// bad one writes nothing.
    pub fn read_to(
        &mut self,
        shadow: Option<&str>,
        offset: u64,
        length: u64,
        out: &mut dyn Write,
    ) -> Result<()> {
        let size = self.size()?;
        if offset.checked_add(length).is_none_or(|end| end > size) {
            bail!(
                "read of {length} bytes at offset {offset} is outside {} ({size} bytes)",
                self.img.display()
            );
        }
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = (end - at).min(ops::PIECE);
            let req = Request::Read {
                shadow: shadow.map(str::to_owned),
                offset: at,
                length: n,
            };
            let (_, data) = self.call(&req, &[])?;
            if data.len() as u64 != n {
                bail!("asked for {n} bytes at offset {at}, got {}", data.len());
            }
            out.write_all(&data)?;
            at += n;
        }
        out.flush()?;
        Ok(())
    }

    /// Writes everything `input` yields at `offset`, one piece at a time,
    /// then flushes once; returns the bytes written. A piece that fails
    /// stops the write and the error says how much went in before it.
    pub fn write_from(&mut self, offset: u64, input: &mut dyn Read) -> Result<u64> {
        let mut buf = vec![0u8; ops::PIECE as usize];
        let mut done = 0u64;
        loop {
            let n = fill(input, &mut buf).context("reading the input")?;
            if n == 0 {
                self.call(&Request::Flush, &[])?;
                return Ok(done);
            }
            let at = offset
                .checked_add(done)
                .context("offset and length overflow")?;
            let req = Request::Write {
                offset: at,
                length: n as u64,
            };
            if let Err(e) = self.call(&req, &buf[..n]) {
                if done == 0 {
                    return Err(e);
                }
                // Earlier pieces went in: say how much.
                bail!(
                    "{}; the {done} bytes before it, from offset {offset}, were written",
                    crate::one_line(&e)
                );
            }
            done += n as u64;
        }
    }
}

/// Reads until `buf` is full or the input ends.
fn fill(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// In-process: the request, then what the engine deleted during it.
fn local(vol: &Volume, req: &Request, payload: &[u8]) -> Answer {
    let result = ops::execute(vol, req, payload);
    Answer {
        result,
        auto_deleted: report::taken(vol),
    }
}

/// Runs one operation on the volume: through its server if one holds it,
/// otherwise in-process. Shadow copies deleted to make room are told on
/// stderr.
pub fn on_volume(img: &Path, req: &Request, payload: &[u8]) -> Result<(Reply, Vec<u8>)> {
    Session::new(img).call(req, payload)
}
