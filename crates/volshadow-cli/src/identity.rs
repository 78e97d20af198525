//! Whether two paths name the same file: by identity (device and inode on
//! Unix, the device number for a block device), not by name, so
//! `./d.img`, a symbolic link and a hard link all count as `d.img`.

use std::path::Path;
#[cfg(not(unix))]
use std::path::PathBuf;

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
    let m = std::fs::metadata(p).ok()?;
    // A block device is the device it opens, whichever node names it
    // (no file system has device number u64::MAX).
    Some(if is_block_device(&m) {
        (u64::MAX, m.rdev())
    } else {
        (m.dev(), m.ino())
    })
}

#[cfg(not(unix))]
fn identity(p: &Path) -> Option<Identity> {
    let c = match std::fs::canonicalize(p) {
        Ok(c) => c,
        // A device path (`\\.\D:`) cannot be resolved; it is what it says.
        Err(_)
            if volshadow_block::device_kind(p).ok() == Some(volshadow_block::DeviceKind::Raw) =>
        {
            std::path::absolute(p).ok()?
        }
        Err(_) => return None,
    };
    // Windows and macOS names are case-insensitive by default.
    Some(PathBuf::from(c.to_string_lossy().to_lowercase()))
}

/// Whether `meta` is a block device's.
pub fn is_block_device(meta: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        meta.file_type().is_block_device()
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        false
    }
}

/// Whether `p` names an existing file (following symbolic links).
pub fn exists(p: &Path) -> bool {
    identity(p).is_some()
}

/// Whether `a` and `b` are the same existing file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (identity(a), identity(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::PathBuf;

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
