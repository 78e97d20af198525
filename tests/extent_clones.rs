//! Copies as extent clones, as a new user would meet them: shadow storage
//! on XFS (reflink) beside its image. `add shadowstorage` and `list
//! shadowstorage` say the copies are clones, a shadow copy taken before
//! new data was written exports its old bytes exactly, `verify` is clean,
//! and the diff area's data extents are shared with the image (filefrag).
//! The XFS file system is made on a loop device, so this needs root and
//! xfsprogs; otherwise it prints a skip reason. On the file system of the
//! target directory (ext4 in CI) the copies are reported as written.
// Linux only: reflink clones on XFS over a loop device (root, xfsprogs, filefrag).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// An XFS file system with reflink on a loop device over a sparse file,
/// unmounted and removed on drop.
struct Xfs {
    /// Holds the backing file; removed after the unmount in `drop`.
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Xfs {
    fn make() -> Option<Xfs> {
        if !is_root() {
            eprintln!("SKIP: an XFS loop mount needs root");
            return None;
        }
        if !tools(&["mkfs.xfs", "mount", "umount", "filefrag"]) {
            return None;
        }
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let backing = dir.path().join("xfs.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        run(
            "mkfs.xfs",
            &["-q", "-f", "-m", "reflink=1", backing.to_str().unwrap()],
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mounted = Command::new("mount")
            .args([
                "-o",
                "loop",
                backing.to_str().unwrap(),
                mnt.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        if !mounted.success() {
            eprintln!("SKIP: could not loop-mount an XFS file system here");
            return None;
        }
        Some(Xfs { _dir: dir, mnt })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        // `mount -o loop` set autoclear: unmounting frees the loop device;
        // the temporary directory then goes with its backing file.
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn copies_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.trim_start().starts_with("Copies:"))
        .unwrap_or_else(|| panic!("no Copies line in:\n{out}"))
}

/// Image with random data, shadow storage, a shadow copy, then new data
/// over most of it; returns (the old bytes, the shadow copy's id).
fn scenario(dir: &Path, extra: &[&str]) -> (Vec<u8>, String, String) {
    const SIZE: usize = 32 << 20;
    let mut model = random_bytes(SIZE, 1);
    std::fs::write(dir.join("disk.img"), &model).unwrap();
    let added = add_storage(dir, "disk.img", "disk.diff", "32M", extra);
    let id = create_shadow(dir, "disk.img");
    let old = model.clone();
    // Unaligned, across many chunks, in two writes.
    put(
        dir,
        "disk.img",
        &mut model,
        4097,
        &random_bytes(20 << 20, 2),
    );
    put(
        dir,
        "disk.img",
        &mut model,
        25 << 20,
        &random_bytes(3 << 20, 3),
    );
    // Each `write` ends with a flush: the image file holds the new bytes.
    assert!(
        std::fs::read(dir.join("disk.img")).unwrap() == model,
        "live volume differs"
    );
    (old, id, added)
}

fn exported(dir: &Path, id: &str) -> Vec<u8> {
    let out = dir.join("snap.bin");
    vs(
        dir,
        &[
            "export",
            "--for",
            "disk.img",
            "--shadow",
            id,
            "--output",
            out.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

#[test]
fn shadow_storage_on_xfs_clones_its_copies() {
    let Some(xfs) = Xfs::make() else { return };
    let dir = xfs.mnt.as_path();
    let (old, id, added) = scenario(dir, &[]);
    assert!(
        copies_line(&added).contains("extent clones"),
        "add shadowstorage: {added}"
    );
    let listed = json(
        dir,
        &["list", "shadowstorage", "--for", "disk.img", "--json"],
    );
    assert_eq!(listed[0]["extent_clones"], serde_json::Value::Bool(true));
    assert!(exported(dir, &id) == old, "the shadow copy's bytes changed");
    let verified = vs(dir, &["verify", "--for", "disk.img"]);
    assert!(verified.contains("all match"), "{verified}");
    // The copies share the image's old extents instead of new blocks.
    let diff = dir.join("disk.diff");
    let frag = String::from_utf8(run("filefrag", &["-v", diff.to_str().unwrap()]).stdout).unwrap();
    assert!(
        frag.contains("shared"),
        "no shared extent in the diff area:\n{frag}"
    );
}

#[test]
fn shadow_storage_that_cannot_clone_says_its_copies_are_written() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let fs = String::from_utf8(
        Command::new("stat")
            .args(["-f", "-c", "%T", dir.path().to_str().unwrap()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    if !matches!(fs.trim(), "ext2/ext3" | "ext4" | "tmpfs") {
        eprintln!(
            "SKIP: {} is {}, which may share extents",
            dir.path().display(),
            fs.trim()
        );
        return;
    }
    let (old, id, added) = scenario(dir.path(), &[]);
    assert!(copies_line(&added).contains("written"), "{added}");
    let listed = json(
        dir.path(),
        &["list", "shadowstorage", "--for", "disk.img", "--json"],
    );
    assert_eq!(listed[0]["extent_clones"], serde_json::Value::Bool(false));
    assert!(exported(dir.path(), &id) == old);
}

#[test]
fn no_extent_clones_on_xfs_writes_the_copies() {
    let Some(xfs) = Xfs::make() else { return };
    let dir = xfs.mnt.as_path();
    let (old, id, added) = scenario(dir, &["--no-extent-clones"]);
    assert!(copies_line(&added).contains("written"), "{added}");
    assert!(exported(dir, &id) == old);
    let diff = dir.join("disk.diff");
    let frag = String::from_utf8(run("filefrag", &["-v", diff.to_str().unwrap()]).stdout).unwrap();
    assert!(!frag.contains("shared"), "a copy was cloned:\n{frag}");

    // The shadow storage moved and paired again: the refusal is kept, and
    // new first writes are still written, not cloned.
    std::fs::rename(&diff, dir.join("moved.diff")).unwrap();
    vs(dir, &["rebind", "--for", "disk.img", "--on", "moved.diff"]);
    let listed = json(
        dir,
        &["list", "shadowstorage", "--for", "disk.img", "--json"],
    );
    assert_eq!(listed[0]["no_extent_clones"], serde_json::Value::Bool(true));
    let text = vs(dir, &["list", "shadowstorage", "--for", "disk.img"]);
    assert!(copies_line(&text).contains("--no-extent-clones"), "{text}");
    let id2 = create_shadow(dir, "disk.img");
    let mut model = std::fs::read(dir.join("disk.img")).unwrap();
    let before = model.clone();
    poke_chunks(dir, &mut model, 4);
    assert!(
        exported(dir, &id2) == before,
        "the second shadow copy changed"
    );
    assert!(exported(dir, &id) == old, "the first shadow copy changed");
    let moved = dir.join("moved.diff");
    let frag = String::from_utf8(run("filefrag", &["-v", moved.to_str().unwrap()]).stdout).unwrap();
    assert!(
        !frag.contains("shared"),
        "a copy was cloned after rebind:\n{frag}"
    );
}

#[test]
fn rebind_with_no_extent_clones_refuses_clones_from_then_on() {
    let Some(xfs) = Xfs::make() else { return };
    let dir = xfs.mnt.as_path();
    let mut model = random_bytes(16 << 20, 5);
    std::fs::write(dir.join("disk.img"), &model).unwrap();
    let added = add_storage(dir, "disk.img", "disk.diff", "32M", &[]);
    assert!(copies_line(&added).contains("extent clones"), "{added}");
    std::fs::rename(dir.join("disk.diff"), dir.join("moved.diff")).unwrap();
    vs(
        dir,
        &[
            "rebind",
            "--for",
            "disk.img",
            "--on",
            "moved.diff",
            "--no-extent-clones",
        ],
    );
    let text = vs(dir, &["list", "shadowstorage", "--for", "disk.img"]);
    assert!(copies_line(&text).contains("--no-extent-clones"), "{text}");
    let id = create_shadow(dir, "disk.img");
    let old = model.clone();
    poke_chunks(dir, &mut model, 6);
    assert!(exported(dir, &id) == old);
    let moved = dir.join("moved.diff");
    let frag = String::from_utf8(run("filefrag", &["-v", moved.to_str().unwrap()]).stdout).unwrap();
    assert!(!frag.contains("shared"), "a copy was cloned:\n{frag}");
}

/// Writes 4 KiB inside each of 8 chunks, 1 MiB apart: a chunk copied as
/// an extent clone keeps its other blocks shared with the image, which
/// `filefrag` shows (a wholly overwritten chunk is unshared again).
fn poke_chunks(dir: &Path, model: &mut [u8], seed: u64) {
    for k in 0..8 {
        let data = random_bytes(4 << 10, seed + k as u64);
        put(dir, "disk.img", model, (k << 20) + (8 << 10), &data);
    }
}
