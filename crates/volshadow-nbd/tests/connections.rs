//! How many clients `serve` takes at once: past `max_connections` a new
//! client waits a moment for a slot, then is closed before the greeting;
//! the ones being served go on, and a client that leaves hands its slot to
//! one waiting.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::One;
use volshadow_block::MemDevice;
use volshadow_nbd::proto::NBDMAGIC;
use volshadow_nbd::{Exports, ServeOptions, serve};

/// Whether a new client gets the server's greeting (else it is closed).
fn greeted(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut magic = [0u8; 8];
    match c.read_exact(&mut magic) {
        Ok(()) => {
            assert_eq!(magic, NBDMAGIC.to_be_bytes());
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            false
        }
        Err(e) => panic!("neither greeted nor closed: {e}"),
    }
}

#[test]
fn clients_past_the_limit_are_closed_and_a_freed_slot_is_reused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let exports: Arc<dyn Exports> = Arc::new(One(Arc::new(MemDevice::new(1 << 20))));
    let options = ServeOptions {
        max_connections: 3,
        // Held clients stay in the handshake for the whole test.
        handshake_limit: Duration::from_secs(60),
        ..ServeOptions::default()
    };
    std::thread::spawn(move || serve(listener, exports, options));

    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            assert!(greeted(&mut c), "a client under the limit was closed");
            c
        })
        .collect();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).unwrap();
        let asked = Instant::now();
        assert!(!greeted(&mut c), "a client past the limit was served");
        assert!(
            asked.elapsed() >= Duration::from_millis(1500),
            "closed without waiting for a slot"
        );
    }
    // One leaves and the next connects at once: it waits for the slot the
    // first gives back as its thread ends, and is served.
    drop(held.pop());
    let mut c = TcpStream::connect(addr).unwrap();
    assert!(greeted(&mut c), "the freed slot was not handed on");
    held.push(c);
    // Full again.
    let mut c = TcpStream::connect(addr).unwrap();
    assert!(!greeted(&mut c));
}
