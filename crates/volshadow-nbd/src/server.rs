//! One NBD connection: fixed-newstyle handshake and option haggling, then
//! the transmission phase (`transmission.rs`). A protocol violation closes
//! that connection only; a bad request gets an NBD error reply and the
//! connection goes on.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Arc;

use tracing::debug;
use volshadow_block::{BlockDevice, Extent};

use crate::proto::*;
use crate::transmission::{self, Negotiated};

/// Produces the changed extents `(offset, len)` of an export within
/// `(offset, len)`, sorted: a BLOCK_STATUS request asks for its range only.
pub type ChangedFn = Arc<dyn Fn(u64, u64) -> Vec<Extent> + Send + Sync>;

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

pub(crate) const CONTEXT_ID_ALLOCATION: u32 = 1;
const CONTEXT_ID_CHANGED: u32 = 2;

struct Conn<'a, R: Read, W: Write> {
    exports: &'a dyn Exports,
    rd: BufReader<R>,
    wr: BufWriter<W>,
    no_zeroes: bool,
    structured: bool,
    contexts: Vec<u32>,
}

/// How one connection is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// Requests of the connection run at once (at least 1); worker threads
    /// beyond the calling one start as the queue needs them.
    pub workers: usize,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions { workers: 4 }
    }
}

/// Serves one client over `reader` / `writer` (two halves of a socket)
/// with the default [`ConnectionOptions`]. The crate's front page has a
/// complete example, a client's handshake and read included.
pub fn serve_connection<R: Read + Send, W: Write + Send>(
    exports: &dyn Exports,
    reader: R,
    writer: W,
) -> Result<()> {
    serve_connection_with(exports, reader, writer, ConnectionOptions::default())
}

/// Serves one client over `reader` / `writer` as `options` say.
pub fn serve_connection_with<R: Read + Send, W: Write + Send>(
    exports: &dyn Exports,
    reader: R,
    writer: W,
    options: ConnectionOptions,
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
    let negotiated = Negotiated {
        structured: c.structured,
        contexts: c.contexts,
    };
    transmission::run(&export, negotiated, options.workers.max(1), &mut c.rd, c.wr)
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
}
