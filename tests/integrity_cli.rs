//! Integrity through the CLI, as a new user would meet it: copied or stale
//! shadow storage, damaged shadow storage rescued in salvage mode, and
//! shadow copy sets killed mid-way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = vs_raw(dir, args);
    assert!(!out.status.success(), "volshadow {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn create_shadow(dir: &Path, img: &str) -> String {
    json(dir, &["create", "shadow", "--for", img, "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_copied_pair_is_refused_until_rebound() {
    let dir = volume("8M");
    let d = dir.path();
    write_file(d, "data", &pattern(1 << 20, 1));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "data",
        ],
    );
    let id = create_shadow(d, "disk.img");
    write_file(d, "new", &pattern(1 << 20, 2));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "new",
        ],
    );
    // Another image of the same size handed the first one's binding.
    vs(d, &["image", "create", "other.img", "--size", "8M"]);
    std::fs::copy(d.join("disk.img.vshadow"), d.join("other.img.vshadow")).unwrap();
    let err = fails(d, &["list", "shadows", "--for", "other.img"]);
    assert!(err.contains("rebind"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    std::fs::remove_file(d.join("other.img.vshadow")).unwrap();
    // A copied pair: refused, then paired again on request.
    std::fs::copy(d.join("disk.img"), d.join("copy.img")).unwrap();
    std::fs::copy(d.join("disk.diff"), d.join("copy.diff")).unwrap();
    std::fs::copy(d.join("disk.img.vshadow"), d.join("copy.img.vshadow")).unwrap();
    let err = fails(d, &["list", "shadows", "--for", "copy.img"]);
    assert!(err.contains("rebind"), "{err}");
    vs(d, &["rebind", "--for", "copy.img", "--on", "copy.diff"]);
    assert_eq!(shadow_ids(d, "copy.img"), vec![id.clone()]);
    vs(
        d,
        &[
            "read", "--for", "copy.img", "--shadow", &id, "--offset", "0", "--length", "1M",
            "--output", "got",
        ],
    );
    assert!(std::fs::read(d.join("got")).unwrap() == pattern(1 << 20, 1));
    // The original is untouched by all of it.
    assert_eq!(shadow_ids(d, "disk.img"), vec![id]);
}

#[test]
fn an_older_copy_of_the_shadow_storage_put_back_is_refused() {
    let dir = volume("8M");
    let d = dir.path();
    create_shadow(d, "disk.img");
    std::fs::copy(d.join("disk.diff"), d.join("old.diff")).unwrap();
    write_file(d, "new", &pattern(1 << 20, 3));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "new",
        ],
    );
    create_shadow(d, "disk.img");
    std::fs::copy(d.join("old.diff"), d.join("disk.diff")).unwrap();
    let err = fails(d, &["list", "shadows", "--for", "disk.img"]);
    assert!(err.contains("older"), "{err}");
    let before = std::fs::read(d.join("disk.diff")).unwrap();
    assert!(
        before == std::fs::read(d.join("old.diff")).unwrap(),
        "refusal changed the file"
    );
}

/// The data region of a diff area starts at the superblock's
/// `data_offset` (byte 104 of either copy).
fn data_offset(diff: &Path) -> u64 {
    let b = std::fs::read(diff).unwrap();
    u64::from_le_bytes(b[104..112].try_into().unwrap())
}

#[test]
fn salvage_export_rescues_what_is_intact() {
    let dir = volume("4M");
    let d = dir.path();
    write_file(d, "old", &pattern(4 << 20, 4));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "old",
        ],
    );
    let id = create_shadow(d, "disk.img");
    write_file(d, "new", &pattern(256 << 10, 5));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "new",
        ],
    );
    // Damage the first preserved copy (chunk 0's old bytes).
    let at = data_offset(&d.join("disk.diff")) + 10;
    let mut diff = std::fs::read(d.join("disk.diff")).unwrap();
    diff[at as usize] ^= 0x40;
    std::fs::write(d.join("disk.diff"), &diff).unwrap();
    let err = fails(
        d,
        &[
            "export", "--for", "disk.img", "--shadow", &id, "--output", "x.img",
        ],
    );
    assert!(err.contains("damaged"), "{err}");
    assert!(!d.join("x.img").exists());
    let err = fails(d, &["verify", "--for", "disk.img"]);
    assert!(err.contains("damaged"), "{err}");
    let err = fails(
        d,
        &[
            "export",
            "--for",
            "disk.img",
            "--shadow",
            &id,
            "--output",
            "s.img",
            "--salvage",
        ],
    );
    assert!(err.contains("could not be vouched for"), "{err}");
    let got = std::fs::read(d.join("s.img")).unwrap();
    let want = pattern(4 << 20, 4);
    let chunk =
        json(d, &["list", "shadowstorage", "--for", "disk.img", "--json"])[0]["usage"]["chunk_size"]
            .as_u64()
            .unwrap() as usize;
    assert!(
        got[..chunk].iter().all(|&b| b == 0),
        "the damaged chunk is zeros"
    );
    assert!(got[chunk..] == want[chunk..], "everything else is exact");
}

/// Two volumes with shadow storage and 16 MiB written, for the set tests.
fn two_volumes() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_file(d, "fill", &pattern(16 << 20, 6));
    for v in ["a", "b"] {
        let img = format!("{v}.img");
        vs(d, &["image", "create", &img, "--size", "16M"]);
        add_storage(d, &img, &format!("{v}.diff"), "64M", &[]);
        vs(
            d,
            &["write", "--for", &img, "--offset", "0", "--input", "fill"],
        );
    }
    dir
}

/// The set ids `img` lists, sorted.
fn sets(d: &Path, img: &str) -> Vec<String> {
    let mut s: Vec<String> = json(d, &["list", "shadows", "--for", img, "--json"])["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["set_id"].as_str().map(str::to_string))
        .collect();
    s.sort();
    s
}

/// Starts `create shadow --for a.img --for b.img` and kills it after a
/// delay that moves with `round` (a few ms to tens of ms).
fn kill_a_set_create(d: &Path, round: u64) {
    let mut child = spawn(
        Command::new(bin())
            .args(["create", "shadow", "--for", "a.img", "--for", "b.img"])
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_micros(round * 7919 % 40_000));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_killed_set_create_leaves_the_whole_set_or_none() {
    let dir = two_volumes();
    let d = dir.path();
    for round in 0..30u64 {
        kill_a_set_create(d, round);
        assert_eq!(
            sets(d, "a.img"),
            sets(d, "b.img"),
            "half a set survived a kill"
        );
    }
}

/// The same with one member served: its server takes part for it, and when
/// the coordinator dies mid-set, a member left in doubt stays hidden until
/// the set's first volume gives a final answer. Never half a set: the two
/// agree once settled, and a member never shows a set its decider lacks.
#[test]
fn a_killed_set_create_with_served_members_settles_whole_or_none() {
    for served in ["a.img", "b.img"] {
        let dir = two_volumes();
        let d = dir.path();
        let _server = Server::start_control(d, served);
        for round in 0..15u64 {
            kill_a_set_create(d, round * 3 + 1);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                // b first: a set b shows has committed on a by then (a
                // decider's part may still finish after a kill, so a read
                // of a before b could miss what b then shows).
                let b = sets(d, "b.img");
                let a = sets(d, "a.img");
                assert!(
                    b.iter().all(|s| a.contains(s)),
                    "served {served}: b.img shows a set a.img (the decider) lacks: {a:?} {b:?}"
                );
                if a == b {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "served {served}: the set never settled: {a:?} {b:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // The set verb still works afterwards, through the server.
        vs(d, &["create", "shadow", "--for", "a.img", "--for", "b.img"]);
        assert_eq!(sets(d, "a.img"), sets(d, "b.img"));
        assert!(!sets(d, "a.img").is_empty());
    }
}

/// SIGTERM (and SIGINT) stop `serve` cleanly: in-flight writes finish, the
/// volume is closed (journal marked committed), sockets are removed, exit
/// status 0; persistent shadow copies survive, non-persistent ones end.
// Unix only: Unix signals; under Wine, windows_server.rs stops serve with Ctrl+C.
#[cfg(unix)]
#[test]
fn serve_stops_cleanly_on_sigterm_and_sigint() {
    for signal in ["-TERM", "-INT"] {
        let dir = volume("16M");
        let d = dir.path();
        let mut server = Server::start(d, "disk.img");
        write_file(d, "data", &pattern(1 << 20, 8));
        let keep = create_shadow(d, "disk.img");
        vs(
            d,
            &[
                "write", "--for", "disk.img", "--offset", "0", "--input", "data",
            ],
        );
        vs(
            d,
            &["create", "shadow", "--for", "disk.img", "--non-persistent"],
        );
        let pid = server.child.id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success());
        let code = server.child.wait().unwrap();
        assert!(code.success(), "serve exited with {code:?} on {signal}");
        assert!(
            !d.join("disk.img.vshadow.sock").exists(),
            "control socket left"
        );
        assert!(!server.socket.exists(), "NBD socket left");
        assert_eq!(shadow_ids(d, "disk.img"), vec![keep.clone()]);
        vs(
            d,
            &[
                "read", "--for", "disk.img", "--shadow", &keep, "--offset", "0", "--length", "1M",
                "--output", "old",
            ],
        );
        assert!(std::fs::read(d.join("old")).unwrap() == vec![0u8; 1 << 20]);
        vs(d, &["verify", "--for", "disk.img"]);
    }
}

/// A binding that names another volume id is refused before anything is
/// opened for writing: the shadow storage's bytes stay as they were.
#[test]
fn a_binding_for_another_volume_is_refused_and_changes_nothing() {
    let dir = volume("4M");
    let d = dir.path();
    create_shadow(d, "disk.img");
    let binding = std::fs::read_to_string(d.join("disk.img.vshadow")).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&binding).unwrap();
    doc["volume_id"] = serde_json::json!("00000000-0000-4000-8000-000000000001");
    std::fs::write(d.join("disk.img.vshadow"), doc.to_string()).unwrap();
    let before = std::fs::read(d.join("disk.diff")).unwrap();
    let err = fails(d, &["list", "shadows", "--for", "disk.img"]);
    assert!(err.contains("expects"), "{err}");
    assert!(std::fs::read(d.join("disk.diff")).unwrap() == before);
}

/// `export` goes through a running server (clients keep the volume) and
/// writes the shadow copy byte for byte, full and incremental.
#[test]
fn export_goes_through_a_running_server() {
    let dir = volume("8M");
    let d = dir.path();
    write_file(d, "a", &pattern(8 << 20, 10));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a",
        ],
    );
    let _server = Server::start_control(d, "disk.img");
    let s1 = create_shadow(d, "disk.img");
    write_file(d, "b", &pattern(1 << 20, 11));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "2M", "--input", "b",
        ],
    );
    let s2 = create_shadow(d, "disk.img");
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "b",
        ],
    );
    vs(
        d,
        &[
            "export", "--for", "disk.img", "--shadow", &s1, "--output", "x.img",
        ],
    );
    assert!(std::fs::read(d.join("x.img")).unwrap() == pattern(8 << 20, 10));
    vs(
        d,
        &[
            "export", "--for", "disk.img", "--shadow", &s2, "--output", "x.img", "--since", &s1,
        ],
    );
    let mut want = pattern(8 << 20, 10);
    want[2 << 20..3 << 20].copy_from_slice(&pattern(1 << 20, 11));
    assert!(std::fs::read(d.join("x.img")).unwrap() == want);
}
