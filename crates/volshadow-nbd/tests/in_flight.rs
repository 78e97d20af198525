//! Several requests in flight on one connection: a slow request does not
//! hold back the ones after it, every cookie gets exactly one reply, and
//! pipelined writes and reads, more than the in-flight budget, are exact.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::One;
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_nbd::proto::*;
use volshadow_nbd::serve_connection;

/// A device whose read of block 0 waits until block 1 has been written.
struct Gate {
    inner: MemDevice,
    written: Mutex<bool>,
    cv: Condvar,
}

impl BlockDevice for Gate {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        if offset == 0 {
            let g = self.written.lock().unwrap();
            let (g, timeout) = self
                .cv
                .wait_timeout_while(g, Duration::from_secs(10), |w| !*w)
                .unwrap();
            if timeout.timed_out() && !*g {
                return Err(volshadow_block::Error::Layer {
                    device: self.name(),
                    kind: std::io::ErrorKind::TimedOut,
                    source: "the write never came".into(),
                });
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> volshadow_block::Result<()> {
        self.inner.write_at(buf, offset)?;
        if offset == 4096 {
            *self.written.lock().unwrap() = true;
            self.cv.notify_all();
        }
        Ok(())
    }
    fn flush(&self) -> volshadow_block::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
        self.inner.discard(offset, len)
    }
    fn name(&self) -> String {
        "gate".into()
    }
}

/// Serves one connection to `dev` and returns the client's socket, past
/// the handshake (old-style export-name option, no zero padding).
fn connect(dev: Arc<dyn BlockDevice>) -> (TcpStream, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let exports = One(dev);
        serve_connection(&exports, s.try_clone().unwrap(), &s).unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
    c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"live");
    c.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    c.read_exact(&mut info).unwrap();
    (c, server)
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Reads one simple reply: (cookie, error, data). `read_len` says how
/// many data bytes follow a successful reply to each read cookie.
fn reply(rd: &mut impl Read, read_len: &HashMap<u64, usize>) -> (u64, u32, Vec<u8>) {
    let mut h = [0u8; 16];
    rd.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let mut data = vec![0u8; if error == 0 { read_len[&cookie] } else { 0 }];
    rd.read_exact(&mut data).unwrap();
    (cookie, error, data)
}

#[test]
fn a_slow_request_does_not_hold_back_the_next() {
    let gate = Arc::new(Gate {
        inner: MemDevice::new(1 << 20),
        written: Mutex::new(false),
        cv: Condvar::new(),
    });
    let (mut c, server) = connect(gate);
    // The read of block 0 can only finish once the write behind it ran.
    c.write_all(&request(CMD_READ, 1, 0, 4096)).unwrap();
    let mut w = request(CMD_WRITE, 2, 4096, 4096);
    w.extend_from_slice(&[7u8; 4096]);
    c.write_all(&w).unwrap();
    let lens = HashMap::from([(1u64, 4096usize), (2, 0)]);
    let mut rd = BufReader::new(c.try_clone().unwrap());
    // The read can only succeed if the write behind it ran meanwhile
    // (otherwise it times out with an error). Which reply goes out first
    // is a race: the read wakes as soon as the write lands.
    let mut got = HashMap::new();
    for _ in 0..2 {
        let (cookie, error, data) = reply(&mut rd, &lens);
        got.insert(cookie, (error, data));
    }
    assert_eq!(got[&2], (0, Vec::new()), "the write succeeds");
    assert_eq!(got[&1], (0, vec![0u8; 4096]), "the read succeeds after it");
    c.write_all(&request(CMD_DISC, 3, 0, 0)).unwrap();
    server.join().unwrap();
}

#[test]
fn pipelined_large_writes_and_reads_land_exactly() {
    // Four 8 MiB requests at once exceed the connection's in-flight budget.
    const BLOCK: usize = 8 << 20;
    const BLOCKS: usize = 12;
    let dev = Arc::new(MemDevice::new((BLOCKS * BLOCK) as u64));
    let (c, server) = connect(dev.clone());
    // Each block written once, in a shuffled order, all pipelined.
    let mut order: Vec<usize> = (0..BLOCKS).collect();
    let mut rng = volshadow_block::conformance::Rng::new(1);
    for i in (1..BLOCKS).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let fill = |b: usize| -> Vec<u8> { (0..BLOCK).map(|i| (b * 31 + i / 512) as u8).collect() };
    let mut wr = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for (cookie, &b) in order.iter().enumerate() {
            let mut r = request(CMD_WRITE, cookie as u64, (b * BLOCK) as u64, BLOCK as u32);
            r.extend_from_slice(&fill(b));
            wr.write_all(&r).unwrap();
        }
        wr.write_all(&request(CMD_FLUSH, 1000, 0, 0)).unwrap();
        wr
    });
    let mut lens: HashMap<u64, usize> = (0..BLOCKS as u64).map(|c| (c, 0)).collect();
    lens.insert(1000, 0);
    let mut rd = BufReader::new(c);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..=BLOCKS {
        let (cookie, error, _) = reply(&mut rd, &lens);
        assert_eq!(error, 0, "cookie {cookie}");
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    // Every write is acknowledged: pipelined reads of whole blocks must
    // return the model's bytes.
    let mut wr = sender.join().unwrap();
    let sender = std::thread::spawn(move || {
        for b in 0..BLOCKS {
            let r = request(CMD_READ, 2000 + b as u64, (b * BLOCK) as u64, BLOCK as u32);
            wr.write_all(&r).unwrap();
        }
        wr.write_all(&request(CMD_DISC, 3000, 0, 0)).unwrap();
    });
    let lens: HashMap<u64, usize> = (0..BLOCKS as u64).map(|b| (2000 + b, BLOCK)).collect();
    let mut answered = std::collections::HashSet::new();
    for _ in 0..BLOCKS {
        let (cookie, error, data) = reply(&mut rd, &lens);
        assert_eq!(error, 0, "cookie {cookie}");
        assert!(answered.insert(cookie), "cookie {cookie} answered twice");
        let b = (cookie - 2000) as usize;
        assert!(data == fill(b), "block {b} read back wrong over NBD");
    }
    sender.join().unwrap();
    server.join().unwrap();
    let mut buf = vec![0u8; BLOCK];
    for b in 0..BLOCKS {
        dev.read_at(&mut buf, (b * BLOCK) as u64).unwrap();
        assert!(buf == fill(b), "block {b} differs on the device");
    }
}
