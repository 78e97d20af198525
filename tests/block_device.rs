//! The command line on a Linux block device, as a new user would drive it
//! (a loop device, as root): the volume's own files live in the state
//! directory, since `/dev` is made anew at every boot.
// Linux only: a loop device made with losetup, as root. (Windows device
// paths, `\\.\D:`, take the same code path and are named by unit tests.)
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SIZE: usize = 32 << 20;

/// `volshadow ARGS` in `dir` with `state` as the state directory.
fn vs_in(dir: &Path, state: &Path, args: &[&str]) -> Output {
    vs_env(dir, &[("VOLSHADOW_STATE_DIR", state)], args)
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_block_device_keeps_its_files_in_the_state_directory() {
    if !is_root() || !have("losetup") {
        eprintln!("SKIP: needs root and losetup for a loop device");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let state = d.join("state");
    let mut model = random_bytes(SIZE, 11);
    std::fs::write(d.join("backing.img"), &model).unwrap();
    let lo = Loop::attach(&d.join("backing.img"), false);
    let dev = lo.dev();
    let name = Path::new(dev).file_name().unwrap().to_str().unwrap();
    let run = |args: &[&str], what: &str| ok(vs_in(d, &state, args), what);

    run(
        &[
            "add",
            "shadowstorage",
            "--for",
            dev,
            "--on",
            "disk.diff",
            "--maxsize",
            "32M",
        ],
        "add shadowstorage",
    );
    assert!(
        !Path::new(&format!("{dev}.vshadow")).exists(),
        "a binding was made in /dev"
    );
    let made = files_in(&state);
    assert_eq!(made.len(), 1, "state directory: {made:?}");
    assert!(
        made[0].starts_with(&format!("{name}-")) && made[0].ends_with(".vshadow"),
        "binding name {made:?}"
    );

    let created = run(
        &["create", "shadow", "--for", dev, "--json"],
        "create shadow",
    );
    let v: serde_json::Value = serde_json::from_str(&created).unwrap();
    let id = v["shadow"]["id"].as_str().unwrap().to_string();
    let old = model.clone();
    let new = random_bytes(5 << 20, 12);
    std::fs::write(d.join("new.bin"), &new).unwrap();
    run(
        &[
            "write", "--for", dev, "--offset", "4097", "--input", "new.bin",
        ],
        "write",
    );
    model[4097..4097 + new.len()].copy_from_slice(&new);
    let read = |shadow: Option<&str>, out: &str| -> Vec<u8> {
        let mut args = vec!["read", "--for", dev];
        if let Some(s) = shadow {
            args.extend(["--shadow", s]);
        }
        args.extend(["--offset", "0", "--length", "32M", "--output", out]);
        run(&args, "read");
        std::fs::read(d.join(out)).unwrap()
    };
    assert!(read(Some(&id), "old.raw") == old, "shadow copy differs");
    assert!(read(None, "live.raw") == model, "live volume differs");

    // Served: the control socket is in the state directory too, and
    // the other verbs go through it.
    let mut serve = spawn(
        Command::new(bin())
            .args(["serve", "--for", dev, "--socket"])
            .arg(d.join("nbd.sock"))
            .current_dir(d)
            .env("VOLSHADOW_STATE_DIR", &state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let sock: PathBuf = state.join(format!(
        "{}.sock",
        files_in(&state)
            .iter()
            .find(|f| f.ends_with(".vshadow"))
            .unwrap()
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(serve.try_wait().unwrap().is_none(), "serve exited");
        assert!(Instant::now() < deadline, "no control socket at {sock:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    run(&["create", "shadow", "--for", dev], "create shadow, served");
    let listed = run(&["list", "shadows", "--for", dev, "--json"], "list shadows");
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v["shadows"].as_array().unwrap().len(), 2, "{listed}");
    serve.kill().unwrap();
    serve.wait().unwrap();
    assert!(read(Some(&id), "old2.raw") == old, "first copy after serve");

    // Another state directory knows nothing of this device.
    let elsewhere = vs_in(d, &d.join("other"), &["list", "shadows", "--for", dev]);
    assert!(!elsewhere.status.success());
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("has no shadow storage"),
        "{}",
        String::from_utf8_lossy(&elsewhere.stderr)
    );
}
