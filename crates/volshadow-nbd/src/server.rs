//! One NBD connection: fixed-newstyle handshake and option haggling (with
//! TLS after `NBD_OPT_STARTTLS` where the server offers it), then the
//! transmission phase (`transmission.rs`). A protocol violation closes
//! that connection only; a bad request gets an NBD error reply and the
//! connection goes on.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tracing::debug;
use volshadow_block::BlockDevice;

use crate::deadline::{Deadline, Timed};
use crate::export::{CONTEXT_ID_ALLOCATION, CONTEXT_ID_CHANGED, Error, Export, Exports, Result};
use crate::listen::Stream;
use crate::proto::*;
use crate::tls::{self, TlsMode};
use crate::transmission::{self, Negotiated};

fn violation<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Protocol(msg.into()))
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

/// How a server serves every client.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub tls: TlsMode,
    /// Every export read-only, whatever its device allows.
    pub read_only: bool,
    /// From connecting to the transmission phase, TLS handshake included
    /// (qemu-nbd's default handshake limit is the same 10 s).
    pub handshake_limit: Duration,
    pub connection: ConnectionOptions,
    /// Clients served at once by [`serve`](crate::serve) (at least 1); one
    /// more waits up to 2 s for a slot and is then closed, so a flood of
    /// connections cannot exhaust the process's threads.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            tls: TlsMode::Off,
            read_only: false,
            handshake_limit: Duration::from_secs(10),
            connection: ConnectionOptions::default(),
            max_connections: 128,
        }
    }
}

/// Where option haggling ended.
enum Haggled {
    /// The client ended the session.
    Abort,
    /// Transmission on this export.
    Go(Export),
    /// `NBD_OPT_STARTTLS` was acknowledged: TLS next.
    StartTls(Arc<ServerConfig>),
}

struct Conn<'a, R: Read, W: Write> {
    exports: &'a dyn Exports,
    options: &'a ServeOptions,
    rd: BufReader<R>,
    wr: BufWriter<W>,
    no_zeroes: bool,
    /// Options now travel over TLS.
    secure: bool,
    structured: bool,
    contexts: Vec<u32>,
}

/// Serves one client over `reader` / `writer` (two halves of a socket)
/// with the default [`ConnectionOptions`] and no TLS. The crate's front
/// page has a complete example, a client's handshake and read included.
pub fn serve_connection<R: Read + Send, W: Write + Send>(
    exports: &dyn Exports,
    reader: R,
    writer: W,
) -> Result<()> {
    serve_connection_with(exports, reader, writer, ConnectionOptions::default())
}

/// Serves one client over `reader` / `writer` as `options` say, no TLS
/// and no handshake time limit (the caller owns the transport).
pub fn serve_connection_with<R: Read + Send, W: Write + Send>(
    exports: &dyn Exports,
    reader: R,
    writer: W,
    options: ConnectionOptions,
) -> Result<()> {
    let options = ServeOptions {
        connection: options,
        ..ServeOptions::default()
    };
    let mut c = Conn::new(exports, &options, reader, writer);
    c.greet()?;
    match c.haggle()? {
        Haggled::Go(export) => c.transmit(&export),
        Haggled::Abort | Haggled::StartTls(_) => Ok(()),
    }
}

/// Serves one client on `stream` as `options` say: the handshake within
/// its time limit (TLS when the client asks or the server requires it),
/// then the transmission phase.
pub fn serve_stream<S: Stream>(
    exports: &dyn Exports,
    stream: S,
    options: &ServeOptions,
) -> Result<()> {
    let deadline = Deadline::start(options.handshake_limit);
    let rd = Timed::new(stream.try_clone()?, deadline.clone());
    let wr = Timed::new(stream.try_clone()?, deadline.clone());
    let mut plain = Conn::new(exports, options, rd, wr);
    plain.greet()?;
    let config = match plain.haggle()? {
        Haggled::Abort => return Ok(()),
        Haggled::Go(export) => {
            deadline.end(&stream)?;
            return plain.transmit(&export);
        }
        Haggled::StartTls(config) => config,
    };
    let no_zeroes = plain.no_zeroes;
    let early = plain.rd.buffer().to_vec();
    let rd = plain.rd.into_inner();
    let wr = plain.wr.into_inner().map_err(|e| e.into_error())?;
    let (rd, wr) = tls::accept(config, rd, wr, early)?;
    debug!(peer = %stream.peer(), "TLS session up");
    let mut secure = Conn::new(exports, options, rd, wr);
    secure.no_zeroes = no_zeroes;
    secure.secure = true;
    match secure.haggle()? {
        Haggled::Abort => Ok(()),
        Haggled::Go(export) => {
            deadline.end(&stream)?;
            secure.transmit(&export)
        }
        Haggled::StartTls(_) => violation("STARTTLS inside TLS"),
    }
}

impl<'a, R: Read + Send, W: Write + Send> Conn<'a, R, W> {
    fn new(exports: &'a dyn Exports, options: &'a ServeOptions, reader: R, writer: W) -> Self {
        Conn {
            exports,
            options,
            rd: BufReader::new(reader),
            wr: BufWriter::new(writer),
            no_zeroes: false,
            secure: false,
            structured: false,
            contexts: Vec::new(),
        }
    }

    fn transmit(self, export: &Export) -> Result<()> {
        debug!(export = %export.name, "transmission phase");
        let negotiated = Negotiated {
            structured: self.structured,
            contexts: self.contexts,
            read_only: self.options.read_only || export.device.is_read_only(),
        };
        let mut rd = self.rd;
        let workers = self.options.connection.workers.max(1);
        transmission::run(export, negotiated, workers, &mut rd, self.wr)
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

    fn read_only(&self, export: &Export) -> bool {
        self.options.read_only || export.device.is_read_only()
    }

    fn transmission_flags(&self, export: &Export) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
        if self.read_only(export) {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        f
    }

    /// The server's greeting and the client's flags.
    fn greet(&mut self) -> Result<()> {
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
        Ok(())
    }

    /// Option haggling, until the client picks an export, ends the
    /// session or starts TLS.
    fn haggle(&mut self) -> Result<Haggled> {
        let tls_required = matches!(self.options.tls, TlsMode::Require(_)) && !self.secure;
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
                OPT_ABORT => {
                    let _ = self.opt_reply(opt, REP_ACK, &[]);
                    return Ok(Haggled::Abort);
                }
                OPT_STARTTLS => {
                    let config = match &self.options.tls {
                        TlsMode::Allow(c) | TlsMode::Require(c) => c.clone(),
                        TlsMode::Off => {
                            self.opt_error(opt, REP_ERR_POLICY, "TLS is not offered")?;
                            continue;
                        }
                    };
                    if self.secure {
                        self.opt_error(opt, REP_ERR_INVALID, "TLS is already on")?;
                    } else if !data.is_empty() {
                        self.opt_error(opt, REP_ERR_INVALID, "STARTTLS takes no data")?;
                    } else {
                        self.opt_reply(opt, REP_ACK, &[])?;
                        return Ok(Haggled::StartTls(config));
                    }
                }
                // It cannot be answered with an error: the spec says end
                // the session.
                OPT_EXPORT_NAME if tls_required => {
                    return violation("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server");
                }
                _ if tls_required => self.opt_error(
                    opt,
                    REP_ERR_TLS_REQD,
                    "this server requires TLS (NBD_OPT_STARTTLS first)",
                )?,
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(export) = self.exports.open(&name) else {
                        return violation(format!("unknown export {name:?}"));
                    };
                    self.wr.write_all(&export.device.len().to_be_bytes())?;
                    self.wr
                        .write_all(&self.transmission_flags(&export).to_be_bytes())?;
                    if !self.no_zeroes {
                        self.wr.write_all(&[0u8; 124])?;
                    }
                    self.wr.flush()?;
                    return Ok(Haggled::Go(export));
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
                        return Ok(Haggled::Go(export));
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
        d.extend_from_slice(&self.transmission_flags(export).to_be_bytes());
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
