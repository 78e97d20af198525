//! TLS on the wire, byte by byte: NBD_OPT_STARTTLS and
//! NBD_REP_ERR_TLS_REQD as the NBD protocol specifies them, a rustls
//! client reading an export over TLS, and hostile clients around the TLS
//! handshake (garbage, a stall, a disconnect half way): each ends with
//! its connection closed, and other clients go on being served.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::One;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_nbd::proto::*;
use volshadow_nbd::test_certs::TestCa;
use volshadow_nbd::{ServeOptions, TlsMode};

const LEN: u64 = 1 << 20;

fn pattern() -> Vec<u8> {
    (0..LEN).map(|i| (i % 251) as u8).collect()
}

/// A server on a loopback port with `mode` built from fresh credentials
/// in `dir`, a 1 s handshake limit, and a device holding `pattern()`.
fn server(dir: &Path, require: bool) -> SocketAddr {
    let ca = TestCa::new("test CA").unwrap();
    ca.write_server_dir(dir).unwrap();
    let config = volshadow_nbd::tls::load_x509(dir, false).unwrap();
    let tls = if require {
        TlsMode::Require(config)
    } else {
        TlsMode::Allow(config)
    };
    let dev = Arc::new(MemDevice::new(LEN));
    dev.write_at(&pattern(), 0).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let options = ServeOptions {
        tls,
        handshake_limit: Duration::from_secs(1),
        ..ServeOptions::default()
    };
    std::thread::spawn(move || volshadow_nbd::serve(listener, Arc::new(One(dev)), options));
    addr
}

/// Connected past the greeting, fixed newstyle, no zeroes.
fn greeted(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

fn send_opt(s: &mut impl Write, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// One option reply: (option, reply type, data).
fn opt_reply(s: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut data).unwrap();
    (opt, kind, data)
}

/// Reads until the server closes; panics if it does not within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return t0.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return t0.elapsed(),
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

fn tls_client(dir: &Path, s: TcpStream) -> StreamOwned<ClientConnection, TcpStream> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(Arc::new(config), name).unwrap();
    StreamOwned::new(conn, s)
}

/// STARTTLS, the TLS handshake, GO on `live`, one READ of 64 KiB at
/// 128 KiB: the bytes must be the device's.
fn read_over_tls(addr: SocketAddr, dir: &Path) {
    let mut s = greeted(addr);
    send_opt(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(opt_reply(&mut s), (OPT_STARTTLS, REP_ACK, Vec::new()));
    let mut t = tls_client(dir, s);
    // Inside TLS a second STARTTLS is invalid, and options work.
    send_opt(&mut t, OPT_STARTTLS, &[]);
    assert_eq!(opt_reply(&mut t).1, REP_ERR_INVALID);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"live");
    go.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut t, OPT_GO, &go);
    loop {
        let (_, kind, _) = opt_reply(&mut t);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
    }
    let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_READ.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&(128u64 << 10).to_be_bytes());
    req.extend_from_slice(&(64u32 << 10).to_be_bytes());
    t.write_all(&req).unwrap();
    let mut h = [0u8; 16];
    t.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&h[4..8], &0u32.to_be_bytes(), "read error");
    let mut data = vec![0u8; 64 << 10];
    t.read_exact(&mut data).unwrap();
    assert!(
        data == pattern()[128 << 10..192 << 10],
        "wrong bytes over TLS"
    );
}

#[test]
fn required_tls_refuses_plaintext_options_as_the_spec_says() {
    let dir = tempfile::tempdir().unwrap();
    let addr = server(dir.path(), true);
    let mut s = greeted(addr);
    for opt in [OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY, 99] {
        send_opt(&mut s, opt, &[]);
        let (o, kind, _) = opt_reply(&mut s);
        assert_eq!((o, kind), (opt, REP_ERR_TLS_REQD));
    }
    send_opt(&mut s, OPT_STARTTLS, b"x");
    assert_eq!(opt_reply(&mut s).1, REP_ERR_INVALID);
    // EXPORT_NAME cannot be answered with an error: the session ends.
    send_opt(&mut s, OPT_EXPORT_NAME, b"live");
    closed_within(&mut s, Duration::from_secs(5));
    read_over_tls(addr, dir.path());
}

#[test]
fn allowed_tls_serves_plaintext_and_tls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let addr = server(dir.path(), false);
    let mut s = greeted(addr);
    send_opt(&mut s, OPT_LIST, &[]);
    let (_, kind, data) = opt_reply(&mut s);
    assert_eq!((kind, &data[4..]), (REP_SERVER, &b"live"[..]));
    assert_eq!(opt_reply(&mut s).1, REP_ACK);
    read_over_tls(addr, dir.path());
}

#[test]
fn hostile_tls_clients_are_closed_and_others_served() {
    let dir = tempfile::tempdir().unwrap();
    let addr = server(dir.path(), true);
    let starttls = |addr| {
        let mut s = greeted(addr);
        send_opt(&mut s, OPT_STARTTLS, &[]);
        assert_eq!(opt_reply(&mut s).1, REP_ACK);
        s
    };

    // Garbage where the ClientHello should be: an alert at most, then
    // the close.
    let mut garbage = starttls(addr);
    garbage.write_all(&[0x42; 300]).unwrap();
    closed_within(&mut garbage, Duration::from_secs(5));

    // A stall after STARTTLS and one before any option: both closed at
    // the handshake limit (1 s), while another client is served.
    let mut stalled = starttls(addr);
    let mut silent = TcpStream::connect(addr).unwrap();
    read_over_tls(addr, dir.path());
    let waited = closed_within(&mut stalled, Duration::from_secs(5));
    closed_within(&mut silent, Duration::from_secs(5));
    assert!(waited < Duration::from_secs(5), "{waited:?}");

    // A real ClientHello, for the clients below.
    let mut hello = Vec::new();
    let mut client = tls_client(dir.path(), TcpStream::connect(addr).unwrap());
    client.conn.write_tls(&mut hello).unwrap();

    // A client that sends it a byte every 100 ms is held to the same
    // limit: the whole handshake has 1 s, not each read.
    let mut dribble = starttls(addr);
    let mut cut = false;
    for b in &hello {
        if dribble.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cut, "a dribbling client was not cut off");

    // A disconnect in the middle of the handshake: half the ClientHello,
    // then gone.
    let mut half = starttls(addr);
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    drop(half);

    // Everyone above was dealt with; the server still serves.
    read_over_tls(addr, dir.path());
}
