//! The VSS verbs as a new user meets them: a writer's veto keeps the
//! shadow copies, writer limits of their own, `list writers` showing the
//! last backup, one set id everywhere, selection, restores refused up
//! front, `delete shadows --set`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

/// A configuration backing up disk.img with the given writer tables.
fn config(d: &Path, name: &str, backup: &str, writers: &str) {
    std::fs::write(
        d.join(name),
        format!(
            "[backup]\ndocument = \"backup.json\"\n{backup}\n[[volume]]\npath = \"disk.img\"\n{writers}"
        ),
    )
    .unwrap();
}

#[cfg(unix)]
fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn doc(d: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(d.join("backup.json")).unwrap()).unwrap()
}

// Unix only: its writers are `sh` scripts (exit codes, stderr); the platform-shell test below runs under Wine.
#[cfg(unix)]
#[test]
fn a_post_snapshot_veto_keeps_the_copies_and_list_writers_shows_it() {
    let dir = volume("4M");
    let d = dir.path();
    config(
        d,
        "b.toml",
        "context = \"app-rollback\"",
        r#"
[[writer]]
name = "app"
kind = "command"
post-snapshot = ["sh", "-c", "echo 'log shipping is down' >&2; exit 3"]
[[writer.component]]
name = "db"
"#,
    );
    let out = vs_raw(d, &["backup", "--config", "b.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("writer app failed at post-snapshot") && err.contains("kept"),
        "{err}"
    );
    // The set stands; the document says the component is not backed up.
    assert_eq!(shadow_ids(d, "disk.img").len(), 1);
    let doc = doc(d);
    assert_eq!(doc["components"][0]["backup_succeeded"], false);
    assert!(
        doc["components"][0]["writer_failure"]
            .as_str()
            .unwrap()
            .contains("log shipping is down")
    );
    // A later `list writers` shows how that backup left the writer.
    let text = vs(d, &["list", "writers", "--config", "b.toml"]);
    assert!(text.contains("State: [8] Failed"), "{text}");
    assert!(
        text.contains("Last error: Non-retryable error at post-snapshot"),
        "{text}"
    );
    let rows = json(d, &["list", "writers", "--config", "b.toml", "--json"]);
    assert_eq!(rows[0]["state"]["failed-at"], "post-snapshot");
}

// Unix only: its writers are `sh` scripts that sleep.
#[cfg(unix)]
#[test]
fn a_writers_own_timeout_is_its_limit_and_names_it() {
    // "first" freezes first and gives itself 300 ms from freeze to thaw;
    // "second" takes a second to freeze, within its own 20 s.
    let dir = volume("4M");
    let d = dir.path();
    config(
        d,
        "b.toml",
        "context = \"app-rollback\"\nfreeze_timeout = \"60s\"",
        r#"
[[writer]]
name = "first"
kind = "command"
timeout = "300ms"
freeze = ["sh", "-c", "true"]
[[writer.component]]
name = "a"
[[writer]]
name = "second"
kind = "command"
timeout = "20s"
freeze = ["sh", "-c", "sleep 1"]
[[writer.component]]
name = "b"
"#,
    );
    let out = vs_raw(d, &["backup", "--config", "b.toml"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("writer first failed at freeze") && err.contains("Timed out"),
        "{err}"
    );
    assert!(shadow_ids(d, "disk.img").is_empty());
    let text = vs(d, &["list", "writers", "--config", "b.toml"]);
    assert!(text.contains("Last error: Timed out at freeze"), "{text}");
}

#[test]
fn one_set_id_everywhere_and_delete_shadows_by_set() {
    let dir = volume("4M");
    let d = dir.path();
    config(d, "b.toml", "context = \"nas-rollback\"", "");
    vs(d, &["backup", "--config", "b.toml"]);
    let set = doc(d)["set_id"].as_str().unwrap().to_string();
    let listed = json(d, &["list", "shadows", "--for", "disk.img", "--json"]);
    assert_eq!(listed["shadows"][0]["set_id"], set.as_str());
    vs(d, &["create", "shadow", "--for", "disk.img"]);
    let out = vs(
        d,
        &["delete", "shadows", "--for", "disk.img", "--set", &set[..8]],
    );
    assert!(!out.is_empty());
    let left = json(d, &["list", "shadows", "--for", "disk.img", "--json"]);
    let left = left["shadows"].as_array().unwrap();
    assert_eq!(left.len(), 1, "only the set's copy goes");
    assert_ne!(left[0]["set_id"], set.as_str());
    let out = vs_raw(
        d,
        &["delete", "shadows", "--for", "disk.img", "--set", &set],
    );
    assert_eq!(out.status.code(), Some(1));
}

// Unix only: its writers are `sh` scripts.
#[cfg(unix)]
#[test]
fn selection_and_restores_refused_up_front() {
    let dir = volume("4M");
    let d = dir.path();
    config(
        d,
        "b.toml",
        "context = \"backup\"\nselect = [\"app/data/db\"]",
        r#"
[[writer]]
name = "app"
kind = "command"
freeze = ["sh", "-c", "echo \"freeze $VOLSHADOW_COMPONENTS\" >> events.log"]
pre-restore = ["sh", "-c", "echo pre-restore >> events.log"]
[[writer.component]]
logical_path = "data"
name = "db"
[[writer.component]]
name = "logs"
"#,
    );
    vs(d, &["backup", "--config", "b.toml"]);
    let doc = doc(d);
    let comps = doc["components"].as_array().unwrap();
    assert_eq!(comps.len(), 1);
    assert_eq!(comps[0]["full_path"], "data\\db");
    assert!(
        shadow_ids(d, "disk.img").is_empty(),
        "context backup auto-releases"
    );
    // Its snapshots were released: refused before any writer is told.
    let out = vs_raw(
        d,
        &["restore", "--config", "b.toml", "--document", "backup.json"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("released"), "{err}");
    assert_eq!(
        std::fs::read_to_string(d.join("events.log")).unwrap(),
        "freeze data\\db\n"
    );
    // A selection naming nothing known is refused before anything runs.
    config(
        d,
        "bad.toml",
        "context = \"backup\"\nselect = [\"app/nothing\"]",
        "[[writer]]\nname = \"app\"\nkind = \"command\"\n[[writer.component]]\nname = \"db\"\n",
    );
    let out = vs_raw(d, &["backup", "--config", "bad.toml"]);
    let err = stderr(&out);
    assert!(
        err.contains("app/nothing") && err.contains("app/db"),
        "{err}"
    );
}

// Unix only: its writers are `sh` scripts.
#[cfg(unix)]
#[test]
fn an_aborted_set_sends_abort_not_abort_and_thaw() {
    let dir = volume("4M");
    let d = dir.path();
    config(
        d,
        "b.toml",
        "context = \"app-rollback\"",
        r#"
[[writer]]
name = "app"
kind = "command"
freeze = ["sh", "-c", "echo frozen >> events.log"]
thaw = ["sh", "-c", "echo thawed >> events.log"]
abort = ["sh", "-c", "echo aborted >> events.log"]
[[writer.component]]
name = "db"
[[writer]]
name = "locker"
kind = "command"
freeze = ["sh", "-c", "echo 'cannot lock' >&2; exit 4"]
[[writer.component]]
name = "files"
"#,
    );
    let out = vs_raw(d, &["backup", "--config", "b.toml"]);
    assert!(
        stderr(&out).contains("writer locker failed at freeze"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(d.join("events.log")).unwrap(),
        "frozen\naborted\n"
    );
    assert!(shadow_ids(d, "disk.img").is_empty());
}

/// An fsfreeze writer whose FIFREEZE returns after its own limit: the
/// backup fails naming it, and the file system is thawed when it returns.
// Linux only: FIFREEZE on ext4 over a loop device (root).
#[cfg(target_os = "linux")]
#[test]
fn a_late_fifreeze_leaves_nothing_frozen() {
    if !is_root() || !have("mkfs.ext4") || !have("losetup") || !have("fsfreeze") {
        eprintln!("SKIP: needs root, mkfs.ext4, losetup and fsfreeze");
        return;
    }
    let dir = volume("4M");
    let d = dir.path();
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = |cmd: &str| {
        std::process::Command::new("sh")
            .args(["-c", cmd])
            .current_dir(d)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ok(
        "truncate -s 192M fs.img && mkfs.ext4 -q -F fs.img >/dev/null 2>&1 && mount -o loop fs.img mnt",
    ) {
        eprintln!("SKIP: cannot loop-mount an ext4 here");
        return;
    }
    // Dirty data: FIFREEZE writes it back first, far past the 30 ms limit.
    std::fs::write(mnt.join("dirty"), vec![0x5A; 96 << 20]).unwrap();
    config(
        d,
        "b.toml",
        "context = \"app-rollback\"",
        "[[writer]]\nname = \"fs\"\nkind = \"fsfreeze\"\nmount = \"mnt\"\ntimeout = \"30ms\"\n",
    );
    let out = vs_raw(d, &["backup", "--config", "b.toml"]);
    let file = mnt.join("after");
    let t = std::thread::spawn(move || std::fs::write(file, b"y").is_ok());
    let started = std::time::Instant::now();
    while !t.is_finished() && started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let thawed = t.is_finished();
    ok("fsfreeze -u mnt 2>/dev/null; umount mnt");
    assert!(thawed, "left frozen: {}", stderr(&out));
    assert!(
        stderr(&out).contains("failed at freeze") && stderr(&out).contains("Timed out"),
        "{}",
        stderr(&out)
    );
}

/// argv running `script` in the platform's shell.
fn shell(script: &str) -> String {
    if cfg!(windows) {
        format!("[\"cmd\", \"/c\", {script:?}]")
    } else {
        format!("[\"sh\", \"-c\", {script:?}]")
    }
}

/// A backup and a restore of a file image with command writers, in the
/// platform's own shell (run under Wine in CI as well).
#[test]
fn backup_and_restore_with_command_writers_in_the_platform_shell() {
    let dir = volume("4M");
    let d = dir.path();
    write_file(d, "data.bin", &[0x5Au8; 65536]);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "data.bin",
        ],
    );
    let (frozen, thawed, restored) = if cfg!(windows) {
        (
            "echo frozen %VOLSHADOW_SET_ID%>>events.log",
            "echo thawed>>events.log",
            "echo restored %VOLSHADOW_COMPONENTS%>>events.log",
        )
    } else {
        (
            "echo frozen $VOLSHADOW_SET_ID >> events.log",
            "echo thawed >> events.log",
            "echo restored $VOLSHADOW_COMPONENTS >> events.log",
        )
    };
    config(
        d,
        "b.toml",
        "context = \"app-rollback\"",
        &format!(
            "[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = {}\nthaw = {}\npost-restore = {}\n[[writer.component]]\nname = \"db\"\n",
            shell(frozen),
            shell(thawed),
            shell(restored)
        ),
    );
    vs(d, &["backup", "--config", "b.toml"]);
    let set = doc(d)["set_id"].as_str().unwrap().to_string();
    write_file(d, "zero.bin", &[0u8; 65536]);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "zero.bin",
        ],
    );
    let out = vs(
        d,
        &["restore", "--config", "b.toml", "--document", "backup.json"],
    );
    assert!(out.contains("db: restored"), "{out}");
    let back = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0", "--length", "65536",
        ],
    )
    .stdout;
    assert!(
        back == vec![0x5Au8; 65536],
        "the restore did not bring the bytes back"
    );
    let events: Vec<String> = std::fs::read_to_string(d.join("events.log"))
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(
        events,
        [
            format!("frozen {set}"),
            "thawed".into(),
            "restored db".into()
        ]
    );
}

/// A component restored to an alternate location: its volume's snapshot
/// lands in the directory as an image file; the volume is not touched.
#[test]
fn restore_to_an_alternate_location() {
    let dir = volume("4M");
    let d = dir.path();
    write_file(d, "data.bin", &[0x42u8; 65536]);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "data.bin",
        ],
    );
    config(
        d,
        "b.toml",
        "context = \"app-rollback\"",
        "[[writer]]\nname = \"app\"\nkind = \"command\"\n[[writer.component]]\nname = \"db\"\n",
    );
    vs(d, &["backup", "--config", "b.toml"]);
    write_file(d, "zero.bin", &[0u8; 65536]);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "zero.bin",
        ],
    );
    std::fs::create_dir(d.join("out")).unwrap();
    let out = vs(
        d,
        &[
            "restore",
            "--config",
            "b.toml",
            "--document",
            "backup.json",
            "--alternate",
            "db=out",
        ],
    );
    assert!(out.contains("db: restored"), "{out}");
    let copy = std::fs::read(d.join("out").join("disk.img")).unwrap();
    assert_eq!(copy.len(), 4 << 20);
    assert!(copy[..65536].iter().all(|&b| b == 0x42));
    let live = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", "0", "--length", "65536",
        ],
    )
    .stdout;
    assert!(live == vec![0u8; 65536], "the volume was rolled back too");
    // A second time the image is there: refused, nothing written.
    let again = vs_raw(
        d,
        &[
            "restore",
            "--config",
            "b.toml",
            "--document",
            "backup.json",
            "--alternate",
            "db=out",
        ],
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}
