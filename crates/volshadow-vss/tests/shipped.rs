//! The writers and providers volshadow ships: command writers (through the
//! platform's shell), the Linux fs-freeze writer on a real ext4, the
//! reflink provider on a real xfs or btrfs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use volshadow_vss::*;

/// argv running `script` in the platform's shell.
fn shell(script: &str) -> Vec<String> {
    if cfg!(windows) {
        vec!["cmd".into(), "/c".into(), script.into()]
    } else {
        vec!["sh".into(), "-c".into(), script.into()]
    }
}

/// Appends `word` (and the event's set id and context) to `log`.
fn log_event(log: &Path, word: &str) -> Vec<String> {
    if cfg!(windows) {
        shell(&format!(
            "echo {word} %VOLSHADOW_CONTEXT% %VOLSHADOW_COMPONENTS%>>{}",
            log.display()
        ))
    } else {
        shell(&format!(
            "echo {word} $VOLSHADOW_CONTEXT $VOLSHADOW_COMPONENTS >> '{}'",
            log.display()
        ))
    }
}

fn fail_with(code: u8, message: &str) -> Vec<String> {
    if cfg!(windows) {
        shell(&format!("echo {message} 1>&2 & exit /b {code}"))
    } else {
        shell(&format!("echo '{message}' >&2; exit {code}"))
    }
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn command_writer_runs_commands_with_the_event_context() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let cmds = HashMap::from([
        ("freeze".to_string(), log_event(&log, "frozen")),
        ("thaw".to_string(), log_event(&log, "thawed")),
        ("backup-shutdown".to_string(), log_event(&log, "shutdown")),
    ]);
    let comps = vec![component("", "db", &["a.img"], true)];
    let w = CommandWriter::new("app", comps, cmds, Duration::from_secs(20)).unwrap();
    let vol = volume();
    let c = coordinator(vec![Arc::new(w)], &[("a.img", &vol)]);
    backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    assert_eq!(
        lines(&log),
        [
            "frozen app-rollback db",
            "thawed app-rollback db",
            "shutdown app-rollback db"
        ]
    );
}

#[test]
fn command_writer_failures_and_timeouts() {
    let ctx = EventContext::default();
    let cmds = HashMap::from([("freeze".to_string(), fail_with(3, "database locked"))]);
    let w = CommandWriter::new("app", vec![], cmds, Duration::from_secs(20)).unwrap();
    let e = w.freeze(&ctx).unwrap_err();
    assert_eq!(e.kind, FailureKind::NonRetryable);
    assert!(e.message.contains("database locked"), "{e}");

    let sleep = if cfg!(windows) {
        shell("ping -n 30 127.0.0.1 >nul")
    } else {
        shell("sleep 30")
    };
    let cmds = HashMap::from([("freeze".to_string(), sleep)]);
    let w = CommandWriter::new("app", vec![], cmds, Duration::from_millis(300)).unwrap();
    let t = Instant::now();
    let e = w.freeze(&ctx).unwrap_err();
    assert_eq!(e.kind, FailureKind::Timeout);
    assert!(t.elapsed() < Duration::from_secs(20), "not killed");

    assert!(
        CommandWriter::new(
            "x",
            vec![],
            HashMap::from([("melt".to_string(), shell("exit 0"))]),
            Duration::from_secs(1)
        )
        .is_err()
    );
}

#[test]
fn command_writer_without_an_abort_command_thaws_on_abort() {
    // A set aborted after this writer froze (another writer fails at
    // freeze): its thaw command runs, once, as its abort.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let cmds = HashMap::from([
        ("freeze".to_string(), log_event(&log, "frozen")),
        ("thaw".to_string(), log_event(&log, "thawed")),
    ]);
    let comps = vec![component("", "db", &["a.img"], true)];
    let w = CommandWriter::new("app", comps, cmds, Duration::from_secs(20)).unwrap();
    let mut bad = TestWriter::new("bad");
    bad.fail_at = Some(Phase::Freeze);
    let vol = volume();
    let c = coordinator(vec![Arc::new(w), Arc::new(bad)], &[("a.img", &vol)]);
    backup(&c, Context::AppRollback, &["a.img"]).unwrap_err();
    assert_eq!(
        lines(&log),
        ["frozen app-rollback db", "thawed app-rollback db"]
    );
}

#[test]
fn a_post_snapshot_command_failure_keeps_the_set() {
    let cmds = HashMap::from([("post-snapshot".to_string(), fail_with(3, "cannot log"))]);
    let comps = vec![component("", "db", &["a.img"], true)];
    let w = CommandWriter::new("app", comps, cmds, Duration::from_secs(20)).unwrap();
    let vol = volume();
    let c = coordinator(vec![Arc::new(w)], &[("a.img", &vol)]);
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    assert_eq!(vol.snapshots().len(), 1);
    assert!(!doc.components[0].backup_succeeded);
    let st = &c.writer_status()[0];
    assert_eq!(st.state, WriterState::FailedAt(Phase::PostSnapshot));
    assert!(
        st.last_error_text().contains("post-snapshot"),
        "{}",
        st.last_error_text()
    );
}

#[cfg(target_os = "linux")]
#[test]
fn fsfreeze_writer_freezes_and_thaws_ext4() {
    if !root_with(&["mkfs.ext4", "losetup", "mount"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::new(dir.path(), "mkfs.ext4 -q -F", 32) else {
        return;
    };
    let ctx = EventContext::default();
    let w = FsFreezeWriter::new(&fs.mnt, vec![]);
    w.freeze(&ctx).unwrap();
    let file = fs.mnt.join("during");
    let t = std::thread::spawn(move || std::fs::write(file, b"x").is_ok());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !t.is_finished(),
        "a write went through a frozen file system"
    );
    w.abort(&ctx).unwrap();
    assert!(t.join().unwrap());
    let w = FsFreezeWriter::new(&fs.mnt, vec![]);
    w.freeze(&ctx).unwrap();
    drop(w);
    std::fs::write(fs.mnt.join("after"), b"y").unwrap();
}

/// FIFREEZE returning after the writer's window closed: the coordinator
/// has given up on it, and the late freeze must still be thawed.
// Linux only: FIFREEZE on ext4 over a loop device (root).
#[cfg(target_os = "linux")]
#[test]
fn a_late_fifreeze_on_ext4_is_thawed() {
    if !root_with(&["mkfs.ext4", "losetup", "mount", "fsfreeze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::new(dir.path(), "mkfs.ext4 -q -F", 192) else {
        return;
    };
    // Dirty data makes FIFREEZE write it back first: far longer than the
    // window (the other events, which do nothing, fit it easily).
    std::fs::write(fs.mnt.join("dirty"), vec![0x5A; 96 << 20]).unwrap();
    let vol = volume();
    let mut c = Coordinator::new();
    let cow = Arc::new(CowProvider::new());
    cow.add_volume("a.img", vol.clone());
    c.add_provider(cow);
    c.add_writer(Arc::new(FsFreezeWriter::new(&fs.mnt, vec!["a.img".into()])));
    c.timeouts.freeze = Duration::from_millis(30);
    let c = Arc::new(c);
    let err = backup(&c, Context::AppRollback, &["a.img"]).unwrap_err();
    assert!(
        matches!(err, VssError::WriterFailed { phase: Phase::Freeze, ref failure, .. } if failure.kind == FailureKind::Timeout),
        "{err}"
    );
    assert!(vol.snapshots().is_empty());
    let file = fs.mnt.join("after");
    let t = std::thread::spawn(move || std::fs::write(file, b"y").is_ok());
    let started = Instant::now();
    while !t.is_finished() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let thawed = t.is_finished();
    if !thawed {
        // Leave the machine usable; LoopFs thaws on drop too.
        sh(&format!("fsfreeze -u {}", fs.mnt.display()));
    }
    assert!(
        thawed,
        "the file system was left frozen after a late FIFREEZE"
    );
    assert!(t.join().unwrap());
}

// Linux only: reflink copies on XFS or btrfs over loop devices (root).
#[cfg(target_os = "linux")]
#[test]
fn reflink_provider_on_xfs_or_btrfs_alongside_the_cow_provider() {
    use volshadow_block::BlockDevice;
    let (mkfs, tool) = if root_with(&["mkfs.xfs", "losetup", "mount"]) {
        ("mkfs.xfs -q -f -m reflink=1", "xfs")
    } else if root_with(&["mkfs.btrfs", "losetup", "mount"]) {
        ("mkfs.btrfs -q -f", "btrfs")
    } else {
        eprintln!("SKIP: neither mkfs.xfs nor mkfs.btrfs (or not root)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::new(dir.path(), mkfs, 320) else {
        return;
    };
    let img = fs.mnt.join("disk.img");
    std::fs::write(&img, vec![0x5A; 1 << 20]).unwrap();
    let reflink = Arc::new(ReflinkProvider::new());
    assert!(reflink.is_volume_supported(&img), "{tool} should reflink");
    let vol = volume();
    vol.write_at(&[0x33; 4096], 0).unwrap();
    let cow = Arc::new(CowProvider::new());
    cow.add_volume("a.img", vol.clone());
    let mut c = Coordinator::new();
    c.add_provider(cow);
    c.add_provider(reflink.clone());
    let c = Arc::new(c);
    let image = img.to_str().unwrap().to_string();
    let doc = backup(&c, Context::NasRollback, &["a.img", &image]).unwrap();
    assert_eq!(doc.snapshots.len(), 2);
    let copy = doc
        .snapshots
        .iter()
        .find(|s| s.provider_id == reflink.id())
        .unwrap()
        .clone();
    std::fs::write(&img, vec![0x00; 1 << 20]).unwrap();
    vol.write_at(&[0x44; 4096], 0).unwrap();
    // Read both snapshots without knowing which provider made them.
    for (s, want) in doc.snapshots.iter().map(|s| {
        let want = if s.provider_id == reflink.id() {
            0x5A
        } else {
            0x33
        };
        (s, want)
    }) {
        let dev = c.open(s).unwrap();
        let mut buf = vec![0u8; 4096];
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == want), "{}", s.provider);
    }
    reflink.revert(&copy).unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), vec![0x5A; 1 << 20]);
    c.delete_set(doc.set_id).unwrap();
    assert!(!copy.location.unwrap().exists());
    assert!(vol.snapshots().is_empty());
}
