//! Opening a device by path, choosing the backend from what the path is.

use std::path::Path;

use crate::{BlockDevice, Error, FileImage, Op, RawVolume, Result, sys};

/// How to open a device.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open for reading only; writes fail with [`Error::ReadOnly`].
    pub read_only: bool,
    /// Unbuffered I/O (`O_DIRECT` on Linux). Windows raw volumes are always
    /// unbuffered and write-through.
    pub direct: bool,
    /// Windows: `FSCTL_LOCK_VOLUME` after opening a volume.
    pub lock_volume: bool,
    /// Windows: also `FSCTL_DISMOUNT_VOLUME`.
    pub dismount: bool,
    /// Logical sector size to report for a regular file (default 512).
    pub block_size: Option<u32>,
}

impl OpenOptions {
    /// Read-write, buffered.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    pub fn direct(mut self, yes: bool) -> Self {
        self.direct = yes;
        self
    }
}

/// What [`open_device`] found at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A regular file: a [`FileImage`].
    Image,
    /// A block device or Windows volume / disk: a [`RawVolume`].
    Raw,
}

/// Tells what kind of device `path` names without opening it for I/O.
pub fn device_kind(path: &Path) -> Result<DeviceKind> {
    if sys::is_device_path(path) {
        return Ok(DeviceKind::Raw);
    }
    let meta = std::fs::metadata(path).map_err(|source| Error::Path {
        path: path.to_owned(),
        op: Op::Open,
        source,
    })?;
    if sys::is_block_device(&meta) {
        Ok(DeviceKind::Raw)
    } else if meta.is_file() {
        Ok(DeviceKind::Image)
    } else {
        Err(Error::Invalid {
            device: path.display().to_string(),
            reason: "neither a regular file nor a block device".to_owned(),
        })
    }
}

/// Opens `path` with the right backend: a [`RawVolume`] for block devices
/// and Windows device paths, or for any path when unbuffered I/O is asked;
/// a [`FileImage`] for regular files otherwise.
///
/// # Example
///
/// ```
/// use volshadow_block::{BlockDevice, FileImage, OpenOptions, open_device};
///
/// # fn main() -> volshadow_block::Result<()> {
/// let dir = tempfile::tempdir().expect("temporary directory");
/// let path = dir.path().join("disk.img");
/// drop(FileImage::create(&path, 1 << 20)?);
///
/// // A path to a regular file opens a `FileImage`; `/dev/loop0` or
/// // `\\.\D:` would open a `RawVolume`.
/// let dev = open_device(&path, &OpenOptions::new().read_only(true))?;
/// assert_eq!(dev.len(), 1 << 20);
/// assert!(dev.write_at(b"no", 0).is_err());
/// # Ok(())
/// # }
/// ```
pub fn open_device(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let path = path.as_ref();
    match device_kind(path)? {
        DeviceKind::Raw => Ok(Box::new(RawVolume::open(path, options)?)),
        DeviceKind::Image if options.direct => Ok(Box::new(RawVolume::open(path, options)?)),
        DeviceKind::Image if options.read_only => Ok(Box::new(FileImage::open_read_only(path)?)),
        DeviceKind::Image => Ok(Box::new(FileImage::open(path)?)),
    }
}
