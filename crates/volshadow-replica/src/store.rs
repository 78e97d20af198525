//! An S3 bucket (through `object_store`) as a replication target: chunks
//! stored by the blake3 of their bytes under `PREFIX/chunks/`, shared by
//! every shadow copy and volume that has them, and one manifest (the
//! stream format with references, docs/FORMAT.md) per shadow copy under
//! `PREFIX/manifests/ID`. Endpoint and credentials come from the usual
//! `AWS_*` environment variables.
//!
//! `object_store` is async; the runtime (tokio, current thread) lives
//! here and nowhere else: callers see blocking calls. A few requests are
//! kept in flight at once ([`IN_FLIGHT`]), each of at most one block, so
//! memory stays bounded.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::stream::HASH_LEN;

/// Requests kept in flight by [`Uploads`] and [`Prefetch`].
pub const IN_FLIGHT: usize = 8;
/// Manifests are read a piece of this size at a time.
const MANIFEST_PIECE: u64 = 1 << 20;
/// Part size of a manifest's multipart upload.
const MANIFEST_PART: usize = 8 << 20;

/// One bucket and prefix.
#[derive(Debug)]
pub struct Bucket {
    rt: Runtime,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

pub fn hex(hash: &[u8; HASH_LEN]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; HASH_LEN]> {
    if s.len() != 2 * HASH_LEN {
        return None;
    }
    let mut out = [0u8; HASH_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Bucket {
    /// `s3://bucket[/prefix]`.
    pub fn open(url: &str) -> Result<Self> {
        let bad = |what: String| Error::Store {
            url: url.to_string(),
            what,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://bucket/prefix".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name".into()));
        }
        let prefix = prefix.trim_matches('/').to_string();
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| bad(format!("starting the I/O runtime: {e}")))?;
        Ok(Bucket {
            rt,
            store: Arc::new(store),
            prefix,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::Store {
            url: self.url.clone(),
            what: what.to_string(),
        }
    }

    fn path(&self, rest: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rest)
        } else {
            ObjPath::from(format!("{}/{rest}", self.prefix))
        }
    }

    pub fn chunk_path(&self, hash: &[u8; HASH_LEN]) -> ObjPath {
        let h = hex(hash);
        self.path(&format!("chunks/{}/{h}", &h[..2]))
    }

    fn manifest_path(&self, id: Uuid) -> ObjPath {
        self.path(&format!("manifests/{id}"))
    }

    /// Starts storing chunks; see [`Uploads`].
    pub fn uploads(&self) -> Uploads<'_> {
        Uploads {
            bucket: self,
            pending: VecDeque::new(),
            uploaded: 0,
            stored: 0,
            uploaded_bytes: 0,
        }
    }

    /// Fetches chunks ahead of their use; see [`Prefetch`].
    pub fn prefetch(&self) -> Prefetch<'_> {
        Prefetch {
            bucket: self,
            pending: VecDeque::new(),
        }
    }

    pub fn get_chunk(&self, hash: &[u8; HASH_LEN]) -> Result<Vec<u8>> {
        let store = self.store.clone();
        let path = self.chunk_path(hash);
        self.rt
            .block_on(async move { store.get(&path).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| self.err(format!("chunk {}: {e}", hex(hash))))
    }

    /// Overwrites an object (tests use it to damage a chunk).
    pub fn put_raw(&self, path: &ObjPath, data: Vec<u8>) -> Result<()> {
        let store = self.store.clone();
        self.rt
            .block_on(async move { store.put(path, PutPayload::from(data)).await })
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Uploads a manifest from `file` (written locally first, so it can
    /// be any size) in parts; it replaces one of the same id.
    pub fn put_manifest(&self, id: Uuid, file: &std::path::Path) -> Result<()> {
        let store = self.store.clone();
        let path = self.manifest_path(id);
        let mut f = std::fs::File::open(file).map_err(|e| Error::File {
            path: file.to_path_buf(),
            source: e,
        })?;
        self.rt
            .block_on(async move {
                let upload = store.put_multipart(&path).await?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, MANIFEST_PART);
                let mut buf = vec![0u8; MANIFEST_PART];
                loop {
                    let n = f.read(&mut buf).map_err(|e| object_store::Error::Generic {
                        store: "manifest file",
                        source: Box::new(e),
                    })?;
                    if n == 0 {
                        break;
                    }
                    w.wait_for_capacity(2).await?;
                    w.write(&buf[..n]);
                }
                w.finish().await
            })
            .map(|_| ())
            .map_err(|e| self.err(format!("manifest {id}: {e}")))
    }

    /// Reads manifest `id` a piece at a time.
    pub fn manifest_reader(&self, id: Uuid) -> Result<ManifestReader<'_>> {
        let store = self.store.clone();
        let path = self.manifest_path(id);
        let p = path.clone();
        let len = self
            .rt
            .block_on(async move { store.head(&p).await })
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => {
                    self.err(format!("there is no shadow copy {id} here"))
                }
                e => self.err(format!("manifest {id}: {e}")),
            })?
            .size;
        Ok(ManifestReader {
            bucket: self,
            path,
            len,
            at: 0,
            buf: Vec::new(),
            pos: 0,
        })
    }

    /// The first `n` bytes of manifest `id` (its header).
    pub fn manifest_head(&self, id: Uuid, n: u64) -> Result<Vec<u8>> {
        let store = self.store.clone();
        let path = self.manifest_path(id);
        self.rt
            .block_on(async move { store.get_range(&path, 0..n).await })
            .map(|b| b.to_vec())
            .map_err(|e| self.err(format!("manifest {id}: {e}")))
    }

    /// Ids of every manifest, sorted.
    pub fn manifests(&self) -> Result<Vec<Uuid>> {
        let mut ids = Vec::new();
        self.each_object("manifests", |name, _| {
            if let Ok(id) = Uuid::parse_str(name) {
                ids.push(id);
            }
            Ok(())
        })?;
        ids.sort();
        Ok(ids)
    }

    /// Calls `f(hash, size)` for every stored chunk (objects under
    /// `chunks/` whose name is not a hash are skipped).
    pub fn each_chunk(&self, mut f: impl FnMut([u8; HASH_LEN], u64) -> Result<()>) -> Result<()> {
        self.each_object("chunks", |name, size| match unhex(name) {
            Some(h) => f(h, size),
            None => Ok(()),
        })
    }

    /// Streams the listing of `dir` page by page.
    fn each_object(&self, dir: &str, mut f: impl FnMut(&str, u64) -> Result<()>) -> Result<()> {
        let prefix = self.path(dir);
        let mut list = self.store.list(Some(&prefix));
        loop {
            let Some(item) = self.rt.block_on(list.next()) else {
                return Ok(());
            };
            let meta = item.map_err(|e| self.err(format!("listing {dir}: {e}")))?;
            if let Some(name) = meta.location.filename() {
                f(name, meta.size)?;
            }
        }
    }

    pub fn delete_manifest(&self, id: Uuid) -> Result<()> {
        let store = self.store.clone();
        let path = self.manifest_path(id);
        self.rt
            .block_on(async move { store.delete(&path).await })
            .map_err(|e| self.err(format!("deleting manifest {id}: {e}")))
    }

    pub fn delete_chunk(&self, hash: &[u8; HASH_LEN]) -> Result<()> {
        let store = self.store.clone();
        let path = self.chunk_path(hash);
        self.rt
            .block_on(async move { store.delete(&path).await })
            .map_err(|e| self.err(format!("deleting chunk {}: {e}", hex(hash))))
    }
}

/// A manifest as a `Read`, fetched a piece at a time.
#[derive(Debug)]
pub struct ManifestReader<'a> {
    bucket: &'a Bucket,
    path: ObjPath,
    len: u64,
    at: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ManifestReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.at >= self.len {
                return Ok(0);
            }
            let end = (self.at + MANIFEST_PIECE).min(self.len);
            let store = self.bucket.store.clone();
            let path = self.path.clone();
            let range = self.at..end;
            let bytes = self
                .bucket
                .rt
                .block_on(async move { store.get_range(&path, range).await })
                .map_err(std::io::Error::other)?;
            self.buf = bytes.to_vec();
            self.pos = 0;
            self.at = end;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Chunk uploads in flight: each first asks whether the chunk is stored
/// (a resumed or deduplicated upload sends nothing), then puts it.
#[derive(Debug)]
pub struct Uploads<'a> {
    bucket: &'a Bucket,
    pending: VecDeque<JoinHandle<object_store::Result<(bool, u64)>>>,
    /// Chunks sent, and chunks found stored already.
    pub uploaded: u64,
    pub stored: u64,
    pub uploaded_bytes: u64,
}

impl Uploads<'_> {
    /// Queues chunk `data` named `hash`; waits while [`IN_FLIGHT`] are.
    pub fn put(&mut self, hash: &[u8; HASH_LEN], data: Vec<u8>) -> Result<()> {
        while self.pending.len() >= IN_FLIGHT {
            self.wait_one()?;
        }
        let store = self.bucket.store.clone();
        let path = self.bucket.chunk_path(hash);
        let len = data.len() as u64;
        self.pending.push_back(self.bucket.rt.spawn(async move {
            match store.head(&path).await {
                Ok(meta) if meta.size == len => return Ok((false, len)),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            store.put(&path, PutPayload::from(data)).await?;
            Ok((true, len))
        }));
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        if let Some(h) = self.pending.pop_front() {
            let (sent, len) = self
                .bucket
                .rt
                .block_on(h)
                .map_err(|e| self.bucket.err(e))?
                .map_err(|e| self.bucket.err(format!("storing a chunk: {e}")))?;
            if sent {
                self.uploaded += 1;
                self.uploaded_bytes += len;
            } else {
                self.stored += 1;
            }
        }
        Ok(())
    }

    /// Waits for every queued upload.
    pub fn finish(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.wait_one()?;
        }
        Ok(())
    }
}

/// One chunk being fetched, for the block at `offset` of `len` bytes.
#[derive(Debug)]
struct Fetch {
    hash: [u8; HASH_LEN],
    offset: u64,
    len: u64,
    task: JoinHandle<object_store::Result<Vec<u8>>>,
}

/// Chunk downloads started ahead of their use, in order.
#[derive(Debug)]
pub struct Prefetch<'a> {
    bucket: &'a Bucket,
    pending: VecDeque<Fetch>,
}

impl Prefetch<'_> {
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Starts fetching chunk `hash`, the `len` bytes at `offset`.
    pub fn start(&mut self, hash: [u8; HASH_LEN], offset: u64, len: u64) {
        let store = self.bucket.store.clone();
        let path = self.bucket.chunk_path(&hash);
        let task = self
            .bucket
            .rt
            .spawn(async move { Ok(store.get(&path).await?.bytes().await?.to_vec()) });
        self.pending.push_back(Fetch {
            hash,
            offset,
            len,
            task,
        });
    }

    /// The oldest fetch: its offset and bytes, checked against the
    /// chunk's name and the block's length.
    pub fn finish_oldest(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(f) = self.pending.pop_front() else {
            return Ok(None);
        };
        let name = hex(&f.hash);
        let data = self
            .bucket
            .rt
            .block_on(f.task)
            .map_err(|e| self.bucket.err(e))?
            .map_err(|e| self.bucket.err(format!("chunk {name}: {e}")))?;
        if *blake3::hash(&data).as_bytes() != f.hash {
            return Err(self.bucket.err(format!(
                "chunk {name} is damaged: its bytes do not hash to its name"
            )));
        }
        if data.len() as u64 != f.len {
            return Err(self.bucket.err(format!(
                "chunk {name} has {} bytes, the block at offset {} {}",
                data.len(),
                f.offset,
                f.len
            )));
        }
        Ok(Some((f.offset, data)))
    }
}
