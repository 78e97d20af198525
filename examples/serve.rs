//! The NBD server embedded in your own process: the live volume exported
//! read-write as `live`, one snapshot read-only as `snap`. A real client
//! (`nbdcopy`, from libnbd) copies the snapshot out and the copy is
//! compared with what the snapshot must hold.
//!
//! `cargo run --release --example serve [-- --hold SECONDS]`
//! (`--hold` keeps serving that long for clients of your own, e.g.
//! `nbdinfo --list nbd://127.0.0.1:PORT`.)

use std::error::Error;
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use volshadow::block::{BlockDevice, MemDevice};
use volshadow::cow::{SnapshotOptions, SnapshotView, Volume, VolumeOptions};
use volshadow::nbd::{Export, Exports, ServeOptions, serve};

const VOLUME: u64 = 16 << 20;

/// What this process offers over NBD.
#[derive(Debug)]
struct Offered {
    live: Volume,
    snap: SnapshotView,
}

impl Exports for Offered {
    fn names(&self) -> Vec<String> {
        vec!["live".into(), "snap".into()]
    }

    fn open(&self, name: &str) -> Option<Export> {
        let (device, description): (Arc<dyn BlockDevice>, _) = match name {
            "" | "live" => (Arc::new(self.live.clone()), "live volume (read-write)"),
            "snap" => (Arc::new(self.snap.clone()), "snapshot (read-only)"),
            _ => return None,
        };
        Some(Export {
            name: if name.is_empty() { "live" } else { name }.into(),
            description: description.into(),
            device,
            changed: None,
        })
    }
}

fn hold_seconds() -> Result<u64, Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(0),
        [flag, secs] if flag == "--hold" => Ok(secs.parse()?),
        _ => Err("usage: serve [--hold SECONDS]".into()),
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let hold = hold_seconds()?;
    let volume = Volume::create(
        Arc::new(MemDevice::new(VOLUME)),
        Arc::new(MemDevice::new(16 << 20)),
        VolumeOptions::default(),
    )?;
    // The snapshot holds a pattern; the live volume is overwritten after.
    let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    volume.write_at(&pattern, 0)?;
    let snap = volume.create_snapshot(SnapshotOptions::default())?;
    volume.write_at(&vec![0xEE; 1 << 20], 0)?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let exports = Arc::new(Offered {
        live: volume.clone(),
        snap: volume.snapshot(snap.id)?,
    });
    // Plaintext on loopback; `ServeOptions::tls` with
    // `nbd::tls::load_x509(dir, verify_peer)` for a network.
    std::thread::spawn(move || serve(listener, exports, ServeOptions::default()));
    println!("serve: nbd://{addr}/live (read-write) and nbd://{addr}/snap (read-only)");

    let dir = tempfile::tempdir()?;
    let out = dir.path().join("snap.raw");
    let copied = Command::new("nbdcopy")
        .arg(format!("nbd://{addr}/snap"))
        .arg(&out)
        .status();
    let outcome = match copied {
        Ok(status) if status.success() => {
            let bytes = std::fs::read(&out)?;
            let good = bytes.len() as u64 == VOLUME
                && bytes[..pattern.len()] == pattern[..]
                && bytes[pattern.len()..].iter().all(|&b| b == 0);
            if !good {
                return Err("nbdcopy's copy of the snapshot differs from it".into());
            }
            // And a write through the live export lands in the volume
            // while the snapshot keeps the old bytes.
            let input = dir.path().join("in.raw");
            std::fs::write(&input, vec![0x5A; 1 << 20])?;
            let wrote = Command::new("nbdcopy")
                .arg(&input)
                .arg(format!("nbd://{addr}/live"))
                .status()?;
            let mut live = vec![0u8; 1 << 20];
            volume.read_at(&mut live, 0)?;
            let mut old = vec![0u8; 1 << 20];
            volume.snapshot(snap.id)?.read_at(&mut old, 0)?;
            if !wrote.success() || live.iter().any(|&b| b != 0x5A) || old != pattern {
                return Err("a write through the live export went wrong".into());
            }
            format!(
                "nbdcopy copied the snapshot export ({} MiB), equal to the snapshot; 1 MiB written through `live` reads back, the snapshot unchanged",
                VOLUME >> 20
            )
        }
        Ok(status) => return Err(format!("nbdcopy failed: {status}").into()),
        Err(e) => format!("SKIPPED client check: nbdcopy could not be run ({e})"),
    };
    println!("serve: {outcome}");

    if hold > 0 {
        println!("serve: serving for {hold} s");
        std::thread::sleep(Duration::from_secs(hold));
    }
    // The accept loop ends with the process.
    println!("serve: stopped");
    Ok(())
}
