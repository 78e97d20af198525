//! The transmission phase of one connection: requests run concurrently.
//!
//! A few worker threads take turns as the reader: the one holding the
//! reader lock reads the next request (and its write payload), lets go of
//! the lock, then runs the request and writes its reply under the
//! connection's writer lock. So a lone request never waits for a thread
//! hand-off, a slow request does not hold back the ones behind it, and the
//! replies of different requests never interleave; they may come back in
//! any order, as NBD allows (clients match them by cookie, and a client
//! that needs order between two requests waits for the first reply).
//! Workers are started as the queue needs them, up to the connection's
//! `workers` option.
//!
//! In-flight payload bytes are bounded, so a client pipelining large writes
//! cannot make the server buffer without limit. Flush semantics hold: a
//! FLUSH flushes the device, which covers every acknowledged write.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::Scope;

use tracing::warn;
use volshadow_block::{AlignedBuf, BlockDevice, BufferPool, Extent};

use crate::export::{CONTEXT_ID_ALLOCATION, Error, Export};
use crate::proto::*;

/// Read buffers and write payloads held for in-flight requests of one
/// connection. One request larger than this still runs, alone.
const MAX_IN_FLIGHT_BYTES: u64 = 16 << 20;
/// Largest payload buffer kept for reuse (larger requests allocate).
const POOLED_MAX: usize = 4 << 20;

/// What the handshake settled for the connection.
pub(crate) struct Negotiated {
    pub structured: bool,
    pub contexts: Vec<u32>,
    /// Writes are refused (the device's or the server's choice).
    pub read_only: bool,
}

/// Runs the transmission phase until the client disconnects, breaks the
/// protocol, or the connection fails. Every request read is answered (or
/// its reply fails to send) before this returns.
pub(crate) fn run<R: Read + Send, W: Write + Send>(
    export: &Export,
    negotiated: Negotiated,
    workers: usize,
    rd: &mut BufReader<R>,
    wr: BufWriter<W>,
) -> Result<(), Error> {
    let conn = Connection {
        export,
        structured: negotiated.structured,
        contexts: negotiated.contexts,
        read_only: negotiated.read_only,
        reader: Mutex::new(Reader { rd, end: None }),
        wr: Mutex::new(wr),
        budget: Budget::default(),
        buffers: BufferPool::new(workers + 2, POOLED_MAX),
        workers,
        started: AtomicUsize::new(1),
        waiting: AtomicUsize::new(0),
        send_error: Mutex::new(None),
    };
    std::thread::scope(|scope| conn.work(scope));
    let end = lock(&conn.reader).end.take();
    if let Some(Err(e)) = end {
        return Err(e);
    }
    // NBD_CMD_DISC and a clean close both mean "done": make the client's
    // writes durable as a graceful disconnect promises.
    if !conn.read_only {
        let _ = export.device.flush();
    }
    match lock(&conn.send_error).take() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

struct Reader<'a, R> {
    rd: &'a mut BufReader<R>,
    /// Set when the client is done (`Ok`) or the stream is unusable.
    end: Option<Result<(), Error>>,
}

struct Job {
    req: Request,
    /// The write payload of a WRITE.
    data: Option<AlignedBuf>,
    /// Bytes taken from the budget, given back after the reply.
    charged: u64,
}

struct Connection<'a, R, W: Write> {
    export: &'a Export,
    structured: bool,
    contexts: Vec<u32>,
    read_only: bool,
    reader: Mutex<Reader<'a, R>>,
    wr: Mutex<BufWriter<W>>,
    budget: Budget,
    /// Payload buffers, reused so requests neither allocate nor zero one.
    buffers: BufferPool,
    /// Most workers to run, the calling thread included.
    workers: usize,
    /// Workers started, the calling thread included.
    started: AtomicUsize,
    /// Workers waiting for their turn to read.
    waiting: AtomicUsize,
    /// The first failure to send a reply.
    send_error: Mutex<Option<io::Error>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked mid-reply leaves the stream in an unknown
    // state; the bytes already sent cannot be taken back either way.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn errno(e: &volshadow_block::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::PermissionDenied => EPERM,
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::StorageFull => ENOSPC,
        _ => EIO,
    }
}

impl<'a, R: Read + Send, W: Write + Send> Connection<'a, R, W> {
    /// One worker: read a request, run it, repeat, until the reader ends.
    fn work<'s>(&'s self, scope: &'s Scope<'s, '_>) {
        loop {
            self.waiting.fetch_add(1, Ordering::AcqRel);
            let mut reader = lock(&self.reader);
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if reader.end.is_some() {
                return;
            }
            let job = match self.next_job(reader.rd) {
                Ok(Some(job)) => job,
                ended => {
                    reader.end = Some(ended.map(|_| ()));
                    return;
                }
            };
            drop(reader);
            // Someone should be ready to read the next request while this
            // one runs.
            if self.waiting.load(Ordering::Acquire) == 0
                && self
                    .started
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.workers).then_some(n + 1)
                    })
                    .is_ok()
            {
                scope.spawn(move || self.work(scope));
            }
            let sent = self.handle(&job.req, job.data.as_deref().unwrap_or_default());
            if let Some(data) = job.data {
                self.buffers.give(data);
            }
            self.budget.give_back(job.charged);
            if let Err(e) = sent {
                let mut first = lock(&self.send_error);
                if first.is_none() {
                    warn!(error = %e, "NBD reply could not be sent");
                    *first = Some(e);
                }
            }
        }
    }

    /// Reads the next request. `Ok(None)`: the client disconnected.
    fn next_job(&self, rd: &mut BufReader<R>) -> Result<Option<Job>, Error> {
        let mut hdr = [0u8; Request::LEN];
        match rd.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let req =
            Request::parse(&hdr).map_err(|e| Error::Protocol(format!("bad request: {e:?}")))?;
        let payload = match req.kind {
            CMD_DISC => return Ok(None),
            CMD_WRITE if req.length > MAX_PAYLOAD => {
                // Its payload cannot be skipped safely: the stream is lost.
                let _ = self.error(&req, EINVAL, "write too large");
                return Err(Error::Protocol(format!("write of {} bytes", req.length)));
            }
            CMD_WRITE => u64::from(req.length),
            CMD_READ if req.length <= MAX_PAYLOAD => u64::from(req.length),
            _ => 0,
        };
        let charged = self.budget.take(payload);
        let mut data = None;
        if req.kind == CMD_WRITE {
            let payload = data.insert(self.buffers.take(req.length as usize));
            if let Err(e) = rd.read_exact(payload) {
                self.budget.give_back(charged);
                return Err(e.into());
            }
        }
        Ok(Some(Job { req, data, charged }))
    }

    fn handle(&self, req: &Request, data: &[u8]) -> io::Result<()> {
        let dev = &*self.export.device;
        let in_range = req
            .offset
            .checked_add(u64::from(req.length))
            .is_some_and(|end| end <= dev.len());
        let fua = |r: volshadow_block::Result<()>| {
            r.and_then(|()| {
                if req.flags & CMD_FLAG_FUA != 0 {
                    dev.flush()
                } else {
                    Ok(())
                }
            })
        };
        match req.kind {
            CMD_WRITE if self.read_only => self.error(req, EPERM, "read-only export"),
            CMD_WRITE if !in_range => self.error(req, EINVAL, "write past the end"),
            CMD_WRITE => self.finish(req, fua(dev.write_at(data, req.offset))),
            CMD_READ => self.read(req, dev, in_range),
            CMD_FLUSH => self.finish(req, dev.flush()),
            CMD_TRIM | CMD_WRITE_ZEROES if self.read_only => {
                self.error(req, EPERM, "read-only export")
            }
            CMD_TRIM | CMD_WRITE_ZEROES if !in_range => {
                self.error(req, EINVAL, "range past the end")
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let len = u64::from(req.length);
                let r = if req.kind == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_NO_HOLE != 0 {
                    dev.write_zeroes(req.offset, len)
                } else {
                    dev.discard(req.offset, len)
                };
                self.finish(req, fua(r))
            }
            CMD_CACHE if in_range => self.simple_reply(req.cookie, 0, &[]),
            CMD_CACHE => self.error(req, EINVAL, "range past the end"),
            CMD_BLOCK_STATUS => self.block_status(req, in_range),
            other => {
                warn!(command = other, "unknown NBD command");
                self.error(req, EINVAL, "unknown command")
            }
        }
    }

    fn read(&self, req: &Request, dev: &dyn BlockDevice, in_range: bool) -> io::Result<()> {
        if req.length > MAX_PAYLOAD || !in_range {
            return self.error(req, EINVAL, "read out of range or too large");
        }
        let mut data = self.buffers.take(req.length as usize);
        if let Err(e) = dev.read_at(&mut data, req.offset) {
            return self.error(req, errno(&e), &e.to_string());
        }
        let sent = self.send_read(req, &data);
        self.buffers.give(data);
        sent
    }

    fn send_read(&self, req: &Request, data: &[u8]) -> io::Result<()> {
        if !self.structured {
            return self.simple_reply(req.cookie, 0, data);
        }
        let mut wr = lock(&self.wr);
        if data.is_empty() {
            chunk(&mut *wr, req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])?;
        } else {
            chunk(
                &mut *wr,
                req.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                &[&req.offset.to_be_bytes(), data],
            )?;
        }
        wr.flush()
    }

    fn simple_reply(&self, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
        let mut wr = lock(&self.wr);
        wr.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
        wr.write_all(&error.to_be_bytes())?;
        wr.write_all(&cookie.to_be_bytes())?;
        wr.write_all(data)?;
        wr.flush()
    }

    /// An error reply: structured where the command requires it.
    fn error(&self, req: &Request, error: u32, msg: &str) -> io::Result<()> {
        if self.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
            let mut p = error.to_be_bytes().to_vec();
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg.as_bytes());
            let mut wr = lock(&self.wr);
            chunk(
                &mut *wr,
                req.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                &[&p],
            )?;
            wr.flush()
        } else {
            self.simple_reply(req.cookie, error, &[])
        }
    }

    fn finish(&self, req: &Request, r: volshadow_block::Result<()>) -> io::Result<()> {
        match r {
            Ok(()) => self.simple_reply(req.cookie, 0, &[]),
            Err(e) => self.error(req, errno(&e), &e.to_string()),
        }
    }

    fn block_status(&self, req: &Request, in_range: bool) -> io::Result<()> {
        if !self.structured || self.contexts.is_empty() {
            return self.error(req, EINVAL, "no metadata context negotiated");
        }
        if !in_range || req.length == 0 {
            return self.error(req, EINVAL, "range past the end");
        }
        let (off, len) = (req.offset, u64::from(req.length));
        let mut payloads = Vec::with_capacity(self.contexts.len());
        for id in &self.contexts {
            let descs: Vec<(u32, u32)> = match *id {
                CONTEXT_ID_ALLOCATION => match self.export.device.allocation(off, len) {
                    Ok(Some(data)) => descriptors(&data, off, len, 0, STATE_HOLE | STATE_ZERO),
                    Ok(None) => vec![(req.length, 0)],
                    Err(e) => return self.error(req, errno(&e), &e.to_string()),
                },
                _ => {
                    let changed = self.export.changed.as_ref().map(|f| f(off, len));
                    descriptors(&changed.unwrap_or_default(), off, len, STATE_CHANGED, 0)
                }
            };
            let take = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                descs.len()
            };
            let mut payload = id.to_be_bytes().to_vec();
            for (l, f) in descs.into_iter().take(take) {
                payload.extend_from_slice(&l.to_be_bytes());
                payload.extend_from_slice(&f.to_be_bytes());
            }
            payloads.push(payload);
        }
        let mut wr = lock(&self.wr);
        let last = payloads.len() - 1;
        for (i, payload) in payloads.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            chunk(
                &mut *wr,
                req.cookie,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                &[payload],
            )?;
        }
        wr.flush()
    }
}

fn chunk<W: Write>(
    wr: &mut W,
    cookie: u64,
    flags: u16,
    kind: u16,
    payload: &[&[u8]],
) -> io::Result<()> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    wr.write_all(&STRUCTURED_REPLY_MAGIC.to_be_bytes())?;
    wr.write_all(&flags.to_be_bytes())?;
    wr.write_all(&kind.to_be_bytes())?;
    wr.write_all(&cookie.to_be_bytes())?;
    wr.write_all(&(len as u32).to_be_bytes())?;
    for p in payload {
        wr.write_all(p)?;
    }
    Ok(())
}

/// Bounds the payload bytes of the requests of one connection that are
/// read but not yet answered.
#[derive(Default)]
struct Budget {
    state: Mutex<(usize, u64)>,
    freed: Condvar,
}

impl Budget {
    /// Waits until a request of `bytes` fits, then counts it in flight.
    /// Returns what to give back. A request bigger than the whole budget
    /// waits for the connection to be idle and then runs alone.
    fn take(&self, bytes: u64) -> u64 {
        let mut s = lock(&self.state);
        while s.0 > 0 && s.1 + bytes > MAX_IN_FLIGHT_BYTES {
            s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.0 += 1;
        s.1 += bytes;
        bytes
    }

    fn give_back(&self, bytes: u64) {
        let mut s = lock(&self.state);
        s.0 -= 1;
        s.1 -= bytes;
        self.freed.notify_all();
    }
}

/// Block status descriptors (length, flags) of `off..off+len`: `inside`
/// over the sorted `extents`, `outside` elsewhere; touching descriptors
/// with the same flags merged.
fn descriptors(
    extents: &[Extent],
    off: u64,
    len: u64,
    inside: u32,
    outside: u32,
) -> Vec<(u32, u32)> {
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
    for x in extents {
        let (s, e) = (x.offset.max(off), x.end().min(end));
        if s >= e {
            continue;
        }
        push(s.saturating_sub(at), outside);
        push(e - s.max(at), inside);
        at = e;
    }
    push(end.saturating_sub(at), outside);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cover_the_range() {
        let ext = |offset, len| Extent { offset, len };
        let ch = [ext(4096, 4096), ext(16384, 8192)];
        assert_eq!(
            descriptors(&ch, 0, 32768, 1, 0),
            vec![(4096, 0), (4096, 1), (8192, 0), (8192, 1), (8192, 0)]
        );
        assert_eq!(descriptors(&ch, 6000, 100, 1, 0), vec![(100, 1)]);
        assert_eq!(descriptors(&[], 0, 10, 1, 0), vec![(10, 0)]);
        // Holes outside the data: the allocation map's way round.
        assert_eq!(
            descriptors(&ch, 4096, 12288, 0, 3),
            vec![(4096, 0), (8192, 3)]
        );
    }
}
