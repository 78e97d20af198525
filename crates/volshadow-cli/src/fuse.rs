//! The volume as a FUSE file system: `live` (read-write) and
//! `shadows/<id>` (read-only), each one file the size of the volume, served
//! through the engine like an NBD export. Shadow copies made or deleted
//! while mounted appear and go.
//!
//! The files are backed either by the volume opened in this process or,
//! when another process serves it, by that server's control socket
//! ([`Backing`]). Reads, writes and syncs run on a few worker threads (the
//! kernel sends several at once, readahead above all); lookups and
//! listings are answered in the session loop.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request as FuseRequest, TimeOrNow,
};
use rustix::io::Errno;
use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_cow::{SnapshotView, Volume};

use crate::control;
use crate::ops::{Reply, Request, ShadowRow};

const ROOT: u64 = 1;
const LIVE: u64 = 2;
const SHADOWS: u64 = 3;
/// The first inode a shadow copy gets; each copy (by id) gets its own for
/// the mount's life, never reused, so cached pages never outlive it.
const SHADOW_BASE: u64 = 16;
/// How long the kernel may keep names and attributes: shadow copies come
/// and go, so not long.
const TTL: Duration = Duration::from_secs(1);
/// Largest request the kernel sends (reads and writes alike).
const MAX_IO: u32 = 1 << 20;
/// Threads doing the data requests.
const WORKERS: usize = 4;

/// What the files read from and write to.
#[derive(Debug)]
pub enum Backing {
    /// The volume, opened by this process.
    Opened(Volume),
    /// A volume another process serves, reached through its control socket.
    Served(PathBuf),
}

impl Backing {
    fn len(&self) -> Result<u64> {
        match self {
            Backing::Opened(v) => Ok(v.len()),
            Backing::Served(img) => match served(img, &Request::Size, &[])?.0 {
                Reply::Size { bytes } => Ok(bytes),
                other => bail!("unexpected answer {other:?}"),
            },
        }
    }

    fn shadows(&self) -> Result<Vec<ShadowRow>> {
        match self {
            Backing::Opened(v) => Ok(v.snapshots().iter().map(ShadowRow::from).collect()),
            Backing::Served(img) => match served(img, &Request::ListShadows, &[])?.0 {
                Reply::Shadows { shadows } => Ok(shadows),
                other => bail!("unexpected answer {other:?}"),
            },
        }
    }

    fn read(&self, view: Option<&Target>, buf: &mut [u8], offset: u64) -> Result<()> {
        match (self, view) {
            (Backing::Opened(v), None) => Ok(v.read_at(buf, offset)?),
            (Backing::Opened(_), Some(Target::Opened(view))) => Ok(view.read_at(buf, offset)?),
            (Backing::Served(img), target) => {
                let req = Request::Read {
                    shadow: target.map(|t| t.id().to_string()),
                    offset,
                    length: buf.len() as u64,
                };
                let (_, data) = served(img, &req, &[])?;
                if data.len() != buf.len() {
                    bail!("asked for {} bytes, got {}", buf.len(), data.len());
                }
                buf.copy_from_slice(&data);
                Ok(())
            }
            (Backing::Opened(_), Some(Target::Served(_))) => {
                bail!("a served shadow copy on an opened volume")
            }
        }
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Backing::Opened(v) => Ok(v.write_at(buf, offset)?),
            Backing::Served(img) => {
                let req = Request::Write {
                    offset,
                    length: buf.len() as u64,
                };
                served(img, &req, buf).map(|_| ())
            }
        }
    }

    fn flush(&self) -> Result<()> {
        match self {
            Backing::Opened(v) => Ok(v.flush()?),
            Backing::Served(img) => served(img, &Request::Flush, &[]).map(|_| ()),
        }
    }

    fn open_shadow(&self, row: &ShadowRow) -> Result<Target> {
        match self {
            Backing::Opened(v) => Ok(Target::Opened(v.snapshot(row.id)?)),
            Backing::Served(_) => Ok(Target::Served(row.id)),
        }
    }
}

fn served(img: &Path, req: &Request, payload: &[u8]) -> Result<(Reply, Vec<u8>)> {
    match control::call(img, req, payload)? {
        Some(answer) => answer.result,
        None => bail!("the server of {} went away", img.display()),
    }
}

/// A shadow copy being read.
#[derive(Debug)]
enum Target {
    Opened(SnapshotView),
    Served(Uuid),
}

impl Target {
    fn id(&self) -> Uuid {
        match self {
            Target::Opened(v) => v.id(),
            Target::Served(id) => *id,
        }
    }
}

/// A data request handed to a worker, with its reply.
enum Job {
    Read(Option<Arc<Target>>, u64, usize, ReplyData),
    Write(Vec<u8>, u64, ReplyWrite),
    Sync(ReplyEmpty),
}

/// The file system. Requests arrive one at a time (fuser's session loop);
/// data requests go on to the workers.
#[derive(Debug)]
pub struct VolumeFs {
    backing: Arc<Backing>,
    uid: u32,
    gid: u32,
    mounted: SystemTime,
    /// Shadow copies opened for reading, by file handle (one per open).
    open: std::collections::HashMap<u64, Arc<Target>>,
    next_fh: u64,
    /// Each shadow copy's inode, by id.
    inodes: std::collections::HashMap<Uuid, u64>,
    jobs: Option<crossbeam_channel::Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Read(_, off, len, _) => write!(f, "read {len} at {off}"),
            Job::Write(data, off, _) => write!(f, "write {} at {off}", data.len()),
            Job::Sync(_) => f.write_str("sync"),
        }
    }
}

impl VolumeFs {
    pub fn new(backing: Backing) -> Self {
        let backing = Arc::new(backing);
        // Bounded: the session loop waits when the workers are behind, so
        // memory stays at a few requests' worth.
        let (tx, rx) = crossbeam_channel::bounded::<Job>(WORKERS * 2);
        let workers = (0..WORKERS)
            .map(|_| {
                let (rx, backing) = (rx.clone(), backing.clone());
                std::thread::spawn(move || {
                    for job in rx {
                        work(&backing, job);
                    }
                })
            })
            .collect();
        VolumeFs {
            backing,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            mounted: SystemTime::now(),
            open: std::collections::HashMap::new(),
            next_fh: 1,
            inodes: std::collections::HashMap::new(),
            jobs: Some(tx),
            workers,
        }
    }

    fn submit(&self, job: Job) {
        if let Some(tx) = &self.jobs
            && let Err(e) = tx.send(job)
        {
            // Workers only end at destroy; answer rather than hang.
            work(&self.backing, e.into_inner());
        }
    }

    fn attr(&self, ino: u64, size: u64) -> FileAttr {
        let (kind, perm, nlink) = match ino {
            ROOT | SHADOWS => (FileType::Directory, 0o755, 2),
            LIVE => (FileType::RegularFile, 0o600, 1),
            _ => (FileType::RegularFile, 0o400, 1),
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
            crtime: self.mounted,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The inode of shadow copy `id`.
    fn inode(&mut self, id: Uuid) -> u64 {
        let next = SHADOW_BASE + self.inodes.len() as u64;
        *self.inodes.entry(id).or_insert(next)
    }

    /// The shadow copy behind inode `ino`, if it still exists.
    fn shadow_of(&self, ino: u64) -> Result<Option<ShadowRow>> {
        let Some((&id, _)) = self.inodes.iter().find(|(_, i)| **i == ino) else {
            return Ok(None);
        };
        Ok(self.backing.shadows()?.into_iter().find(|s| s.id == id))
    }

    fn getattr_of(&self, ino: u64) -> std::result::Result<FileAttr, Errno> {
        match ino {
            ROOT | SHADOWS => Ok(self.attr(ino, 0)),
            LIVE => Ok(self.attr(ino, self.backing.len().map_err(io_error)?)),
            _ => match self.shadow_of(ino).map_err(io_error)? {
                Some(_) => Ok(self.attr(ino, self.backing.len().map_err(io_error)?)),
                None => Err(Errno::NOENT),
            },
        }
    }

    /// The part of `len` bytes at `offset` inside the volume.
    fn clip(&self, offset: i64, len: u64) -> std::result::Result<(u64, u64), Errno> {
        let size = self.backing.len().map_err(io_error)?;
        let offset = u64::try_from(offset).map_err(|_| Errno::INVAL)?;
        Ok((offset, len.min(size.saturating_sub(offset))))
    }
}

fn work(backing: &Backing, job: Job) {
    match job {
        Job::Read(target, offset, len, reply) => {
            let mut buf = vec![0u8; len];
            match backing.read(target.as_deref(), &mut buf, offset) {
                Ok(()) => reply.data(&buf),
                Err(e) => reply.error(io_error(e).raw_os_error()),
            }
        }
        Job::Write(data, offset, reply) => match backing.write(&data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(io_error(e).raw_os_error()),
        },
        Job::Sync(reply) => match backing.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(io_error(e).raw_os_error()),
        },
    }
}

fn io_error(e: anyhow::Error) -> Errno {
    tracing::warn!(error = %crate::one_line(&e), "FUSE request failed");
    Errno::IO
}

impl Filesystem for VolumeFs {
    fn init(
        &mut self,
        _req: &FuseRequest<'_>,
        config: &mut KernelConfig,
    ) -> std::result::Result<(), i32> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        Ok(())
    }

    fn destroy(&mut self) {
        // Every request answered before the session ends.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    fn lookup(&mut self, _req: &FuseRequest<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let ino = match (parent, name.to_str()) {
            (ROOT, Some("live")) => Some(LIVE),
            (ROOT, Some("shadows")) => Some(SHADOWS),
            (SHADOWS, Some(name)) => match self.backing.shadows() {
                Ok(rows) => rows
                    .iter()
                    .find(|s| s.id.to_string() == name)
                    .map(|s| s.id)
                    .map(|id| self.inode(id)),
                Err(e) => return reply.error(io_error(e).raw_os_error()),
            },
            _ => None,
        };
        match ino.map(|i| self.getattr_of(i)) {
            Some(Ok(attr)) => reply.entry(&TTL, &attr, 0),
            Some(Err(e)) => reply.error(e.raw_os_error()),
            None => reply.error(Errno::NOENT.raw_os_error()),
        }
    }

    fn getattr(&mut self, _req: &FuseRequest<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.getattr_of(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e.raw_os_error()),
        }
    }

    fn setattr(
        &mut self,
        _req: &FuseRequest<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // A volume's size and the files' owners are fixed; times are
        // accepted and not kept.
        let attr = match self.getattr_of(ino) {
            Ok(a) => a,
            Err(e) => return reply.error(e.raw_os_error()),
        };
        if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some_and(|s| s != attr.size)
        {
            return reply.error(Errno::PERM.raw_os_error());
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&mut self, _req: &FuseRequest<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let writes = flags & rustix::fs::OFlags::ACCMODE.bits() as i32
            != rustix::fs::OFlags::RDONLY.bits() as i32;
        match ino {
            LIVE => reply.opened(0, 0),
            ROOT | SHADOWS => reply.error(Errno::ISDIR.raw_os_error()),
            _ if writes => reply.error(Errno::ROFS.raw_os_error()),
            _ => match self.shadow_of(ino) {
                Ok(Some(row)) => match self.backing.open_shadow(&row) {
                    Ok(target) => {
                        let fh = self.next_fh;
                        self.next_fh += 1;
                        self.open.insert(fh, Arc::new(target));
                        // A shadow copy never changes: the page cache may stay.
                        reply.opened(fh, fuser::consts::FOPEN_KEEP_CACHE);
                    }
                    Err(e) => reply.error(io_error(e).raw_os_error()),
                },
                Ok(None) => reply.error(Errno::NOENT.raw_os_error()),
                Err(e) => reply.error(io_error(e).raw_os_error()),
            },
        }
    }

    fn read(
        &mut self,
        _req: &FuseRequest<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let (offset, len) = match self.clip(offset, u64::from(size.min(MAX_IO))) {
            Ok(r) => r,
            Err(e) => return reply.error(e.raw_os_error()),
        };
        let target = match ino {
            LIVE => None,
            _ => match self.open.get(&fh) {
                Some(t) => Some(t.clone()),
                None => return reply.error(Errno::BADF.raw_os_error()),
            },
        };
        self.submit(Job::Read(target, offset, len as usize, reply));
    }

    fn write(
        &mut self,
        _req: &FuseRequest<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        if ino != LIVE {
            return reply.error(Errno::ROFS.raw_os_error());
        }
        let (offset, len) = match self.clip(offset, data.len() as u64) {
            Ok(r) => r,
            Err(e) => return reply.error(e.raw_os_error()),
        };
        if len == 0 && !data.is_empty() {
            // Past the end of a fixed-size volume, as a block device says.
            return reply.error(Errno::NOSPC.raw_os_error());
        }
        self.submit(Job::Write(data[..len as usize].to_vec(), offset, reply));
    }

    fn flush(
        &mut self,
        _req: &FuseRequest<'_>,
        ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        self.fsync(_req, ino, 0, true, reply);
    }

    fn fsync(
        &mut self,
        _req: &FuseRequest<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != LIVE {
            return reply.ok();
        }
        self.submit(Job::Sync(reply));
    }

    fn release(
        &mut self,
        _req: &FuseRequest<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open.remove(&fh);
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &FuseRequest<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ino, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        match ino {
            ROOT => {
                entries.push((LIVE, FileType::RegularFile, "live".into()));
                entries.push((SHADOWS, FileType::Directory, "shadows".into()));
            }
            SHADOWS => match self.backing.shadows() {
                Ok(rows) => {
                    for s in rows {
                        let ino = self.inode(s.id);
                        entries.push((ino, FileType::RegularFile, s.id.to_string()));
                    }
                }
                Err(e) => return reply.error(io_error(e).raw_os_error()),
            },
            _ => return reply.error(Errno::NOTDIR.raw_os_error()),
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &FuseRequest<'_>, _ino: u64, reply: ReplyStatfs) {
        let blocks = self.backing.len().unwrap_or(0) / 4096;
        reply.statfs(blocks, 0, 0, 0, 0, 4096, 255, 4096);
    }
}
