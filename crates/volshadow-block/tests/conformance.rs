//! The conformance suite against every backend, plus backend-specific
//! behaviour (sparse create, locking, read-only, hole punching, selection).

use volshadow_block::conformance::{self, MIN_LEN};
use volshadow_block::{
    BlockDevice, DeviceKind, Error, FaultyDevice, FileImage, MemDevice, OpenOptions, RawVolume,
    Result, device_kind, open_device,
};

fn assert_conforms(dev: &dyn BlockDevice) {
    let failures = conformance::run_all(dev);
    assert!(
        failures.is_empty(),
        "{} failed conformance: {failures:#?}",
        dev.name()
    );
}

#[test]
fn mem_device_conforms() {
    assert_conforms(&MemDevice::new(MIN_LEN + (1 << 20)));
    assert_conforms(&MemDevice::with_block_size(MIN_LEN, 4096));
}

#[test]
fn file_image_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let img = FileImage::create(dir.path().join("a.img"), MIN_LEN).unwrap();
    assert_conforms(&img);
}

#[test]
fn file_image_with_direct_writes_conforms_and_mixes_with_buffered_writes() {
    // In the target directory: /tmp may be tmpfs, which refuses O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("direct.img");
    let img = FileImage::create(&path, MIN_LEN)
        .unwrap()
        .with_direct_writes();
    if cfg!(target_os = "linux") && !img.writes_direct() {
        eprintln!("skipping: {} refuses O_DIRECT", dir.path().display());
        return;
    }
    assert_conforms(&img);
    // Aligned whole blocks go unbuffered, the rest through the page cache,
    // over the same pages in turn: reads must always show the last write.
    let len = 1usize << 20;
    let mut model = vec![0u8; len];
    img.write_at(&model, 0).unwrap();
    let mut rng = conformance::Rng::new(7);
    for i in 0..400u32 {
        let (off, n) = if i % 2 == 0 {
            let blocks = 1 + rng.below(64) as usize;
            let start = rng.below((len / 4096 - blocks) as u64) as usize;
            (start * 4096, blocks * 4096)
        } else {
            let off = rng.below(len as u64 - 1) as usize;
            (off, 1 + rng.below((len - off).min(20_000) as u64) as usize)
        };
        let data: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
        // Half of the aligned writes come from a misaligned buffer (bounced).
        let mut shifted = vec![0u8; n + 1];
        shifted[1..].copy_from_slice(&data);
        let src = if i % 4 == 0 { &shifted[1..] } else { &data[..] };
        img.write_at(src, off as u64).unwrap();
        model[off..off + n].copy_from_slice(&data);
        if i % 50 == 0 {
            img.flush().unwrap();
        }
        let mut back = vec![0u8; n];
        img.read_at(&mut back, off as u64).unwrap();
        assert_eq!(back, model[off..off + n], "write {i} at {off}+{n}");
    }
    img.flush().unwrap();
    drop(img);
    let again = FileImage::open(&path).unwrap();
    let mut all = vec![0u8; len];
    again.read_at(&mut all, 0).unwrap();
    assert!(
        all == model,
        "the file differs from the model after reopening"
    );
}

#[test]
fn raw_volume_on_a_file_conforms_buffered_and_unbuffered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.img");
    drop(FileImage::create(&path, MIN_LEN).unwrap());
    let buffered = RawVolume::open(&path, &OpenOptions::new()).unwrap();
    assert_conforms(&buffered);
    drop(buffered);
    // O_DIRECT (Linux) / FILE_FLAG_NO_BUFFERING (Windows, always): exercises
    // the aligned bounce buffers and read-modify-write. Some file systems
    // (tmpfs) refuse O_DIRECT; then say so rather than pass silently.
    match RawVolume::open(&path, &OpenOptions::new().direct(true)) {
        Ok(direct) => {
            assert!(direct.io_alignment() >= 512);
            assert_conforms(&direct);
        }
        Err(e) => eprintln!("skipping unbuffered RawVolume on {}: {e}", path.display()),
    }
}

#[test]
fn faulty_device_conforms() {
    let dev = FaultyDevice::new(MemDevice::new(MIN_LEN));
    assert_conforms(&dev);
    // And what it reports as durable equals what it shows after a flush.
    dev.flush().unwrap();
    assert_eq!(dev.inner().to_vec().len() as u64, MIN_LEN);
    let mut shown = vec![0u8; MIN_LEN as usize];
    dev.read_at(&mut shown, 0).unwrap();
    assert_eq!(shown, dev.inner().to_vec());
}

/// A backend whose discard does nothing must fail the suite: proof that the
/// suite can fail.
#[test]
fn suite_catches_a_broken_discard() {
    struct NoDiscard(MemDevice);
    impl BlockDevice for NoDiscard {
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn block_size(&self) -> u32 {
            self.0.block_size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
            Ok(())
        }
        fn name(&self) -> String {
            "broken".into()
        }
    }
    let failures = conformance::run_all(&NoDiscard(MemDevice::new(MIN_LEN)));
    let names: Vec<_> = failures.iter().map(|(n, _)| *n).collect();
    assert!(names.contains(&"discard_reads_zero"), "{failures:?}");
    assert!(names.contains(&"out_of_range_rejected"), "{failures:?}");
}

/// A backend that writes the in-range part of an overlong request must fail.
#[test]
fn suite_catches_a_partial_write() {
    struct Partial(MemDevice);
    impl BlockDevice for Partial {
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            let room = self.0.len().saturating_sub(offset).min(buf.len() as u64) as usize;
            self.0.write_at(&buf[..room], offset)?;
            volshadow_block::check_range(self, volshadow_block::Op::Write, offset, buf.len() as u64)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.0.discard(offset, len)
        }
        fn name(&self) -> String {
            "partial".into()
        }
    }
    let failures = conformance::run_all(&Partial(MemDevice::new(MIN_LEN)));
    assert!(
        failures.iter().any(|(n, _)| *n == "out_of_range_rejected"),
        "{failures:?}"
    );
}

#[test]
fn create_is_sparse_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let img = FileImage::create(&path, 1 << 30).unwrap();
    assert_eq!(img.len(), 1 << 30);
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, (1 << 30) - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks();
        assert!(blocks < 64, "a new 1 GiB image uses {blocks} blocks");
    }
    drop(img);
    assert!(matches!(
        FileImage::create(&path, 4096),
        Err(Error::Path { .. })
    ));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
}

// Linux only: counts the file's allocated blocks (st_blocks).
#[cfg(target_os = "linux")]
#[test]
fn discard_punches_a_hole() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holes.img");
    let img = FileImage::create(&path, 8 << 20).unwrap();
    img.write_at(&vec![0x5a; 8 << 20], 0).unwrap();
    img.flush().unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks();
    img.discard(1 << 20, 4 << 20).unwrap();
    img.flush().unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks();
    // tmpfs and ext4/xfs/btrfs all punch; a file system that cannot would
    // fall back to writing zeros, which the conformance suite covers.
    if after >= before {
        eprintln!("file system at {} did not punch holes", path.display());
    } else {
        assert!(before - after >= (4 << 20) / 512 / 2, "{before} -> {after}");
    }
    let mut buf = vec![1u8; 4 << 20];
    img.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn second_writer_gets_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.img");
    let first = FileImage::create(&path, 1 << 20).unwrap();
    let err = FileImage::open(&path).unwrap_err();
    assert!(matches!(err, Error::InUse { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    assert!(matches!(
        FileImage::open_read_only(&path),
        Err(Error::InUse { .. })
    ));
    assert!(matches!(
        RawVolume::open(&path, &OpenOptions::new()),
        Err(Error::InUse { .. })
    ));
    drop(first);
    // Readers share; a writer is refused while they hold it.
    let r1 = FileImage::open_read_only(&path).unwrap();
    let r2 = FileImage::open_read_only(&path).unwrap();
    assert!(matches!(FileImage::open(&path), Err(Error::InUse { .. })));
    drop((r1, r2));
    FileImage::open(&path).unwrap();
}

#[test]
fn read_only_refuses_writes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    FileImage::create(&path, 1 << 20)
        .unwrap()
        .write_at(&[9u8; 512], 0)
        .unwrap();
    let ro = FileImage::open_read_only(&path).unwrap();
    assert!(ro.is_read_only());
    assert!(matches!(
        ro.write_at(&[1u8; 512], 0),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(ro.discard(0, 512), Err(Error::ReadOnly { .. })));
    let mut buf = [0u8; 512];
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [9u8; 512]);
}

#[test]
fn open_device_picks_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pick.img");
    drop(FileImage::create(&path, 1 << 20).unwrap());
    assert_eq!(device_kind(&path).unwrap(), DeviceKind::Image);
    let dev = open_device(&path, &OpenOptions::new()).unwrap();
    assert_eq!(dev.len(), 1 << 20);
    drop(dev);
    let ro = open_device(&path, &OpenOptions::new().read_only(true)).unwrap();
    assert!(ro.is_read_only());
    drop(ro);
    assert!(matches!(
        device_kind(dir.path()),
        Err(Error::Invalid { .. })
    ));
    let missing = open_device(dir.path().join("nope"), &OpenOptions::new())
        .err()
        .unwrap();
    assert!(missing.to_string().contains("nope"), "{missing}");
}

#[test]
fn grow_a_file_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = FileImage::create(dir.path().join("g.img"), 4096).unwrap();
    assert!(matches!(
        img.write_at(&[1u8; 512], 4096),
        Err(Error::OutOfRange { .. })
    ));
    img.set_len(8192).unwrap();
    img.write_at(&[1u8; 512], 4096).unwrap();
    assert_eq!(img.len(), 8192);
}

/// The suite against a real loop device: Linux, root and losetup only.
// Linux only: loop devices (root, losetup).
#[cfg(target_os = "linux")]
#[test]
fn loop_device_conforms() {
    let Some(lo) = LoopDevice::setup(MIN_LEN) else {
        return;
    };
    let kind = device_kind(lo.dev()).unwrap();
    assert_eq!(kind, DeviceKind::Raw);
    let vol = RawVolume::open(lo.dev(), &OpenOptions::new()).unwrap();
    assert_eq!(vol.len(), MIN_LEN);
    assert_conforms(&vol);
    // O_EXCL: a second exclusive open of the block device is refused.
    assert!(matches!(
        RawVolume::open(lo.dev(), &OpenOptions::new()),
        Err(Error::InUse { .. })
    ));
    drop(vol);
    let direct = RawVolume::open(lo.dev(), &OpenOptions::new().direct(true)).unwrap();
    assert_eq!(direct.io_alignment(), direct.block_size());
    assert_conforms(&direct);
}

#[cfg(target_os = "linux")]
struct LoopDevice {
    dev: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

#[cfg(target_os = "linux")]
impl LoopDevice {
    fn setup(size: u64) -> Option<Self> {
        use std::process::Command;
        if !rustix_is_root() {
            eprintln!("skipping loop device test: not running as root");
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("loop.img");
        drop(FileImage::create(&img, size).ok()?);
        let out = match Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
        {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                eprintln!(
                    "skipping loop device test: losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("skipping loop device test: losetup not available: {e}");
                return None;
            }
        };
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Some(LoopDevice {
            dev: dev.into(),
            _dir: dir,
        })
    }

    fn dev(&self) -> &std::path::Path {
        &self.dev
    }
}

#[cfg(target_os = "linux")]
impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

#[cfg(target_os = "linux")]
fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
