//! Where a volume's shadow storage is: a small JSON file beside the image,
//! `IMG.vshadow`, naming the diff area relative to itself (so moving both
//! files together keeps them paired), the volume id recorded in it, and
//! the diff area's generation when it was last opened (an older copy of
//! the diff area put back is refused: its shadow copies would read chunks
//! overwritten since).
//!
//! A device (a Linux block device, a Windows `\\.\D:` or
//! `\\.\PhysicalDriveN`) keeps these files in the state directory
//! instead (see [`sidecar_base`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volshadow_block::{BlockDevice, FileImage, OpenOptions, open_device};
use volshadow_cow::{InDoubtSet, OpenMode, SnapshotSet, Volume};

use crate::control;
use crate::ops::{Reply, Request, SetOutcome};

#[derive(Debug, Serialize, Deserialize)]
pub struct Binding {
    pub version: u32,
    /// The diff area, relative to the binding file's directory.
    pub diff: PathBuf,
    pub volume_id: Uuid,
    /// The diff area's superblock generation after its last open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Whether the diff area's file system shares extents with the image
    /// (copies are extent clones), probed when the pair was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extent_clones: Option<bool>,
    /// Set by `--no-extent-clones`: copies are written even where the file
    /// system could clone; kept when the pair is rebound.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_extent_clones: bool,
    /// For a device (its binding is in the state directory): its path as
    /// given when the binding was made, so that another name of the same
    /// device finds this binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
}

/// Whether a diff area at `diff` can clone `origin`'s extents (probed in
/// its directory).
pub fn probe_clones(origin: &dyn BlockDevice, diff: &Path) -> bool {
    let dir = match diff.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    volshadow_block::probe_extent_clones(origin, dir)
}

/// `IMG.vshadow`.
pub fn binding_path(img: &Path) -> PathBuf {
    with_suffix(&sidecar_base(img), ".vshadow")
}

/// What a volume's own files (binding, control socket, receive marker)
/// are named after: the image itself, so they sit beside it; for a device,
/// a name in [`state_dir`] made of the device's last path component and a
/// hash of its whole path. Beside a device they would not last: `/dev` is
/// made anew at every boot, and `\\.\D:.vshadow` names no file at all.
/// The path is taken as given, not resolved: a stable name such as
/// `/dev/disk/by-id/...` keeps its shadow storage when `/dev/sdX` changes.
/// A device already bound under another name (a symbolic link, another
/// node) is found by identity and shares that binding: one device never
/// gets two diff areas.
pub fn sidecar_base(img: &Path) -> PathBuf {
    if !is_device(img) {
        return img.to_path_buf();
    }
    let own = device_base(img);
    if with_suffix(&own, ".vshadow").exists() {
        return own;
    }
    device_volumes()
        .into_iter()
        .find(|(_, device)| crate::identity::same_file(device, img))
        .map_or(own, |(base, _)| base)
}

fn is_device(img: &Path) -> bool {
    volshadow_block::device_kind(img).ok() == Some(volshadow_block::DeviceKind::Raw)
}

fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The devices bound in the state directory: (what their files are named
/// after, the device's path as recorded). Unreadable bindings are left out.
pub fn device_volumes() -> Vec<(PathBuf, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(state_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let base = PathBuf::from(path.to_str()?.strip_suffix(".vshadow")?);
            let text = std::fs::read_to_string(&path).ok()?;
            let binding: Binding = serde_json::from_str(&text).ok()?;
            Some((base, binding.device?))
        })
        .collect()
}

/// [`sidecar_base`] of a device by its own name.
fn device_base(img: &Path) -> PathBuf {
    let full = std::path::absolute(img).unwrap_or_else(|_| img.to_path_buf());
    let full = full.to_string_lossy();
    // Windows names are case-insensitive: `\\.\d:` is `\\.\D:`.
    let key = if cfg!(windows) {
        full.to_lowercase()
    } else {
        full.to_string()
    };
    let last = key
        .rsplit(['/', '\\'])
        .find(|s| !s.is_empty())
        .unwrap_or("device");
    let readable: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hash = Uuid::new_v5(&Uuid::NAMESPACE_URL, key.as_bytes())
        .simple()
        .to_string();
    // 40 + 13 characters keep the control socket's path within the 108
    // bytes a Unix socket allows.
    state_dir().join(format!("{readable}-{}", &hash[..12]))
}

/// Where the files of device volumes live: `$VOLSHADOW_STATE_DIR`, else
/// `/var/lib/volshadow` (Unix) or `%ProgramData%\volshadow` (Windows).
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VOLSHADOW_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    #[cfg(windows)]
    let base = std::env::var_os("ProgramData")
        .map_or_else(|| PathBuf::from(r"C:\ProgramData"), PathBuf::from);
    #[cfg(not(windows))]
    let base = PathBuf::from("/var/lib");
    base.join("volshadow")
}

pub fn read_binding(img: &Path) -> Result<(Binding, PathBuf)> {
    let path = binding_path(img);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{} has no shadow storage (no {}); run `volshadow add shadowstorage --for {} --on DIFF --maxsize SIZE`",
                img.display(),
                path.display(),
                img.display()
            )
        } else {
            format!(
                "{}'s shadow-storage binding {} cannot be read",
                img.display(),
                path.display()
            )
        };
        anyhow::Error::new(e).context(what)
    })?;
    let b: Binding = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid shadow-storage binding", path.display()))?;
    if b.version != 1 {
        bail!(
            "{}: binding version {} is not supported",
            path.display(),
            b.version
        );
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let diff = dir.join(&b.diff);
    Ok((b, diff))
}

/// Writes `IMG.vshadow`. `extent_clones`: what the probe found (false
/// when not probed because `no_extent_clones`, the user's refusal, is set).
pub fn write_binding(
    img: &Path,
    diff: &Path,
    volume_id: Uuid,
    extent_clones: bool,
    no_extent_clones: bool,
) -> Result<()> {
    let dir = binding_dir(img)?;
    let dir_abs =
        std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let diff_abs = std::fs::canonicalize(diff)
        .with_context(|| format!("cannot resolve {}", diff.display()))?;
    let rel = diff_abs
        .strip_prefix(&dir_abs)
        .map(Path::to_path_buf)
        .unwrap_or(diff_abs);
    save_binding(
        img,
        &Binding {
            version: 1,
            diff: rel,
            volume_id,
            generation: None,
            extent_clones: Some(extent_clones),
            no_extent_clones,
            device: is_device(img)
                .then(|| std::path::absolute(img).unwrap_or_else(|_| img.to_path_buf())),
        },
    )
}

/// The directory `img`'s binding goes in, made if missing (the state
/// directory of devices); an error says why it cannot take the binding.
pub fn binding_dir(img: &Path) -> Result<PathBuf> {
    let path = binding_path(img);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if dir.exists() && !dir.is_dir() {
        bail!(
            "{} is not a directory, so {}'s shadow-storage binding cannot go there (VOLSHADOW_STATE_DIR names the state directory of devices); nothing was changed",
            dir.display(),
            img.display()
        );
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create {}; nothing was changed", dir.display()))?;
    let probe = dir.join(format!(".volshadow-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "cannot write in {}, where {}'s binding goes; nothing was changed",
                dir.display(),
                img.display()
            )
        })?;
    Ok(dir)
}

/// Writes the binding through a temporary file and a rename, so a crash
/// leaves the old one or the new one, never half of either.
fn save_binding(img: &Path, b: &Binding) -> Result<()> {
    let path = binding_path(img);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, serde_json::to_string_pretty(b)? + "\n")
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Opens the origin and its diff area (running recovery).
pub fn open_volume(img: &Path) -> Result<Volume> {
    open_volume_with(img, OpenMode::Normal)
}

/// Opens with `mode`. A normal open refuses a diff area older than the
/// one this image last used, records the generation it leaves, and
/// settles shadow copies of sets a crash left in doubt.
pub fn open_volume_with(img: &Path, mode: OpenMode) -> Result<Volume> {
    open_inner(img, mode, true)
}

fn open_inner(img: &Path, mode: OpenMode, resolve: bool) -> Result<Volume> {
    let (mut binding, diff_path) = read_binding(img)?;
    let origin: Arc<dyn BlockDevice> = Arc::from(waiting_out_brief_use(|| {
        open_device(img, &OpenOptions::new())
    })?);
    let diff: Arc<dyn BlockDevice> = Arc::new(
        // Large runs of chunk copies go out unbuffered (see
        // `FileImage::with_direct_writes`).
        waiting_out_brief_use(|| FileImage::open(&diff_path))
            .with_context(|| format!("opening shadow storage {}", diff_path.display()))?
            .with_direct_writes(),
    );
    // Checked before opening: recovery writes, and a refusal changes nothing.
    if let Ok((id, now, copy_damaged)) = Volume::peek(&*diff) {
        if id != binding.volume_id && mode != OpenMode::Rebind {
            bail!(
                "{} holds volume {id}, but {} expects {}; nothing was changed",
                diff_path.display(),
                binding_path(img).display(),
                binding.volume_id
            );
        }
        // The two superblock copies are written in turn, one generation
        // apart: with one damaged, the valid one may be the older by one,
        // and recovery finds the newer state in the journal.
        let one_short = copy_damaged && now.checked_add(1) == binding.generation;
        if let Some(last) = binding.generation
            && now < last
            && !one_short
            && mode == OpenMode::Normal
        {
            bail!(
                "shadow storage {} is older than the one {} last used (generation {now} < {last}): an older copy of the file was put back, and its shadow copies could read data written since; if that is what you want, run `volshadow rebind --for {}`",
                diff_path.display(),
                img.display(),
                img.display()
            );
        }
    }
    let vol = Volume::open_with(origin, diff, mode)?;
    // Off where the probe found the file system cannot share extents or
    // the storage was added with --no-extent-clones.
    if binding.extent_clones == Some(false) || binding.no_extent_clones {
        vol.set_extent_clones(false);
    }
    if mode != OpenMode::Salvage {
        binding.volume_id = vol.id();
        binding.generation = Some(vol.generation());
        if let Err(e) = save_binding(img, &binding) {
            tracing::warn!(error = %e, "could not record the diff area's generation");
        }
        if resolve {
            resolve_in_doubt(img, &vol)?;
        }
        if mode == OpenMode::Normal {
            settle_cut_receive(img, &vol)?;
        }
    }
    Ok(vol)
}

/// How long an open waits for a volume another command (or a server
/// settling a set) holds only briefly, before it says "in use".
const BRIEF_USE: std::time::Duration = std::time::Duration::from_secs(3);

/// `open`, retried while its file is locked, up to [`BRIEF_USE`].
fn waiting_out_brief_use<T>(
    open: impl Fn() -> volshadow_block::Result<T>,
) -> volshadow_block::Result<T> {
    let deadline = std::time::Instant::now() + BRIEF_USE;
    loop {
        match open() {
            Err(volshadow_block::Error::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Settles each shadow copy of `vol` whose set's creation a crash cut.
/// One line per settled copy; one that cannot be settled stays hidden,
/// with a line saying why.
fn resolve_in_doubt(img: &Path, vol: &Volume) -> Result<()> {
    for d in vol.in_doubt_sets() {
        match ask_decider(&d) {
            Ok(committed) => settle(img, vol, &d, committed)?,
            Err(e) => eprintln!(
                "volshadow: {}: shadow copy {} of set {} (cut by a crash) stays hidden: its first volume {} could not be asked ({})",
                img.display(),
                d.snapshot.id,
                d.set_id,
                d.members.first().map_or("?", |m| m.1.as_str()),
                crate::one_line(&e)
            ),
        }
    }
    Ok(())
}

/// Whether the set of `d` committed: its decider (the set's first volume,
/// found by the image path recorded with the set) has its shadow copy of
/// the set exactly when the set committed. Asked through the decider's
/// server when one runs (which says so while its part is under way), else
/// by opening it.
pub(crate) fn ask_decider(d: &InDoubtSet) -> Result<bool> {
    let Some((decider_id, locator)) = d.members.first() else {
        bail!("the set records no members");
    };
    let decider = Path::new(locator);
    let ask = Request::SetOutcome { set_id: d.set_id };
    if let Some(answer) = control::call(decider, &ask, &[])? {
        return match answer.result?.0 {
            Reply::SetOutcome {
                outcome: SetOutcome::InProgress,
            } => bail!("its part of the set is still under way"),
            Reply::SetOutcome { outcome } => Ok(outcome == SetOutcome::Committed),
            other => bail!("unexpected answer {other:?}"),
        };
    }
    let dv = open_inner(decider, OpenMode::Normal, false)?;
    if dv.id() != *decider_id {
        bail!("{} now holds another volume", decider.display());
    }
    Ok(SnapshotSet::committed_on(&dv, d.set_id))
}

/// Keeps or discards `d`'s shadow copy, and says which.
pub(crate) fn settle(img: &Path, vol: &Volume, d: &InDoubtSet, committed: bool) -> Result<()> {
    vol.resolve_in_doubt(d.set_id, committed)?;
    eprintln!(
        "volshadow: {}: shadow copy {} of set {} (cut by a crash) {}",
        img.display(),
        d.snapshot.id,
        d.set_id,
        if committed {
            "kept: the set committed"
        } else {
            "discarded: the set did not commit"
        }
    );
    Ok(())
}

/// Parses sizes like `64M`, `16K`, `1G`, `2T` or plain bytes; `0` and
/// `0K` are both zero (callers that need a positive size use
/// [`parse_positive_size`]). Never panics: overflow is an error.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix {c:?} in {s:?} (use K, M, G, T)"
                    ));
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a size (e.g. 64M)"));
    }
    // All digits: a parse failure can only be overflow.
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("size {s:?} is too large (at most {} bytes)", u64::MAX))
}

/// [`parse_size`] for sizes that must not be zero.
pub fn parse_positive_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!("size {:?} must be more than zero", s.trim())),
        n => Ok(n),
    }
}

/// `IMG.vshadow.receiving`: the marker of a receive in progress.
pub(crate) fn marker_path(img: &Path) -> PathBuf {
    with_suffix(&binding_path(img), ".receiving")
}

/// Called on every normal open: settles a receive a crash cut, saying so
/// on stderr.
pub(crate) fn settle_cut_receive(img: &Path, vol: &Volume) -> Result<()> {
    let marker = marker_path(img);
    match volshadow_replica::apply::settle(vol, &marker)? {
        volshadow_replica::apply::Settled::Clean => {}
        volshadow_replica::apply::Settled::Finished(id) => eprintln!(
            "volshadow: {}: the receive of shadow copy {id} had finished; its marker is removed",
            img.display()
        ),
        volshadow_replica::apply::Settled::RolledBack(base) => eprintln!(
            "volshadow: {}: a receive was cut; the live volume is back at shadow copy {base}",
            img.display()
        ),
        volshadow_replica::apply::Settled::UnfinishedFirst(id) => bail!(
            "{} is a replica whose first receive (of shadow copy {id}) was cut; receive the full stream again (it starts over) or delete the replica's files",
            img.display()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_keeps_its_files_beside_it() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let img = dir.join("Cargo.toml");
        assert_eq!(binding_path(&img), dir.join("Cargo.toml.vshadow"));
        // A path with nothing there yet (a replica to receive) too.
        let new = dir.join("no-such.img");
        assert_eq!(sidecar_base(&new), new);
    }

    #[cfg(windows)]
    #[test]
    fn a_windows_device_keeps_its_files_in_the_state_directory() {
        let d = sidecar_base(Path::new(r"\\.\D:"));
        assert_eq!(d.parent(), Some(state_dir().as_path()));
        let name = d.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            name.starts_with("d_-") && name.len() == "d_-".len() + 12,
            "{name}"
        );
        // The same device however it is spelled; another device elsewhere.
        assert_eq!(sidecar_base(Path::new(r"\\.\d:")), d);
        assert_ne!(sidecar_base(Path::new(r"\\.\E:")), d);
        let disk = sidecar_base(Path::new(r"\\.\PhysicalDrive1"));
        let disk = disk.file_name().unwrap().to_str().unwrap();
        assert!(disk.starts_with("physicaldrive1-"), "{disk}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("16k"), Ok(16 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("0K"), Ok(0));
        assert!(parse_positive_size("0K").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1K").is_err());
        assert!(parse_size("+1").is_err());
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_size("99999999999999999999999K")
                .unwrap_err()
                .contains("too large")
        );
    }
}
