//! Entry point for the NBD fuzz target and its corpus test: a whole client
//! session (handshake, options, requests) from arbitrary bytes, against a
//! small read-write export and a read-only one. Must never panic.

use std::sync::Arc;

use volshadow_block::{BlockDevice, MemDevice};

use crate::proto::{Request, parse_info, parse_meta};
use crate::{ConnectionOptions, Export, Exports, serve_connection_with};

struct Two {
    rw: Arc<MemDevice>,
    ro: Arc<ReadOnly>,
}

struct ReadOnly(MemDevice);

impl BlockDevice for ReadOnly {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> volshadow_block::Result<()> {
        Err(volshadow_block::Error::ReadOnly {
            device: self.name(),
        })
    }
    fn flush(&self) -> volshadow_block::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> volshadow_block::Result<()> {
        Err(volshadow_block::Error::ReadOnly {
            device: self.name(),
        })
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn name(&self) -> String {
        "fuzz snapshot".into()
    }
}

impl Exports for Two {
    fn names(&self) -> Vec<String> {
        vec!["live".into(), "snap".into()]
    }
    fn open(&self, name: &str) -> Option<Export> {
        let changed: crate::ChangedFn = Arc::new(|_, _| {
            vec![volshadow_block::Extent {
                offset: 4096,
                len: 8192,
            }]
        });
        match name {
            "" | "live" => Some(Export {
                name: "live".into(),
                description: String::new(),
                device: self.rw.clone(),
                changed: Some(changed),
            }),
            "snap" => Some(Export {
                name: "snap".into(),
                description: String::new(),
                device: self.ro.clone(),
                changed: None,
            }),
            _ => None,
        }
    }
}

/// One client session whose bytes are `data`.
pub fn session(data: &[u8]) {
    let _ = Request::parse(data);
    let _ = parse_info(data);
    let _ = parse_meta(data);
    let exports = Two {
        rw: Arc::new(MemDevice::new(64 << 10)),
        ro: Arc::new(ReadOnly(MemDevice::new(64 << 10))),
    };
    // One worker: every input runs the same way each time, and no thread
    // outlives the input (libFuzzer's leak check would catch a worker
    // still running its thread-local destructors).
    let options = ConnectionOptions { workers: 1 };
    let _ = serve_connection_with(&exports, data, std::io::sink(), options);
}
