//! `expose` and `unexpose` (VSS's ExposeSnapshot, diskshadow's `expose`):
//! a shadow copy attached read-only to a loop device and its file system
//! mounted read-only.
//!
//! The loop device reads `shadows/<id>` of a private FUSE mount (a
//! `volshadow mount` process started for the exposure; through the
//! volume's server when one runs). What was set up is recorded under
//! [`STATE_DIR`], so `unexpose` undoes exactly that and `list shadows`
//! says where a copy is exposed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ops::{self, Reply, Request, Which};
use crate::session::Session;
use crate::verbs::mount::{alive, check_mount_dir, mounts};

/// Where exposures are recorded (root only, gone at reboot like the loop
/// devices and mounts they describe).
const STATE_DIR: &str = "/run/volshadow/expose";
/// How long the private mount may take to show the shadow copy.
const START_WAIT: Duration = Duration::from_secs(20);

/// One exposure, as recorded: written when its mount process starts and
/// again after each step, `complete` once it stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Exposure {
    pub(crate) image: PathBuf,
    pub(crate) shadow: Uuid,
    /// Where its file system is mounted (none with `--no-mount`).
    pub(crate) dir: Option<PathBuf>,
    pub(crate) device: Option<PathBuf>,
    fuse_dir: PathBuf,
    fuse_pid: u32,
    /// The `expose` that made it: a record it left incomplete and that is
    /// no longer running was cut short.
    expose_pid: u32,
    complete: bool,
}

impl Exposure {
    /// Where the exposure shows: its mount point, else its device.
    pub(crate) fn place(&self) -> Option<&Path> {
        self.dir.as_deref().or(self.device.as_deref())
    }

    fn save(&self, state: &Path) -> Result<()> {
        let tmp = state.join("exposure.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, state.join("exposure.json"))?;
        Ok(())
    }
}

/// Tears down exposures an `expose` left half made (it was killed).
fn sweep_cut_short() {
    for (state, e) in exposures() {
        if !e.complete && !alive(e.expose_pid) {
            let mut undo = Undo::new(state);
            undo.device = e.device.clone();
            undo.fuse = Some((e.fuse_dir.clone(), e.fuse_pid));
        }
    }
}

/// Every recorded exposure, with its record's folder.
pub(crate) fn exposures() -> Vec<(PathBuf, Exposure)> {
    let Ok(rd) = std::fs::read_dir(STATE_DIR) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join("exposure.json")).ok()?;
            Some((e.path(), serde_json::from_str(&text).ok()?))
        })
        .collect()
}

/// A listing of `img`'s shadow copies, each with where it is exposed.
pub(crate) fn with_exposures(img: &Path, mut reply: Reply) -> Result<Reply> {
    if let Reply::Shadows { shadows } = &mut reply {
        let image = std::fs::canonicalize(img)?;
        let exposures = exposures();
        for s in shadows {
            s.exposed = exposures
                .iter()
                .find(|(_, e)| e.complete && e.image == image && e.shadow == s.id)
                .and_then(|(_, e)| e.place().map(Path::to_path_buf));
        }
    }
    Ok(reply)
}

/// An exposed shadow copy is not deleted from under its readers.
pub(crate) fn refuse_if_exposed(img: &Path, which: &Which) -> Result<()> {
    let exposed: Vec<(Uuid, PathBuf)> = {
        let Ok(image) = std::fs::canonicalize(img) else {
            return Ok(());
        };
        exposures()
            .into_iter()
            .filter(|(_, e)| e.complete && e.image == image)
            .filter_map(|(_, e)| Some((e.shadow, e.place()?.to_path_buf())))
            .collect()
    };
    if exposed.is_empty() {
        return Ok(());
    }
    let shadows = match Session::new(img).call(&Request::ListShadows, &[])?.0 {
        Reply::Shadows { shadows } => shadows,
        other => bail!("unexpected answer {other:?} to a listing"),
    };
    let doomed: Vec<Uuid> = match which {
        Which::Id(id) => vec![ops::resolve_among(&shadows, id)?],
        Which::Oldest => shadows.iter().take(1).map(|s| s.id).collect(),
        Which::All => shadows.iter().map(|s| s.id).collect(),
    };
    if let Some((id, place)) = exposed.iter().find(|(id, _)| doomed.contains(id)) {
        bail!(
            "shadow copy {id} is exposed at {}; run `volshadow unexpose {}` first; nothing was changed",
            place.display(),
            place.display()
        );
    }
    Ok(())
}

fn run(cmd: &str, args: &[&OsStr]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `expose --for IMG --shadow ID [DIR | --no-mount]`.
pub(crate) fn expose(img: &Path, shadow: &str, dir: Option<&Path>) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("expose needs root (it attaches a loop device and mounts); nothing was changed");
    }
    sweep_cut_short();
    let dir = dir.map(check_mount_dir).transpose()?;
    let id = match Session::new(img).call(&Request::ListShadows, &[])?.0 {
        Reply::Shadows { shadows } => ops::resolve_among(&shadows, shadow)?,
        other => bail!("unexpected answer {other:?} to a listing"),
    };
    let image = std::fs::canonicalize(img)?;
    let state = PathBuf::from(STATE_DIR).join(Uuid::new_v4().to_string());
    let fuse_dir = state.join("fuse");
    std::fs::create_dir_all(&fuse_dir)
        .with_context(|| format!("creating {}", fuse_dir.display()))?;
    let mut undo = Undo::new(state.clone());
    let log = std::fs::File::create(state.join("mount.log"))?;
    let child = {
        use std::os::unix::process::CommandExt;
        Command::new(std::env::current_exe()?)
            .arg("mount")
            .arg("--for")
            .arg(&image)
            .arg(&fuse_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl+C at this terminal does not
            // end the exposure.
            .process_group(0)
            .spawn()
            .context("starting the exposure's mount")?
    };
    undo.fuse = Some((fuse_dir.clone(), child.id()));
    let mut record = Exposure {
        image,
        shadow: id,
        dir: None,
        device: None,
        fuse_dir: fuse_dir.clone(),
        fuse_pid: child.id(),
        expose_pid: std::process::id(),
        complete: false,
    };
    record.save(&state)?;
    let file = fuse_dir.join("shadows").join(id.to_string());
    let deadline = Instant::now() + START_WAIT;
    while !file.exists() {
        if !alive(child.id()) || Instant::now() > deadline {
            let said = std::fs::read_to_string(state.join("mount.log")).unwrap_or_default();
            bail!(
                "the exposure's mount did not start: {}",
                said.lines().last().unwrap_or("no message")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let device = PathBuf::from(run(
        "losetup",
        &[
            "--find".as_ref(),
            "--show".as_ref(),
            "--read-only".as_ref(),
            file.as_os_str(),
        ],
    )?);
    undo.device = Some(device.clone());
    record.device = Some(device.clone());
    record.save(&state)?;
    if let Some(dir) = &dir {
        let dev = device.as_os_str();
        let fs_type = run(
            "blkid",
            // -p: probe the device itself, not blkid's cache (a loop
            // device's name is reused for other contents).
            &[
                "-p".as_ref(),
                "-o".as_ref(),
                "value".as_ref(),
                "-s".as_ref(),
                "TYPE".as_ref(),
                dev,
            ],
        )
        .ok()
        .filter(|t| !t.is_empty())
        .with_context(|| format!("shadow copy {id} holds no file system blkid knows"))?;
        // A read-only device cannot replay a journal: mount without it.
        let options = match fs_type.as_str() {
            "ext3" | "ext4" => "ro,noload",
            // The copy has the live file system's UUID, which may be mounted.
            "xfs" => "ro,norecovery,nouuid",
            _ => "ro",
        };
        run(
            "mount",
            &[
                "-t".as_ref(),
                fs_type.as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                dev,
                dir.as_os_str(),
            ],
        )?;
        undo.dir = Some(dir.clone());
    }
    record.dir = dir.clone();
    record.complete = true;
    record.save(&state)?;
    undo.done();
    match &dir {
        Some(d) => println!(
            "Exposed shadow copy {id} at {} (read-only, {}).",
            d.display(),
            device.display()
        ),
        None => println!(
            "Exposed shadow copy {id} as {} (read-only).",
            device.display()
        ),
    }
    Ok(())
}

/// `unexpose DIR|DEVICE`: undoes one exposure.
pub(crate) fn unexpose(place: &Path) -> Result<()> {
    sweep_cut_short();
    let wanted = std::fs::canonicalize(place).unwrap_or_else(|_| place.to_path_buf());
    let Some((state, e)) = exposures()
        .into_iter()
        .find(|(_, e)| e.complete && e.place() == Some(&wanted))
    else {
        bail!(
            "{} is not a volshadow exposure; nothing was changed",
            place.display()
        );
    };
    let mut undo = Undo::new(state);
    undo.dir = e.dir.clone();
    undo.device = e.device.clone();
    undo.fuse = Some((e.fuse_dir.clone(), e.fuse_pid));
    drop(undo);
    println!(
        "Shadow copy {} is no longer exposed at {}.",
        e.shadow,
        wanted.display()
    );
    Ok(())
}

/// What an exposure set up so far, torn down when dropped unless `done`.
#[derive(Debug)]
struct Undo {
    state: PathBuf,
    fuse: Option<(PathBuf, u32)>,
    device: Option<PathBuf>,
    dir: Option<PathBuf>,
    keep: bool,
}

impl Undo {
    fn new(state: PathBuf) -> Self {
        Undo {
            state,
            fuse: None,
            device: None,
            dir: None,
            keep: false,
        }
    }

    fn done(&mut self) {
        self.keep = true;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Some(dir) = &self.dir
            && mounts().is_ok_and(|m| m.iter().any(|m| &m.point == dir))
            && let Err(e) = run("umount", &[dir.as_os_str()])
        {
            eprintln!("volshadow: {}", crate::one_line(&e));
        }
        if let Some(dev) = &self.device
            && let Err(e) = run("losetup", &["-d".as_ref(), dev.as_os_str()])
        {
            eprintln!("volshadow: {}", crate::one_line(&e));
        }
        if let Some((dir, pid)) = &self.fuse {
            // Unmounted whether or not mountinfo can be read: a removal
            // below must never run inside a live mount.
            match rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH) {
                Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {}
                Err(e) => eprintln!("volshadow: cannot unmount {}: {e}", dir.display()),
            }
            let deadline = Instant::now() + START_WAIT;
            while alive(*pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}
