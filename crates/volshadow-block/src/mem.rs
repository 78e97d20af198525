//! A device in RAM, for tests and benchmarks.

use std::sync::{PoisonError, RwLock};

use crate::{BlockDevice, Error, Op, Result, check_range};

/// Bytes per independently locked segment. Writers to different segments do
/// not contend; a request spanning segments locks them one at a time, which
/// is as much atomicity as a real disk gives.
const SEGMENT: usize = 1 << 20;

/// One lazily allocated segment; `None` reads as zeros.
type Segment = RwLock<Option<Box<[u8]>>>;

/// A RAM-backed device. Segments are allocated on first write, so a large
/// mostly-empty device costs little memory (like a sparse file).
#[derive(Debug)]
pub struct MemDevice {
    len: u64,
    block_size: u32,
    segments: Box<[Segment]>,
}

impl MemDevice {
    /// A zero-filled device of `len` bytes with 512-byte sectors.
    pub fn new(len: u64) -> Self {
        Self::with_block_size(len, 512)
    }

    /// A zero-filled device with the given logical sector size.
    pub fn with_block_size(len: u64, block_size: u32) -> Self {
        let n = len.div_ceil(SEGMENT as u64) as usize;
        MemDevice {
            len,
            block_size,
            segments: (0..n).map(|_| RwLock::new(None)).collect(),
        }
    }

    /// A copy of the whole contents (tests compare it with a model).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len as usize];
        self.copy_out(&mut out, 0);
        out
    }

    fn segment_len(&self, idx: usize) -> usize {
        let start = idx as u64 * SEGMENT as u64;
        (self.len - start).min(SEGMENT as u64) as usize
    }

    /// Splits `offset..offset+len` into (segment index, offset in segment,
    /// position in the caller's buffer, length) pieces.
    fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let mut pos = 0usize;
        std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let abs = offset + pos as u64;
            let seg = (abs / SEGMENT as u64) as usize;
            let in_seg = (abs % SEGMENT as u64) as usize;
            let n = (SEGMENT - in_seg).min(len - pos);
            let piece = (seg, in_seg, pos, n);
            pos += n;
            Some(piece)
        })
    }

    fn copy_out(&self, buf: &mut [u8], offset: u64) {
        for (seg, at, pos, n) in Self::pieces(offset, buf.len()) {
            let guard = self.segments[seg]
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match guard.as_deref() {
                Some(data) => buf[pos..pos + n].copy_from_slice(&data[at..at + n]),
                None => buf[pos..pos + n].fill(0),
            }
        }
    }
}

impl BlockDevice for MemDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self, Op::Read, offset, buf.len() as u64)?;
        self.copy_out(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self, Op::Write, offset, buf.len() as u64)?;
        for (seg, at, pos, n) in Self::pieces(offset, buf.len()) {
            let mut guard = self.segments[seg]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let seg_len = self.segment_len(seg);
            let data = guard.get_or_insert_with(|| vec![0u8; seg_len].into_boxed_slice());
            data[at..at + n].copy_from_slice(&buf[pos..pos + n]);
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self, Op::Discard, offset, len)?;
        let len = usize::try_from(len).map_err(|_| Error::Invalid {
            device: self.name(),
            reason: format!("discard length {len} does not fit in memory"),
        })?;
        for (seg, at, _, n) in Self::pieces(offset, len) {
            let mut guard = self.segments[seg]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if at == 0 && n == self.segment_len(seg) {
                *guard = None;
            } else if let Some(data) = guard.as_deref_mut() {
                data[at..at + n].fill(0);
            }
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Option<Vec<crate::Extent>>> {
        check_range(self, Op::Query, offset, len)?;
        let mut out = Vec::new();
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        for (seg, at, pos, n) in Self::pieces(offset, len) {
            let data = self.segments[seg]
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some();
            let _ = at;
            if data {
                crate::push_extent(
                    &mut out,
                    crate::Extent {
                        offset: offset + pos as u64,
                        len: n as u64,
                    },
                );
            }
        }
        Ok(Some(out))
    }

    fn name(&self) -> String {
        "memory device".to_owned()
    }
}
