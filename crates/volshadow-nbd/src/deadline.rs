//! The handshake's time limit. A client gets `limit` from connecting to
//! entering the transmission phase (options, TLS handshake and all), so a
//! client that stalls or dribbles bytes cannot hold a thread for ever.
//! The limit is on the whole handshake, not on each read.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::listen::Stream;

/// When the handshake of one connection must be over.
#[derive(Debug)]
pub(crate) struct Deadline {
    at: Instant,
    /// Cleared when the transmission phase starts.
    on: AtomicBool,
}

impl Deadline {
    pub(crate) fn start(limit: Duration) -> Arc<Deadline> {
        Arc::new(Deadline {
            at: Instant::now() + limit,
            on: AtomicBool::new(true),
        })
    }

    /// Lifts the limit from the socket: requests may be far apart.
    pub(crate) fn end<S: Stream>(&self, stream: &S) -> io::Result<()> {
        self.on.store(false, Ordering::Release);
        stream.set_timeouts(None)
    }

    /// Sets the socket's time limits to what is left of the handshake's.
    fn arm<S: Stream>(&self, stream: &S) -> io::Result<()> {
        if !self.on.load(Ordering::Acquire) {
            return Ok(());
        }
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not finish the handshake in time",
            ));
        }
        stream.set_timeouts(Some(left))
    }
}

/// A handle of a socket whose reads and writes end at the deadline while
/// it is on.
pub(crate) struct Timed<S> {
    stream: S,
    deadline: Arc<Deadline>,
}

impl<S: Stream> Timed<S> {
    pub(crate) fn new(stream: S, deadline: Arc<Deadline>) -> Self {
        Timed { stream, deadline }
    }
}

impl<S: Stream> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.deadline.arm(&self.stream)?;
        self.stream.read(buf)
    }
}

impl<S: Stream> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.deadline.arm(&self.stream)?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}
