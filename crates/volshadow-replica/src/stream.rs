//! The send stream (and the object store's manifest, the same format with
//! references instead of data): a header, records in increasing offset
//! order each with its blake3, and an end record whose hash covers the
//! header and every record's hash. Byte tables in docs/FORMAT.md.
//!
//! Reading keeps one record's data (at most [`MAX_DATA`]) in memory, so a
//! stream of any size is read in bounded memory; every record is checked
//! before it is handed out, and the end record last.

use std::io::{Read, Write};

use uuid::Uuid;

use crate::error::{Error, Result};

/// `VSHSEND\x01`.
pub const MAGIC: [u8; 8] = *b"VSHSEND\x01";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;
pub const RECORD_HEADER_LEN: usize = 24;
pub const HASH_LEN: usize = 32;
/// Most data bytes one `Data` record carries (a reader refuses more).
pub const MAX_DATA: u64 = 4 << 20;
/// Feature bits a reader must understand: none yet.
const KNOWN_INCOMPAT: u64 = 0;

/// What the records carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Data` and `Zero` records: a stream to apply.
    Stream = 1,
    /// `Ref` and `Zero` records: an object store's manifest.
    Manifest = 2,
}

/// The stream's header: what it is a copy of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The source volume's chunk size.
    pub chunk_size: u32,
    pub volume_len: u64,
    pub volume_id: Uuid,
    pub shadow_id: Uuid,
    /// The shadow copy an incremental stream applies on; `None`: a full one.
    pub base_id: Option<Uuid>,
    /// The source shadow copy's creation time, ns since the Unix epoch.
    pub created_ns: u64,
    /// `Stream`: the largest `Data` record; `Manifest`: the block size
    /// (every `Ref` starts on a block boundary and is at most one block).
    pub piece: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        // 16..24 incompat, 24..32 compat: zero.
        b[32..36].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[36..40].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.volume_len.to_le_bytes());
        b[48..64].copy_from_slice(self.volume_id.as_bytes());
        b[64..80].copy_from_slice(self.shadow_id.as_bytes());
        b[80..96].copy_from_slice(self.base_id.unwrap_or(Uuid::nil()).as_bytes());
        b[96..104].copy_from_slice(&self.created_ns.to_le_bytes());
        b[104..108].copy_from_slice(&self.piece.to_le_bytes());
        let crc = crc32c::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self> {
        if b[0..8] != MAGIC {
            return Err(Error::NotAStream);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let damaged = |what: &str, at: u64| Error::Damaged {
            what: format!("header: {what}"),
            at,
        };
        if crc32c::crc32c(&b[..124]) != u32_at(b, 124) {
            return Err(damaged("checksum mismatch", 124));
        }
        if u32_at(b, 12) as usize != HEADER_LEN {
            return Err(damaged("unexpected header length", 12));
        }
        let incompat = u64_at(b, 16);
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(Error::Features(incompat));
        }
        let kind = match u32_at(b, 32) {
            1 => Kind::Stream,
            2 => Kind::Manifest,
            _ => return Err(damaged("unknown kind", 32)),
        };
        let chunk_size = u32_at(b, 36);
        if !chunk_size.is_power_of_two() || !(4096..=1 << 20).contains(&chunk_size) {
            return Err(damaged("chunk size is not a power of two in 4K..=1M", 36));
        }
        let piece = u32_at(b, 104);
        let piece_ok = match kind {
            Kind::Stream => piece > 0 && u64::from(piece) <= MAX_DATA,
            Kind::Manifest => {
                piece.is_power_of_two() && u64::from(piece) <= MAX_DATA && piece >= chunk_size
            }
        };
        if !piece_ok {
            return Err(damaged("record size out of range", 104));
        }
        let uuid = |at: usize| {
            let mut u = [0u8; 16];
            u.copy_from_slice(&b[at..at + 16]);
            Uuid::from_bytes(u)
        };
        let base = uuid(80);
        Ok(Header {
            kind,
            chunk_size,
            volume_len: u64_at(b, 40),
            volume_id: uuid(48),
            shadow_id: uuid(64),
            base_id: (!base.is_nil()).then_some(base),
            created_ns: u64_at(b, 96),
            piece,
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

const KIND_DATA: u32 = 1;
const KIND_ZERO: u32 = 2;
const KIND_REF: u32 = 3;
const KIND_END: u32 = 4;

fn record_header(kind: u32, offset: u64, len: u64) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

fn record_hash(head: &[u8; RECORD_HEADER_LEN], body: &[u8]) -> [u8; HASH_LEN] {
    let mut h = blake3::Hasher::new();
    h.update(head);
    h.update(body);
    *h.finalize().as_bytes()
}

/// One record as read, already checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// These bytes at `offset`.
    Data { offset: u64, data: &'a [u8] },
    /// `len` zero bytes at `offset`.
    Zero { offset: u64, len: u64 },
    /// `len` bytes at `offset` are the object whose blake3 is `hash`.
    Ref {
        offset: u64,
        len: u64,
        hash: [u8; HASH_LEN],
    },
}

/// Writes a stream: the header at once, records in increasing offset
/// order, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    header: Header,
    trailer: blake3::Hasher,
    next: u64,
    records: u64,
    covered: u64,
    /// A run of zeros [`push`](Self::push) has not written yet.
    zeros: Option<(u64, u64)>,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(mut out: W, header: Header) -> Result<Self> {
        let h = header.encode();
        out.write_all(&h).map_err(Error::Write)?;
        let mut trailer = blake3::Hasher::new();
        trailer.update(&h);
        Ok(StreamWriter {
            out,
            header,
            trailer,
            next: 0,
            records: 0,
            covered: 0,
            zeros: None,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// `data` at `offset` as a data record, or, when it is all zeros, as
    /// part of one zero record for the whole run.
    pub fn push(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.iter().all(|&b| b == 0) {
            return self.push_zero(offset, data.len() as u64);
        }
        self.data(offset, data)
    }

    fn flush_zeros(&mut self) -> Result<()> {
        match self.zeros.take() {
            Some((at, n)) if n > 0 => self.zero(at, n),
            _ => Ok(()),
        }
    }

    /// Bytes of the volume the records written so far cover.
    pub fn covered(&self) -> u64 {
        self.covered + self.zeros.map_or(0, |z| z.1)
    }

    fn record(&mut self, kind: u32, offset: u64, len: u64, body: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.header.volume_len);
        if offset < self.next || len == 0 || end.is_none() {
            return Err(Error::Refused(format!(
                "record of {len} bytes at {offset} is out of order or outside the volume"
            )));
        }
        let head = record_header(kind, offset, len);
        let hash = record_hash(&head, body);
        self.out.write_all(&head).map_err(Error::Write)?;
        self.out.write_all(body).map_err(Error::Write)?;
        self.out.write_all(&hash).map_err(Error::Write)?;
        self.trailer.update(&hash);
        self.next = offset + len;
        self.records += 1;
        self.covered += len;
        Ok(())
    }

    /// `len` zero bytes at `offset`, joined to a run of zeros just before.
    pub fn push_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match &mut self.zeros {
            Some((at, n)) if *at + *n == offset => *n += len,
            _ => {
                self.flush_zeros()?;
                self.zeros = Some((offset, len));
            }
        }
        Ok(())
    }

    /// `data` at `offset` (at most the header's `piece` bytes).
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        debug_assert_eq!(self.header.kind, Kind::Stream);
        self.flush_zeros()?;
        if data.len() as u64 > u64::from(self.header.piece) {
            return Err(Error::Refused(format!(
                "a data record of {} bytes is more than the stream's piece {}",
                data.len(),
                self.header.piece
            )));
        }
        self.record(KIND_DATA, offset, data.len() as u64, data)
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.record(KIND_ZERO, offset, len, &[])
    }

    /// `len` bytes at `offset` are the object named by `hash`.
    pub fn reference(&mut self, offset: u64, len: u64, hash: &[u8; HASH_LEN]) -> Result<()> {
        debug_assert_eq!(self.header.kind, Kind::Manifest);
        self.flush_zeros()?;
        self.record(KIND_REF, offset, len, hash)
    }

    /// The end record; returns the output (flushed).
    pub fn finish(mut self) -> Result<W> {
        self.flush_zeros()?;
        let head = record_header(KIND_END, self.records, self.covered);
        self.trailer.update(&head);
        let total = *self.trailer.finalize().as_bytes();
        self.out.write_all(&head).map_err(Error::Write)?;
        self.out.write_all(&total).map_err(Error::Write)?;
        self.out.flush().map_err(Error::Write)?;
        Ok(self.out)
    }
}

/// Reads and checks a stream record by record.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    input: R,
    header: Header,
    trailer: blake3::Hasher,
    /// Bytes read so far (for error messages).
    at: u64,
    next: u64,
    records: u64,
    covered: u64,
    buf: Vec<u8>,
    done: bool,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        read_exact(&mut input, &mut h, 0)?;
        let header = Header::decode(&h)?;
        let mut trailer = blake3::Hasher::new();
        trailer.update(&h);
        Ok(StreamReader {
            input,
            header,
            trailer,
            at: HEADER_LEN as u64,
            next: 0,
            records: 0,
            covered: 0,
            buf: Vec::new(),
            done: false,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Stream bytes read so far.
    pub fn position(&self) -> u64 {
        self.at
    }

    fn damaged(&self, what: impl Into<String>, at: u64) -> Error {
        Error::Damaged {
            what: what.into(),
            at,
        }
    }

    /// The next record, checked; `None` after the end record, once its
    /// hash over the whole stream matched and nothing follows it.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>> {
        if self.done {
            return Ok(None);
        }
        let start = self.at;
        let mut head = [0u8; RECORD_HEADER_LEN];
        read_exact(&mut self.input, &mut head, self.at)?;
        self.at += RECORD_HEADER_LEN as u64;
        let kind = u32_at(&head, 0);
        let offset = u64_at(&head, 8);
        let len = u64_at(&head, 16);
        if kind == KIND_END {
            let mut total = [0u8; HASH_LEN];
            read_exact(&mut self.input, &mut total, self.at)?;
            self.at += HASH_LEN as u64;
            self.trailer.update(&head);
            if *self.trailer.finalize().as_bytes() != total {
                return Err(self.damaged(
                    "the end record's checksum of the stream does not match",
                    start,
                ));
            }
            if offset != self.records || len != self.covered {
                return Err(self.damaged(
                    format!(
                        "the end record counts {offset} records of {len} bytes, the stream had {} of {}",
                        self.records, self.covered
                    ),
                    start,
                ));
            }
            let mut extra = [0u8; 1];
            match self.input.read(&mut extra) {
                Ok(0) => {}
                Ok(_) => return Err(self.damaged("bytes follow the end record", self.at)),
                Err(e) => {
                    return Err(Error::Read {
                        at: self.at,
                        source: e,
                    });
                }
            }
            self.done = true;
            return Ok(None);
        }
        let h = &self.header;
        let valid_kind = matches!(
            (h.kind, kind),
            (Kind::Stream, KIND_DATA) | (Kind::Manifest, KIND_REF) | (_, KIND_ZERO)
        );
        if !valid_kind || u32_at(&head, 4) != 0 {
            return Err(self.damaged(format!("unknown record kind {kind}"), start));
        }
        let end = offset.checked_add(len);
        if len == 0 || offset < self.next || end.is_none_or(|e| e > h.volume_len) {
            return Err(self.damaged(
                format!(
                    "record of {len} bytes at offset {offset} is out of order or outside the volume"
                ),
                start,
            ));
        }
        let body_len = match kind {
            KIND_DATA if len > u64::from(h.piece) => {
                return Err(self.damaged(format!("data record of {len} bytes is too large"), start));
            }
            KIND_DATA => len as usize,
            KIND_REF => {
                let block = u64::from(h.piece);
                if !offset.is_multiple_of(block) || len > block {
                    return Err(self.damaged("reference not one block", start));
                }
                HASH_LEN
            }
            _ => 0,
        };
        self.buf.resize(body_len + HASH_LEN, 0);
        read_exact(&mut self.input, &mut self.buf, self.at)?;
        self.at += self.buf.len() as u64;
        let (body, hash) = self.buf.split_at(body_len);
        let want = record_hash(&head, body);
        if want != hash {
            return Err(Error::Damaged {
                what: format!("the hash of the record at volume offset {offset} does not match"),
                at: start,
            });
        }
        self.trailer.update(&want);
        self.next = offset + len;
        self.records += 1;
        self.covered += len;
        let body = &self.buf[..body_len];
        Ok(Some(match kind {
            KIND_DATA => Record::Data { offset, data: body },
            KIND_REF => {
                let mut hash = [0u8; HASH_LEN];
                hash.copy_from_slice(body);
                Record::Ref { offset, len, hash }
            }
            _ => Record::Zero { offset, len },
        }))
    }
}

/// `read_exact` that tells a cut stream from a failing read.
fn read_exact(input: &mut impl Read, buf: &mut [u8], at: u64) -> Result<()> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => return Err(Error::Truncated { at: at + n as u64 }),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Read {
                    at: at + n as u64,
                    source: e,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(kind: Kind) -> Header {
        Header {
            kind,
            chunk_size: 4096,
            volume_len: 1 << 20,
            volume_id: Uuid::from_u128(1),
            shadow_id: Uuid::from_u128(2),
            base_id: Some(Uuid::from_u128(3)),
            created_ns: 42,
            piece: 65536,
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), header(Kind::Stream)).unwrap();
        w.data(0, &[1u8; 5000]).unwrap();
        w.push_zero(8192, 4096).unwrap();
        w.data(65536, &[9u8; 65536]).unwrap();
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut r = StreamReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(match rec {
                Record::Data { offset, data } => (offset, data.to_vec()),
                Record::Zero { offset, len } => (offset, vec![0; len as usize]),
                Record::Ref { .. } => unreachable!(),
            });
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let recs = read_all(&bytes).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0], (0, vec![1u8; 5000]));
        assert_eq!(recs[1], (8192, vec![0u8; 4096]));
        assert_eq!(recs[2], (65536, vec![9u8; 65536]));
        assert_eq!(
            StreamReader::new(&bytes[..]).unwrap().header(),
            &header(Kind::Stream)
        );
    }

    /// Every single-byte flip and every cut is refused.
    #[test]
    fn every_flip_and_every_cut_is_refused() {
        let bytes = sample();
        for i in (0..bytes.len()).step_by(61).chain([bytes.len() - 1]) {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(read_all(&b).is_err(), "flip at {i} passed");
        }
        for cut in (0..bytes.len()).step_by(67) {
            assert!(read_all(&bytes[..cut]).is_err(), "cut at {cut} passed");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read_all(&longer).is_err());
    }

    #[test]
    fn a_dropped_record_is_refused() {
        let mut w = StreamWriter::new(Vec::new(), header(Kind::Stream)).unwrap();
        w.data(0, &[1u8; 100]).unwrap();
        let keep = w.out.len();
        w.data(4096, &[2u8; 100]).unwrap();
        let cut_to = w.out.len();
        w.data(8192, &[3u8; 100]).unwrap();
        let mut bytes = w.finish().unwrap();
        bytes.drain(keep..cut_to);
        assert!(matches!(read_all(&bytes), Err(Error::Damaged { .. })));
    }

    #[test]
    fn manifest_refs() {
        let mut w = StreamWriter::new(Vec::new(), header(Kind::Manifest)).unwrap();
        w.reference(0, 65536, &[7u8; 32]).unwrap();
        w.reference(131072, 100, &[8u8; 32]).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = StreamReader::new(&bytes[..]).unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Ref {
                offset: 0,
                len: 65536,
                hash: [7u8; 32]
            })
        );
        assert!(r.next_record().unwrap().is_some());
        assert_eq!(r.next_record().unwrap(), None);
    }
}
