//! Refusing to write over a volume's own files.
//!
//! An output path that names a volume's image, its diff area or its binding
//! file — directly, through a symbolic link or as a hard link — would
//! destroy the volume or its shadow copies. Files are compared by identity
//! (device and inode on Unix), not by name, so `./d.img`, `link-to-d.img`
//! and a hard link all count as `d.img`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::storage;

/// What identifies a file independently of the name it was reached by.
#[cfg(unix)]
type Identity = (u64, u64);
/// Without device and inode numbers in stable std, the canonical path
/// (symbolic links resolved) stands in; hard links are not recognised.
#[cfg(not(unix))]
type Identity = PathBuf;

#[cfg(unix)]
fn identity(p: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symbolic links: a link is its target.
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn identity(p: &Path) -> Option<Identity> {
    let c = std::fs::canonicalize(p).ok()?;
    // Windows and macOS names are case-insensitive by default.
    Some(PathBuf::from(c.to_string_lossy().to_lowercase()))
}

/// Whether `a` and `b` are the same existing file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (identity(a), identity(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

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
/// them. Volumes elsewhere cannot be found from a path alone.
pub(crate) fn volumes_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let name = p.file_name()?.to_str()?.to_owned();
            name.strip_suffix(".vshadow")
                .map(|img| p.with_file_name(img))
        })
        .collect())
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
    identity(target)?;
    let mut candidates: Vec<PathBuf> = volumes.to_vec();
    candidates.extend(volumes_in(target.parent().unwrap_or(Path::new("."))).unwrap_or_default());
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn links_are_the_same_file() {
        let dir = tempfile_dir();
        let a = dir.join("a");
        std::fs::write(&a, b"x").unwrap();
        let b = dir.join("b");
        std::fs::write(&b, b"x").unwrap();
        assert!(same_file(&a, &a));
        assert!(!same_file(&a, &b));
        assert!(!same_file(&a, &dir.join("missing")));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&a, dir.join("sym")).unwrap();
            std::fs::hard_link(&a, dir.join("hard")).unwrap();
            assert!(same_file(&a, &dir.join("sym")));
            assert!(same_file(&a, &dir.join("hard")));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "volshadow-guard-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
