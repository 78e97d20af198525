//! `mount` and `unmount`: the volume as a FUSE file system in the
//! foreground, like `serve`; stopped by `unmount`, SIGINT or SIGTERM,
//! leaving no stale mount.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fuser::MountOption;

use crate::fuse::{Backing, VolumeFs};
use crate::ops::Request;
use crate::{control, control_server, report, storage};

/// How a volshadow mount's source starts in /proc/self/mountinfo (then
/// the process id and the image: `volshadow:PID:IMG`).
const SOURCE_PREFIX: &str = "volshadow:";
/// How long `unmount` waits for the mount process to finish.
const STOP_WAIT: Duration = Duration::from_secs(20);

/// One line of /proc/self/mountinfo: where, what type, from what.
#[derive(Debug)]
pub(crate) struct MountEntry {
    pub(crate) point: PathBuf,
    pub(crate) fs_type: String,
    pub(crate) source: String,
}

/// The mounts this process sees. Paths are bytes (any mount point on the
/// machine may be non-UTF-8) with mountinfo's `\ooo` escapes undone.
pub(crate) fn mounts() -> Result<Vec<MountEntry>> {
    use std::os::unix::ffi::OsStringExt;
    let text = std::fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let unescape = |b: &[u8]| -> Vec<u8> {
        // Spaces, tabs, newlines and backslashes are written as \ooo.
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && let Some(v) = b
                    .get(i + 1..i + 4)
                    .and_then(|o| std::str::from_utf8(o).ok())
                    .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        out
    };
    Ok(text
        .split(|&c| c == b'\n')
        .filter_map(|line| {
            let f: Vec<&[u8]> = line.split(|&c| c == b' ').collect();
            let dash = f.iter().position(|x| *x == b"-")?;
            Some(MountEntry {
                point: PathBuf::from(std::ffi::OsString::from_vec(unescape(f.get(4)?))),
                fs_type: String::from_utf8_lossy(f.get(dash + 1)?).into_owned(),
                source: String::from_utf8_lossy(&unescape(f.get(dash + 2)?)).into_owned(),
            })
        })
        .collect())
}

/// DIR must be an existing, empty directory that nothing is mounted on.
pub(crate) fn check_mount_dir(dir: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("{} does not exist; nothing was changed", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory; nothing was changed", dir.display());
    }
    let dir = std::fs::canonicalize(dir)?;
    if mounts()?.iter().any(|m| m.point == dir) {
        bail!(
            "{} is already a mount point; nothing was changed",
            dir.display()
        );
    }
    if std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} is not empty; nothing was changed", dir.display());
    }
    Ok(dir)
}

/// `mount --for IMG DIR`: through the volume's server when one holds it,
/// else opening the volume here and serving its control socket too (so
/// `create shadow` and the rest reach it meanwhile).
pub(crate) fn mount(img: &Path, dir: &Path) -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("FUSE is missing (no /dev/fuse): load the fuse module or install fuse3");
    }
    let dir = check_mount_dir(dir)?;
    let opened = if control::call(img, &Request::Size, &[])?.is_some() {
        None
    } else {
        let vol = storage::open_volume(img)?;
        let reporter = Arc::new(report::Reporter::new(vol.clone()));
        control_server::serve(img, reporter)?;
        Some(vol)
    };
    let backing = match &opened {
        Some(vol) => Backing::Opened(vol.clone()),
        None => Backing::Served(img.to_path_buf()),
    };
    let image = std::fs::canonicalize(img).unwrap_or_else(|_| img.to_path_buf());
    // The source names the process, so `unmount` can wait for it.
    let mut options = vec![
        MountOption::FSName(format!(
            "{SOURCE_PREFIX}{}:{}",
            std::process::id(),
            image.display()
        )),
        MountOption::RW,
    ];
    if rustix::process::geteuid().is_root() {
        // Root's mount serves root's tools (losetup, mkfs) and checks
        // everyone else against the files' modes.
        options.extend([MountOption::AllowOther, MountOption::DefaultPermissions]);
    }
    let mut session = fuser::Session::new(VolumeFs::new(backing), &dir, &options)
        .with_context(|| format!("mounting on {}", dir.display()))?;
    let unmounter = Mutex::new(session.unmount_callable());
    ctrlc::set_handler(move || {
        let mut u = unmounter.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = u.unmount() {
            eprintln!("volshadow: cannot unmount: {e}");
        }
    })
    .context("cannot install the stop handler")?;
    eprintln!(
        "Mounted {} on {}: live and shadows/<id> (stop with `volshadow unmount {}` or Ctrl+C).",
        img.display(),
        dir.display(),
        dir.display()
    );
    let ran = session.run();
    drop(session);
    let closed = match opened {
        Some(vol) => {
            let closed = vol.close();
            crate::channel::remove(img);
            closed.map_err(anyhow::Error::from)
        }
        None => Ok(()),
    };
    ran.with_context(|| format!("serving the mount on {}", dir.display()))?;
    closed
}

/// `unmount DIR`: only a volshadow mount; waits until its process ended.
pub(crate) fn unmount(dir: &Path) -> Result<()> {
    let point = std::fs::canonicalize(dir)
        .with_context(|| format!("{} does not exist; nothing was changed", dir.display()))?;
    let Some(entry) = mounts()?.into_iter().find(|m| m.point == point) else {
        bail!(
            "nothing is mounted on {}; nothing was changed",
            point.display()
        );
    };
    let pid: Option<u32> = entry
        .source
        .strip_prefix(SOURCE_PREFIX)
        .filter(|_| entry.fs_type.starts_with("fuse"))
        .and_then(|s| s.split(':').next())
        .and_then(|p| p.parse().ok());
    let Some(pid) = pid else {
        bail!(
            "{} is not a volshadow mount ({} from {}); nothing was changed",
            point.display(),
            entry.fs_type,
            entry.source
        );
    };
    match rustix::mount::unmount(&point, rustix::mount::UnmountFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::PERM) => {
            let status = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&point)
                .status()
                .context("running fusermount3 -u")?;
            if !status.success() {
                bail!("fusermount3 -u {} failed", point.display());
            }
        }
        Err(rustix::io::Errno::BUSY) => bail!(
            "{} is busy (a file in it is open, or something is mounted from it); nothing was changed",
            point.display()
        ),
        Err(e) => bail!("cannot unmount {}: {e}", point.display()),
    }
    let deadline = Instant::now() + STOP_WAIT;
    while alive(pid) && pid != std::process::id() {
        if Instant::now() > deadline {
            bail!(
                "unmounted {}, but its process {pid} has not finished",
                point.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("Unmounted {}.", point.display());
    Ok(())
}

/// Whether process `pid` runs (a zombie, ended but not yet reaped, does not).
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}
