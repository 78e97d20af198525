//! One NBD connection: fixed-newstyle handshake, option haggling, then
//! the transmission phase. A protocol violation closes that connection
//! only; a bad request gets an NBD error reply and the connection goes on.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Arc;

use tracing::{debug, warn};
use volshadow_block::{BlockDevice, Extent};

use crate::proto::*;

/// Produces the changed extents `(offset, len)` of an export, sorted.
pub type ChangedFn = Arc<dyn Fn() -> Vec<(u64, u64)> + Send + Sync>;

/// One export: a device and, optionally, its changed extents.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Extents changed since the export's base (the previous snapshot, or
    /// the newest one for the live volume): the `volshadow:changed` context.
    pub changed: Option<ChangedFn>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("read_only", &self.device.is_read_only())
            .finish_non_exhaustive()
    }
}

/// What a server offers.
pub trait Exports: Send + Sync {
    /// Export names, the default export first.
    fn names(&self) -> Vec<String>;
    /// The export called `name`; `""` is the default export.
    fn open(&self, name: &str) -> Option<Export>;
}

/// Why a connection ended other than by a clean disconnect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("I/O error on the connection: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

type Result<T> = std::result::Result<T, ConnectionError>;

fn violation<T>(msg: impl Into<String>) -> Result<T> {
    Err(ConnectionError::Protocol(msg.into()))
}

const CONTEXT_ID_ALLOCATION: u32 = 1;
const CONTEXT_ID_CHANGED: u32 = 2;

struct Conn<'a, R: Read, W: Write> {
    exports: &'a dyn Exports,
    rd: BufReader<R>,
    wr: BufWriter<W>,
    no_zeroes: bool,
    structured: bool,
    contexts: Vec<u32>,
}

/// Serves one client over `reader` / `writer` (two halves of a socket).
pub fn serve_connection<R: Read, W: Write>(
    exports: &dyn Exports,
    reader: R,
    writer: W,
) -> Result<()> {
    let mut c = Conn {
        exports,
        rd: BufReader::new(reader),
        wr: BufWriter::new(writer),
        no_zeroes: false,
        structured: false,
        contexts: Vec::new(),
    };
    let Some(export) = c.handshake()? else {
        return Ok(());
    };
    debug!(export = %export.name, "transmission phase");
    c.transmission(&export)
}

fn errno(e: &volshadow_block::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::PermissionDenied => EPERM,
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::StorageFull => ENOSPC,
        _ => EIO,
    }
}

impl<R: Read, W: Write> Conn<'_, R, W> {
    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.rd.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.rd.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn opt_reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        self.wr.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
        self.wr.write_all(&opt.to_be_bytes())?;
        self.wr.write_all(&kind.to_be_bytes())?;
        self.wr.write_all(&(data.len() as u32).to_be_bytes())?;
        self.wr.write_all(data)?;
        self.wr.flush()
    }

    fn opt_error(&mut self, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
        self.opt_reply(opt, kind, msg.as_bytes())
    }

    fn transmission_flags(export: &Export) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
        if export.device.is_read_only() {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        f
    }

    /// Option haggling. `Ok(None)`: the client ended the session.
    fn handshake(&mut self) -> Result<Option<Export>> {
        self.wr.write_all(&NBDMAGIC.to_be_bytes())?;
        self.wr.write_all(&IHAVEOPT.to_be_bytes())?;
        self.wr
            .write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        self.wr.flush()?;
        let client = self.read_u32()?;
        if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return violation(format!("unknown client flags {client:#x}"));
        }
        self.no_zeroes = client & FLAG_C_NO_ZEROES != 0;
        loop {
            let magic = self.read_u64()?;
            if magic != IHAVEOPT {
                return violation(format!("bad option magic {magic:#x}"));
            }
            let opt = self.read_u32()?;
            let len = self.read_u32()?;
            if len > MAX_OPTION {
                // Not worth reading; the client is broken or hostile.
                let _ = self.opt_error(opt, REP_ERR_TOO_BIG, "option too large");
                return violation(format!("option {opt} of {len} bytes"));
            }
            let mut data = vec![0u8; len as usize];
            self.rd.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(export) = self.exports.open(&name) else {
                        return violation(format!("unknown export {name:?}"));
                    };
                    self.wr.write_all(&export.device.len().to_be_bytes())?;
                    self.wr
                        .write_all(&Self::transmission_flags(&export).to_be_bytes())?;
                    if !self.no_zeroes {
                        self.wr.write_all(&[0u8; 124])?;
                    }
                    self.wr.flush()?;
                    return Ok(Some(export));
                }
                OPT_ABORT => {
                    let _ = self.opt_reply(opt, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.opt_error(opt, REP_ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    for name in self.exports.names() {
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        self.opt_reply(opt, REP_SERVER, &d)?;
                    }
                    self.opt_reply(opt, REP_ACK, &[])?;
                }
                OPT_STARTTLS => self.opt_error(opt, REP_ERR_POLICY, "TLS is not offered")?,
                OPT_INFO | OPT_GO => {
                    let Some(req) = parse_info(&data) else {
                        self.opt_error(opt, REP_ERR_INVALID, "malformed INFO/GO")?;
                        continue;
                    };
                    let Some(export) = self.exports.open(&req.name) else {
                        self.opt_error(opt, REP_ERR_UNKNOWN, "no such export")?;
                        continue;
                    };
                    self.send_info(opt, &export, &req.infos)?;
                    self.opt_reply(opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        return Ok(Some(export));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.opt_error(opt, REP_ERR_INVALID, "takes no data")?;
                        continue;
                    }
                    self.structured = true;
                    self.opt_reply(opt, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, &data)?,
                _ => self.opt_error(opt, REP_ERR_UNSUP, "option not supported")?,
            }
        }
    }

    fn send_info(&mut self, opt: u32, export: &Export, asked: &[u16]) -> io::Result<()> {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&export.device.len().to_be_bytes());
        d.extend_from_slice(&Self::transmission_flags(export).to_be_bytes());
        self.opt_reply(opt, REP_INFO, &d)?;
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&4096u32.to_be_bytes());
        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.opt_reply(opt, REP_INFO, &d)?;
        if asked.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(export.name.as_bytes());
            self.opt_reply(opt, REP_INFO, &d)?;
        }
        if asked.contains(&INFO_DESCRIPTION) {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(export.description.as_bytes());
            self.opt_reply(opt, REP_INFO, &d)?;
        }
        Ok(())
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let Some(req) = parse_meta(data) else {
            return self.opt_error(opt, REP_ERR_INVALID, "malformed meta context request");
        };
        if opt == OPT_SET_META_CONTEXT && !self.structured {
            return self.opt_error(opt, REP_ERR_INVALID, "structured replies first");
        }
        let Some(export) = self.exports.open(&req.export) else {
            return self.opt_error(opt, REP_ERR_UNKNOWN, "no such export");
        };
        let mut available = vec![(CONTEXT_ID_ALLOCATION, CONTEXT_BASE_ALLOCATION)];
        if export.changed.is_some() {
            available.push((CONTEXT_ID_CHANGED, CONTEXT_CHANGED));
        }
        let list = opt == OPT_LIST_META_CONTEXT;
        let chosen: Vec<(u32, &str)> = available
            .into_iter()
            .filter(|(_, name)| {
                (list && req.queries.is_empty())
                    || req.queries.iter().any(|q| {
                        q == name || (list && q.ends_with(':') && name.starts_with(q.as_str()))
                    })
            })
            .collect();
        for (id, name) in &chosen {
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            self.opt_reply(opt, REP_META_CONTEXT, &d)?;
        }
        if !list {
            self.contexts = chosen.iter().map(|(id, _)| *id).collect();
        }
        self.opt_reply(opt, REP_ACK, &[])
    }

    fn simple_reply(&mut self, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
        self.wr.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
        self.wr.write_all(&error.to_be_bytes())?;
        self.wr.write_all(&cookie.to_be_bytes())?;
        self.wr.write_all(data)?;
        self.wr.flush()
    }

    fn chunk(&mut self, cookie: u64, flags: u16, kind: u16, payload: &[&[u8]]) -> io::Result<()> {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        self.wr.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
        self.wr.write_all(&flags.to_be_bytes())?;
        self.wr.write_all(&kind.to_be_bytes())?;
        self.wr.write_all(&cookie.to_be_bytes())?;
        self.wr.write_all(&(len as u32).to_be_bytes())?;
        for p in payload {
            self.wr.write_all(p)?;
        }
        Ok(())
    }

    /// An error reply: structured where the command requires it.
    fn error(&mut self, req: &Request, error: u32, msg: &str) -> io::Result<()> {
        if self.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
            let mut p = error.to_be_bytes().to_vec();
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg.as_bytes());
            self.chunk(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &[&p])?;
            self.wr.flush()
        } else {
            self.simple_reply(req.cookie, error, &[])
        }
    }

    fn transmission(&mut self, export: &Export) -> Result<()> {
        let dev = export.device.clone();
        let size = dev.len();
        loop {
            let mut hdr = [0u8; Request::LEN];
            match self.rd.read_exact(&mut hdr) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let req = match Request::parse(&hdr) {
                Ok(r) => r,
                Err(e) => return violation(format!("bad request: {e:?}")),
            };
            let in_range = req
                .offset
                .checked_add(req.length as u64)
                .is_some_and(|end| end <= size);
            match req.kind {
                CMD_WRITE => {
                    if req.length > MAX_PAYLOAD {
                        let _ = self.error(&req, EINVAL, "write too large");
                        return violation(format!("write of {} bytes", req.length));
                    }
                    let mut data = vec![0u8; req.length as usize];
                    self.rd.read_exact(&mut data)?;
                    if dev.is_read_only() {
                        self.error(&req, EPERM, "read-only export")?;
                    } else if !in_range {
                        self.error(&req, EINVAL, "write past the end")?;
                    } else {
                        let r = dev.write_at(&data, req.offset).and_then(|()| {
                            if req.flags & CMD_FLAG_FUA != 0 {
                                dev.flush()
                            } else {
                                Ok(())
                            }
                        });
                        self.finish(&req, r)?;
                    }
                }
                CMD_READ => {
                    if req.length > MAX_PAYLOAD || !in_range {
                        self.error(&req, EINVAL, "read out of range or too large")?;
                        continue;
                    }
                    let mut data = vec![0u8; req.length as usize];
                    match dev.read_at(&mut data, req.offset) {
                        Ok(()) if self.structured => {
                            if data.is_empty() {
                                self.chunk(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])?;
                            } else {
                                self.chunk(
                                    req.cookie,
                                    REPLY_FLAG_DONE,
                                    REPLY_TYPE_OFFSET_DATA,
                                    &[&req.offset.to_be_bytes(), &data],
                                )?;
                            }
                            self.wr.flush()?;
                        }
                        Ok(()) => self.simple_reply(req.cookie, 0, &data)?,
                        Err(e) => self.error(&req, errno(&e), &e.to_string())?,
                    }
                }
                CMD_DISC => {
                    let _ = dev.flush();
                    return Ok(());
                }
                CMD_FLUSH => {
                    let r = dev.flush();
                    self.finish(&req, r)?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    if dev.is_read_only() {
                        self.error(&req, EPERM, "read-only export")?;
                    } else if !in_range {
                        self.error(&req, EINVAL, "range past the end")?;
                    } else {
                        let zero_write =
                            req.kind == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_NO_HOLE != 0;
                        let r = if zero_write {
                            write_zeros(&*dev, req.offset, req.length as u64)
                        } else {
                            dev.discard(req.offset, req.length as u64)
                        };
                        let r = r.and_then(|()| {
                            if req.flags & CMD_FLAG_FUA != 0 {
                                dev.flush()
                            } else {
                                Ok(())
                            }
                        });
                        self.finish(&req, r)?;
                    }
                }
                CMD_CACHE => {
                    if in_range {
                        self.simple_reply(req.cookie, 0, &[])?;
                    } else {
                        self.error(&req, EINVAL, "range past the end")?;
                    }
                }
                CMD_BLOCK_STATUS => self.block_status(&req, export, in_range)?,
                other => {
                    warn!(command = other, "unknown NBD command");
                    self.error(&req, EINVAL, "unknown command")?;
                }
            }
        }
    }

    fn finish(&mut self, req: &Request, r: volshadow_block::Result<()>) -> io::Result<()> {
        match r {
            Ok(()) => self.simple_reply(req.cookie, 0, &[]),
            Err(e) => self.error(req, errno(&e), &e.to_string()),
        }
    }

    fn block_status(&mut self, req: &Request, export: &Export, in_range: bool) -> io::Result<()> {
        if !self.structured || self.contexts.is_empty() {
            return self.error(req, EINVAL, "no metadata context negotiated");
        }
        if !in_range || req.length == 0 {
            return self.error(req, EINVAL, "range past the end");
        }
        let (off, len) = (req.offset, req.length as u64);
        let contexts = self.contexts.clone();
        for (i, id) in contexts.iter().enumerate() {
            let descs: Vec<(u32, u32)> = match *id {
                CONTEXT_ID_ALLOCATION => match export.device.allocation(off, len) {
                    Ok(Some(ext)) => ext
                        .iter()
                        .map(|e: &Extent| {
                            let flags = if e.data { 0 } else { STATE_HOLE | STATE_ZERO };
                            (e.len as u32, flags)
                        })
                        .collect(),
                    Ok(None) => vec![(len as u32, 0)],
                    Err(e) => return self.error(req, errno(&e), &e.to_string()),
                },
                _ => {
                    let changed = export.changed.as_ref().map(|f| f()).unwrap_or_default();
                    changed_descriptors(&changed, off, len)
                }
            };
            let descs = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                descs.into_iter().take(1).collect()
            } else {
                descs
            };
            let mut payload = id.to_be_bytes().to_vec();
            for (l, f) in descs {
                payload.extend_from_slice(&l.to_be_bytes());
                payload.extend_from_slice(&f.to_be_bytes());
            }
            let flags = if i + 1 == contexts.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            self.chunk(req.cookie, flags, REPLY_TYPE_BLOCK_STATUS, &[&payload])?;
        }
        self.wr.flush()
    }
}

/// Descriptors of `off..off+len` from sorted changed extents.
fn changed_descriptors(changed: &[(u64, u64)], off: u64, len: u64) -> Vec<(u32, u32)> {
    let end = off + len;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut push = |n: u64, flag: u32| {
        if n == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == flag => last.0 += n as u32,
            _ => out.push((n as u32, flag)),
        }
    };
    let mut at = off;
    for &(s, l) in changed {
        let (s, e) = (s.max(off), (s + l).min(end));
        if s >= e {
            continue;
        }
        push(s.saturating_sub(at), 0);
        push(e - s.max(at), STATE_CHANGED);
        at = e;
    }
    push(end.saturating_sub(at), 0);
    out
}

fn write_zeros(dev: &dyn BlockDevice, mut off: u64, mut len: u64) -> volshadow_block::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(zeros.len() as u64);
        dev.write_at(&zeros[..n as usize], off)?;
        off += n;
        len -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_descriptors_cover_the_range() {
        let ch = [(4096u64, 4096u64), (16384, 8192)];
        assert_eq!(
            changed_descriptors(&ch, 0, 32768),
            vec![(4096, 0), (4096, 1), (8192, 0), (8192, 1), (8192, 0)]
        );
        assert_eq!(changed_descriptors(&ch, 6000, 100), vec![(100, 1)]);
        assert_eq!(changed_descriptors(&[], 0, 10), vec![(10, 0)]);
    }
}
