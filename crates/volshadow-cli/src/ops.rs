//! Operations on one volume, as data: the CLI carries them out in-process
//! or sends them to the `serve` process that holds the volume.

use std::time::UNIX_EPOCH;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_cow::{
    Extent, FullPolicy, SnapshotInfo, SnapshotOptions, Target, Usage, VerifyReport, Volume,
    attributes,
};

/// Bytes the command line moves per request when reading or writing: big
/// enough to keep the disk busy, small enough to keep memory flat.
pub const PIECE: u64 = 1 << 20;
/// Most bytes one request may read or write (in-process or over the
/// control socket): a client-supplied length is checked against this
/// before anything is allocated for it.
pub const MAX_PIECE: u64 = 4 << 20;

/// The outcome of one request, with the shadow copies the delete-oldest
/// policy removed while it ran (told also when the request failed).
#[derive(Debug)]
pub struct Answer {
    pub result: Result<(Reply, Vec<u8>)>,
    pub auto_deleted: Vec<ShadowRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The volume's size in bytes (to check a range before streaming it).
    Size,
    CreateShadow {
        persistent: bool,
    },
    ListShadows,
    DeleteShadows {
        which: Which,
    },
    Diff {
        from: String,
        to: Option<String>,
    },
    /// `Diff` within `offset..offset+length` only, so a caller walks a
    /// large volume's changes a window at a time in bounded memory.
    DiffIn {
        from: String,
        to: Option<String>,
        offset: u64,
        length: u64,
    },
    Read {
        shadow: Option<String>,
        offset: u64,
        length: u64,
    },
    /// One piece of a write; durable only after a `Flush`.
    Write {
        offset: u64,
        length: u64,
    },
    /// Makes every write before it durable.
    Flush,
    Revert {
        shadow: String,
    },
    Verify,
    Usage,
    Resize {
        max_bytes: u64,
        policy: Option<FullPolicy>,
    },
    /// Whether snapshot set `set_id` committed on this volume, its decider.
    SetOutcome {
        set_id: Uuid,
    },
    /// Starts taking part in a snapshot set another process coordinates:
    /// the rest of the connection is that conversation (`serve` only; see
    /// `member`). Answered with `SetJoined`.
    SetJoin,
    /// Holds new writes for the set, draining those in flight.
    SetHold {
        set_id: Uuid,
        timeout_ms: u64,
    },
    /// Takes this member's snapshot; with `pending`, in doubt.
    SetPrepare {
        persistent: bool,
        attributes: u32,
        pending: Option<Vec<(Uuid, String)>>,
    },
    SetCommit {
        seq: u64,
    },
    SetAbandon {
        seq: u64,
    },
    /// Lets writes go again and ends the conversation.
    SetRelease,
}

/// What a set's decider says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetOutcome {
    Committed,
    NotCommitted,
    /// Its creation is still under way here: ask again later.
    InProgress,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Which {
    Id(String),
    Oldest,
    All,
}

/// One shadow copy, as listed (`--json` field names are stable).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShadowRow {
    pub id: Uuid,
    pub set_id: Option<Uuid>,
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub created: f64,
    pub persistent: bool,
    pub attributes: Vec<String>,
    /// Where `expose` made it visible (a mount point or a loop device);
    /// filled in by `list shadows` on this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed: Option<std::path::PathBuf>,
}

impl From<&SnapshotInfo> for ShadowRow {
    fn from(s: &SnapshotInfo) -> Self {
        ShadowRow {
            id: s.id,
            set_id: s.set_id,
            seq: s.seq,
            created: s
                .created
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            persistent: s.persistent,
            attributes: attributes::names(s.attributes)
                .into_iter()
                .map(String::from)
                .collect(),
            exposed: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    Shadows {
        shadows: Vec<ShadowRow>,
    },
    Created {
        shadow: ShadowRow,
    },
    Deleted {
        ids: Vec<Uuid>,
    },
    Extents {
        extents: Vec<Extent>,
        bytes: u64,
    },
    Data {
        length: u64,
    },
    Done,
    Verify {
        report: VerifyReport,
    },
    Usage {
        usage: Usage,
        /// Shadow copies the delete-oldest policy removed since the volume
        /// was opened by the process answering (`serve`, or this command).
        #[serde(default)]
        auto_deleted: u64,
    },
    Size {
        bytes: u64,
    },
    SetOutcome {
        outcome: SetOutcome,
    },
    SetJoined {
        volume_id: Uuid,
    },
    SetPrepared {
        snapshot: SnapshotInfo,
    },
}

/// Resolves a full id or a unique prefix among the live snapshots.
pub fn resolve(vol: &Volume, id: &str) -> Result<Uuid> {
    let rows: Vec<ShadowRow> = vol.snapshots().iter().map(ShadowRow::from).collect();
    resolve_among(&rows, id)
}

/// [`resolve`] over a listing (as a server sends it).
pub fn resolve_among(shadows: &[ShadowRow], id: &str) -> Result<Uuid> {
    let id = id.trim().to_ascii_lowercase();
    if id.is_empty() {
        bail!("empty shadow copy id");
    }
    let matches: Vec<Uuid> = shadows
        .iter()
        .map(|s| s.id)
        .filter(|u| u.to_string().starts_with(&id) || u.simple().to_string().starts_with(&id))
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => bail!("no shadow copy {id}"),
        _ => bail!(
            "{id} matches {} shadow copies; give more of the id",
            matches.len()
        ),
    }
}

/// Carries out `req` on `vol`. `payload` is the input of writes; the
/// returned bytes are the output of reads.
pub fn execute(vol: &Volume, req: &Request, payload: &[u8]) -> Result<(Reply, Vec<u8>)> {
    Ok(match req {
        Request::Size => (Reply::Size { bytes: vol.len() }, Vec::new()),
        Request::CreateShadow { persistent } => {
            let info = vol.create_snapshot(SnapshotOptions {
                persistent: *persistent,
                attributes: if *persistent {
                    attributes::CLIENT_ACCESSIBLE
                } else {
                    0
                },
                set_id: None,
            })?;
            (
                Reply::Created {
                    shadow: (&info).into(),
                },
                Vec::new(),
            )
        }
        Request::ListShadows => (
            Reply::Shadows {
                shadows: vol.snapshots().iter().map(ShadowRow::from).collect(),
            },
            Vec::new(),
        ),
        Request::DeleteShadows { which } => {
            let ids = match which {
                Which::Id(id) => {
                    let id = resolve(vol, id)?;
                    vol.delete_snapshot(id)?;
                    vec![id]
                }
                Which::Oldest => match vol.delete_oldest()? {
                    Some(s) => vec![s.id],
                    None => bail!("there are no shadow copies to delete"),
                },
                Which::All => {
                    let mut ids = Vec::new();
                    while let Some(s) = vol.delete_oldest()? {
                        ids.push(s.id);
                    }
                    ids
                }
            };
            (Reply::Deleted { ids }, Vec::new())
        }
        Request::Diff { from, to } => {
            let from = resolve(vol, from)?;
            let to = match to {
                Some(t) => Target::Snapshot(resolve(vol, t)?),
                None => Target::Live,
            };
            let extents = vol.changed_extents(from, to)?;
            let bytes = extents.iter().map(|e| e.len).sum();
            (Reply::Extents { extents, bytes }, Vec::new())
        }
        Request::DiffIn {
            from,
            to,
            offset,
            length,
        } => {
            let from = resolve(vol, from)?;
            let to = match to {
                Some(t) => Target::Snapshot(resolve(vol, t)?),
                None => Target::Live,
            };
            let extents = vol.changed_extents_in(from, to, *offset, *length)?;
            let bytes = extents.iter().map(|e| e.len).sum();
            (Reply::Extents { extents, bytes }, Vec::new())
        }
        Request::Read {
            shadow,
            offset,
            length,
        } => {
            if *length > MAX_PIECE {
                bail!(
                    "a read of {length} bytes in one request is more than the limit of {MAX_PIECE}; read in pieces"
                );
            }
            let mut buf = vec![0u8; *length as usize];
            match shadow {
                Some(id) => vol
                    .snapshot(resolve(vol, id)?)?
                    .read_at(&mut buf, *offset)?,
                None => vol.read_at(&mut buf, *offset)?,
            }
            (Reply::Data { length: *length }, buf)
        }
        Request::Write { offset, length } => {
            if *length > MAX_PIECE {
                bail!(
                    "a write of {length} bytes in one request is more than the limit of {MAX_PIECE}; write in pieces"
                );
            }
            if payload.len() as u64 != *length {
                bail!(
                    "write of {length} bytes got {} bytes of data",
                    payload.len()
                );
            }
            vol.write_at(payload, *offset)
                .map_err(|e| write_error(e, *offset, *length))?;
            (Reply::Done, Vec::new())
        }
        Request::Flush => {
            vol.flush()?;
            (Reply::Done, Vec::new())
        }
        Request::Revert { shadow } => {
            let id = resolve(vol, shadow)?;
            vol.revert(id).map_err(|e| revert_error(e, id))?;
            (Reply::Done, Vec::new())
        }
        Request::Verify => (
            Reply::Verify {
                report: vol.verify()?,
            },
            Vec::new(),
        ),
        Request::Usage => (
            Reply::Usage {
                usage: vol.usage(),
                auto_deleted: vol.auto_deleted_count(),
            },
            Vec::new(),
        ),
        Request::Resize { max_bytes, policy } => (
            Reply::Usage {
                usage: vol.resize(*max_bytes, *policy)?,
                auto_deleted: vol.auto_deleted_count(),
            },
            Vec::new(),
        ),
        Request::SetOutcome { set_id } => (
            Reply::SetOutcome {
                outcome: if volshadow_cow::SnapshotSet::committed_on(vol, *set_id) {
                    SetOutcome::Committed
                } else {
                    SetOutcome::NotCommitted
                },
            },
            Vec::new(),
        ),
        Request::SetJoin
        | Request::SetHold { .. }
        | Request::SetPrepare { .. }
        | Request::SetCommit { .. }
        | Request::SetAbandon { .. }
        | Request::SetRelease => {
            bail!("taking part in a snapshot set needs a server's control connection")
        }
    })
}

/// `used` and `max` of the engine's "diff area is full" anywhere in `e`'s
/// chain (the block layer wraps the engine's errors).
fn diff_area_full(e: &(dyn std::error::Error + 'static)) -> Option<(u64, u64)> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(volshadow_cow::Error::DiffAreaFull { used, max }) =
            err.downcast_ref::<volshadow_cow::Error>()
        {
            return Some((*used, *max));
        }
        cur = err.source();
    }
    None
}

/// A write the command line sends may be one piece of a longer one, so
/// "nothing changed" is said of this piece only; the caller tells what
/// earlier pieces did.
fn write_error(e: volshadow_block::Error, offset: u64, length: u64) -> anyhow::Error {
    match diff_area_full(&e) {
        Some((used, max)) => anyhow::anyhow!(
            "shadow storage is full ({used} of {max} bytes used); the write of {length} bytes at offset {offset} was refused and did not change the volume"
        ),
        None => e.into(),
    }
}

/// The engine's "diff area is full" speaks of a refused write; a refused
/// revert is not a write the user made, so it gets its own words.
fn revert_error(e: volshadow_cow::Error, id: Uuid) -> anyhow::Error {
    match diff_area_full(&e) {
        Some((used, max)) => anyhow::anyhow!(
            "cannot revert to shadow copy {id}: the shadow storage has too little room left to preserve what the revert overwrites ({used} of {max} bytes used); nothing was changed (raise the limit with `resize shadowstorage` or delete shadow copies)"
        ),
        None => e.into(),
    }
}

pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub(crate) fn time(secs: f64) -> String {
    // UTC, without a date crate: days since the epoch to a civil date.
    let s = secs as i64;
    let (days, rem) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Human-readable text of a reply (what `--json` replaces).
pub fn render(reply: &Reply) -> String {
    match reply {
        Reply::Shadows { shadows } if shadows.is_empty() => "No shadow copies.\n".into(),
        Reply::Shadows { shadows } => {
            let mut out = String::new();
            for s in shadows {
                out += &render_shadow(s);
            }
            out
        }
        Reply::Created { shadow } => {
            format!("Created shadow copy.\n{}", render_shadow(shadow))
        }
        Reply::Deleted { ids } => {
            let mut out = format!(
                "Deleted {} shadow cop{}.\n",
                ids.len(),
                if ids.len() == 1 { "y" } else { "ies" }
            );
            for id in ids {
                out += &format!("  {id}\n");
            }
            out
        }
        Reply::Extents { extents, bytes } => {
            let mut out = format!(
                "{} changed extent(s), {} ({bytes} bytes)\n",
                extents.len(),
                human_size(*bytes)
            );
            for e in extents {
                out += &format!("  offset {:>14}  length {:>12}\n", e.offset, e.len);
            }
            out
        }
        Reply::Data { .. }
        | Reply::Done
        | Reply::SetOutcome { .. }
        | Reply::SetJoined { .. }
        | Reply::SetPrepared { .. } => String::new(),
        Reply::Size { bytes } => format!("{bytes}\n"),
        Reply::Verify { report } => {
            let mut out = if report.mismatches.is_empty() {
                format!(
                    "Verified {} preserved chunk(s): all match their hashes.\n",
                    report.checked
                )
            } else {
                format!(
                    "Verified {} preserved chunk(s): {} DAMAGED.\n",
                    report.checked,
                    report.mismatches.len()
                )
            };
            if report.unhashed > 0 {
                out += &format!(
                    "{} chunk(s) preserved only for non-persistent shadow copies carry no hash.\n",
                    report.unhashed
                );
            }
            if !report.problems.is_empty() {
                out += &format!("{} other problem(s):\n", report.problems.len());
                for p in &report.problems {
                    out += &format!("  {p}\n");
                }
            }
            for m in &report.mismatches {
                let ids: Vec<String> = m.snapshots.iter().map(Uuid::to_string).collect();
                out += &format!(
                    "  chunk {} (offset {}): read by {}\n",
                    m.chunk,
                    m.offset,
                    ids.join(", ")
                );
            }
            out
        }
        Reply::Usage { usage, .. } => render_usage(usage),
    }
}

fn render_shadow(s: &ShadowRow) -> String {
    format!(
        "Shadow copy ID: {}\n   Shadow copy set: {}\n   Sequence: {}\n   Created: {}\n   Type: {}\n   Attributes: {}\n",
        s.id,
        s.set_id.map_or_else(|| "-".to_string(), |u| u.to_string()),
        s.seq,
        time(s.created),
        if s.persistent {
            "persistent"
        } else {
            "non-persistent (auto-release)"
        },
        if s.attributes.is_empty() {
            "-".to_string()
        } else {
            s.attributes.join(", ")
        },
    ) + &s
        .exposed
        .as_ref()
        .map(|p| format!("   Exposed at: {}\n", p.display()))
        .unwrap_or_default()
}

pub fn render_usage(u: &Usage) -> String {
    let policy = match u.policy {
        FullPolicy::DeleteOldest => "delete-oldest".to_string(),
        FullPolicy::FailWrites => "fail-writes".to_string(),
        FullPolicy::Grow { max } => format!("grow (up to {})", human_size(max)),
    };
    format!(
        "   Used Shadow Storage space: {} ({:.0}%)\n   Maximum Shadow Storage space: {}\n   Capacity: {}\n   Chunk size: {}\n   Preserved chunks: {}\n   Shadow copies: {}\n   When full: {policy}\n",
        human_size(u.used_bytes),
        if u.max_bytes == 0 {
            0.0
        } else {
            u.used_bytes as f64 * 100.0 / u.max_bytes as f64
        },
        human_size(u.max_bytes),
        human_size(u.capacity_bytes),
        human_size(u.chunk_size as u64),
        u.preserved_chunks,
        u.snapshots
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time() {
        assert_eq!(time(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(1_795_000_000.0), "2026-11-18 11:06:40 UTC");
        assert_eq!(time(951_782_400.0), "2000-02-29 00:00:00 UTC");
    }
}
