//! `volshadow serve` with real NBD clients (qemu-img, qemu-io, nbdinfo,
//! nbdcopy, nbdfuse) and with hostile raw-socket input.
#![allow(clippy::unwrap_used)]
// Unix only: NBD over Unix sockets with Linux clients. The Windows
// server over TCP with the same clients is windows_server.rs (under Wine).
#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn real_clients_read_write_and_compare() {
    if !tools(&["qemu-img", "qemu-io", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = volume("16M");
    let d = dir.path();
    let data = pattern(4 << 20, 0);
    write_file(d, "data.bin", &data);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "data.bin",
        ],
    );
    let snap = json(d, &["create", "shadow", "--for", "disk.img", "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut expected = data.clone();
    expected.resize(16 << 20, 0);
    write_file(d, "expected.raw", &expected);

    let server = Server::start(d, "disk.img");
    let live = server.uri("live");
    let snap_uri = server.uri(&snap);

    // Listing shows both exports and the contexts.
    let list = String::from_utf8(run("nbdinfo", &["--list", &live]).stdout).unwrap();
    assert!(
        list.contains("export=\"live\"") && list.contains(&snap),
        "{list}"
    );
    assert!(
        list.contains("base:allocation") && list.contains("volshadow:changed"),
        "{list}"
    );

    // Writes through qemu-io on live, each read back with a pattern check.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x55 1M 64k",
            "-c",
            "read -P 0x55 1M 64k",
            "-c",
            "discard 2M 64k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "write -z 3M 64k",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "write -P 0x66 -f 10M 4k",
            "-c",
            "flush",
            &live,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");

    // The snapshot still reads the old bytes: convert, nbdcopy, compare.
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &snap_uri,
            d.join("conv.raw").to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(d.join("conv.raw")).unwrap() == expected);
    run(
        "nbdcopy",
        &[&snap_uri, d.join("copy.raw").to_str().unwrap()],
    );
    assert!(std::fs::read(d.join("copy.raw")).unwrap() == expected);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &snap_uri,
            d.join("expected.raw").to_str().unwrap(),
        ],
    );

    // Holes are reported; the changed context marks what qemu-io wrote.
    let map = String::from_utf8(run("nbdinfo", &["--map", &snap_uri]).stdout).unwrap();
    assert!(map.contains("hole,zero"), "{map}");
    let changed =
        String::from_utf8(run("nbdinfo", &["--map=volshadow:changed", &live]).stdout).unwrap();
    assert!(
        changed
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("1")),
        "{changed}"
    );

    // A shadow copy made over the control socket while qemu-io writes.
    let writer = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 5M 2M", &live])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let during = json(
        d,
        &[
            "create",
            "shadow",
            "--for",
            "disk.img",
            "--non-persistent",
            "--json",
        ],
    );
    assert!(writer.wait_with_output().unwrap().status.success());
    let id = during["shadow"]["id"].as_str().unwrap();
    assert_eq!(shadow_ids(d, "disk.img").len(), 2);
    // It holds the 2 MiB write entirely or not at all (one request).
    let got = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--shadow", id, "--offset", "5M", "--length", "2M",
        ],
    )
    .stdout;
    assert!(
        got.iter().all(|&b| b == 0x77) || got == expected[5 << 20..7 << 20],
        "torn write in a snapshot"
    );
    drop(server);
}

#[test]
fn hostile_input_gets_errors_and_the_server_stays_up() {
    let dir = volume("4M");
    let d = dir.path();
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let snap = shadow_ids(d, "disk.img")[0].clone();
    let server = Server::start(d, "disk.img");
    let sock = server.socket.clone();

    // Truncated handshake, bad option magic, garbage: each closes only its
    // own connection.
    drop(Raw::connect(&sock));
    {
        let mut r = Raw::connect(&sock);
        r.0.write_all(&[0, 0]).unwrap();
    }
    {
        let mut r = Raw::connect(&sock);
        r.0.write_all(&3u32.to_be_bytes()).unwrap();
        r.0.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(r.0.read(&mut b), Ok(0) | Err(_)));
    }
    {
        // An option claiming a huge payload.
        let mut r = Raw::connect(&sock);
        r.0.write_all(&3u32.to_be_bytes()).unwrap();
        let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        r.0.write_all(&b).unwrap();
    }
    {
        // Unknown export and unknown option get errors, not a hang up.
        let mut r = Raw::connect(&sock);
        r.0.write_all(&3u32.to_be_bytes()).unwrap();
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"nope");
        d.extend_from_slice(&0u16.to_be_bytes());
        r.opt(7, &d);
        assert_eq!(r.opt_reply().0, (1 << 31) | 6);
        r.opt(999, &[]);
        assert_eq!(r.opt_reply().0, (1 << 31) | 1);
    }

    let mut live = Raw::go(&sock, "live");
    // Out of range, overflowing, oversized, unknown command: EINVAL.
    assert_eq!(live.request(0, 4 << 20, 1, &[]), 22);
    assert_eq!(live.request(0, u64::MAX - 10, 100, &[]), 22);
    assert_eq!(live.request(0, 0, u32::MAX, &[]), 22);
    assert_eq!(live.request(1, (4 << 20) - 1, 2, &[1, 2]), 22);
    assert_eq!(live.request(77, 0, 0, &[]), 22);
    // The connection still works.
    assert_eq!(live.request(1, 0, 4, &[9, 9, 9, 9]), 0);
    assert_eq!(live.request(0, 0, 4, &[]), 0);
    // Writes to a snapshot: EPERM; its bytes unchanged.
    let mut ro = Raw::go(&sock, &snap);
    assert_eq!(ro.request(1, 0, 4, &[1, 2, 3, 4]), 1);
    assert_eq!(ro.request(4, 0, 4096, &[]), 1);
    assert_eq!(ro.request(6, 0, 4096, &[]), 1);
    // A request with bad magic ends that connection only.
    live.0.write_all(&[0u8; 28]).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(live.0.read(&mut b), Ok(0) | Err(_)));

    // Next client is served.
    let mut again = Raw::go(&sock, "live");
    assert_eq!(again.request(0, 0, 512, &[]), 0);
    let snap_bytes = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--shadow", &snap, "--offset", "0", "--length", "4",
        ],
    )
    .stdout;
    assert_eq!(snap_bytes, vec![0, 0, 0, 0]);
}

/// As root: nbdfuse exposes the live export as a file, a loop device over
/// it carries ext4; files written there, a snapshot, changes, then the
/// snapshot export mounted read-only still has the old files.
#[test]
fn ext4_over_nbdfuse_and_a_snapshot_of_it() {
    if !is_root() {
        eprintln!("SKIP: ext4 over nbdfuse needs root");
        return;
    }
    if !tools(&[
        "nbdfuse",
        "mkfs.ext4",
        "losetup",
        "mount",
        "umount",
        "fusermount3",
    ]) {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: no /dev/fuse");
        return;
    }
    let dir = volume("64M");
    let d = dir.path();
    let server = Server::start(d, "disk.img");
    let fuse_dir = d.join("fuse");
    std::fs::create_dir(&fuse_dir).unwrap();
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fuse = FuseExport::start(&fuse_dir, &server.uri("live"));
    let Some(fuse) = fuse else {
        eprintln!("SKIP: nbdfuse could not mount (no FUSE in this sandbox)");
        return;
    };
    let image = fuse_dir.join("nbd");
    run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
    let lo = Loop::attach(&image, false);
    run("mount", &[lo.dev(), mnt.to_str().unwrap()]);
    std::fs::write(mnt.join("hello.txt"), b"before the snapshot\n").unwrap();
    run("umount", &[mnt.to_str().unwrap()]);
    drop(lo);
    let snap = json(d, &["create", "shadow", "--for", "disk.img", "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let lo = Loop::attach(&image, false);
    run("mount", &[lo.dev(), mnt.to_str().unwrap()]);
    std::fs::write(mnt.join("hello.txt"), b"after\n").unwrap();
    std::fs::write(mnt.join("new.txt"), b"new\n").unwrap();
    run("umount", &[mnt.to_str().unwrap()]);
    drop(lo);
    drop(fuse);

    let snap_dir = d.join("fuse-snap");
    std::fs::create_dir(&snap_dir).unwrap();
    let fuse = FuseExport::start(&snap_dir, &server.uri(&snap)).unwrap();
    let lo = Loop::attach(&snap_dir.join("nbd"), true);
    run(
        "mount",
        &["-o", "ro,noload", lo.dev(), mnt.to_str().unwrap()],
    );
    let old = std::fs::read(mnt.join("hello.txt")).unwrap();
    let has_new = mnt.join("new.txt").exists();
    run("umount", &[mnt.to_str().unwrap()]);
    drop(lo);
    drop(fuse);
    assert_eq!(old, b"before the snapshot\n");
    assert!(!has_new);
    eprintln!("ext4 on the snapshot export still has the old file");
}

struct FuseExport {
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl FuseExport {
    fn start(dir: &std::path::Path, uri: &str) -> Option<FuseExport> {
        let child = Command::new("nbdfuse")
            .arg(dir)
            .arg(uri)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let mut f = FuseExport {
            dir: dir.to_owned(),
            child,
        };
        for _ in 0..200 {
            if dir.join("nbd").exists() {
                return Some(f);
            }
            if let Ok(Some(_)) = f.child.try_wait() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = f.child.kill();
        None
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        let _ = self.child.wait();
    }
}
