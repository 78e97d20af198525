//! Refusing to write over a volume's own files.
//!
//! An output path that names a volume's image, its diff area or its binding
//! file — directly, through a symbolic link or as a hard link — would
//! destroy the volume or its shadow copies. Files are compared by identity
//! (device and inode on Unix), not by name, so `./d.img`, `link-to-d.img`
//! and a hard link all count as `d.img`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::identity::same_file;
use crate::storage;

/// The files that make up the volume whose image is `img`, each with what
/// it is. The diff area is listed only when the binding names it.
fn parts(img: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut out = vec![
        (img.to_path_buf(), "image"),
        (storage::binding_path(img), "shadow-storage binding file"),
    ];
    #[cfg(unix)]
    out.push((crate::channel::socket_path(img), "control socket"));
    if let Ok((_, diff)) = storage::read_binding(img) {
        out.push((diff, "shadow storage (diff area)"));
    }
    out
}

/// Images with shadow storage in `dir`: those with an `IMG.vshadow` beside
/// them (in the state directory, the bindings of devices are not images
/// and are left out). Volumes elsewhere cannot be found from a path alone.
pub(crate) fn volumes_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    // In the state directory, bindings of devices name no image.
    let devices: Vec<PathBuf> = if same_file(dir, &storage::state_dir()) {
        storage::device_volumes()
            .into_iter()
            .map(|(base, _)| base)
            .collect()
    } else {
        Vec::new()
    };
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let name = p.file_name()?.to_str()?.to_owned();
            let img = p.with_file_name(name.strip_suffix(".vshadow")?);
            let device = devices.iter().any(|d| d.file_name() == img.file_name());
            (!device).then_some(img)
        })
        .collect())
}

/// Every volume found from `dir`: the images with shadow storage in it
/// and the devices bound in the state directory.
pub(crate) fn volumes_from(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut all = volumes_in(dir)?;
    all.extend(
        storage::device_volumes()
            .into_iter()
            .map(|(_, device)| device),
    );
    Ok(all)
}

/// A volume file some path turned out to be.
#[derive(Debug)]
pub struct Owner {
    /// The volume's image.
    pub volume: PathBuf,
    /// Which of its files: "image", "shadow storage (diff area)", ...
    pub kind: &'static str,
}

/// The volume `target` belongs to, if it is a file of one of `volumes` or
/// of a volume found beside `target` or beside those volumes.
pub fn owner(target: &Path, volumes: &[PathBuf]) -> Option<Owner> {
    // Nothing there yet: writing creates a new file.
    if !crate::identity::exists(target) {
        return None;
    }
    let mut candidates: Vec<PathBuf> = volumes.to_vec();
    candidates.extend(volumes_from(target.parent().unwrap_or(Path::new("."))).unwrap_or_default());
    for v in volumes {
        candidates.extend(volumes_in(v.parent().unwrap_or(Path::new("."))).unwrap_or_default());
    }
    candidates.into_iter().find_map(|img| {
        parts(&img)
            .into_iter()
            .find(|(part, _)| same_file(target, part))
            .map(|(_, kind)| Owner { volume: img, kind })
    })
}

/// Refuses `target` when [`owner`] finds it is a volume's file. `what`
/// names what the caller would write there ("the export").
pub fn refuse_volume_file(target: &Path, volumes: &[PathBuf], what: &str) -> Result<()> {
    if let Some(o) = owner(target, volumes) {
        bail!(
            "refusing to write {what} to {}: it is the {} of volume {}; nothing was changed",
            target.display(),
            o.kind,
            o.volume.display()
        );
    }
    Ok(())
}
