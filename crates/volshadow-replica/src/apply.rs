//! Applying a stream to a replica so that a refused stream or a crash
//! leaves it at its previous shadow copy.
//!
//! Writes go through the engine onto the replica's live volume, so the
//! replica's newest shadow copy (the stream's base) keeps the old bytes of
//! every chunk they touch. Before the first write a marker file records
//! what is being applied; the shadow copy with the source's id is created
//! only after the last record and the stream's end checksum, and the
//! marker is removed after that. Whoever opens the replica next settles a
//! marker it finds ([`settle`]): the target shadow copy exists (the apply
//! finished; only the marker's removal was cut), or the live volume is
//! reverted to the base, a journaled engine operation that itself
//! survives a crash.
//!
//! During the apply the full policy is fail-writes (the marker keeps the
//! one to restore): delete-oldest could otherwise delete the base, the
//! very shadow copy a rollback needs.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_cow::{FullPolicy, SnapshotInfo, SnapshotOptions, Target, Volume, attributes};

use crate::error::{Error, Result};
use crate::stream::Record;

/// What the marker file says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub version: u32,
    /// The shadow copy being received (the source's id).
    pub target: Uuid,
    /// The replica's newest shadow copy when the apply began; `None`: the
    /// replica was created by this receive (a full stream).
    pub base: Option<Uuid>,
    /// The replica's full policy before the apply.
    pub policy: Option<FullPolicy>,
}

/// How [`settle`] left a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// No receive was cut here.
    Clean,
    /// The receive had finished; only its marker was left.
    Finished(Uuid),
    /// The live volume was rolled back to this shadow copy.
    RolledBack(Uuid),
    /// A first receive (a full stream) was cut: the replica holds no
    /// shadow copy and its live volume is partial.
    UnfinishedFirst(Uuid),
}

pub fn read_marker(path: &Path) -> Result<Option<Pending>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::File {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    let p: Pending = serde_json::from_str(&text).map_err(|e| Error::Marker {
        path: path.to_path_buf(),
        what: format!("not a receive marker ({e})"),
    })?;
    if p.version != 1 {
        return Err(Error::Marker {
            path: path.to_path_buf(),
            what: format!("marker version {} is not supported", p.version),
        });
    }
    Ok(Some(p))
}

/// Writes the marker durably: a temporary file, flushed, renamed over,
/// and the directory flushed, so a crash leaves none or all of it.
pub fn write_marker(path: &Path, p: &Pending) -> Result<()> {
    let file_err = |source| Error::File {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_string_pretty(p).map_err(|e| Error::Marker {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(file_err)?;
    f.write_all(text.as_bytes()).map_err(file_err)?;
    f.sync_all().map_err(file_err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(file_err)?;
    sync_dir(path)
}

pub fn remove_marker(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::File {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Makes a rename or removal in `path`'s directory durable (Unix; Windows
/// has no directory handle to flush and journals names itself).
fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::File {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Settles what a cut receive left at `marker` (see the module comment).
pub fn settle(vol: &Volume, marker: &Path) -> Result<Settled> {
    let Some(p) = read_marker(marker)? else {
        return Ok(Settled::Clean);
    };
    let outcome = if vol.snapshots().iter().any(|s| s.id == p.target) {
        Settled::Finished(p.target)
    } else {
        match p.base {
            Some(base) => {
                vol.revert(base)?;
                vol.flush()?;
                Settled::RolledBack(base)
            }
            None => return Ok(Settled::UnfinishedFirst(p.target)),
        }
    };
    restore_policy(vol, &p)?;
    remove_marker(marker)?;
    Ok(outcome)
}

fn restore_policy(vol: &Volume, p: &Pending) -> Result<()> {
    if let Some(policy) = p.policy
        && vol.usage().policy != policy
    {
        vol.resize(vol.usage().max_bytes, Some(policy))?;
    }
    Ok(())
}

/// Whether the live volume still reads exactly what shadow copy `base`
/// reads (nothing was written to the replica since it was received). Only
/// the chunks written since are compared, a window of the volume at a
/// time, in 1 MiB pieces.
pub fn live_matches(vol: &Volume, base: Uuid) -> Result<bool> {
    const WINDOW: u64 = 1 << 30;
    const PIECE: u64 = 1 << 20;
    let snap = vol.snapshot(base)?;
    let mut a = vec![0u8; PIECE as usize];
    let mut b = vec![0u8; PIECE as usize];
    let len = vol.len();
    let mut w = 0;
    while w < len {
        for e in vol.changed_extents_in(base, Target::Live, w, WINDOW)? {
            let mut at = e.offset;
            while at < e.offset + e.len {
                let n = (e.offset + e.len - at).min(PIECE) as usize;
                vol.read_at(&mut a[..n], at)?;
                snap.read_at(&mut b[..n], at)?;
                if a[..n] != b[..n] {
                    return Ok(false);
                }
                at += n as u64;
            }
        }
        w += WINDOW;
    }
    Ok(true)
}

/// One apply in progress. Dropping it without [`commit`](Self::commit)
/// leaves the marker, so the next open rolls back; [`abort`](Self::abort)
/// rolls back at once.
#[derive(Debug)]
pub struct Apply<'a> {
    vol: &'a Volume,
    marker: PathBuf,
    pending: Pending,
    written: u64,
}

impl<'a> Apply<'a> {
    /// Checks that the replica's newest shadow copy is `base` (none for a
    /// full stream), that `target` is new and that the live volume was
    /// not written since `base`; then writes the marker (a first
    /// receive's caller wrote it already, with `base` `None`, before it
    /// created the replica). A refusal changes nothing.
    pub fn begin(vol: &'a Volume, marker: &Path, target: Uuid, base: Option<Uuid>) -> Result<Self> {
        // A first receive writes its marker before it creates the
        // replica's files; that one is taken over.
        if let Some(p) = read_marker(marker)?
            && !(p.base.is_none() && base.is_none() && p.target == target)
        {
            return Err(Error::Refused(format!(
                "a receive of shadow copy {} was cut and is not settled yet ({} exists)",
                p.target,
                marker.display()
            )));
        }
        let snaps = vol.snapshots();
        if snaps.iter().any(|s| s.id == target) {
            return Err(Error::Refused(format!(
                "the replica already has shadow copy {target}"
            )));
        }
        let newest = snaps.last().map(|s| s.id);
        if newest != base {
            return Err(Error::Refused(match (base, newest) {
                (Some(b), Some(n)) => format!(
                    "the stream applies on shadow copy {b}, but the replica's newest is {n}; nothing was changed"
                ),
                (Some(b), None) => format!(
                    "the stream applies on shadow copy {b}, but the replica has none; send a full stream first"
                ),
                (None, _) => {
                    "a full stream creates a new replica; this one already has shadow copies"
                        .to_string()
                }
            }));
        }
        if let Some(b) = base
            && !live_matches(vol, b)?
        {
            return Err(Error::Refused(format!(
                "the replica's live volume was written since shadow copy {b}; `volshadow revert` it to {b} first; nothing was changed"
            )));
        }
        let policy = vol.usage().policy;
        let pending = Pending {
            version: 1,
            target,
            base,
            policy: Some(policy),
        };
        write_marker(marker, &pending)?;
        let apply = Apply {
            vol,
            marker: marker.to_path_buf(),
            pending,
            written: 0,
        };
        if policy != FullPolicy::FailWrites {
            vol.resize(vol.usage().max_bytes, Some(FullPolicy::FailWrites))?;
        }
        Ok(apply)
    }

    /// Bytes written to the replica so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes one checked record. Zero records of a first receive are
    /// skipped: the new image reads zeros already.
    pub fn record(&mut self, rec: &Record<'_>) -> Result<()> {
        match *rec {
            Record::Data { offset, data } => {
                self.vol.write_at(data, offset)?;
                self.written += data.len() as u64;
            }
            Record::Zero { offset, len } => {
                if self.pending.base.is_some() {
                    self.vol.write_zeroes(offset, len)?;
                    self.written += len;
                }
            }
            Record::Ref { offset, .. } => {
                return Err(Error::Refused(format!(
                    "a reference record (offset {offset}) in a stream to apply"
                )));
            }
        }
        Ok(())
    }

    /// Makes the writes durable, creates the shadow copy with the
    /// source's id, restores the full policy and removes the marker.
    pub fn commit(self) -> Result<SnapshotInfo> {
        self.vol.flush()?;
        let info = self.vol.create_snapshot_with_id(
            SnapshotOptions {
                persistent: true,
                attributes: attributes::CLIENT_ACCESSIBLE | attributes::IMPORTED,
                set_id: None,
            },
            self.pending.target,
        )?;
        restore_policy(self.vol, &self.pending)?;
        remove_marker(&self.marker)?;
        Ok(info)
    }

    /// Rolls back now: the live volume back to the base and the marker
    /// removed. A first receive keeps its marker (the caller removes the
    /// replica it created).
    pub fn abort(self) -> Result<Settled> {
        settle(self.vol, &self.marker)
    }
}
