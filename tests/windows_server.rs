//! The Windows build's server, run under Wine, as a user on Windows would
//! meet it: NBD over TCP with the Linux clients (nbdcopy, qemu-io), and
//! the other verbs reaching the running server through its control pipe.
//!
//! Runs only when `VOLSHADOW_WINDOWS_EXE` names the Windows `volshadow.exe`
//! (CI's Wine step sets it; `VOLSHADOW_WINE` overrides the Wine loader);
//! otherwise it prints why it skips.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{random_bytes, run, tools};

/// The Windows binary and the Wine that runs it, or why not.
fn windows_exe() -> Option<(PathBuf, PathBuf)> {
    let Some(exe) = std::env::var_os("VOLSHADOW_WINDOWS_EXE") else {
        eprintln!("SKIP: VOLSHADOW_WINDOWS_EXE does not name a Windows volshadow.exe");
        return None;
    };
    let wine = std::env::var_os("VOLSHADOW_WINE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/wine/wine64"));
    if !wine.exists() {
        eprintln!("SKIP: Wine is not installed at {}", wine.display());
        return None;
    }
    Some((PathBuf::from(exe), wine))
}

struct Win {
    exe: PathBuf,
    wine: PathBuf,
    dir: PathBuf,
}

impl Win {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.wine);
        c.arg(&self.exe)
            .args(args)
            .current_dir(&self.dir)
            .env("WINEDEBUG", "-all")
            .stdin(Stdio::null());
        c
    }

    fn raw(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.raw(args);
        assert!(
            out.status.success(),
            "volshadow.exe {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn refused(&self, args: &[&str]) -> String {
        let out = self.raw(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        err
    }

    /// `read` through whatever holds the volume, into a file, returned.
    fn read(&self, shadow: Option<&str>, len: usize) -> Vec<u8> {
        let out = self.dir.join("read.bin");
        let _ = std::fs::remove_file(&out);
        let mut args = vec!["read", "--for", "d.img", "--offset", "0"];
        let len = len.to_string();
        args.extend(["--length", &len, "--output", "read.bin"]);
        if let Some(s) = shadow {
            args.extend(["--shadow", s]);
        }
        self.ok(&args);
        std::fs::read(out).unwrap()
    }
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `serve` under Wine, killed on drop unless it stopped.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn start(w: &Win, port: u16) -> Serve {
        let log = w.dir.join("serve.log");
        let child = w
            .command(&[
                "serve",
                "--for",
                "d.img",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Serve { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("serve exited ({status}): {}", s.printed());
            }
            assert!(
                Instant::now() < deadline,
                "serve did not listen: {}",
                s.printed()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn printed(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl+C: Wine turns SIGINT into the console's CTRL_C_EVENT.
    fn interrupt(mut self) -> (std::process::ExitStatus, String) {
        run("kill", &["-INT", &self.child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.printed());
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop: {}",
                self.printed()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nbd(port: u16, export: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{export}")
}

fn ids(w: &Win) -> Vec<(String, bool)> {
    w.json(&["list", "shadows", "--for", "d.img", "--json"])["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["persistent"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// Serve, write through NBD, take shadow copies through the control pipe,
/// read them back exact (pipe and NBD), diff, export, verify, delete,
/// then Ctrl+C: the server closes the volume and its non-persistent copy
/// is released.
#[test]
fn a_served_volume_answers_every_verb_through_its_pipe() {
    let Some((exe, wine)) = windows_exe() else {
        return;
    };
    if !tools(&["nbdcopy", "qemu-io"]) {
        return;
    }
    const SIZE: usize = 8 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let w = Win {
        exe,
        wine,
        dir: tmp.path().to_path_buf(),
    };
    w.ok(&["image", "create", "d.img", "--size", "8M"]);
    w.ok(&[
        "add",
        "shadowstorage",
        "--for",
        "d.img",
        "--on",
        "d.diff",
        "--maxsize",
        "8M",
    ]);
    // Without a server, a non-persistent copy has nothing to live in.
    let err = w.refused(&["create", "shadow", "--for", "d.img", "--non-persistent"]);
    assert!(err.contains("serve"), "{err}");

    let port = free_port();
    let server = Serve::start(&w, port);
    // A second server for the volume is refused while the first runs.
    let err = w.refused(&[
        "serve",
        "--for",
        "d.img",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert!(err.contains("in use"), "{err}");

    // Writes through NBD.
    let first = random_bytes(SIZE, 21);
    let src = tmp.path().join("first.bin");
    std::fs::write(&src, &first).unwrap();
    run("nbdcopy", &[src.to_str().unwrap(), &nbd(port, "live")]);

    // A persistent and a non-persistent copy, through the pipe.
    let a = w.json(&["create", "shadow", "--for", "d.img", "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = w.json(&[
        "create",
        "shadow",
        "--for",
        "d.img",
        "--non-persistent",
        "--json",
    ])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(ids(&w), vec![(a.clone(), true), (b.clone(), false)]);

    // The live volume moves on: 1 MiB at 3 MiB.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 3M 1M", &nbd(port, "live")],
    );
    let mut live = first.clone();
    live[3 << 20..4 << 20].fill(0x5a);

    // Old bytes through the pipe and through NBD; the live volume too.
    same("shadow a through the pipe", &w.read(Some(&a), SIZE), &first);
    same("shadow b through the pipe", &w.read(Some(&b), SIZE), &first);
    same("live through the pipe", &w.read(None, SIZE), &live);
    let out = tmp.path().join("a.nbd");
    run("nbdcopy", &[&nbd(port, &a), out.to_str().unwrap()]);
    same("shadow a over NBD", &std::fs::read(&out).unwrap(), &first);

    // What changed since a: the rewritten megabyte (whole chunks).
    let d = w.json(&["diff", "--for", "d.img", "--from", &a, "--json"]);
    let extents = d["extents"].as_array().unwrap();
    assert_eq!(extents.len(), 1, "{d}");
    assert_eq!(extents[0]["offset"], 3 << 20, "{d}");
    assert_eq!(extents[0]["len"], 1 << 20, "{d}");

    w.ok(&[
        "export", "--for", "d.img", "--shadow", &a, "--output", "a.raw",
    ]);
    same(
        "export of a",
        &std::fs::read(tmp.path().join("a.raw")).unwrap(),
        &first,
    );
    let v = w.json(&["verify", "--for", "d.img", "--json"]);
    assert!(
        v["report"]["mismatches"].as_array().unwrap().is_empty(),
        "{v}"
    );
    assert!(
        v["report"]["problems"].as_array().unwrap().is_empty(),
        "{v}"
    );

    w.ok(&["delete", "shadows", "--for", "d.img", "--shadow", &a]);
    assert_eq!(ids(&w), vec![(b.clone(), false)]);

    let (status, log) = server.interrupt();
    assert!(status.success(), "serve after Ctrl+C: {status}: {log}");
    assert!(log.contains("stopping"), "{log}");
    // The volume opens here now: the non-persistent copy went with the
    // server, the live data stayed.
    assert!(ids(&w).is_empty());
    same("live after the stop", &w.read(None, SIZE), &live);

    // A server killed outright leaves no pipe behind: the next one serves,
    // and the verbs reach it (a non-persistent copy needs the server).
    drop(Serve::start(&w, free_port()));
    let again = Serve::start(&w, free_port());
    w.ok(&["create", "shadow", "--for", "d.img", "--non-persistent"]);
    assert_eq!(ids(&w).len(), 1);
    let (status, log) = again.interrupt();
    assert!(status.success(), "{status}: {log}");
    assert!(ids(&w).is_empty());
}

/// `revert` and a two-volume set through two servers' pipes.
#[test]
fn revert_and_a_set_of_two_served_volumes() {
    let Some((exe, wine)) = windows_exe() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let w = Win {
        exe,
        wine,
        dir: tmp.path().to_path_buf(),
    };
    let mut servers = Vec::new();
    for img in ["d.img", "e.img"] {
        w.ok(&["image", "create", img, "--size", "4M"]);
        let diff = format!("{img}.diff");
        w.ok(&[
            "add",
            "shadowstorage",
            "--for",
            img,
            "--on",
            &diff,
            "--maxsize",
            "4M",
        ]);
    }
    let before = random_bytes(1 << 20, 5);
    let piece = tmp.path().join("piece.bin");
    std::fs::write(&piece, &before).unwrap();
    for img in ["d.img", "e.img"] {
        w.ok(&[
            "write",
            "--for",
            img,
            "--offset",
            "0",
            "--input",
            "piece.bin",
        ]);
    }
    for img in ["d.img", "e.img"] {
        let log = tmp.path().join(format!("{img}.log"));
        let port = free_port();
        let child = w
            .command(&[
                "serve",
                "--for",
                img,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Serve { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(s.child.try_wait().unwrap().is_none(), "{}", s.printed());
            assert!(Instant::now() < deadline, "{}", s.printed());
            std::thread::sleep(Duration::from_millis(50));
        }
        servers.push(s);
    }
    let set = w.json(&[
        "create", "shadow", "--for", "d.img", "--for", "e.img", "--json",
    ]);
    let shadows = set["shadows"].as_array().unwrap();
    assert_eq!(shadows.len(), 2, "{set}");
    assert!(
        shadows.iter().all(|s| s["set_id"] == set["set_id"]),
        "{set}"
    );
    // Overwrite d through its server, then revert it to the set's copy.
    std::fs::write(&piece, random_bytes(1 << 20, 6)).unwrap();
    w.ok(&[
        "write",
        "--for",
        "d.img",
        "--offset",
        "0",
        "--input",
        "piece.bin",
    ]);
    let d_shadow = shadows[0]["id"].as_str().unwrap();
    w.ok(&["revert", "--for", "d.img", "--shadow", d_shadow]);
    let out = tmp.path().join("read.bin");
    w.ok(&[
        "read", "--for", "d.img", "--offset", "0", "--length", "1M", "--output", "read.bin",
    ]);
    same("d after revert", &std::fs::read(&out).unwrap(), &before);
    for s in servers {
        let (status, log) = s.interrupt();
        assert!(status.success(), "{status}: {log}");
    }
    // Both copies of the set are there after the servers stopped.
    for img in ["d.img", "e.img"] {
        let list = w.json(&["list", "shadows", "--for", img, "--json"]);
        assert_eq!(
            list["shadows"].as_array().unwrap().len(),
            1,
            "{img}: {list}"
        );
    }
}
