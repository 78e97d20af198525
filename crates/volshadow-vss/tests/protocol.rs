//! The VSS protocol end to end: sequences, failures at every phase,
//! timeouts, holds, multi-volume sets, writer status, backup documents and
//! restore, and the shipped writers and providers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_cow::{Volume, VolumeOptions};
use volshadow_vss::*;

/// A writer that records its calls and can fail or stall at one phase, and
/// write a marker to a volume when it freezes and when it thaws.
struct TestWriter {
    name: String,
    id: Uuid,
    instance: Uuid,
    fail_at: Option<Phase>,
    sleep_at: Option<(Phase, Duration)>,
    log: Mutex<Vec<String>>,
    marker: Option<Volume>,
    volumes: Vec<PathBuf>,
}

impl TestWriter {
    fn new(name: &str) -> Self {
        TestWriter {
            name: name.into(),
            id: Uuid::new_v4(),
            instance: Uuid::new_v4(),
            fail_at: None,
            sleep_at: None,
            log: Mutex::new(Vec::new()),
            marker: None,
            volumes: vec![PathBuf::from("a.img")],
        }
    }

    fn step(&self, phase: Phase) -> WriterResult {
        self.log.lock().unwrap().push(phase.to_string());
        if let Some((p, d)) = self.sleep_at
            && p == phase
        {
            std::thread::sleep(d);
        }
        if let Some(v) = &self.marker {
            match phase {
                Phase::Freeze => v.write_at(b"FROZEN", 0).unwrap(),
                Phase::Thaw => v.write_at(b"THAWED", 4096).unwrap(),
                _ => {}
            }
        }
        if self.fail_at == Some(phase) {
            return Err(WriterFailure::new(
                FailureKind::Retryable,
                format!("{} says no", self.name),
            ));
        }
        Ok(())
    }

    fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Writer for TestWriter {
    fn identify(&self) -> Result<WriterMetadata, WriterFailure> {
        self.log.lock().unwrap().push("identify".into());
        if self.fail_at == Some(Phase::Identify) {
            return Err(WriterFailure::new(
                FailureKind::NonRetryable,
                "cannot identify",
            ));
        }
        Ok(WriterMetadata {
            name: self.name.clone(),
            writer_id: self.id,
            instance_id: self.instance,
            usage: UsageType::UserData,
            restore_method: RestoreMethod::RestoreIfCanReplace,
            components: vec![Component {
                logical_path: "app".into(),
                name: "db".into(),
                paths: vec![PathBuf::from("/data/db")],
                volumes: self.volumes.clone(),
                selectable: true,
            }],
        })
    }
    fn prepare_for_backup(&self, _c: &[String]) -> WriterResult {
        self.step(Phase::PrepareBackup)
    }
    fn prepare_for_snapshot(&self) -> WriterResult {
        self.step(Phase::PrepareSnapshot)
    }
    fn freeze(&self) -> WriterResult {
        self.step(Phase::Freeze)
    }
    fn thaw(&self) -> WriterResult {
        self.step(Phase::Thaw)
    }
    fn post_snapshot(&self) -> WriterResult {
        self.step(Phase::PostSnapshot)
    }
    fn backup_complete(&self, _s: &[String]) -> WriterResult {
        self.step(Phase::BackupComplete)
    }
    fn abort(&self) -> WriterResult {
        self.log.lock().unwrap().push("abort".into());
        Ok(())
    }
    fn pre_restore(&self, _c: &[String]) -> WriterResult {
        self.step(Phase::PreRestore)
    }
    fn post_restore(&self, _c: &[String]) -> WriterResult {
        self.step(Phase::PostRestore)
    }
}

fn volume() -> Volume {
    Volume::create(
        Arc::new(MemDevice::new(1 << 20)),
        Arc::new(MemDevice::new(8 << 20)),
        VolumeOptions::default(),
    )
    .unwrap()
}

fn coordinator(writers: Vec<Arc<dyn Writer>>, vols: &[(&str, &Volume)]) -> Arc<Coordinator> {
    let cow = Arc::new(CowProvider::new());
    for (p, v) in vols {
        cow.add_volume(*p, (*v).clone());
    }
    let mut c = Coordinator::new();
    c.add_provider(cow);
    for w in writers {
        c.add_writer(w);
    }
    c.timeouts.freeze = Duration::from_millis(500);
    Arc::new(c)
}

/// Runs a whole backup of the given volumes; returns the document.
fn backup(c: &Arc<Coordinator>, ctx: Context, vols: &[&str]) -> VssResult<BackupDocument> {
    let mut s = c.backup();
    s.initialize_for_backup()?;
    s.set_context(ctx)?;
    s.set_backup_state(BackupType::Full, None)?;
    let meta = s.gather_writer_metadata()?;
    for m in &meta {
        for comp in &m.components {
            s.add_component(m.writer_id, &comp.full_path())?;
        }
    }
    s.start_snapshot_set()?;
    for v in vols {
        s.add_to_snapshot_set(Path::new(v))?;
    }
    s.prepare_for_backup()?;
    s.do_snapshot_set()?;
    for m in &meta {
        for comp in &m.components {
            s.backup_component_succeeded(&comp.full_path())?;
        }
    }
    s.backup_complete()
}

#[test]
fn a_whole_backup_in_vss_order() {
    let vol = volume();
    let w = Arc::new(TestWriter::new("app"));
    let c = coordinator(vec![w.clone()], &[("a.img", &vol)]);
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    assert_eq!(
        w.calls(),
        [
            "identify",
            "identify",
            "prepare-backup",
            "prepare-snapshot",
            "freeze",
            "thaw",
            "post-snapshot",
            "backup-complete"
        ]
    );
    assert_eq!(doc.snapshots.len(), 1);
    assert_eq!(vol.snapshots().len(), 1);
    assert!(vol.snapshots()[0].persistent);
    assert_eq!(doc.components[0].full_path, "app\\db");
    assert!(doc.components[0].backup_succeeded);
    assert!(
        c.writer_status()
            .iter()
            .all(|s| s.state == WriterState::Stable)
    );
}

#[test]
fn a_failure_at_each_phase_aborts_cleanly() {
    for phase in [
        Phase::PrepareBackup,
        Phase::PrepareSnapshot,
        Phase::Freeze,
        Phase::Thaw,
        Phase::PostSnapshot,
    ] {
        let vol = volume();
        let good = Arc::new(TestWriter::new("good"));
        let mut bad = TestWriter::new("bad");
        bad.fail_at = Some(phase);
        let bad = Arc::new(bad);
        let c = coordinator(vec![good.clone(), bad.clone()], &[("a.img", &vol)]);
        let err = backup(&c, Context::AppRollback, &["a.img"]).unwrap_err();
        match &err {
            VssError::WriterFailed {
                writer, phase: p, ..
            } => {
                assert_eq!(writer, "bad");
                assert_eq!(*p, phase);
            }
            e => panic!("{phase}: {e}"),
        }
        assert!(err.to_string().contains("bad") && err.to_string().contains(&phase.to_string()));
        assert!(
            vol.snapshots().is_empty(),
            "{phase}: a snapshot of the aborted set remains"
        );
        for w in [&good, &bad] {
            let calls = w.calls();
            let n = calls.len();
            assert_eq!(&calls[n - 2..], ["abort", "thaw"], "{phase}: {calls:?}");
        }
        let status = c.writer_status();
        let bad_status = status.iter().find(|s| s.name == "bad").unwrap();
        assert_eq!(bad_status.state, WriterState::FailedAt(phase));
        assert!(bad_status.last_error.is_some());
        // The slot is free again: the next backup (without the failure) runs.
        let mut s = c.backup();
        s.initialize_for_backup().unwrap();
        s.set_context(Context::AppRollback).unwrap();
        s.gather_writer_metadata().unwrap();
        // A failed writer returns to stable at identify, keeping its error.
        let st = c.writer_status();
        let b = st.iter().find(|s| s.name == "bad").unwrap();
        assert_eq!(b.state, WriterState::Stable);
        assert!(b.last_error.is_some());
        s.start_snapshot_set().unwrap();
    }
}

#[test]
fn a_writer_that_overruns_the_freeze_window_times_out() {
    let vol = volume();
    let mut slow = TestWriter::new("slow");
    slow.sleep_at = Some((Phase::Freeze, Duration::from_secs(2)));
    let slow = Arc::new(slow);
    let c = coordinator(vec![slow.clone()], &[("a.img", &vol)]);
    let err = backup(&c, Context::AppRollback, &["a.img"]).unwrap_err();
    match err {
        VssError::WriterFailed {
            writer,
            phase,
            failure,
        } => {
            assert_eq!((writer.as_str(), phase), ("slow", Phase::Freeze));
            assert_eq!(failure.kind, FailureKind::Timeout);
        }
        e => panic!("{e}"),
    }
    assert!(vol.snapshots().is_empty());
    assert!(slow.calls().contains(&"thaw".to_string()));
}

#[test]
fn freeze_is_before_the_snapshot_and_thaw_after() {
    let vol = volume();
    let mut w = TestWriter::new("marker");
    w.marker = Some(vol.clone());
    let w = Arc::new(w);
    let c = coordinator(vec![w], &[("a.img", &vol)]);
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    let snap = vol.snapshot(doc.snapshots[0].snapshot_id).unwrap();
    let mut buf = [0u8; 6];
    snap.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"FROZEN", "the freeze-time write is in the snapshot");
    snap.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0u8; 6], "the thaw-time write is not");
    vol.read_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf, b"THAWED");
}

/// A provider that fails at commit, for all-or-nothing sets.
struct FailingProvider;

impl Provider for FailingProvider {
    fn name(&self) -> &str {
        "failing"
    }
    fn id(&self) -> Uuid {
        Uuid::nil()
    }
    fn kind(&self) -> &str {
        "software"
    }
    fn is_volume_supported(&self, v: &Path) -> bool {
        v == Path::new("b.img")
    }
    fn begin_prepare_snapshot(&self, _: Uuid, _: &Path) -> ProviderResult {
        Ok(())
    }
    fn end_prepare_snapshot(&self, _: Uuid) -> ProviderResult {
        Ok(())
    }
    fn pre_commit(&self, _: Uuid) -> ProviderResult {
        Ok(())
    }
    fn commit(&self, _: Uuid, _: &CommitOptions) -> ProviderResult {
        Err(ProviderError("the array is offline".into()))
    }
    fn post_commit(&self, _: Uuid) -> ProviderResult<Vec<SnapshotRef>> {
        Ok(Vec::new())
    }
    fn abort(&self, _: Uuid) -> ProviderResult {
        Ok(())
    }
    fn delete(&self, _: &SnapshotRef) -> ProviderResult {
        Ok(())
    }
    fn revert(&self, _: &SnapshotRef) -> ProviderResult {
        Ok(())
    }
    fn query(&self) -> Vec<SnapshotRef> {
        Vec::new()
    }
}

#[test]
fn multi_volume_sets_are_all_or_nothing() {
    let a = volume();
    let b = volume();
    // Both on the COW provider: one set, one instant.
    let c = coordinator(vec![], &[("a.img", &a), ("b.img", &b)]);
    let doc = backup(&c, Context::NasRollback, &["a.img", "b.img"]).unwrap();
    assert_eq!(doc.snapshots.len(), 2);
    assert!(a.snapshots()[0].set_id.is_some());
    assert_eq!(a.snapshots()[0].set_id, b.snapshots()[0].set_id);

    // b on a provider that fails at commit: a's snapshot must not remain.
    let a = volume();
    let cow = Arc::new(CowProvider::new());
    cow.add_volume("a.img", a.clone());
    let mut coord = Coordinator::new();
    coord.add_provider(cow);
    coord.add_provider(Arc::new(FailingProvider));
    let coord = Arc::new(coord);
    let err = backup(&coord, Context::NasRollback, &["a.img", "b.img"]).unwrap_err();
    assert!(
        matches!(err, VssError::ProviderFailed { ref provider, phase: "commit", .. } if provider == "failing"),
        "{err}"
    );
    assert!(a.snapshots().is_empty(), "partial set left behind");
}

#[test]
fn calls_out_of_order_are_bad_state_and_one_set_at_a_time() {
    let vol = volume();
    let c = coordinator(vec![], &[("a.img", &vol)]);
    let mut s = c.backup();
    assert!(matches!(
        s.do_snapshot_set(),
        Err(VssError::BadState { .. })
    ));
    assert!(matches!(
        s.set_context(Context::Backup),
        Err(VssError::BadState { .. })
    ));
    s.initialize_for_backup().unwrap();
    assert!(matches!(
        s.initialize_for_backup(),
        Err(VssError::BadState { .. })
    ));
    s.set_context(Context::NasRollback).unwrap();
    s.gather_writer_metadata().unwrap();
    s.start_snapshot_set().unwrap();
    assert!(matches!(
        s.add_to_snapshot_set(Path::new("nope.img")),
        Err(VssError::VolumeNotSupported(_))
    ));
    let mut other = c.backup();
    other.initialize_for_backup().unwrap();
    other.set_context(Context::NasRollback).unwrap();
    other.gather_writer_metadata().unwrap();
    assert!(matches!(
        other.start_snapshot_set(),
        Err(VssError::SnapshotSetInProgress)
    ));
    assert!(matches!(s.prepare_for_backup(), Err(VssError::Invalid(_))));
    s.add_to_snapshot_set(Path::new("a.img")).unwrap();
    assert!(s.add_to_snapshot_set(Path::new("a.img")).is_err());
    s.abort().unwrap();
    other.start_snapshot_set().unwrap();
}

#[test]
fn limits_are_enforced() {
    let vol = volume();
    let cow = Arc::new(CowProvider::new());
    cow.add_volume("a.img", vol.clone());
    cow.add_volume("b.img", volume());
    let mut c = Coordinator::new();
    c.add_provider(cow);
    c.limits.volumes_per_set = 1;
    c.limits.snapshots_per_volume = 1;
    let c = Arc::new(c);
    backup(&c, Context::NasRollback, &["a.img"]).unwrap();
    let err = backup(&c, Context::NasRollback, &["a.img"]).unwrap_err();
    assert!(matches!(err, VssError::LimitReached(_)), "{err}");
    let err = backup(&c, Context::NasRollback, &["b.img", "a.img"]).unwrap_err();
    assert!(matches!(err, VssError::LimitReached(_)), "{err}");
}

#[test]
fn non_persistent_backup_snapshots_are_released() {
    let vol = volume();
    let c = coordinator(vec![Arc::new(TestWriter::new("w"))], &[("a.img", &vol)]);
    let doc = backup(&c, Context::Backup, &["a.img"]).unwrap();
    assert_eq!(doc.snapshots.len(), 1);
    assert!(vol.snapshots().is_empty(), "auto-release");
}

#[test]
fn the_document_round_trips_and_drives_a_restore() {
    let vol = volume();
    vol.write_at(&[0xAB; 8192], 0).unwrap();
    let w = Arc::new(TestWriter::new("app"));
    let c = coordinator(vec![w.clone()], &[("a.img", &vol)]);
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    let json = doc.to_json();
    let back = BackupDocument::from_json(&json).unwrap();
    assert_eq!(back, doc);
    assert!(BackupDocument::from_json("{}").is_err());
    // Damage the volume, then restore from the document.
    vol.write_at(&[0x00; 8192], 0).unwrap();
    let mut r = c.restore(back).unwrap();
    assert!(matches!(r.pre_restore(), Err(VssError::BadState { .. })));
    r.gather_writer_metadata().unwrap();
    r.select_for_restore("app\\db").unwrap();
    assert!(r.select_for_restore("app\\nothing").is_err());
    r.pre_restore().unwrap();
    r.restore().unwrap();
    let done = r.post_restore().unwrap();
    assert_eq!(done.components[0].restore_succeeded, Some(true));
    let mut buf = vec![0u8; 8192];
    vol.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xAB));
    let calls = w.calls();
    assert!(
        calls.ends_with(&["pre-restore".into(), "post-restore".into()]),
        "{calls:?}"
    );
}

#[test]
fn incremental_backups_record_their_cbt_base() {
    let vol = volume();
    let c = coordinator(vec![], &[("a.img", &vol)]);
    let full = backup(&c, Context::NasRollback, &["a.img"]).unwrap();
    let mut s = c.backup();
    s.initialize_for_backup().unwrap();
    s.set_context(Context::NasRollback).unwrap();
    assert!(s.set_backup_state(BackupType::Incremental, None).is_err());
    s.set_backup_state(BackupType::Incremental, Some(&full))
        .unwrap();
    s.gather_writer_metadata().unwrap();
    s.start_snapshot_set().unwrap();
    s.add_to_snapshot_set(Path::new("a.img")).unwrap();
    s.prepare_for_backup().unwrap();
    s.do_snapshot_set().unwrap();
    let inc = s.backup_complete().unwrap();
    assert_eq!(inc.backup_type, BackupType::Incremental);
    assert_eq!(inc.cbt_base[0].snapshot_id, full.snapshots[0].snapshot_id);
}

#[test]
fn command_writer_runs_commands_and_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let sh = |s: String| vec!["sh".to_string(), "-c".to_string(), s];
    let mut cmds = HashMap::new();
    cmds.insert(
        "freeze".to_string(),
        sh(format!("echo frozen >> {}", log.display())),
    );
    cmds.insert(
        "thaw".to_string(),
        sh(format!("echo thawed >> {}", log.display())),
    );
    let w = CommandWriter::new("app", vec![], cmds.clone(), Duration::from_secs(5)).unwrap();
    w.freeze().unwrap();
    w.thaw().unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "frozen\nthawed\n");

    cmds.insert(
        "freeze".to_string(),
        sh("echo 'database locked' >&2; exit 3".into()),
    );
    let w = CommandWriter::new("app", vec![], cmds.clone(), Duration::from_secs(5)).unwrap();
    let e = w.freeze().unwrap_err();
    assert_eq!(e.kind, FailureKind::NonRetryable);
    assert!(e.message.contains("database locked"), "{e}");

    cmds.insert("freeze".to_string(), sh("sleep 10".into()));
    let w = CommandWriter::new("app", vec![], cmds.clone(), Duration::from_millis(200)).unwrap();
    let t = std::time::Instant::now();
    let e = w.freeze().unwrap_err();
    assert_eq!(e.kind, FailureKind::Timeout);
    assert!(t.elapsed() < Duration::from_secs(5), "not killed");

    assert!(
        CommandWriter::new(
            "x",
            vec![],
            HashMap::from([("melt".to_string(), sh("true".into()))]),
            Duration::from_secs(1)
        )
        .is_err()
    );
}

fn root_with(tools: &[&str]) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        eprintln!("SKIP: needs root");
        return false;
    }
    for t in tools {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIP: {t} is not installed");
            return false;
        }
    }
    true
}

fn sh(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A loop-mounted file system of `kind` in `dir/mnt`; torn down on drop.
struct LoopFs {
    mnt: PathBuf,
    dev: String,
}

impl LoopFs {
    fn new(dir: &Path, mkfs: &str, size_mb: u32) -> Option<LoopFs> {
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).ok()?;
        if !sh(&format!(
            "truncate -s {size_mb}M {0} && {mkfs} {0} >/dev/null 2>&1",
            img.display()
        )) {
            eprintln!("SKIP: {mkfs} failed");
            return None;
        }
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() || !sh(&format!("mount {dev} {}", mnt.display())) {
            eprintln!("SKIP: cannot mount a loop device here");
            let _ = sh(&format!("losetup -d {dev}"));
            return None;
        }
        Some(LoopFs { mnt, dev })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = sh(&format!("umount {}", self.mnt.display()));
        let _ = sh(&format!("losetup -d {}", self.dev));
    }
}

#[test]
fn fsfreeze_writer_freezes_and_thaws_ext4() {
    if !root_with(&["mkfs.ext4", "losetup", "mount"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::new(dir.path(), "mkfs.ext4 -q -F", 32) else {
        return;
    };
    let w = FsFreezeWriter::new(&fs.mnt, vec![]);
    w.freeze().unwrap();
    // While frozen a write blocks; it must complete after thaw.
    let file = fs.mnt.join("during");
    let t = std::thread::spawn(move || std::fs::write(file, b"x").is_ok());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !t.is_finished(),
        "a write went through a frozen file system"
    );
    w.abort().unwrap();
    assert!(t.join().unwrap());
    // Drop thaws too.
    let w = FsFreezeWriter::new(&fs.mnt, vec![]);
    w.freeze().unwrap();
    drop(w);
    std::fs::write(fs.mnt.join("after"), b"y").unwrap();
}

#[test]
fn reflink_provider_on_xfs_or_btrfs() {
    let (mkfs, tool) = if root_with(&["mkfs.xfs"]) {
        ("mkfs.xfs -q -f -m reflink=1", "xfs")
    } else if root_with(&["mkfs.btrfs"]) {
        ("mkfs.btrfs -q -f", "btrfs")
    } else {
        eprintln!("SKIP: neither mkfs.xfs nor mkfs.btrfs");
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
    // Not supported on a file system without reflinks.
    let tmp_img = dir.path().join("plain.img");
    std::fs::write(&tmp_img, b"x").unwrap();
    let cow = Arc::new(CowProvider::new());
    let mut c = Coordinator::new();
    c.add_provider(cow);
    c.add_provider(reflink.clone());
    let c = Arc::new(c);
    let vol = img.to_str().unwrap().to_string();
    let doc = backup(&c, Context::NasRollback, &[&vol]).unwrap();
    assert_eq!(doc.snapshots[0].provider, "volshadow reflink provider");
    std::fs::write(&img, vec![0x00; 1 << 20]).unwrap();
    let copy = doc.snapshots[0].location.clone().unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), vec![0x5A; 1 << 20]);
    reflink.revert(&doc.snapshots[0]).unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), vec![0x5A; 1 << 20]);
    reflink.delete(&doc.snapshots[0]).unwrap();
    assert!(!copy.exists());
}
