//! Shadow copies in a bucket ([`Bucket`]): upload (full, or only the
//! blocks changed since a shadow copy already there), restore onto a
//! replica through [`Apply`], list, verify and delete.
//!
//! A manifest covers its whole volume, block by block (`Ref` or `Zero`
//! records, [`BLOCK`] bytes each, runs of zero blocks joined), so each
//! stands alone: restoring needs no chain, and deleting one removes only
//! the chunks no other manifest names. It is uploaded after every chunk
//! it names is stored, so a manifest never names a missing chunk, and an
//! interrupted upload leaves only chunks, which the next one finds and
//! does not send again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::BufWriter;

use serde::Serialize;
use uuid::Uuid;

use crate::apply::Apply;
use crate::error::{Error, Result};
use crate::store::{Bucket, ManifestReader, hex};
use crate::stream::{HASH_LEN, HEADER_LEN, Header, Kind, Record, StreamReader, StreamWriter};

/// Bytes per stored chunk (a multiple of every volume chunk size).
pub const BLOCK: u64 = 1 << 20;
/// Changed extents are asked for a window at a time.
const WINDOW: u64 = 1 << 30;

/// One block of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Zero,
    Ref([u8; HASH_LEN]),
}

/// A manifest read block by block, in order.
struct Blocks<'a> {
    reader: StreamReader<std::io::BufReader<ManifestReader<'a>>>,
    /// The record being walked: (offset, len, entry).
    cur: Option<(u64, u64, Entry)>,
}

impl<'a> Blocks<'a> {
    fn open(bucket: &'a Bucket, id: Uuid) -> Result<Self> {
        let reader = StreamReader::new(std::io::BufReader::new(bucket.manifest_reader(id)?))?;
        let h = reader.header();
        if h.kind != Kind::Manifest || h.shadow_id != id || u64::from(h.piece) != BLOCK {
            return Err(Error::Damaged {
                what: format!("manifest {id}: its header does not describe it"),
                at: 0,
            });
        }
        Ok(Blocks { reader, cur: None })
    }

    fn header(&self) -> &Header {
        self.reader.header()
    }

    /// The entry of the block at `offset` (asked in increasing order).
    fn at(&mut self, offset: u64) -> Result<Entry> {
        loop {
            if let Some((o, l, e)) = self.cur
                && offset < o + l
            {
                if offset < o || (matches!(e, Entry::Ref(_)) && offset != o) {
                    break;
                }
                return Ok(e);
            }
            self.cur = match self.reader.next_record()? {
                Some(Record::Zero { offset, len }) => Some((offset, len, Entry::Zero)),
                Some(Record::Ref { offset, len, hash }) => Some((offset, len, Entry::Ref(hash))),
                Some(Record::Data { .. }) | None => break,
            };
        }
        Err(Error::Damaged {
            what: format!(
                "manifest {}: no record for the block at offset {offset}",
                self.header().shadow_id
            ),
            at: self.reader.position(),
        })
    }

    /// Reads to the end, so the end record's checksum is checked.
    fn finish(mut self) -> Result<()> {
        while self.reader.next_record()?.is_some() {}
        Ok(())
    }
}

/// What a shadow copy is, for its manifest's header.
#[derive(Debug, Clone)]
pub struct ShadowMeta {
    pub volume_id: Uuid,
    pub volume_len: u64,
    pub chunk_size: u32,
    pub shadow_id: Uuid,
    pub created_ns: u64,
}

/// What an upload did.
#[derive(Debug, Clone, Serialize)]
pub struct UploadReport {
    pub shadow: Uuid,
    pub since: Option<Uuid>,
    /// Chunks sent, and chunks already stored (deduplicated or resumed).
    pub uploaded: u64,
    pub already_stored: u64,
    pub uploaded_bytes: u64,
    /// Bytes of the shadow copy read and hashed.
    pub read_bytes: u64,
}

fn src_err(e: impl std::fmt::Display) -> Error {
    Error::Source(e.to_string())
}

/// Uploads shadow copy `meta`: every block, or with `since` (a shadow
/// copy of the same volume whose manifest is in the bucket) only blocks
/// holding a chunk `changed` names; `read` reads the shadow copy.
pub fn upload<E: std::fmt::Display>(
    bucket: &Bucket,
    meta: &ShadowMeta,
    since: Option<Uuid>,
    mut changed: impl FnMut(u64, u64) -> Result<Vec<(u64, u64)>, E>,
    mut read: impl FnMut(u64, u64) -> Result<Vec<u8>, E>,
    mut progress: impl FnMut(u64),
) -> Result<UploadReport> {
    let mut base = match since {
        Some(id) => {
            let b = Blocks::open(bucket, id)?;
            if b.header().volume_id != meta.volume_id || b.header().volume_len != meta.volume_len {
                return Err(Error::Refused(format!(
                    "shadow copy {id} in {} is of another volume",
                    bucket.url()
                )));
            }
            Some(b)
        }
        None => None,
    };
    let header = Header {
        kind: Kind::Manifest,
        chunk_size: meta.chunk_size,
        volume_len: meta.volume_len,
        volume_id: meta.volume_id,
        shadow_id: meta.shadow_id,
        base_id: None,
        created_ns: meta.created_ns,
        piece: BLOCK as u32,
    };
    let tmp = std::env::temp_dir().join(format!("volshadow-manifest-{}", Uuid::new_v4()));
    let file_err = |e| Error::File {
        path: tmp.clone(),
        source: e,
    };
    let result = (|| -> Result<UploadReport> {
        let file = std::fs::File::create(&tmp).map_err(file_err)?;
        let mut manifest = StreamWriter::new(BufWriter::new(file), header)?;
        let mut uploads = bucket.uploads();
        let mut read_bytes = 0;
        let len = meta.volume_len;
        let mut w = 0;
        while w < len {
            let wend = (w + WINDOW).min(len);
            let dirty: Option<BTreeSet<u64>> = match since {
                Some(_) => {
                    let mut set = BTreeSet::new();
                    for (o, l) in changed(w, wend - w).map_err(src_err)? {
                        set.extend(o / BLOCK..(o + l).div_ceil(BLOCK));
                    }
                    Some(set)
                }
                None => None,
            };
            let mut off = w;
            while off < wend {
                let n = BLOCK.min(len - off);
                let old = match &mut base {
                    Some(b) => Some(b.at(off)?),
                    None => None,
                };
                let fresh = dirty.as_ref().is_none_or(|d| d.contains(&(off / BLOCK)));
                let entry = match old {
                    Some(e) if !fresh => e,
                    _ => {
                        let data = read(off, n).map_err(src_err)?;
                        read_bytes += n;
                        if data.iter().all(|&b| b == 0) {
                            Entry::Zero
                        } else {
                            let hash = *blake3::hash(&data).as_bytes();
                            uploads.put(&hash, data)?;
                            Entry::Ref(hash)
                        }
                    }
                };
                match entry {
                    Entry::Zero => manifest.push_zero(off, n)?,
                    Entry::Ref(h) => manifest.reference(off, n, &h)?,
                }
                progress(n);
                off += n;
            }
            w = wend;
        }
        if let Some(b) = base.take() {
            b.finish()?;
        }
        uploads.finish()?;
        let out = manifest.finish()?;
        out.into_inner()
            .map_err(|e| file_err(e.into_error()))?
            .sync_all()
            .map_err(file_err)?;
        bucket.put_manifest(meta.shadow_id, &tmp)?;
        Ok(UploadReport {
            shadow: meta.shadow_id,
            since,
            uploaded: uploads.uploaded,
            already_stored: uploads.stored,
            uploaded_bytes: uploads.uploaded_bytes,
            read_bytes,
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// The header of shadow copy `id`'s manifest (what a restore creates).
pub fn manifest_header(bucket: &Bucket, id: Uuid) -> Result<Header> {
    let bytes = bucket.manifest_head(id, HEADER_LEN as u64)?;
    let arr: [u8; HEADER_LEN] = bytes.as_slice().try_into().map_err(|_| Error::Damaged {
        what: format!("manifest {id} is shorter than a header"),
        at: 0,
    })?;
    Header::decode(&arr)
}

/// Restores shadow copy `target` through `apply`: every block, or with
/// `base` (the replica's newest shadow copy, whose manifest is in the
/// bucket) only the blocks whose entries differ. Every chunk is checked
/// against its name before it is written.
pub fn restore(
    bucket: &Bucket,
    target: Uuid,
    base: Option<Uuid>,
    apply: &mut Apply<'_>,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    let mut new = Blocks::open(bucket, target)?;
    let mut old = base.map(|b| Blocks::open(bucket, b)).transpose()?;
    let len = new.header().volume_len;
    if let Some(o) = &old
        && o.header().volume_len != len
    {
        return Err(Error::Refused(
            "the two shadow copies differ in size".into(),
        ));
    }
    let mut fetch = bucket.prefetch();
    let mut write_oldest = |fetch: &mut crate::store::Prefetch<'_>, apply: &mut Apply<'_>| {
        if let Some((offset, data)) = fetch.finish_oldest()? {
            apply.record(&Record::Data {
                offset,
                data: &data,
            })?;
            progress(data.len() as u64);
        }
        Ok::<(), Error>(())
    };
    let mut off = 0;
    while off < len {
        let n = BLOCK.min(len - off);
        let e = new.at(off)?;
        let same = match &mut old {
            Some(o) => o.at(off)? == e,
            None => false,
        };
        if !same {
            match e {
                Entry::Zero => apply.record(&Record::Zero {
                    offset: off,
                    len: n,
                })?,
                Entry::Ref(h) => {
                    if fetch.len() >= crate::store::IN_FLIGHT {
                        write_oldest(&mut fetch, apply)?;
                    }
                    fetch.start(h, off, n);
                }
            }
        }
        off += n;
    }
    while !fetch.is_empty() {
        write_oldest(&mut fetch, apply)?;
    }
    new.finish()?;
    if let Some(o) = old {
        o.finish()?;
    }
    Ok(())
}

/// One shadow copy in a bucket, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct StoredShadow {
    pub id: Uuid,
    pub volume_id: Uuid,
    pub volume_len: u64,
    /// Seconds since the Unix epoch (the source shadow copy's creation).
    pub created: f64,
}

pub fn list(bucket: &Bucket) -> Result<Vec<StoredShadow>> {
    let mut out = Vec::new();
    for id in bucket.manifests()? {
        let h = manifest_header(bucket, id)?;
        out.push(StoredShadow {
            id,
            volume_id: h.volume_id,
            volume_len: h.volume_len,
            created: h.created_ns as f64 / 1e9,
        });
    }
    out.sort_by(|a, b| a.created.total_cmp(&b.created));
    Ok(out)
}

/// What `verify` found in a bucket.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BucketReport {
    pub manifests: u64,
    pub chunks_checked: u64,
    /// Chunks whose bytes do not hash to their name.
    pub damaged: Vec<String>,
    /// Chunks a manifest names that are not stored: (manifest, chunk).
    pub missing: Vec<(Uuid, String)>,
    /// Stored chunks no manifest names (an upload cut before its
    /// manifest; the next upload uses them, `delete` removes them).
    pub unreferenced: u64,
    /// Manifests that could not be read whole, one line each.
    pub problems: Vec<String>,
}

impl BucketReport {
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.missing.is_empty() && self.problems.is_empty()
    }
}

/// Every chunk named by every manifest (except `skip`), with one
/// manifest that names it. Memory: one entry per distinct chunk.
fn referenced(
    bucket: &Bucket,
    skip: Option<Uuid>,
    problems: &mut Vec<String>,
) -> Result<(u64, HashMap<[u8; HASH_LEN], Uuid>)> {
    let mut refs = HashMap::new();
    let mut n = 0;
    for id in bucket.manifests()? {
        if Some(id) == skip {
            continue;
        }
        n += 1;
        let walked = (|| -> Result<()> {
            let mut r = StreamReader::new(std::io::BufReader::new(bucket.manifest_reader(id)?))?;
            while let Some(rec) = r.next_record()? {
                if let Record::Ref { hash, .. } = rec {
                    refs.entry(hash).or_insert(id);
                }
            }
            Ok(())
        })();
        if let Err(e) = walked {
            problems.push(format!("manifest {id}: {e}"));
        }
    }
    Ok((n, refs))
}

/// Reads every manifest whole and rehashes every chunk.
pub fn verify(bucket: &Bucket, mut progress: impl FnMut(u64)) -> Result<BucketReport> {
    let mut report = BucketReport::default();
    let (n, mut refs) = referenced(bucket, None, &mut report.problems)?;
    report.manifests = n;
    let mut hashes = Vec::new();
    bucket.each_chunk(|h, _| {
        hashes.push(h);
        Ok(())
    })?;
    for h in hashes {
        let data = bucket.get_chunk(&h)?;
        report.chunks_checked += 1;
        progress(data.len() as u64);
        if *blake3::hash(&data).as_bytes() != h {
            report.damaged.push(hex(&h));
        }
        if refs.remove(&h).is_none() {
            report.unreferenced += 1;
        }
    }
    let mut missing: Vec<(Uuid, String)> = refs.into_iter().map(|(h, m)| (m, hex(&h))).collect();
    missing.sort();
    report.missing = missing;
    Ok(report)
}

/// Deletes shadow copy `id`'s manifest, then every chunk no other
/// manifest names; returns how many chunks went. Refused (nothing
/// deleted) when another manifest cannot be read, since its chunks would
/// look unreferenced.
pub fn delete(bucket: &Bucket, id: Uuid) -> Result<u64> {
    manifest_header(bucket, id)?;
    let mut problems = Vec::new();
    let (_, keep) = referenced(bucket, Some(id), &mut problems)?;
    if let Some(p) = problems.first() {
        return Err(Error::Refused(format!(
            "{p}; nothing was deleted (its chunks could be taken for unreferenced)"
        )));
    }
    bucket.delete_manifest(id)?;
    let mut gone = Vec::new();
    bucket.each_chunk(|h, _| {
        if !keep.contains_key(&h) {
            gone.push(h);
        }
        Ok(())
    })?;
    for h in &gone {
        bucket.delete_chunk(h)?;
    }
    Ok(gone.len() as u64)
}

/// A unique manifest id from a full id or prefix.
pub fn resolve(bucket: &Bucket, id: &str) -> Result<Uuid> {
    let id = id.trim().to_ascii_lowercase();
    let all = bucket.manifests()?;
    let m: HashSet<Uuid> = all
        .into_iter()
        .filter(|u| u.to_string().starts_with(&id) || u.simple().to_string().starts_with(&id))
        .collect();
    let mut m: Vec<Uuid> = m.into_iter().collect();
    match (m.pop(), m.is_empty()) {
        (Some(one), true) if !id.is_empty() => Ok(one),
        (None, _) => Err(Error::Refused(format!(
            "there is no shadow copy {id} in {}",
            bucket.url()
        ))),
        _ => Err(Error::Refused(format!(
            "{id:?} names more than one shadow copy in {}; give more of the id",
            bucket.url()
        ))),
    }
}

/// Whether `path` is an object store URL rather than a file.
pub fn is_url(s: &str) -> bool {
    s.starts_with("s3://")
}
