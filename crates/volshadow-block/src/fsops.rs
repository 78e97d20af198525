//! File-system operations the coordinator's writers and providers need,
//! as safe functions over the OS layer.

use std::path::Path;

use crate::{BlockDevice, Error, Op, Result, sys};

fn path_err(path: &Path, op: Op) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Path {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Freezes the file system mounted at `mount` (Linux `FIFREEZE`): writes
/// block and the file system is consistent on disk until thawed.
pub fn freeze_filesystem(mount: &Path) -> Result<()> {
    sys::fs_freeze(mount, true).map_err(path_err(mount, Op::Lock))
}

/// Thaws a frozen file system (Linux `FITHAW`).
pub fn thaw_filesystem(mount: &Path) -> Result<()> {
    sys::fs_freeze(mount, false).map_err(path_err(mount, Op::Lock))
}

/// Creates `dst` as a reflink copy of `src` (Linux `FICLONE`: btrfs, xfs):
/// it shares `src`'s extents until either is written. Fails, leaving no
/// `dst`, where the file system cannot.
pub fn reflink_file(src: &Path, dst: &Path) -> Result<()> {
    let from = std::fs::File::open(src).map_err(path_err(src, Op::Open))?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(path_err(dst, Op::Open))?;
    if let Err(e) = sys::reflink(&from, &to) {
        drop(to);
        let _ = std::fs::remove_file(dst);
        return Err(path_err(dst, Op::Write)(e));
    }
    Ok(())
}

/// Whether a file in `dir` can share extents with `src` (`FICLONERANGE`:
/// XFS with reflink, btrfs, on the same file system): what a diff area in
/// `dir` would do with its copies. Probes by cloning `src`'s first block
/// into a scratch file in `dir`, removed again; `false` for devices that
/// are no file, or anything smaller than a block.
pub fn probe_extent_clones(src: &dyn BlockDevice, dir: &Path) -> bool {
    const BLOCK: u64 = 4096;
    let Some(from) = src.file() else {
        return false;
    };
    if src.len() < BLOCK {
        return false;
    }
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let scratch = dir.join(format!(
        ".volshadow-clone-probe-{}-{nonce}",
        std::process::id()
    ));
    let Ok(to) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&scratch)
    else {
        return false;
    };
    let cloned = sys::clone_range(from, 0, &to, 0, BLOCK).unwrap_or(false);
    drop(to);
    let _ = std::fs::remove_file(&scratch);
    cloned
}
