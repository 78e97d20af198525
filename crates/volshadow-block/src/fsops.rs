//! File-system operations the coordinator's writers and providers need,
//! as safe functions over the OS layer.

use std::path::Path;

use crate::{Error, Op, Result, sys};

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
