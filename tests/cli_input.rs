//! The command line given what a hostile or careless user would give it:
//! outputs over a volume's own files, huge sizes and lengths, a flood of
//! control connections, damaged shadow storage. One clear line, a non-zero
//! exit, and nothing changed.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn files(d: &std::path::Path, names: &[&str]) -> Vec<Vec<u8>> {
    names
        .iter()
        .map(|n| std::fs::read(d.join(n)).unwrap())
        .collect()
}

#[test]
fn outputs_never_overwrite_a_volume_file() {
    let dir = volume("4M");
    let d = dir.path();
    let a = pattern(1 << 20, 11);
    write_file(d, "a.bin", &a);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a.bin",
        ],
    );
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let id = shadow_ids(d, "disk.img")[0].clone();
    write_file(d, "b.bin", &pattern(1 << 20, 12));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "b.bin",
        ],
    );
    vs(d, &["image", "create", "two.img", "--size", "4M"]);
    let own = ["disk.img", "disk.diff", "disk.img.vshadow"];
    let before = files(d, &own);
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut targets = vec!["disk.img", "./disk.img", "disk.diff", "disk.img.vshadow"];
    // Links name the same files by other names (Windows: identity by
    // canonical path only, so links are Unix-only here).
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.join("disk.img"), d.join("sym.img")).unwrap();
        std::fs::hard_link(d.join("disk.diff"), d.join("hard.diff")).unwrap();
        std::os::unix::fs::symlink("disk.img.vshadow", d.join("sym.vshadow")).unwrap();
        targets.extend(["sym.img", "hard.diff", "sym.vshadow"]);
    }
    for t in targets {
        let err = refused(
            d,
            &[
                "export", "--for", "disk.img", "--shadow", &id, "--output", t,
            ],
            1,
        );
        assert!(
            err.contains("refusing") && err.contains("nothing was changed"),
            "{err}"
        );
        let err = refused(
            d,
            &[
                "read", "--for", "disk.img", "--offset", "0", "--length", "4K", "--output", t,
            ],
            1,
        );
        assert!(err.contains("refusing"), "{err}");
        // Reading another volume into this one's files: refused as well.
        let err = refused(
            d,
            &[
                "read", "--for", "two.img", "--offset", "0", "--length", "4K", "--output", t,
            ],
            1,
        );
        assert!(err.contains("refusing"), "{t}: {err}");
        let err = refused(d, &["image", "create", t, "--size", "1M"], 1);
        assert!(err.contains("refusing"), "{t}: {err}");
        let err = refused(
            d,
            &[
                "add",
                "shadowstorage",
                "--for",
                "two.img",
                "--on",
                t,
                "--maxsize",
                "1M",
            ],
            1,
        );
        assert!(err.contains("refusing"), "{t}: {err}");
        #[cfg(unix)]
        {
            let err = refused(d, &["serve", "--for", "two.img", "--socket", t], 1);
            assert!(err.contains("refusing"), "{t}: {err}");
        }
    }
    // A volume's diff area or binding cannot become a volume itself, and a
    // link to its image cannot get a second diff area.
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut not_images = vec!["disk.diff", "disk.img.vshadow"];
    #[cfg(unix)]
    not_images.extend(["hard.diff", "sym.img"]);
    for img in not_images {
        let err = refused(
            d,
            &[
                "add",
                "shadowstorage",
                "--for",
                img,
                "--on",
                "new.diff",
                "--maxsize",
                "1M",
            ],
            1,
        );
        assert!(err.contains("refusing"), "{img}: {err}");
    }
    assert!(!d.join("new.diff").exists());
    assert!(!d.join("two.img.vshadow").exists());
    // The backup document is an output too.
    std::fs::write(
        d.join("bad.toml"),
        "[backup]\ndocument = \"disk.diff\"\n[[volume]]\npath = \"disk.img\"\n",
    )
    .unwrap();
    let err = refused(d, &["backup", "--config", "bad.toml"], 1);
    assert!(err.contains("refusing"), "{err}");

    assert!(files(d, &own) == before, "a volume file changed");
    // The shadow copy still reads the old bytes; a new file is fine.
    assert_eq!(shadow_ids(d, "disk.img"), vec![id.clone()]);
    vs(
        d,
        &[
            "export", "--for", "disk.img", "--shadow", &id, "--output", "s.raw",
        ],
    );
    assert!(std::fs::read(d.join("s.raw")).unwrap()[..1 << 20] == a[..]);
}

// Unix only: the memory bound is enforced with the shell's `ulimit -v`.
#[cfg(unix)]
#[test]
fn reads_stream_in_bounded_memory_and_refuse_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vs(d, &["image", "create", "disk.img", "--size", "512M"]);
    add_storage(d, "disk.img", "disk.diff", "16M", &[]);
    let a = pattern(3 << 20, 21);
    write_file(d, "a.bin", &a);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "509M", "--input", "a.bin",
        ],
    );
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let id = shadow_ids(d, "disk.img")[0].clone();
    write_file(d, "keep.bin", b"keep");
    for args in [
        vec![
            "read", "--for", "disk.img", "--offset", "0", "--length", "1T",
        ],
        vec![
            "read", "--for", "disk.img", "--shadow", &id, "--offset", "0", "--length", "1T",
        ],
        vec![
            "read", "--for", "disk.img", "--offset", "510M", "--length", "3M", "--output",
            "keep.bin",
        ],
        vec![
            "read",
            "--for",
            "disk.img",
            "--offset",
            "18446744073709551615",
            "--length",
            "2",
        ],
    ] {
        let err = refused(d, &args, 1);
        assert!(err.contains("outside"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(d.join("keep.bin")).unwrap(), b"keep");
    // The whole volume, live and shadow copy, under a 256 MiB address-space
    // limit: only a streaming read fits.
    for shadow in ["", &format!("--shadow {id}")] {
        let script = format!(
            "ulimit -v 262144 && exec '{}' read --for disk.img {shadow} --offset 0 --length 512M --output whole.raw",
            bin()
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let whole = std::fs::read(d.join("whole.raw")).unwrap();
        assert_eq!(whole.len(), 512 << 20);
        assert!(whole[509 << 20..] == a[..], "tail differs");
        assert!(whole[..509 << 20].iter().all(|&b| b == 0), "head differs");
    }
    // To stdout, byte-exact across piece boundaries.
    let out = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "509M", "--length", "3M",
        ],
    );
    assert!(out.status.success());
    assert!(out.stdout == a);
}

/// Hostile input on the control channel (a Unix socket, or the named
/// pipe on Windows) gets an error and the server serves on.
#[test]
fn control_socket_bounds_requests_and_keeps_serving() {
    use std::io::{BufRead, BufReader, Write};
    let dir = volume("8M");
    let d = dir.path();
    let a = pattern(8 << 20, 31);
    write_file(d, "a.bin", &a);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a.bin",
        ],
    );
    let mut server = Server::start_control(d, "disk.img");
    let ask = |raw: &[u8]| -> String {
        let s = control(d, "disk.img").unwrap();
        // A pipe has no half-close: an empty request is a client that
        // connects and goes.
        if raw.is_empty() && cfg!(windows) {
            return String::new();
        }
        // The server may answer and close before taking all of it.
        let _ = (&s).write_all(raw);
        #[cfg(unix)]
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        let _ = BufReader::new(&s).read_line(&mut line);
        line
    };
    let huge_read =
        br#"{"ok":{"op":"read","shadow":null,"offset":0,"length":1099511627776},"payload_len":0}
"#;
    let r = ask(huge_read);
    assert!(r.contains("\"error\"") && r.contains("limit"), "{r}");
    let huge_payload =
        br#"{"ok":{"op":"write","offset":0,"length":5},"payload_len":18446744073709551615}
"#;
    let r = ask(huge_payload);
    assert!(r.contains("\"error\"") && r.contains("limit"), "{r}");
    let r = ask(&vec![b'x'; 1 << 20]);
    assert!(r.contains("\"error\"") && r.contains("longer than"), "{r}");
    let r = ask(b"{not json}\n");
    assert!(r.contains("\"error\""), "{r}");
    let r = ask(b"");
    assert!(r.is_empty() || r.contains("\"error\""), "{r}");
    assert!(server.child.try_wait().unwrap().is_none(), "server died");
    // The command line through the server: refused past the end, exact
    // within it, and the server still serves.
    let err = refused(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0", "--length", "1T",
        ],
        1,
    );
    assert!(err.contains("outside"), "{err}");
    let whole = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0", "--length", "8M",
        ],
    );
    assert!(whole.status.success());
    assert!(whole.stdout == a);
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    assert_eq!(shadow_ids(d, "disk.img").len(), 1);
    assert!(server.child.try_wait().unwrap().is_none(), "server died");
}

#[test]
fn sizes_and_durations_are_bounded_and_never_panic() {
    let dir = volume("4M");
    let d = dir.path();
    for args in [
        vec![
            "image",
            "create",
            "x.img",
            "--size",
            "99999999999999999999999K",
        ],
        vec![
            "resize",
            "shadowstorage",
            "--for",
            "disk.img",
            "--maxsize",
            "99999999999999999999999K",
        ],
        vec!["image", "create", "x.img", "--size", "99999999999T"],
    ] {
        let err = refused(d, &args, 2);
        assert!(err.contains("too large"), "{args:?}: {err}");
    }
    let err = refused(d, &["image", "create", "x.img", "--size", "0K"], 2);
    assert!(err.contains("more than zero"), "{err}");
    assert!(!d.join("x.img").exists());
    // 0K is 0 wherever a size is read.
    write_file(d, "a.bin", &pattern(8192, 41));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0K", "--input", "a.bin",
        ],
    );
    let r0 = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0", "--length", "8K",
        ],
    );
    let r0k = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0K", "--length", "8K",
        ],
    );
    assert!(r0.status.success() && r0k.status.success());
    assert!(r0.stdout == pattern(8192, 41) && r0k.stdout == r0.stdout);
    // Below one chunk: `add` refuses as `resize` does.
    vs(d, &["image", "create", "two.img", "--size", "4M"]);
    for maxsize in ["1K", "0K", "0"] {
        let add = refused(
            d,
            &[
                "add",
                "shadowstorage",
                "--for",
                "two.img",
                "--on",
                "two.diff",
                "--maxsize",
                maxsize,
            ],
            1,
        );
        let resize = refused(
            d,
            &[
                "resize",
                "shadowstorage",
                "--for",
                "disk.img",
                "--maxsize",
                maxsize,
            ],
            1,
        );
        for err in [&add, &resize] {
            assert!(
                err.contains("must lie between one chunk"),
                "{maxsize}: {err}"
            );
        }
    }
    assert!(!d.join("two.diff").exists() && !d.join("two.img.vshadow").exists());
    // Durations in a backup configuration.
    for (value, needle) in [
        ("99999999999999999999999s", "too long"),
        ("1e400s", "unknown duration unit"),
        ("25h", "too long"),
        ("soon", "not a duration"),
    ] {
        std::fs::write(
            d.join("b.toml"),
            format!("[backup]\nfreeze_timeout = \"{value}\"\n[[volume]]\npath = \"disk.img\"\n"),
        )
        .unwrap();
        for verb in [
            vec!["backup", "--config", "b.toml"],
            vec!["list", "writers", "--config", "b.toml"],
        ] {
            let err = refused(d, &verb, 1);
            assert!(
                err.contains("freeze_timeout") && err.contains(needle),
                "{verb:?} {value}: {err}"
            );
        }
    }
    assert!(shadow_ids(d, "disk.img").is_empty());
}

#[test]
fn delete_oldest_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vs(d, &["image", "create", "disk.img", "--size", "4M"]);
    add_storage(
        d,
        "disk.img",
        "disk.diff",
        "1M",
        &["--on-full", "delete-oldest"],
    );
    write_file(d, "a.bin", &pattern(1 << 20, 51));
    write_file(d, "b.bin", &pattern(1 << 20, 52));
    let w = |off: &str, input: &str| {
        vs_raw(
            d,
            &[
                "write", "--for", "disk.img", "--offset", off, "--input", input, "--json",
            ],
        )
    };
    assert!(w("0", "a.bin").status.success());
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let s1 = shadow_ids(d, "disk.img")[0].clone();
    // Preserves 1 MiB for s1: the storage is now full.
    let out = w("0", "b.bin");
    assert!(out.status.success());
    assert!(out.stderr.is_empty() || !String::from_utf8_lossy(&out.stderr).contains("deleted"));
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let s2 = shadow_ids(d, "disk.img")[1].clone();
    // Needs another 1 MiB for s2: s1 goes, and is told.
    let out = w("1M", "a.bin");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("deleted shadow copy").count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "shadow storage full: deleted shadow copy {s1} (created "
        )),
        "{err}"
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["auto_deleted"], serde_json::json!([s1]));
    assert_eq!(reply["bytes"], 1 << 20);
    assert_eq!(shadow_ids(d, "disk.img"), vec![s2.clone()]);
    let st = vs(d, &["list", "shadowstorage", "--for", "disk.img"]);
    assert!(
        st.contains("counted only while `volshadow serve` runs"),
        "{st}"
    );

    // Under serve: the client is told, the server logs it, and `list
    // shadowstorage` counts it.
    let log = d.join("serve.log");
    let server = Server::start_control_logged(d, "disk.img", &log);
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let s3 = shadow_ids(d, "disk.img")[1].clone();
    let out = w("2M", "b.bin");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("deleted shadow copy {s2}")), "{err}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["auto_deleted"], serde_json::json!([s2]));
    assert_eq!(shadow_ids(d, "disk.img"), vec![s3]);
    let st = json(d, &["list", "shadowstorage", "--for", "disk.img", "--json"]);
    assert_eq!(st[0]["auto_deleted"], 1, "{st}");
    assert_eq!(st[0]["served"], true, "{st}");
    let st = vs(d, &["list", "shadowstorage", "--for", "disk.img"]);
    assert!(
        st.contains("Deleted to make room: 1 (since `volshadow serve` started)"),
        "{st}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!("deleted shadow copy {s2}")),
        "{logged}"
    );
    drop(server);
}

#[test]
fn errors_print_each_cause_once_and_revert_says_revert() {
    // The OS's words for a missing file; Windows has others.
    #[cfg(unix)]
    for args in [
        vec!["image", "create", "nodir/x.img", "--size", "1M"],
        vec!["list", "shadows", "--for", "nope.img"],
        vec![
            "write",
            "--for",
            "x.img",
            "--offset",
            "0",
            "--input",
            "missing.bin",
        ],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let err = refused(dir.path(), &args, 1);
        assert_eq!(
            err.matches("No such file or directory").count(),
            1,
            "{args:?}: {err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vs(d, &["image", "create", "disk.img", "--size", "4M"]);
    add_storage(
        d,
        "disk.img",
        "disk.diff",
        "1M",
        &["--on-full", "fail-writes"],
    );
    let a = pattern(4 << 20, 61);
    let b = pattern(2 << 20, 62);
    write_file(d, "a.bin", &a);
    write_file(d, "b.bin", &b);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a.bin",
        ],
    );
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let s1 = shadow_ids(d, "disk.img")[0].clone();
    // 2 MiB over 1 MiB of room: the first MiB goes in, the second is
    // refused, and the message says both, each once.
    let err = refused(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "b.bin",
        ],
        1,
    );
    assert_eq!(err.matches("full").count(), 1, "{err}");
    assert_eq!(err.matches("refused").count(), 1, "{err}");
    assert!(
        err.contains("the 1048576 bytes before it, from offset 0, were written"),
        "{err}"
    );
    let live = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0", "--length", "4M",
        ],
    )
    .stdout;
    assert!(live[..1 << 20] == b[..1 << 20] && live[1 << 20..] == a[1 << 20..]);
    // A revert that needs room it does not have: refused as a revert.
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let before = files(d, &["disk.img"]);
    let err = refused(d, &["revert", "--for", "disk.img", "--shadow", &s1], 1);
    assert!(err.contains("cannot revert"), "{err}");
    assert!(!err.contains("write was refused"), "{err}");
    assert_eq!(err.matches("nothing was changed").count(), 1, "{err}");
    assert!(files(d, &["disk.img"]) == before);
}

#[test]
fn options_have_help_text() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["read", "--help"], "How many bytes to read"),
        (vec!["add", "shadowstorage", "--help"], "at least one chunk"),
        (
            vec!["list", "shadowstorage", "--help"],
            "since `serve` started",
        ),
    ] {
        let out = vs(dir.path(), &args);
        assert!(out.contains(needle), "{args:?}: {out}");
    }
}

#[test]
fn a_damaged_copy_fails_read_and_export_and_leaves_no_output() {
    let dir = volume("4M");
    let d = dir.path();
    let a = pattern(1 << 20, 71);
    write_file(d, "a.bin", &a);
    write_file(d, "b.bin", &pattern(1 << 20, 72));
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a.bin",
        ],
    );
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let id = shadow_ids(d, "disk.img")[0].clone();
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "b.bin",
        ],
    );
    // One bit of the preserved copy of chunk 3 (16 KiB chunks).
    let mut diff = std::fs::read(d.join("disk.diff")).unwrap();
    let needle = &a[3 * 16384..3 * 16384 + 4096];
    let at = diff
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    diff[at + 100] ^= 1;
    std::fs::write(d.join("disk.diff"), &diff).unwrap();
    for args in [
        vec![
            "read", "--for", "disk.img", "--shadow", &id, "--offset", "0", "--length", "4M",
            "--output", "out.raw",
        ],
        vec![
            "export", "--for", "disk.img", "--shadow", &id, "--output", "out.raw",
        ],
    ] {
        let err = refused(d, &args, 1);
        assert!(err.contains("damaged") && err.contains("removed"), "{err}");
        assert_eq!(err.matches(&id).count(), 1, "{err}");
        assert!(
            !d.join("out.raw").exists(),
            "{args:?} left a cut-short file"
        );
    }
    let out = vs_raw(d, &["verify", "--for", "disk.img"]);
    assert_eq!(out.status.code(), Some(1));
}

/// A client of the control socket that takes part in a set badly: holds
/// with a huge timeout, then sends steps out of order or for a snapshot
/// that is not the set's. The first refused step ends the conversation and
/// lets writes go; no other shadow copy is touched; an unfinished
/// non-persistent copy is removed when the client goes.
#[test]
fn a_hostile_set_member_conversation_is_refused_and_releases_writes() {
    use std::io::{BufRead, BufReader, Write};
    let dir = volume("8M");
    let d = dir.path();
    let keep = json(d, &["create", "shadow", "--for", "disk.img", "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let _server = Server::start_control(d, "disk.img");
    let set = "6d2b0a6e-0000-4000-8000-000000000001";
    let talk = |steps: &[String]| -> Vec<String> {
        let s = control(d, "disk.img").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = &s;
        let mut answers = Vec::new();
        for step in steps {
            // After a refusal the server has hung up: a step sent then
            // fails to send, which ends the talk like an empty answer.
            let sent = w.write_all(format!("{{\"ok\":{step},\"payload_len\":0}}\n").as_bytes());
            if sent.is_err() {
                break;
            }
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            answers.push(line);
        }
        answers
    };
    // Seq 1 is `keep`, not this set's: refused, and the conversation ends.
    let a = talk(&[
        r#"{"op":"set-join"}"#.into(),
        format!(r#"{{"op":"set-hold","set_id":"{set}","timeout_ms":18446744073709551615}}"#),
        r#"{"op":"set-abandon","seq":1}"#.into(),
        r#"{"op":"set-release"}"#.into(),
    ]);
    assert_eq!(a.len(), 3, "{a:?}");
    assert!(a[1].contains("\"ok\""), "held: {a:?}");
    assert!(
        a[2].contains("error") && a[2].contains("made no snapshot"),
        "{a:?}"
    );
    // Writes go on at once (the hold ended with the conversation).
    write_file(d, "x.bin", &[7u8; 4096]);
    let t0 = std::time::Instant::now();
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "x.bin",
        ],
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "writes were held"
    );
    assert_eq!(shadow_ids(d, "disk.img"), vec![keep.clone()]);
    // A non-persistent copy of a set whose client goes away unfinished is
    // removed; prepare twice is refused.
    let a = talk(&[
        r#"{"op":"set-join"}"#.into(),
        format!(r#"{{"op":"set-hold","set_id":"{set}","timeout_ms":5000}}"#),
        r#"{"op":"set-prepare","persistent":false,"attributes":0,"pending":null}"#.into(),
        r#"{"op":"set-prepare","persistent":false,"attributes":0,"pending":null}"#.into(),
    ]);
    assert!(a[2].contains("set-prepared"), "{a:?}");
    assert!(a[3].contains("prepares once"), "{a:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while shadow_ids(d, "disk.img") != vec![keep.clone()] {
        assert!(
            std::time::Instant::now() < deadline,
            "the unfinished copy stayed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A device named as the output is written, never removed (a read cut
/// short removes only a regular file it made).
// Unix only: the device written is /dev/null, told apart by its file type.
#[cfg(unix)]
#[test]
fn a_device_as_output_is_written_and_never_removed() {
    use std::os::unix::fs::FileTypeExt;
    let dir = volume("4M");
    let d = dir.path();
    vs(
        d,
        &[
            "read",
            "--for",
            "disk.img",
            "--offset",
            "0",
            "--length",
            "1M",
            "--output",
            "/dev/null",
        ],
    );
    let out = vs_raw(
        d,
        &[
            "read",
            "--for",
            "disk.img",
            "--offset",
            "3M",
            "--length",
            "2M",
            "--output",
            "/dev/null",
        ],
    );
    assert!(!out.status.success(), "past the end");
    let m = std::fs::symlink_metadata("/dev/null").unwrap();
    assert!(m.file_type().is_char_device(), "/dev/null is still there");
}

/// A write whose input file runs past the end of the volume is refused
/// whole: the volume and its shadow storage stay as they were.
#[test]
fn a_write_past_the_end_from_a_file_writes_nothing() {
    let dir = volume("8M");
    let d = dir.path();
    let a = pattern(8 << 20, 3);
    write_file(d, "a.bin", &a);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a.bin",
        ],
    );
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    write_file(d, "big.bin", &pattern(4 << 20, 4));
    let usage =
        || json(d, &["list", "shadowstorage", "--for", "disk.img", "--json"])[0]["usage"].clone();
    let before = usage();
    let err = refused(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "6M", "--input", "big.bin",
        ],
        1,
    );
    assert!(
        err.contains("outside") && err.contains("nothing was written"),
        "{err}"
    );
    assert!(
        std::fs::read(d.join("disk.img")).unwrap() == a,
        "the volume changed"
    );
    assert_eq!(usage(), before, "chunks were copied");
}

/// An empty input at an offset past the end is refused, as the same read
/// is: nothing is "written" outside the volume.
#[test]
fn an_empty_write_past_the_end_is_refused() {
    let dir = volume("1M");
    let d = dir.path();
    let err = refused(d, &["write", "--for", "disk.img", "--offset", "5G"], 1);
    assert!(err.contains("outside"), "{err}");
}

/// A binding that exists but cannot be read is reported as such, not as
/// "no shadow storage" (whose advice, adding one, is then refused).
#[test]
fn an_unreadable_binding_says_so() {
    let dir = volume("1M");
    let d = dir.path();
    let mut text = std::fs::read(d.join("disk.img.vshadow")).unwrap();
    text.push(0xff);
    std::fs::write(d.join("disk.img.vshadow"), &text).unwrap();
    let err = refused(d, &["list", "shadows", "--for", "disk.img"], 1);
    assert!(
        err.contains("cannot be read") && !err.contains("has no shadow storage"),
        "{err}"
    );
}

/// The newer superblock copy damaged: the older copy is one generation
/// short of what the binding recorded, which is not "an older copy put
/// back"; the state is found in the journal and every copy reads exact.
#[test]
fn a_damaged_newest_superblock_copy_still_opens() {
    let dir = volume("4M");
    let d = dir.path();
    let a = pattern(4 << 20, 5);
    write_file(d, "a.bin", &a);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "a.bin",
        ],
    );
    let id = create_shadow(d, "disk.img");
    put(d, "disk.img", &mut a.clone(), 8192, &pattern(1 << 20, 6));
    let diff = d.join("disk.diff");
    let mut bytes = std::fs::read(&diff).unwrap();
    let generation = |copy: usize| {
        let at = copy * 4096 + 32;
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    };
    let newest = if generation(1) > generation(0) { 1 } else { 0 };
    bytes[newest * 4096 + 45] ^= 1;
    std::fs::write(&diff, &bytes).unwrap();
    let out = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--shadow", &id, "--offset", "0", "--length", "4M",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == a, "the shadow copy's bytes differ");
}
