//! `mount`, `unmount`, `expose` and `unexpose` as a new user would run
//! them: a FUSE mount of the volume, a file system made on its `live`
//! file and kept busy, a shadow copy of it taken frozen, exposed and
//! checked. Needs root, /dev/fuse and the util-linux and e2fsprogs tools;
//! otherwise each test prints why it skips.
// Linux only: FUSE, loop devices and Linux file-system tools.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn can_mount(tools: &[&str]) -> bool {
    if !is_root() {
        eprintln!("SKIP: FUSE, loop devices and mounts need root");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: no /dev/fuse");
        return false;
    }
    for t in tools {
        if !have(t) {
            eprintln!("SKIP: {t} is not installed");
            return false;
        }
    }
    true
}

/// Whether something is mounted on `dir`.
fn mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

/// A `volshadow mount` in the foreground, stopped (and checked to stop
/// cleanly) on drop if the test did not stop it.
struct Mount {
    child: Option<Child>,
    dir: PathBuf,
}

impl Mount {
    fn start(d: &Path, img: &str, dir: &str) -> Mount {
        let path = d.join(dir);
        std::fs::create_dir_all(&path).unwrap();
        let child = Command::new(bin())
            .args(["mount", "--for", img, dir])
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Mount {
            child: Some(child),
            dir: path,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !m.dir.join("live").exists() {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                let mut err = String::new();
                m.child
                    .take()
                    .unwrap()
                    .stderr
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("mount exited ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "mount did not show live");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// Waits for the process to end after an unmount or a signal; its exit
    /// status.
    fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "mount did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new(bin()).arg("unmount").arg(&self.dir).output();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_file(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn mount_shows_live_and_shadow_copies_and_stops_cleanly() {
    if !can_mount(&[]) {
        return;
    }
    let dir = volume("16M");
    let d = dir.path();
    let mut m = Mount::start(d, "disk.img", "m");
    let live = m.dir.join("live");
    assert_eq!(std::fs::metadata(&live).unwrap().len(), 16 << 20);

    // Written through the file, read back through the engine (the mount
    // process answers the other verbs).
    let a = pattern(3 << 20, 1);
    let mut f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&a).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let out = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "1M", "--length", "3M",
        ],
    );
    assert!(out.status.success());
    assert!(out.stdout == a, "the engine reads what the file got");

    // A shadow copy made meanwhile appears, and keeps the old bytes.
    let id = json(d, &["create", "shadow", "--for", "disk.img", "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let snap = m.dir.join("shadows").join(&id);
    assert!(snap.exists(), "shadows/{id} appears");
    let b = pattern(3 << 20, 2);
    let mut f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(
        read_file(&snap, 1 << 20, 3 << 20) == a,
        "the shadow copy kept its bytes"
    );
    // Each open is its own: a second opener closing does not end the first.
    let mut first = std::fs::File::open(&snap).unwrap();
    drop(std::fs::File::open(&snap).unwrap());
    let mut buf = vec![0u8; 4096];
    first.seek(SeekFrom::Start(1 << 20)).unwrap();
    first.read_exact(&mut buf).unwrap();
    assert!(buf[..] == a[..4096]);
    drop(first);
    assert!(
        read_file(&live, 1 << 20, 3 << 20) == b,
        "live has the new ones"
    );

    // Read-only, fixed-size, and nothing past the end.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&snap)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(30), "EROFS: {e}");
    let f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    assert!(f.set_len(1 << 20).is_err(), "a volume's size is fixed");
    drop(f);
    let mut f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    f.seek(SeekFrom::Start(16 << 20)).unwrap();
    assert!(f.write_all(&[1u8; 4096]).is_err(), "no write past the end");
    drop(f);

    // Deleted copies go.
    vs(
        d,
        &["delete", "shadows", "--for", "disk.img", "--shadow", &id],
    );
    assert!(!snap.exists(), "a deleted copy is gone from shadows/");

    // `unmount` ends the process cleanly: no mount, no socket, exit 0.
    vs(d, &["unmount", "m"]);
    assert!(m.wait().success());
    assert!(!mounted(&m.dir), "no stale mount");
    assert!(!d.join("disk.img.vshadow.sock").exists());
    // The data is in the volume.
    let out = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "1M", "--length", "3M",
        ],
    );
    assert!(out.stdout == b);

    // SIGTERM and SIGINT do the same.
    for signal in ["-TERM", "-INT"] {
        let mut m = Mount::start(d, "disk.img", "m");
        let pid = m.child.as_ref().unwrap().id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
        assert!(m.wait().success(), "{signal}");
        assert!(!mounted(&m.dir), "{signal}: no stale mount");
    }
}

#[test]
fn mount_and_expose_refuse_bad_input_and_change_nothing() {
    if !can_mount(&[]) {
        return;
    }
    let dir = volume("16M");
    let d = dir.path();
    std::fs::create_dir(d.join("full")).unwrap();
    std::fs::write(d.join("full/x"), b"x").unwrap();
    let id = json(d, &["create", "shadow", "--for", "disk.img", "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let msg = refused(d, &["mount", "--for", "disk.img", "missing"], 1);
    assert!(msg.contains("does not exist"), "{msg}");
    let msg = refused(d, &["mount", "--for", "disk.img", "full"], 1);
    assert!(msg.contains("not empty"), "{msg}");
    let m = Mount::start(d, "disk.img", "m");
    let msg = refused(d, &["mount", "--for", "disk.img", "m"], 1);
    assert!(msg.contains("mount point"), "{msg}");
    let msg = refused(d, &["unmount", "full"], 1);
    assert!(msg.contains("nothing is mounted"), "{msg}");
    let msg = refused(d, &["unexpose", "full"], 1);
    assert!(msg.contains("not a volshadow exposure"), "{msg}");
    std::fs::create_dir(d.join("ex")).unwrap();
    let msg = refused(
        d,
        &["expose", "--for", "disk.img", "--shadow", "ffffffff", "ex"],
        1,
    );
    assert!(msg.contains("ffffffff"), "{msg}");
    assert!(!mounted(&d.join("ex")));
    assert_eq!(shadow_ids(d, "disk.img"), vec![id]);
    drop(m);
}

/// Appends checksummed records to several files of a mounted file system,
/// each durable (fsync) before the next; counts what is durable.
struct Appender {
    stop: Arc<AtomicBool>,
    durable: Vec<Arc<AtomicU64>>,
    started: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

const RECORD: usize = 64;
const FILES: usize = 3;

fn record(file: usize, n: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&n.to_le_bytes());
    r[8..16].copy_from_slice(&(file as u64).to_le_bytes());
    for (i, b) in r[16..RECORD - 8].iter_mut().enumerate() {
        *b = (n as u8).wrapping_mul(31).wrapping_add(i as u8) ^ file as u8;
    }
    let sum: u64 = r[..RECORD - 8].iter().map(|&b| u64::from(b)).sum::<u64>() ^ 0x5eed;
    r[RECORD - 8..].copy_from_slice(&sum.to_le_bytes());
    r
}

impl Appender {
    fn start(root: &Path) -> Appender {
        let stop = Arc::new(AtomicBool::new(false));
        let mut a = Appender {
            stop: stop.clone(),
            durable: Vec::new(),
            started: Vec::new(),
            threads: Vec::new(),
        };
        for f in 0..FILES {
            let (durable, started) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            a.durable.push(durable.clone());
            a.started.push(started.clone());
            let path = root.join(format!("log{f}"));
            let stop = stop.clone();
            a.threads.push(std::thread::spawn(move || {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    started.store(n, Ordering::SeqCst);
                    file.write_all(&record(f, n)).unwrap();
                    file.sync_data().unwrap();
                    durable.store(n, Ordering::SeqCst);
                }
            }));
        }
        a
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

/// Records 1..=n of `log{f}` in `data`, whole and in order; n.
fn records_in(data: &[u8], f: usize) -> u64 {
    assert_eq!(data.len() % RECORD, 0, "log{f}: a torn record at the end");
    for (i, r) in data.chunks(RECORD).enumerate() {
        assert!(
            r == record(f, i as u64 + 1),
            "log{f}: record {} is wrong",
            i + 1
        );
    }
    (data.len() / RECORD) as u64
}

const FS_TOOLS: [&str; 7] = [
    "losetup",
    "mkfs.ext4",
    "mount",
    "umount",
    "fsfreeze",
    "blkid",
    "fsck.ext4",
];

/// The whole path: a busy ext4 on the mounted volume, frozen for a shadow
/// copy while the writers keep going, the copy exposed and checked.
#[test]
fn a_busy_mounted_file_system_is_copied_frozen_and_exposed_intact() {
    if !can_mount(&FS_TOOLS) {
        return;
    }
    let dir = volume("128M");
    let d = dir.path();
    let m = Mount::start(d, "disk.img", "m");
    copy_a_busy_file_system(d, &m.dir.join("live"), Fs::Ext4);
    drop(m);
}

/// The same with XFS (its copy mounts beside the live one: same UUID).
#[test]
fn a_busy_xfs_is_copied_frozen_and_exposed_intact() {
    if !can_mount(&FS_TOOLS) || !can_mount(&["mkfs.xfs", "xfs_repair"]) {
        return;
    }
    // XFS wants at least 300 MiB.
    let dir = volume("320M");
    let d = dir.path();
    let m = Mount::start(d, "disk.img", "m");
    copy_a_busy_file_system(d, &m.dir.join("live"), Fs::Xfs);
    drop(m);
}

#[derive(Debug, Clone, Copy)]
enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    fn mkfs(self, dev: &str) {
        match self {
            Fs::Ext4 => run("mkfs.ext4", &["-q", dev]),
            Fs::Xfs => run("mkfs.xfs", &["-q", "-f", dev]),
        };
    }

    /// A read-only check of the file system on `dev`.
    fn check(self, dev: &str) -> std::process::Output {
        let (tool, args): (&str, &[&str]) = match self {
            Fs::Ext4 => ("fsck.ext4", &["-n", "-f"]),
            Fs::Xfs => ("xfs_repair", &["-n"]),
        };
        Command::new(tool).args(args).arg(dev).output().unwrap()
    }
}

/// The same with the volume served over NBD and made a file by nbdfuse
/// (libnbd's FUSE client): `expose` then goes through the server.
#[test]
fn the_same_through_serve_and_nbdfuse() {
    if !can_mount(&FS_TOOLS) || !can_mount(&["nbdfuse"]) {
        return;
    }
    let dir = volume("128M");
    let d = dir.path();
    let server = Server::start(d, "disk.img");
    let n = d.join("n");
    std::fs::create_dir(&n).unwrap();
    let mut fuse = Command::new("nbdfuse")
        .arg(&n)
        .arg(server.uri("live"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let file = n.join("nbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        assert!(Instant::now() < deadline, "nbdfuse did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    copy_a_busy_file_system(d, &file, Fs::Ext4);
    let _ = Command::new("fusermount3").arg("-u").arg(&n).status();
    let _ = fuse.wait();
    drop(server);
}

/// mkfs on `live` (through a loop device), writers appending, a frozen
/// shadow copy of disk.img, exposed (mounted and as a device) and checked.
fn copy_a_busy_file_system(d: &Path, live: &Path, kind: Fs) {
    let loop_dev =
        String::from_utf8(run("losetup", &["--find", "--show", live.to_str().unwrap()]).stdout)
            .unwrap()
            .trim()
            .to_string();
    let fs = d.join("fs");
    std::fs::create_dir(&fs).unwrap();
    let cleanup = Cleanup {
        fs: fs.clone(),
        loop_dev: loop_dev.clone(),
    };
    kind.mkfs(&loop_dev);
    run("mount", &[&loop_dev, fs.to_str().unwrap()]);

    let writers = Appender::start(&fs);
    std::thread::sleep(Duration::from_millis(300));
    // A VSS backup with an fsfreeze writer on the file system, through the
    // mount's server: every write durable before it is in the copy, none
    // started after it.
    std::fs::write(
        d.join("backup.toml"),
        format!(
            r#"[backup]
context = "app-rollback"
type = "full"
document = "backup.json"
[[volume]]
path = "disk.img"
[[writer]]
name = "fs"
kind = "fsfreeze"
mount = "{}"
[[writer.component]]
name = "logs"
paths = ["{}"]
"#,
            fs.display(),
            fs.display()
        ),
    )
    .unwrap();
    let before: Vec<u64> = writers
        .durable
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .collect();
    let backup = vs_raw(d, &["backup", "--config", "backup.toml"]);
    let after: Vec<u64> = writers
        .started
        .iter()
        .map(|a| a.load(Ordering::SeqCst))
        .collect();
    assert!(
        backup.status.success(),
        "{}{}",
        String::from_utf8_lossy(&backup.stdout),
        String::from_utf8_lossy(&backup.stderr)
    );
    let listed = json(d, &["list", "shadows", "--for", "disk.img", "--json"]);
    let id = listed["shadows"][0]["id"].as_str().unwrap().to_string();
    assert!(d.join("backup.json").exists(), "the backup document");
    // The writers keep going while the copy is exposed.
    std::thread::sleep(Duration::from_millis(300));

    let ex = d.join("ex");
    std::fs::create_dir(&ex).unwrap();
    vs(d, &["expose", "--for", "disk.img", "--shadow", &id, "ex"]);
    let listed = vs(d, &["list", "shadows", "--for", "disk.img"]);
    assert!(listed.contains("Exposed at:"), "{listed}");
    // Not deleted from under its readers.
    let msg = refused(d, &["delete", "shadows", "--for", "disk.img", "--all"], 1);
    assert!(msg.contains("exposed at"), "{msg}");
    for f in 0..FILES {
        let data = std::fs::read(ex.join(format!("log{f}"))).unwrap();
        let n = records_in(&data, f);
        assert!(
            n >= before[f],
            "log{f}: {n} records, {} were durable before the freeze",
            before[f]
        );
        assert!(
            n <= after[f],
            "log{f}: {n} records, only {} started before the thaw",
            after[f]
        );
    }
    let exposed_dev = vs(d, &["list", "shadows", "--for", "disk.img", "--json"]);
    assert!(exposed_dev.contains("\"exposed\""), "{exposed_dev}");
    vs(d, &["unexpose", "ex"]);
    assert!(!mounted(&ex));

    // fsck of the copy, read-only, on its own loop device.
    vs(
        d,
        &["expose", "--for", "disk.img", "--shadow", &id, "--no-mount"],
    );
    let json = json(d, &["list", "shadows", "--for", "disk.img", "--json"]);
    let dev = json["shadows"][0]["exposed"].as_str().unwrap().to_string();
    let fsck = match kind {
        Fs::Ext4 => kind.check(&dev),
        // XFS keeps its log dirty across a freeze: check a writable copy
        // of the shadow copy after its log is replayed by a mount.
        Fs::Xfs => {
            vs(
                d,
                &[
                    "export", "--for", "disk.img", "--shadow", &id, "--output", "copy.raw",
                ],
            );
            let copy = String::from_utf8(
                run(
                    "losetup",
                    &["--find", "--show", d.join("copy.raw").to_str().unwrap()],
                )
                .stdout,
            )
            .unwrap()
            .trim()
            .to_string();
            let replay = d.join("replay");
            std::fs::create_dir(&replay).unwrap();
            run("mount", &["-o", "nouuid", &copy, replay.to_str().unwrap()]);
            run("umount", &[replay.to_str().unwrap()]);
            let out = kind.check(&copy);
            run("losetup", &["-d", &copy]);
            out
        }
    };
    assert!(
        fsck.status.success(),
        "fsck of the shadow copy: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    vs(d, &["unexpose", &dev]);

    writers.stop();
    // The live file system is unharmed.
    for f in 0..FILES {
        records_in(&std::fs::read(fs.join(format!("log{f}"))).unwrap(), f);
    }
    run("umount", &[fs.to_str().unwrap()]);
    let fsck = kind.check(&loop_dev);
    assert!(
        fsck.status.success(),
        "fsck of the live file system: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    drop(cleanup);
}

/// Unmounts the test's file system and detaches its loop device.
struct Cleanup {
    fs: PathBuf,
    loop_dev: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.fs)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
    }
}
