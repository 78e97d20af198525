//! `send` / `receive` as a new user runs them: full and incremental
//! streams through files and pipes, checked byte for byte against a model
//! of what was written; wrong bases, damaged and cut streams refused with
//! the replica unchanged; `kill -9` during a receive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SIZE: usize = 16 << 20;

fn snapshot(dir: &Path, img: &str) -> String {
    json(dir, &["create", "shadow", "--for", img, "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn read_all(dir: &Path, img: &str, shadow: Option<&str>) -> Vec<u8> {
    let len = SIZE.to_string();
    let mut args = vec!["read", "--for", img, "--offset", "0", "--length", &len];
    if let Some(s) = shadow {
        args.extend(["--shadow", s]);
    }
    let out = vs_raw(dir, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn send(dir: &Path, shadow: &str, since: Option<&str>, out: &str) {
    let mut args = vec![
        "send", "--for", "disk.img", "--shadow", shadow, "--output", out,
    ];
    if let Some(b) = since {
        args.extend(["--since", b]);
    }
    vs(dir, &args);
}

/// Runs `receive --for rep.img` with `stream` on standard input.
fn receive_stdin(dir: &Path, stream: &[u8]) -> std::process::Output {
    let mut child = spawn(
        Command::new(bin())
            .args(["receive", "--for", "rep.img"])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A refused stream may close the pipe early; that is fine.
    let _ = stdin.write_all(stream);
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// The replica's image, byte for byte, and its shadow copies. (Opening
/// the shadow storage checkpoints its journal, so that file's bytes move.)
fn replica_files(dir: &Path) -> (Vec<u8>, Vec<String>) {
    (
        std::fs::read(dir.join("rep.img")).unwrap(),
        shadow_ids(dir, "rep.img"),
    )
}

struct Source {
    dir: tempfile::TempDir,
    model: Vec<u8>,
    /// (shadow id, the model at that shadow copy).
    shadows: Vec<(String, Vec<u8>)>,
}

/// A 16 MiB source with a shadow copy after the first fill and after each
/// of `rounds` rounds of scattered overwrites.
fn source(rounds: u64) -> Source {
    let dir = volume("16M");
    let d = dir.path();
    let mut model = vec![0u8; SIZE];
    put(
        d,
        "disk.img",
        &mut model,
        1 << 20,
        &random_bytes(6 << 20, 1),
    );
    // A stretch of written zeros inside data: sent as a zero record.
    put(d, "disk.img", &mut model, 3 << 20, &vec![0u8; 1 << 20]);
    let mut shadows = vec![(snapshot(d, "disk.img"), model.clone())];
    for r in 0..rounds {
        for k in 0..5u64 {
            let off = ((r * 7 + k * 3) % 15) as usize * (1 << 20) + (k as usize * 5000);
            put(
                d,
                "disk.img",
                &mut model,
                off,
                &random_bytes(20_000, r * 10 + k + 2),
            );
        }
        shadows.push((snapshot(d, "disk.img"), model.clone()));
    }
    Source {
        dir,
        model,
        shadows,
    }
}

#[test]
fn full_and_incrementals_through_files_and_pipes_are_byte_exact() {
    let src = source(3);
    let d = src.dir.path();
    let ids: Vec<&str> = src.shadows.iter().map(|s| s.0.as_str()).collect();
    send(d, ids[0], None, "s0.vss");
    vs(d, &["receive", "--for", "rep.img", "--input", "s0.vss"]);
    assert_eq!(read_all(d, "rep.img", None), src.shadows[0].1);
    for i in 1..ids.len() {
        let name = format!("s{i}.vss");
        send(d, ids[i], Some(ids[i - 1]), &name);
        // Incrementals carry only what changed: 5 pieces of 20 000 bytes,
        // rounded to 16 KiB chunks.
        let len = std::fs::metadata(d.join(&name)).unwrap().len();
        assert!(len < 400 << 10, "incremental stream of {len} bytes");
        let out = if i % 2 == 1 {
            receive_stdin(d, &std::fs::read(d.join(&name)).unwrap())
        } else {
            vs_raw(d, &["receive", "--for", "rep.img", "--input", &name])
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(read_all(d, "rep.img", None), src.shadows[i].1, "after {i}");
    }
    // Every shadow copy of the replica, by the source's ids, reads what
    // the source's did.
    assert_eq!(shadow_ids(d, "rep.img"), ids);
    for (id, want) in &src.shadows {
        assert!(
            read_all(d, "rep.img", Some(id)) == *want,
            "shadow copy {id}"
        );
    }
    assert_eq!(read_all(d, "rep.img", None), src.model);
    let v = json(d, &["verify", "--for", "rep.img", "--json"]);
    assert!(v["report"]["mismatches"].as_array().unwrap().is_empty());
    // `send | receive` through a pipe between the two processes, into a
    // second replica.
    let mut send = spawn(
        Command::new(bin())
            .args(["send", "--for", "disk.img", "--shadow", ids[3]])
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    )
    .unwrap();
    let received = spawn(
        Command::new(bin())
            .args(["receive", "--for", "rep2.img", "--on", "rep2.diff"])
            .current_dir(d)
            .stdin(send.stdout.take().unwrap()),
    )
    .unwrap()
    .wait()
    .unwrap();
    assert!(send.wait().unwrap().success());
    assert!(received.success());
    let len = SIZE.to_string();
    let out = vs_raw(
        d,
        &[
            "read", "--for", "rep2.img", "--offset", "0", "--length", &len,
        ],
    );
    assert!(out.stdout == src.shadows[3].1);
}

#[test]
fn wrong_base_damaged_and_cut_streams_are_refused_and_change_nothing() {
    let src = source(2);
    let d = src.dir.path();
    let ids: Vec<&str> = src.shadows.iter().map(|s| s.0.as_str()).collect();
    send(d, ids[0], None, "s0.vss");
    send(d, ids[1], Some(ids[0]), "s1.vss");
    send(d, ids[2], Some(ids[1]), "s2.vss");
    send(d, ids[2], Some(ids[0]), "s02.vss");
    // An incremental with no replica, and before the replica has its base.
    let out = vs_raw(d, &["receive", "--for", "rep.img", "--input", "s1.vss"]);
    assert!(!out.status.success());
    assert!(!d.join("rep.img").exists());
    vs(d, &["receive", "--for", "rep.img", "--input", "s0.vss"]);
    let before = replica_files(d);
    let err =
        String::from_utf8(vs_raw(d, &["receive", "--for", "rep.img", "--input", "s2.vss"]).stderr)
            .unwrap();
    assert!(err.contains("applies on shadow copy"), "{err}");
    assert!(
        replica_files(d) == before,
        "a wrong base changed the replica"
    );
    // A full stream onto an existing replica.
    assert!(
        !vs_raw(d, &["receive", "--for", "rep.img", "--input", "s0.vss"])
            .status
            .success()
    );
    assert!(replica_files(d) == before);

    // Damaged: one byte flipped in the middle of the data; cut: the end
    // missing. Both are found only after records were applied, and must
    // roll back.
    let good = std::fs::read(d.join("s1.vss")).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    let cut = &good[..good.len() - 40];
    for (what, stream) in [("damaged", &flipped[..]), ("cut", cut)] {
        let out = receive_stdin(d, stream);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} stream accepted");
        assert!(err.contains("is back at shadow copy"), "{what}: {err}");
        assert_eq!(shadow_ids(d, "rep.img"), vec![ids[0]]);
        assert!(read_all(d, "rep.img", None) == src.shadows[0].1, "{what}");
        assert!(!d.join("rep.img.vshadow.receiving").exists());
    }
    // The good stream still applies after the rollbacks, and the one
    // from 0 to 2 is refused on top of it.
    vs(d, &["receive", "--for", "rep.img", "--input", "s1.vss"]);
    assert!(read_all(d, "rep.img", None) == src.shadows[1].1);
    assert!(
        !vs_raw(d, &["receive", "--for", "rep.img", "--input", "s02.vss"])
            .status
            .success()
    );
    // A replica written to since its newest shadow copy is refused.
    let f = write_file(d, "x.bin", b"local change");
    vs(
        d,
        &[
            "write",
            "--for",
            "rep.img",
            "--offset",
            "0",
            "--input",
            f.to_str().unwrap(),
        ],
    );
    let err =
        String::from_utf8(vs_raw(d, &["receive", "--for", "rep.img", "--input", "s2.vss"]).stderr)
            .unwrap();
    assert!(err.contains("was written since"), "{err}");
    vs(d, &["revert", "--for", "rep.img", "--shadow", ids[1]]);
    vs(d, &["receive", "--for", "rep.img", "--input", "s2.vss"]);
    assert!(read_all(d, "rep.img", None) == src.shadows[2].1);
}

/// Starts `receive` on a pipe, feeds it `fed` bytes of `stream`, waits
/// until it has applied them (its marker exists and it reads no more),
/// then kills it with SIGKILL.
fn kill_mid_receive(dir: &Path, stream: &[u8], fed: usize) {
    let mut child = spawn(
        Command::new(bin())
            .args(["receive", "--for", "rep.img"])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&stream[..fed]).unwrap();
    stdin.flush().unwrap();
    let t = Instant::now();
    while !dir.join("rep.img.vshadow.receiving").exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no marker appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let it apply what it was given.
    std::thread::sleep(Duration::from_millis(500));
    // Killed outright (SIGKILL; TerminateProcess on Windows), by pid:
    // the child is ours.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
}

#[test]
fn kill_9_during_receive_leaves_the_previous_shadow_copy() {
    let src = source(1);
    let d = src.dir.path();
    let ids: Vec<&str> = src.shadows.iter().map(|s| s.0.as_str()).collect();
    send(d, ids[0], None, "s0.vss");
    send(d, ids[1], Some(ids[0]), "s1.vss");
    let full = std::fs::read(d.join("s0.vss")).unwrap();

    // A first receive killed half way: the next full receive starts over.
    kill_mid_receive(d, &full, full.len() / 2);
    assert!(d.join("rep.img.vshadow.receiving").exists());
    let out = vs_raw(d, &["list", "shadows", "--for", "rep.img"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("first receive"));
    let out = vs_raw(d, &["receive", "--for", "rep.img", "--input", "s0.vss"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(read_all(d, "rep.img", None) == src.shadows[0].1);

    // An incremental killed after most of its records went in.
    let inc = std::fs::read(d.join("s1.vss")).unwrap();
    kill_mid_receive(d, &inc, inc.len() - 100);
    assert!(d.join("rep.img.vshadow.receiving").exists());
    // The next open rolls the live volume back to the previous copy.
    let out = vs_raw(d, &["list", "shadows", "--for", "rep.img", "--json"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is back at shadow copy"));
    assert_eq!(shadow_ids(d, "rep.img"), vec![ids[0]]);
    assert!(read_all(d, "rep.img", None) == src.shadows[0].1);
    assert!(!d.join("rep.img.vshadow.receiving").exists());
    // And the stream applies afterwards.
    vs(d, &["receive", "--for", "rep.img", "--input", "s1.vss"]);
    assert!(read_all(d, "rep.img", None) == src.shadows[1].1);
    assert_eq!(shadow_ids(d, "rep.img"), ids);
}
