//! Self-describing blocks, the generator, and reading images back.

use super::*;

#[derive(Debug, Clone)]
pub(crate) struct Rng(pub(crate) conformance::Rng);

impl Rng {
    /// A generator for one part (`role`, `round`) of the run `seed`.
    pub(crate) fn new(seed: u64, role: u64, round: u64) -> Rng {
        Rng(conformance::Rng::new(mix64(
            seed ^ mix64(role ^ round.rotate_left(32)),
        )))
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub(crate) fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// 1..=MAX_BLOCKS blocks, small sizes as likely as large ones.
    pub(crate) fn blocks(&mut self) -> u64 {
        let lo = 1u64 << self.below(9);
        (lo + self.below(lo)).min(MAX_BLOCKS)
    }
}

pub(crate) const MAGIC: [u8; 4] = *b"VSsk";
/// A block that is neither zeros nor a whole block of one write.
pub(crate) const GARBAGE: u32 = u32::MAX;

/// Block `blk` (index in the volume) as write `id` leaves it.
pub(crate) fn fill_block(out: &mut [u8], id: u32, blk: u32) {
    out[..4].copy_from_slice(&MAGIC);
    out[4..8].copy_from_slice(&id.to_le_bytes());
    out[8..12].copy_from_slice(&blk.to_le_bytes());
    out[12..16].copy_from_slice(&(id ^ blk ^ 0x5a5a_5a5a).to_le_bytes());
    conformance::Rng::new((u64::from(id) << 32) | u64::from(blk)).fill(&mut out[16..BLOCK]);
}

/// The write a block read back at `blk` came from: 0 for zeros (never
/// written), `GARBAGE` for anything else that is not exactly one write's
/// block `blk`.
pub(crate) fn decode_block(b: &[u8], blk: u32, scratch: &mut [u8]) -> u32 {
    if b[..4] != MAGIC {
        return if b.iter().all(|&x| x == 0) {
            0
        } else {
            GARBAGE
        };
    }
    let id = u32::from_le_bytes(b[4..8].try_into().unwrap());
    if id == 0 || id == GARBAGE {
        return GARBAGE;
    }
    fill_block(scratch, id, blk);
    if scratch == b { id } else { GARBAGE }
}

/// What a `GARBAGE` block holds, for a report.
pub(crate) fn describe_garbage(b: &[u8], blk: u32) -> String {
    if b[..4] != MAGIC {
        let nonzero = b.iter().filter(|&&x| x != 0).count();
        return format!("no block header ({nonzero} non-zero bytes)");
    }
    let id = u32::from_le_bytes(b[4..8].try_into().unwrap());
    let at = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if at != blk {
        return format!("write {id}'s block {at} (misplaced)");
    }
    let mut want = vec![0u8; BLOCK];
    fill_block(&mut want, id, blk);
    let first = b.iter().zip(&want).position(|(x, y)| x != y).unwrap_or(0);
    let last = b.iter().zip(&want).rposition(|(x, y)| x != y).unwrap_or(0);
    format!("write {id}'s header, bytes {first}..={last} differ (torn)")
}

/// The blocks of a whole export, as write ids, with descriptions of up to
/// a few garbage blocks.
pub(crate) struct Image {
    pub(crate) ids: Vec<u32>,
    pub(crate) notes: BTreeMap<usize, String>,
}

impl Image {
    pub(crate) fn decode(&mut self, first_blk: usize, bytes: &[u8], scratch: &mut [u8]) {
        for (i, b) in bytes.chunks_exact(BLOCK).enumerate() {
            let blk = first_blk + i;
            let id = decode_block(b, blk as u32, scratch);
            if id == GARBAGE && self.notes.len() < 8 {
                self.notes.insert(blk, describe_garbage(b, blk as u32));
            }
            self.ids[blk] = id;
        }
    }

    pub(crate) fn show(&self, blk: usize) -> String {
        match self.ids[blk] {
            GARBAGE => self
                .notes
                .get(&blk)
                .cloned()
                .unwrap_or_else(|| "garbage".into()),
            id => show(id),
        }
    }
}

/// A block's value as a report names it.
pub(crate) fn show(id: u32) -> String {
    match id {
        0 => "zeros".into(),
        GARBAGE => "garbage".into(),
        id => format!("write {id}"),
    }
}

/// Reads a whole export over NBD.
pub(crate) fn read_export(socket: &Path, export: &str) -> Result<Image, String> {
    let mut conn = Raw::try_go(socket, export, IO_TIMEOUT).map_err(|e| e.to_string())?;
    read_all(&mut conn)
}

pub(crate) fn read_all(conn: &mut Raw) -> Result<Image, String> {
    let mut img = Image {
        ids: vec![0; BLOCKS],
        notes: BTreeMap::new(),
    };
    let (mut data, mut scratch) = (Vec::new(), vec![0u8; BLOCK]);
    let piece = MAX_BLOCKS as usize;
    for first in (0..BLOCKS).step_by(piece) {
        let len = (piece * BLOCK) as u32;
        match conn.cmd(NBD_CMD_READ, 0, (first * BLOCK) as u64, len, &[], &mut data) {
            Ok(0) => img.decode(first, &data, &mut scratch),
            Ok(e) => return Err(format!("READ at {} failed: NBD error {e}", first * BLOCK)),
            Err(e) => return Err(format!("READ at {}: {e}", first * BLOCK)),
        }
    }
    Ok(img)
}

/// Reads a whole shadow copy through `volshadow read` (the control socket).
pub(crate) fn read_cli(dir: &Path, id: &str) -> Result<Image, String> {
    let file = dir.join("shadow-read.raw");
    let out = vs_raw(
        dir,
        &[
            "read",
            "--for",
            IMG,
            "--shadow",
            id,
            "--offset",
            "0",
            "--length",
            "64M",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    if !out.status.success() {
        return Err(format!("volshadow read: {}", stderr(&out)));
    }
    let bytes = std::fs::read(&file).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&file);
    if bytes.len() != IMG_SIZE as usize {
        return Err(format!("volshadow read gave {} bytes", bytes.len()));
    }
    let mut img = Image {
        ids: vec![0; BLOCKS],
        notes: BTreeMap::new(),
    };
    img.decode(0, &bytes, &mut vec![0u8; BLOCK]);
    Ok(img)
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}
