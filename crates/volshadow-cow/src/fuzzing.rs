//! Entry points for the fuzz targets under `fuzz/` and for the test that
//! replays their corpus on stable. Each takes arbitrary bytes and must not
//! panic or allocate without bound; the engine target also checks every
//! result against a model and panics on a difference (that is a finding).

use std::sync::{Arc, OnceLock};

use volshadow_block::{BlockDevice, MemDevice};

use crate::format::{self, Superblock};
use crate::{SnapshotOptions, Target, Volume, VolumeOptions};

/// Superblock decoding of arbitrary bytes.
pub fn superblock(data: &[u8]) {
    if let Ok(sb) = Superblock::decode(data) {
        // What decodes re-encodes to the same thing (in this build's
        // format: an older superblock is written back upgraded).
        let again = Superblock::decode(&sb.encode());
        let want = Superblock {
            version: format::FORMAT_VERSION,
            ..sb
        };
        assert_eq!(again.as_ref().ok(), Some(&want));
    }
    for version in [format::FORMAT_OLDEST, format::FORMAT_VERSION] {
        let mut seq = 0;
        let mut at = 0;
        while let Ok(d) = format::decode_record(&data[at..], 1, seq, version) {
            at += d.len;
            seq += 1;
        }
    }
}

const ORIGIN: u64 = 32 << 10;
const DIFF: u64 = 512 << 10;

/// A diff area image with some history, made once.
fn template() -> &'static (Vec<u8>, Vec<u8>) {
    static T: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    T.get_or_init(|| {
        let origin = Arc::new(MemDevice::new(ORIGIN));
        let diff = Arc::new(MemDevice::new(DIFF));
        let made = (|| -> crate::Result<()> {
            let vol = Volume::create(
                origin.clone(),
                diff.clone(),
                VolumeOptions {
                    chunk_size: 4096,
                    journal_half: Some(8192),
                    ..Default::default()
                },
            )?;
            let p = SnapshotOptions {
                persistent: true,
                ..Default::default()
            };
            vol.create_snapshot(p.clone())?;
            vol.write_at(&[1u8; 20_000], 3000)
                .map_err(crate::Error::Block)?;
            vol.create_snapshot(p)?;
            vol.write_at(&[2u8; 9000], 22_000)
                .map_err(crate::Error::Block)?;
            Ok(())
        })();
        debug_assert!(made.is_ok());
        (origin.to_vec(), diff.to_vec())
    })
}

/// Recovery of a diff area whose journal region holds arbitrary bytes:
/// the first 2 bytes pick an offset in the journal, the rest is written
/// there. Open must fail cleanly or give a volume whose snapshots read.
pub fn journal(data: &[u8]) {
    let (o, d) = template();
    let origin = Arc::new(MemDevice::new(ORIGIN));
    let diff = Arc::new(MemDevice::new(DIFF));
    if origin.write_at(o, 0).is_err() || diff.write_at(d, 0).is_err() {
        return;
    }
    let (at, bytes) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as u64, rest),
        _ => (0, data),
    };
    let at = 8192 + at % (2 * 8192);
    let n = bytes.len().min((8192 * 3 - at) as usize);
    if diff.write_at(&bytes[..n], at).is_err() {
        return;
    }
    if let Ok(vol) = Volume::open(origin, diff) {
        let mut buf = vec![0u8; ORIGIN as usize];
        for s in vol.snapshots() {
            if let Ok(view) = vol.snapshot(s.id) {
                let _ = view.read_at(&mut buf, 0);
            }
        }
        let _ = vol.verify();
    }
}

/// Engine operations decoded from bytes, checked against a model that
/// keeps full copies. Panics on any difference.
pub fn engine(data: &[u8]) {
    let origin = Arc::new(MemDevice::new(ORIGIN));
    let diff = Arc::new(MemDevice::new(DIFF));
    // A small diff area that fills: FailWrites refuses a write without
    // changing anything, which the model can follow (DeleteOldest would
    // drop snapshots the model still holds).
    let opts = VolumeOptions {
        chunk_size: 4096,
        journal_half: Some(8192),
        policy: crate::FullPolicy::FailWrites,
        ..Default::default()
    };
    let Ok(mut vol) = Volume::create(origin.clone(), diff.clone(), opts) else {
        return;
    };
    let mut live = vec![0u8; ORIGIN as usize];
    // (id, persistent, bytes)
    let mut snaps: Vec<(uuid::Uuid, bool, Vec<u8>)> = Vec::new();
    let mut it = data.chunks_exact(4);
    for op in &mut it {
        let (kind, a, b, c) = (op[0] % 8, op[1], op[2], op[3]);
        match kind {
            0 | 1 => {
                let off = (u16::from_le_bytes([a, b]) as u64 * 7) % ORIGIN;
                let len = (1 + c as u64 * 97).min(ORIGIN - off) as usize;
                let byte = a ^ c;
                if vol.write_at(&vec![byte; len], off).is_ok() {
                    live[off as usize..off as usize + len].fill(byte);
                }
            }
            2 if snaps.len() < 8 => {
                let persistent = a % 2 == 0;
                if let Ok(s) = vol.create_snapshot(SnapshotOptions {
                    persistent,
                    ..Default::default()
                }) {
                    snaps.push((s.id, persistent, live.clone()));
                }
            }
            3 if !snaps.is_empty() => {
                let i = a as usize % snaps.len();
                if vol.delete_snapshot(snaps[i].0).is_ok() {
                    snaps.remove(i);
                }
            }
            4 if !snaps.is_empty() => {
                let i = a as usize % snaps.len();
                if snaps[i].1 && vol.revert(snaps[i].0).is_ok() {
                    live.clone_from(&snaps[i].2);
                }
            }
            5 => {
                if vol.flush().is_ok()
                    && let Ok(v) = Volume::open(origin.clone(), diff.clone())
                {
                    vol = v;
                    snaps.retain(|s| s.1);
                }
            }
            6 if !snaps.is_empty() => {
                let i = a as usize % snaps.len();
                let _ = vol.changed_extents(snaps[i].0, Target::Live);
            }
            _ => {
                let off = (u16::from_le_bytes([a, b]) as u64 * 13) % ORIGIN;
                let len = (c as u64 * 300).min(ORIGIN - off);
                if vol.discard(off, len).is_ok() {
                    live[off as usize..(off + len) as usize].fill(0);
                }
            }
        }
        let mut buf = vec![0u8; ORIGIN as usize];
        assert!(vol.read_at(&mut buf, 0).is_ok());
        assert!(buf == live, "live volume differs from the model");
        for (id, _, want) in &snaps {
            let view = vol.snapshot(*id);
            assert!(view.is_ok(), "snapshot {id} lost");
            if let Ok(v) = view {
                assert!(v.read_at(&mut buf, 0).is_ok());
                assert!(buf == *want, "snapshot {id} differs from the model");
            }
        }
    }
}
