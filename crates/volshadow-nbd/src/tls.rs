//! TLS for NBD (rustls): credentials in the directory layout qemu-nbd and
//! libnbd use, the handshake after `NBD_OPT_STARTTLS`, and a TLS session
//! split into a reading and a writing half, so that the transmission
//! phase can read the next request while a reply is being written, as it
//! does on a plain socket.
//!
//! The halves share the rustls session under a lock that is never held
//! across socket I/O: the reader waits for the socket without it and the
//! writer encrypts under it, then writes the records under a second lock
//! that keeps them in order.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::export::Error;

/// The CA that client certificates must chain to (`--tls-verify-peer`).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain, its own certificate first.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";

/// Whether a server offers TLS, and how.
#[derive(Debug, Clone, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused (the NBD spec's NOTLS).
    #[default]
    Off,
    /// TLS at the client's choice; plaintext clients are served too
    /// (SELECTIVETLS without TLS-only exports).
    Allow(Arc<ServerConfig>),
    /// Every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` gets
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up (FORCEDTLS).
    Require(Arc<ServerConfig>),
}

fn bad(path: &Path, reason: impl ToString) -> Error {
    Error::Credentials {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Reads x509 credentials from `dir` (`server-cert.pem`,
/// `server-key.pem`, and with `verify_peer` `ca-cert.pem`, whose
/// certificates client certificates must then chain to).
pub fn load_x509(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_path = dir.join(SERVER_CERT);
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(&cert_path, e))?;
    if chain.is_empty() {
        return Err(bad(&cert_path, "no certificate in it"));
    }
    let key_path = dir.join(SERVER_KEY);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(&key_path, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(dir, e))?;
    let builder = if verify_peer {
        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca_path).map_err(|e| bad(&ca_path, e))? {
            roots
                .add(cert.map_err(|e| bad(&ca_path, e))?)
                .map_err(|e| bad(&ca_path, e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| bad(&ca_path, e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad(&cert_path, format!("certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// Encrypted bytes a session holds before they must be sent: a whole
/// 256 KiB read reply (nbdcopy's request size) goes out in one write.
const SEND_BUFFER: usize = 288 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // rustls leaves its session consistent between calls; a panic
    // elsewhere while holding the lock does not change that.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Raw bytes read from the socket that rustls has not taken yet.
#[derive(Default)]
struct Inbox {
    buf: Vec<u8>,
    at: usize,
}

impl Inbox {
    /// Room for one full TLS record and its header.
    const CHUNK: usize = 18 << 10;

    fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }

    /// Reads what the socket has (waits for at least a byte); 0 at EOF.
    fn fill(&mut self, sock: &mut impl Read) -> io::Result<usize> {
        self.buf.resize(Self::CHUNK, 0);
        self.at = 0;
        let n = sock.read(&mut self.buf)?;
        self.buf.truncate(n);
        Ok(n)
    }
}

impl Read for Inbox {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = (&self.buf[self.at..]).read(out)?;
        self.at += n;
        Ok(n)
    }
}

/// The session and the socket's writing end, shared by the halves.
struct Shared<W> {
    conn: Mutex<ServerConnection>,
    out: Mutex<Outbox<W>>,
}

struct Outbox<W> {
    sock: W,
    /// Encrypted records on their way out (at most [`SEND_BUFFER`]).
    records: Vec<u8>,
}

impl<W: Write> Shared<W> {
    /// Writes out every record the session has ready. Records leave in
    /// the order they were made: they are taken and written under the
    /// outbox lock.
    fn send(&self) -> io::Result<()> {
        let mut out = lock(&self.out);
        let Outbox { sock, records } = &mut *out;
        records.clear();
        {
            let mut conn = lock(&self.conn);
            while conn.wants_write() {
                conn.write_tls(records)?;
            }
        }
        sock.write_all(records)?;
        sock.flush()
    }
}

/// Runs the server side of the TLS handshake on a socket's two handles.
/// `early`: bytes the client sent after `NBD_OPT_STARTTLS` that were
/// already read. The socket's time limits bound the handshake.
pub(crate) fn accept<R: Read, W: Write>(
    config: Arc<ServerConfig>,
    mut rd: R,
    mut wr: W,
    early: Vec<u8>,
) -> Result<(TlsReader<R, W>, TlsWriter<W>), Error> {
    let mut conn = ServerConnection::new(config)?;
    conn.set_buffer_limit(Some(SEND_BUFFER));
    let mut inbox = Inbox { buf: early, at: 0 };
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(&mut wr)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        if inbox.is_empty() && inbox.fill(&mut rd)? == 0 {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client left during the TLS handshake",
            )));
        }
        conn.read_tls(&mut inbox)?;
        if let Err(e) = conn.process_new_packets() {
            // Tell the client why (a TLS alert) before closing.
            let _ = conn.write_tls(&mut wr);
            return Err(Error::Tls(e));
        }
    }
    // The last flight (and session tickets) go out now.
    while conn.wants_write() {
        conn.write_tls(&mut wr)?;
    }
    wr.flush()?;
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        out: Mutex::new(Outbox {
            sock: wr,
            records: Vec::new(),
        }),
    });
    Ok((
        TlsReader {
            sock: rd,
            inbox,
            shared: shared.clone(),
        },
        TlsWriter { shared },
    ))
}

/// The reading half of a TLS session: plaintext from the client.
pub(crate) struct TlsReader<R, W> {
    sock: R,
    inbox: Inbox,
    shared: Arc<Shared<W>>,
}

impl<R: Read, W: Write> Read for TlsReader<R, W> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut conn = lock(&self.shared.conn);
            match conn.reader().read(out) {
                // 0: the client closed the session (close_notify).
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // UnexpectedEof: the socket closed without close_notify.
                Err(e) => return Err(e),
            }
            // No plaintext left, so rustls has room for another record.
            if !self.inbox.is_empty() {
                conn.read_tls(&mut self.inbox)?;
                let processed = conn.process_new_packets();
                let reply = conn.wants_write();
                drop(conn);
                if reply {
                    // An alert or a key update answered.
                    self.shared.send()?;
                }
                processed.map_err(tls_error)?;
                continue;
            }
            drop(conn);
            if self.inbox.fill(&mut self.sock)? == 0 {
                // End of stream: the next `reader().read` reports it.
                lock(&self.shared.conn).read_tls(&mut io::empty())?;
            }
        }
    }
}

/// The writing half of a TLS session. Dropping it ends the session
/// with close_notify.
pub(crate) struct TlsWriter<W: Write> {
    shared: Arc<Shared<W>>,
}

impl<W: Write> Write for TlsWriter<W> {
    /// Encrypts into rustls' buffer (at most [`SEND_BUFFER`]); the
    /// records go out when it is full and at `flush`, so a reply's header
    /// and data leave in one write rather than one each.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let n = lock(&self.shared.conn).writer().write(buf)?;
            if n < buf.len() {
                self.shared.send()?;
            }
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.shared.send()
    }
}

impl<W: Write> Drop for TlsWriter<W> {
    fn drop(&mut self) {
        lock(&self.shared.conn).send_close_notify();
        // The client may be gone already; nothing is left to tell it.
        let _ = self.shared.send();
    }
}
