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

/// Whether loop devices can be made here; says why not.
fn loop_devices() -> bool {
    let ok = is_root() && have("losetup");
    if !ok {
        eprintln!("SKIP: needs root and losetup for a loop device");
    }
    ok
}

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
    if !loop_devices() {
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

/// Another name of a bound device (a symbolic link) is the same volume:
/// its shadow storage is found, a second one is refused, and no other
/// volume's verb may write over the device's diff area.
#[test]
fn another_name_of_a_device_is_the_same_volume() {
    if !loop_devices() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let state = d.join("state");
    let model = random_bytes(16 << 20, 21);
    std::fs::write(d.join("backing.img"), &model).unwrap();
    let lo = Loop::attach(&d.join("backing.img"), false);
    let dev = lo.dev();
    std::os::unix::fs::symlink(dev, d.join("alias")).unwrap();
    let run = |args: &[&str]| vs_in(d, &state, args);
    let add = |on: &str, name: &str| {
        run(&[
            "add",
            "shadowstorage",
            "--for",
            name,
            "--on",
            on,
            "--maxsize",
            "16M",
        ])
    };
    ok(add("a.diff", dev), "add shadowstorage");
    let id = {
        let out = ok(
            run(&["create", "shadow", "--for", dev, "--json"]),
            "create shadow",
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["shadow"]["id"].as_str().unwrap().to_string()
    };

    // A second diff area through the link is refused, and makes no file.
    let second = add("b.diff", "alias");
    assert!(
        !second.status.success(),
        "a second shadow storage was added"
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already has shadow storage"), "{err}");
    assert!(!d.join("b.diff").exists());
    // Writes through the link go through the same copy-on-write layer.
    std::fs::write(d.join("new.bin"), random_bytes(4 << 20, 22)).unwrap();
    ok(
        run(&[
            "write", "--for", "alias", "--offset", "0", "--input", "new.bin",
        ]),
        "write through the link",
    );
    let listed = ok(
        run(&["list", "shadows", "--for", "alias", "--json"]),
        "list shadows",
    );
    assert!(listed.contains(&id), "{listed}");
    ok(
        run(&[
            "read", "--for", dev, "--shadow", &id, "--offset", "0", "--length", "16M", "--output",
            "old.raw",
        ]),
        "read the shadow copy",
    );
    assert!(
        std::fs::read(d.join("old.raw")).unwrap() == model,
        "the shadow copy changed"
    );

    // Another volume's export onto the device's diff area is refused.
    ok(
        run(&["image", "create", "img.raw", "--size", "8M"]),
        "image",
    );
    ok(add("img.diff", "img.raw"), "add for the image");
    ok(
        run(&["create", "shadow", "--for", "img.raw"]),
        "shadow of img",
    );
    let before = std::fs::read(d.join("a.diff")).unwrap();
    let ids = ok(
        run(&["list", "shadows", "--for", "img.raw", "--json"]),
        "list",
    );
    let v: serde_json::Value = serde_json::from_str(&ids).unwrap();
    let img_id = v["shadows"][0]["id"].as_str().unwrap().to_string();
    let export = run(&[
        "export", "--for", "img.raw", "--shadow", &img_id, "--output", "a.diff",
    ]);
    assert!(!export.status.success(), "the export overwrote a.diff");
    let err = String::from_utf8_lossy(&export.stderr);
    assert!(err.contains("shadow storage (diff area)"), "{err}");
    assert!(std::fs::read(d.join("a.diff")).unwrap() == before);

    // `list shadowstorage` shows the device too, from anywhere, and in the
    // state directory takes no binding there for an image.
    for cwd in [d.to_path_buf(), state.clone()] {
        let out = ok(
            vs_in(&cwd, &state, &["list", "shadowstorage", "--json"]),
            "list shadowstorage",
        );
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let volumes: Vec<&str> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["volume"].as_str().unwrap())
            .collect();
        assert!(volumes.contains(&dev), "{cwd:?}: {volumes:?}");
    }
}

/// A state directory that cannot take the binding: refused before the
/// diff area is made, so the next try with a good one works.
#[test]
fn an_unusable_state_directory_changes_nothing() {
    if !loop_devices() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("backing.img"), random_bytes(8 << 20, 31)).unwrap();
    let lo = Loop::attach(&d.join("backing.img"), false);
    let dev = lo.dev();
    std::fs::write(d.join("not-a-dir"), b"").unwrap();
    let args = [
        "add",
        "shadowstorage",
        "--for",
        dev,
        "--on",
        "dev.diff",
        "--maxsize",
        "8M",
    ];
    let out = vs_in(d, &d.join("not-a-dir"), &args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a directory"), "{err}");
    assert!(
        !d.join("dev.diff").exists(),
        "the diff area was left behind"
    );
    ok(
        vs_in(d, &d.join("state"), &args),
        "add with a good state dir",
    );
}

/// A block device as `write --input` has a known length: past the end
/// of the volume it is refused before anything is written.
#[test]
fn a_block_device_input_past_the_end_writes_nothing() {
    if !loop_devices() {
        return;
    }
    let dir = volume("8M");
    let d = dir.path();
    std::fs::write(d.join("input.img"), random_bytes(6 << 20, 41)).unwrap();
    let lo = Loop::attach(&d.join("input.img"), true);
    let before = std::fs::read(d.join("disk.img")).unwrap();
    let err = refused(
        d,
        &[
            "write",
            "--for",
            "disk.img",
            "--offset",
            "4M",
            "--input",
            lo.dev(),
        ],
        1,
    );
    assert!(
        err.contains("6291456 bytes") && err.contains("nothing was written"),
        "{err}"
    );
    assert!(std::fs::read(d.join("disk.img")).unwrap() == before);
}
