//! What the accept loop needs of a listening socket and of the streams it
//! accepts, so that TCP and Unix sockets share one loop.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A connected socket the server can serve.
pub trait Stream: Read + Write + Send + Sized + 'static {
    /// A second handle to the same socket (one reads, one writes).
    fn try_clone(&self) -> io::Result<Self>;
    /// Read and write time limits of the socket (shared by its handles);
    /// `None` waits for ever.
    fn set_timeouts(&self, limit: Option<Duration>) -> io::Result<()>;
    /// Who is on the other end, for logs.
    fn peer(&self) -> String;
}

/// A listening socket.
pub trait Listener: Send + Sync {
    type Stream: Stream;
    /// Waits for the next client.
    fn accept(&self) -> io::Result<Self::Stream>;
}

impl Stream for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn set_timeouts(&self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)?;
        self.set_write_timeout(limit)
    }
    fn peer(&self) -> String {
        self.peer_addr().map(|a| a.to_string()).unwrap_or_default()
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn accept(&self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self)?;
        // Replies are written whole; waiting to coalesce them only adds
        // latency.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

#[cfg(unix)]
mod unix {
    use std::io;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    impl super::Stream for UnixStream {
        fn try_clone(&self) -> io::Result<Self> {
            UnixStream::try_clone(self)
        }
        fn set_timeouts(&self, limit: Option<Duration>) -> io::Result<()> {
            self.set_read_timeout(limit)?;
            self.set_write_timeout(limit)
        }
        fn peer(&self) -> String {
            "unix socket".into()
        }
    }

    impl super::Listener for UnixListener {
        type Stream = UnixStream;
        fn accept(&self) -> io::Result<UnixStream> {
            UnixListener::accept(self).map(|(s, _)| s)
        }
    }
}
