//! The command line as a new user drives it, against the built binary.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn full_scenario() {
    let dir = volume("8M");
    let d = dir.path();
    let a = pattern(8 << 20, 1);
    write_file(d, "a.bin", &a);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a.bin",
        ],
    );
    let s1 = json(
        d,
        &[
            "create",
            "shadow",
            "--for",
            "disk.img",
            "--persistent",
            "--json",
        ],
    );
    let s1 = s1["shadow"]["id"].as_str().unwrap().to_string();
    // Overwrite 100 KiB at 1 MiB + 5.
    let b = pattern(100 << 10, 99);
    write_file(d, "b.bin", &b);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "1048581", "--input", "b.bin",
        ],
    );
    let mut v2 = a.clone();
    v2[1_048_581..1_048_581 + b.len()].copy_from_slice(&b);
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let ids = shadow_ids(d, "disk.img");
    assert_eq!(ids.len(), 2);
    let s2 = ids[1].clone();
    // Third write, third snapshot.
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "4M", "--input", "b.bin",
        ],
    );
    let mut v3 = v2.clone();
    v3[4 << 20..(4 << 20) + b.len()].copy_from_slice(&b);
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let s3 = shadow_ids(d, "disk.img")[2].clone();

    // Old and new bytes; ids by unique prefix.
    let old = vs_raw(
        d,
        &[
            "read",
            "--for",
            "disk.img",
            "--shadow",
            &s1[..8],
            "--offset",
            "1048576",
            "--length",
            "4096",
        ],
    );
    assert_eq!(old.stdout, a[1 << 20..(1 << 20) + 4096]);
    let new = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "1048576", "--length", "4096",
        ],
    );
    assert_eq!(new.stdout, v3[1 << 20..(1 << 20) + 4096]);

    // Diff: chunks 64..=70 (16 KiB chunks) between s1 and s2.
    let diff = json(
        d,
        &[
            "diff", "--for", "disk.img", "--from", &s1, "--to", &s2, "--json",
        ],
    );
    assert_eq!(diff["extents"][0]["offset"], 1 << 20);
    assert_eq!(diff["bytes"], 7 * 16384);
    // Delete the middle one; diff across it still exact.
    vs(
        d,
        &["delete", "shadows", "--for", "disk.img", "--shadow", &s2],
    );
    let across = json(
        d,
        &[
            "diff", "--for", "disk.img", "--from", &s1, "--to", &s3, "--json",
        ],
    );
    let exts = across["extents"].as_array().unwrap();
    assert_eq!(exts.len(), 2, "{across}");
    assert_eq!(exts[1]["offset"], 4 << 20);

    // Export full s1 and s3, then incremental s1 -> s3 into a copy of s1.
    vs(
        d,
        &[
            "export", "--for", "disk.img", "--shadow", &s1, "--output", "s1.raw",
        ],
    );
    assert_eq!(std::fs::read(d.join("s1.raw")).unwrap(), a);
    vs(
        d,
        &[
            "export", "--for", "disk.img", "--shadow", &s3, "--output", "s3.raw",
        ],
    );
    std::fs::copy(d.join("s1.raw"), d.join("inc.raw")).unwrap();
    let inc = json(
        d,
        &[
            "export", "--for", "disk.img", "--shadow", &s3, "--output", "inc.raw", "--since", &s1,
            "--json",
        ],
    );
    assert!(inc["bytes_written"].as_u64().unwrap() < 1 << 20, "{inc}");
    assert!(
        std::fs::read(d.join("inc.raw")).unwrap() == std::fs::read(d.join("s3.raw")).unwrap(),
        "the incremental export differs from the full one"
    );
    assert_eq!(std::fs::read(d.join("s3.raw")).unwrap(), v3);

    // Revert to s1: the live volume reads as s1; s3 still reads as before.
    vs(d, &["revert", "--for", "disk.img", "--shadow", &s1]);
    let live = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0", "--length", "8M",
        ],
    );
    assert!(live.stdout == a);
    let s3_now = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--shadow", &s3, "--offset", "0", "--length", "8M",
        ],
    );
    assert!(s3_now.stdout == v3);

    let v = json(d, &["verify", "--for", "disk.img", "--json"]);
    assert!(v["report"]["mismatches"].as_array().unwrap().is_empty());
    let st = json(d, &["list", "shadowstorage", "--for", "disk.img", "--json"]);
    assert_eq!(st[0]["usage"]["snapshots"], 2);
    vs(d, &["delete", "shadows", "--for", "disk.img", "--all"]);
    assert!(shadow_ids(d, "disk.img").is_empty());
}

#[test]
fn moving_image_and_storage_together_keeps_them_paired() {
    let dir = volume("4M");
    let d = dir.path();
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let moved = d.join("moved");
    std::fs::create_dir(&moved).unwrap();
    for f in ["disk.img", "disk.img.vshadow", "disk.diff"] {
        std::fs::rename(d.join(f), moved.join(f)).unwrap();
    }
    assert_eq!(shadow_ids(&moved, "disk.img").len(), 1);
}

#[test]
fn bad_input_is_one_clear_line_and_changes_nothing() {
    let dir = volume("4M");
    let d = dir.path();
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let before = std::fs::read(d.join("disk.diff")).unwrap();
    for (args, needle) in [
        (
            vec![
                "read", "--for", "disk.img", "--offset", "4M", "--length", "1",
            ],
            "outside",
        ),
        (
            vec!["list", "shadows", "--for", "nope.img"],
            "no shadow storage",
        ),
        (
            vec![
                "delete", "shadows", "--for", "disk.img", "--shadow", "ffffffff",
            ],
            "no shadow copy",
        ),
        (
            vec!["image", "create", "x.img", "--size", "12Q"],
            "unknown size suffix",
        ),
        (
            vec!["revert", "--for", "disk.img", "--shadow", "0000"],
            "no shadow copy",
        ),
        (
            vec![
                "resize",
                "shadowstorage",
                "--for",
                "disk.img",
                "--maxsize",
                "1T",
            ],
            "capacity",
        ),
    ] {
        let out = vs_raw(d, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    // A corrupt diff area is reported, not used.
    let mut bad = before.clone();
    bad[16..24].fill(0xff);
    bad[4096 + 16..4096 + 24].fill(0xff);
    std::fs::write(d.join("disk.diff"), &bad).unwrap();
    let out = vs_raw(d, &["list", "shadows", "--for", "disk.img"]);
    assert!(!out.status.success());
    // Format 2 names the damage ("corrupt ... both superblock copies");
    // either way one line that names the file.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disk.diff")
            && (err.contains("corrupt") || err.contains("not a volshadow diff area")),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(d.join("disk.diff")).unwrap(), bad);
}

#[test]
fn shadow_copy_sets_across_volumes() {
    let dir = volume("4M");
    let d = dir.path();
    vs(d, &["image", "create", "two.img", "--size", "4M"]);
    add_storage(
        d,
        "two.img",
        "two.diff",
        "8M",
        &["--on-full", "fail-writes"],
    );
    let set = json(
        d,
        &[
            "create", "shadow", "--for", "disk.img", "--for", "two.img", "--json",
        ],
    );
    let set_id = set["set_id"].as_str().unwrap();
    for img in ["disk.img", "two.img"] {
        let s = json(d, &["list", "shadows", "--for", img, "--json"]);
        assert_eq!(s["shadows"][0]["set_id"], set_id);
    }
}

/// A set across volumes some of which `serve` holds: the served ones take
/// part through their servers (their clients keep writing until the
/// hold), the rest are opened; one instant, one set id, all or nothing.
// Unix only: the servers serve NBD on Unix sockets and the clients are
// Linux tools. On Windows, windows_server.rs makes a set through two
// servers' pipes.
#[cfg(unix)]
#[test]
fn shadow_copy_sets_reach_served_volumes_through_their_servers() {
    let dir = volume("4M");
    let d = dir.path();
    for img in ["two.img", "three.img"] {
        vs(d, &["image", "create", img, "--size", "4M"]);
        let diff = img.replace(".img", ".diff");
        add_storage(d, img, &diff, "8M", &[]);
    }
    let imgs = ["disk.img", "two.img", "three.img"];
    // Writes `data` at 1 MiB of every volume (through a server where one runs).
    let write_everywhere = |data: Vec<u8>| {
        write_file(d, "data.bin", &data);
        for img in imgs {
            vs(
                d,
                &[
                    "write", "--for", img, "--offset", "1M", "--input", "data.bin",
                ],
            );
        }
        data
    };
    let before = write_everywhere(pattern(1 << 20, 7));
    let a = Server::start(d, "disk.img");
    let b = Server::start_own(d, "two.img");

    // Writers keep counting on both served volumes, a then b, each write
    // durable before the next: any one instant sees a == b or a == b + 1.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counting = {
        let (sa, sb, stop) = (a.socket.clone(), b.socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ca, mut cb) = (Raw::go(&sa, "live"), Raw::go(&sb, "live"));
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let mut block = vec![0u8; 4096];
                block[..8].copy_from_slice(&n.to_le_bytes());
                for c in [&mut ca, &mut cb] {
                    let err = c
                        .cmd(
                            NBD_CMD_WRITE,
                            NBD_CMD_FLAG_FUA,
                            0,
                            4096,
                            &block,
                            &mut Vec::new(),
                        )
                        .unwrap();
                    assert_eq!(err, 0);
                }
            }
            n
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut args = vec!["create", "shadow", "--json"];
    for img in imgs {
        args.extend(["--for", img]);
    }
    let set = json(d, &args);
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let counted = counting.join().unwrap();
    let set_id = set["set_id"].as_str().unwrap().to_string();
    let shadows: Vec<String> = (0..3)
        .map(|i| set["shadows"][i]["id"].as_str().unwrap().to_string())
        .collect();
    let counter = |img: &str, shadow: &str| {
        let out = vs_raw(
            d,
            &[
                "read", "--for", img, "--shadow", shadow, "--offset", "0", "--length", "8",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        u64::from_le_bytes(out.stdout[..8].try_into().unwrap())
    };
    let (ca, cb) = (
        counter("disk.img", &shadows[0]),
        counter("two.img", &shadows[1]),
    );
    assert!(
        ca > 0 && ca < counted,
        "the writers ran across the set ({ca} of {counted})"
    );
    assert!(ca == cb || ca == cb + 1, "one instant: a {ca}, b {cb}");

    // New data everywhere; the shadow copies keep the old.
    let after = write_everywhere(pattern(1 << 20, 9));
    let read = |img: &str, shadow: Option<&str>| {
        let mut args = vec!["read", "--for", img, "--offset", "1M", "--length", "1M"];
        if let Some(s) = shadow {
            args.extend(["--shadow", s]);
        }
        let out = vs_raw(d, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    for (img, shadow) in imgs.iter().zip(&shadows) {
        assert!(
            read(img, Some(shadow)) == before,
            "{img}: the shadow copy kept its data"
        );
        assert!(read(img, None) == after, "{img}: live has the new data");
        let s = json(d, &["list", "shadows", "--for", img, "--json"]);
        assert_eq!(s["shadows"][0]["set_id"], set_id.as_str(), "{img}");
    }

    // Non-persistent: only where every member is served.
    let np = json(
        d,
        &[
            "create",
            "shadow",
            "--non-persistent",
            "--json",
            "--for",
            "disk.img",
            "--for",
            "two.img",
        ],
    );
    assert_eq!(np["shadows"].as_array().unwrap().len(), 2);
    let msg = refused(
        d,
        &[
            "create",
            "shadow",
            "--non-persistent",
            "--for",
            "disk.img",
            "--for",
            "three.img",
        ],
        1,
    );
    assert!(msg.contains("three.img"), "{msg}");
    assert_eq!(
        shadow_ids(d, "three.img").len(),
        1,
        "the refused set left nothing"
    );
    assert_eq!(
        shadow_ids(d, "disk.img").len(),
        2,
        "the refused set left nothing"
    );

    // The persistent set outlives the servers; the non-persistent one ends with them.
    drop((a, b));
    for img in imgs {
        let s = json(d, &["list", "shadows", "--for", img, "--json"]);
        let rows = s["shadows"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{img}: {rows:?}");
        assert_eq!(rows[0]["set_id"], set_id.as_str(), "{img}");
    }
}

#[test]
fn quickstart_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = vs(dir.path(), &["quickstart", "--dir", "qs"]);
    assert!(
        out.contains("match what was written before it: OK"),
        "{out}"
    );
    assert!(out.contains("all match their hashes"), "{out}");
    // What it made is a real volume the other verbs can use.
    assert_eq!(shadow_ids(&dir.path().join("qs"), "disk.img").len(), 2);
}

#[test]
fn second_writer_gets_in_use() {
    let dir = volume("4M");
    let d = dir.path();
    // Hold the diff area's lock the way a second process would see it.
    let held = volshadow::block::FileImage::open(d.join("disk.img")).unwrap();
    let out = vs_raw(d, &["list", "shadows", "--for", "disk.img"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
}

// Unix only: its writers are `sh` commands. The same backup and restore
// with writers in Windows' own shell is vss_cli's
// backup_and_restore_with_command_writers_in_the_platform_shell.
#[cfg(unix)]
#[test]
fn backup_and_restore_with_a_config() {
    let dir = volume("4M");
    let d = dir.path();
    let data = pattern(1 << 20, 5);
    write_file(d, "data.bin", &data);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "data.bin",
        ],
    );
    std::fs::write(
        d.join("backup.toml"),
        r#"
[backup]
context = "app-rollback"
type = "full"
freeze_timeout = "30s"
hold_timeout = "5s"
document = "backup.json"

[[volume]]
path = "disk.img"

[[writer]]
name = "app"
kind = "command"
freeze = ["sh", "-c", "echo frozen >> events.log"]
thaw = ["sh", "-c", "echo thawed >> events.log"]
post-restore = ["sh", "-c", "echo restored >> events.log"]

[[writer.component]]
name = "db"
paths = ["/srv/db"]
"#,
    )
    .unwrap();
    let out = vs(d, &["backup", "--config", "backup.toml"]);
    assert!(out.contains("Backup complete"), "{out}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("backup.json")).unwrap()).unwrap();
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["components"][0]["full_path"], "db");
    assert_eq!(shadow_ids(d, "disk.img").len(), 1);
    // Damage, restore, compare.
    write_file(d, "zero.bin", &vec![0u8; 1 << 20]);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "zero.bin",
        ],
    );
    let out = vs(
        d,
        &[
            "restore",
            "--config",
            "backup.toml",
            "--document",
            "backup.json",
        ],
    );
    assert!(out.contains("db: restored"), "{out}");
    let back = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0", "--length", "1M",
        ],
    )
    .stdout;
    assert!(back == data, "restore did not bring the bytes back");
    assert_eq!(
        std::fs::read_to_string(d.join("events.log")).unwrap(),
        "frozen\nthawed\nrestored\n"
    );
    let writers = json(d, &["list", "writers", "--config", "backup.toml", "--json"]);
    assert_eq!(writers[0]["name"], "app");
    assert_eq!(writers[0]["state"], "stable");
    let providers = json(d, &["list", "providers", "--json"]);
    assert_eq!(providers.as_array().unwrap().len(), 2);

    // A failing freeze: one line naming writer and phase; no snapshot made.
    let cfg = std::fs::read_to_string(d.join("backup.toml"))
        .unwrap()
        .replace("echo frozen >> events.log", "echo locked >&2; exit 4");
    std::fs::write(d.join("bad.toml"), cfg).unwrap();
    let outp = vs_raw(d, &["backup", "--config", "bad.toml"]);
    assert!(!outp.status.success());
    let err = String::from_utf8_lossy(&outp.stderr);
    assert!(
        err.contains("writer app failed at freeze") && err.contains("locked"),
        "{err}"
    );
    assert_eq!(shadow_ids(d, "disk.img").len(), 1);
}

#[test]
fn preallocated_shadow_storage_is_allocated_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vs(d, &["image", "create", "disk.img", "--size", "4M"]);
    add_storage(d, "disk.img", "disk.diff", "8M", &["--preallocate"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(d.join("disk.diff")).unwrap();
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "{} of {} bytes allocated",
            meta.blocks() * 512,
            meta.len()
        );
    }
    let a = pattern(1 << 20, 3);
    write_file(d, "a.bin", &a);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a.bin",
        ],
    );
    vs(
        d,
        &["create", "shadow", "--for", "disk.img", "--persistent"],
    );
    let id = shadow_ids(d, "disk.img")[0].clone();
    write_file(d, "b.bin", &pattern(1 << 20, 9));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "b.bin",
        ],
    );
    vs(
        d,
        &[
            "export", "--for", "disk.img", "--shadow", &id, "--output", "snap.raw",
        ],
    );
    let snap = std::fs::read(d.join("snap.raw")).unwrap();
    assert_eq!(&snap[..1 << 20], &a[..]);
    assert!(snap[1 << 20..].iter().all(|&b| b == 0));
    let out = vs(d, &["verify", "--for", "disk.img"]);
    assert!(out.contains("all match"), "{out}");
}
