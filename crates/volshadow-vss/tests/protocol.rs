//! The backup sequence as VSS documents it: order, writer vetoes versus
//! aborts, each writer's own limits, late calls, what writers see, which
//! writers take part.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use volshadow_block::BlockDevice;
use volshadow_vss::*;

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
            "backup-complete",
            "backup-shutdown"
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
fn every_event_carries_the_set_volumes_type_and_context() {
    let vol = volume();
    let w = Arc::new(TestWriter::new("app"));
    let c = coordinator(vec![w.clone()], &[("a.img", &vol)]);
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    let seen = w.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 7, "{seen:?}");
    for (phase, ctx) in seen {
        assert_eq!(ctx.set_id, Some(doc.set_id), "{phase}");
        assert_eq!(ctx.volumes, [Path::new("a.img")], "{phase}");
        assert_eq!(ctx.backup_type, BackupType::Full, "{phase}");
        assert_eq!(ctx.context, Context::AppRollback, "{phase}");
        assert_eq!(ctx.components, ["app\\db"], "{phase}");
    }
}

#[test]
fn freeze_and_thaw_failures_abort_with_abort_alone() {
    for phase in [Phase::Freeze, Phase::Thaw] {
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
            } => assert_eq!((writer.as_str(), *p), ("bad", phase)),
            e => panic!("{phase}: {e}"),
        }
        assert!(err.to_string().contains("bad") && err.to_string().contains(&phase.to_string()));
        assert!(
            vol.snapshots().is_empty(),
            "{phase}: the aborted set remains"
        );
        // VSS sends Abort, not Abort then Thaw; then BackupShutdown.
        for w in [&good, &bad] {
            let calls = w.calls();
            let n = calls.len();
            assert_eq!(
                &calls[n - 2..],
                ["abort", "backup-shutdown"],
                "{phase}: {calls:?}"
            );
            assert_eq!(calls.iter().filter(|c| *c == "abort").count(), 1);
        }
        assert!(!good.frozen.load(Ordering::SeqCst));
        let status = c.writer_status();
        let bad_status = status.iter().find(|s| s.name == "bad").unwrap();
        assert_eq!(bad_status.state, WriterState::FailedAt(phase));
        assert_eq!(bad_status.last_error_at, Some(phase));
        // The slot is free again; a failed writer returns to stable at
        // identify, keeping its error.
        let mut s = c.backup();
        s.initialize_for_backup().unwrap();
        s.set_context(Context::AppRollback).unwrap();
        s.gather_writer_metadata().unwrap();
        let st = c.writer_status();
        let b = st.iter().find(|s| s.name == "bad").unwrap();
        assert_eq!(b.state, WriterState::Stable);
        assert!(b.last_error.is_some());
        s.start_snapshot_set().unwrap();
    }
}

#[test]
fn prepare_and_post_snapshot_failures_are_vetoes_the_set_stands() {
    for phase in [
        Phase::PrepareBackup,
        Phase::PrepareSnapshot,
        Phase::PostSnapshot,
    ] {
        let vol = volume();
        let good = Arc::new(TestWriter::new("good"));
        let mut bad = TestWriter::new("bad");
        bad.fail_at = Some(phase);
        bad.components = vec![component("", "logs", &["a.img"], true)];
        let bad = Arc::new(bad);
        let c = coordinator(vec![good.clone(), bad.clone()], &[("a.img", &vol)]);
        let doc = backup(&c, Context::AppRollback, &["a.img"])
            .unwrap_or_else(|e| panic!("{phase}: a veto aborted the set: {e}"));
        assert_eq!(vol.snapshots().len(), 1, "{phase}: the set must stand");
        assert_eq!(doc.snapshots.len(), 1);
        for w in [&good, &bad] {
            assert!(
                !w.calls().contains(&"abort".to_string()),
                "{phase}: {:?}",
                w.calls()
            );
        }
        // The failed writer takes no further part in the set.
        let calls = bad.calls();
        let at = calls.iter().position(|c| *c == phase.to_string()).unwrap();
        assert_eq!(&calls[at + 1..], ["backup-shutdown"], "{phase}: {calls:?}");
        assert!(good.calls().contains(&"backup-complete".to_string()));
        let st = c.writer_status();
        let b = st.iter().find(|s| s.name == "bad").unwrap();
        assert_eq!(b.state, WriterState::FailedAt(phase));
        assert!(
            b.last_error
                .as_ref()
                .unwrap()
                .message
                .contains("bad says no")
        );
        let g = st.iter().find(|s| s.name == "good").unwrap();
        assert_eq!(g.state, WriterState::Stable);
        // The document says which components are not consistent and why.
        let logs = doc
            .components
            .iter()
            .find(|c| c.full_path == "logs")
            .unwrap();
        assert!(!logs.backup_succeeded);
        assert!(
            logs.writer_failure
                .as_ref()
                .unwrap()
                .contains(&phase.to_string())
        );
        let db = doc
            .components
            .iter()
            .find(|c| c.full_path == "app\\db")
            .unwrap();
        assert!(db.backup_succeeded && db.writer_failure.is_none());
    }
}

#[test]
fn a_freeze_overrunning_the_window_times_out_and_is_undone_when_it_returns() {
    let vol = volume();
    let mut slow = TestWriter::new("slow");
    slow.sleep_at = Some((Phase::Freeze, Duration::from_millis(700)));
    slow.own_timeout = Some(Duration::from_millis(150));
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
    // The freeze is still running: nothing else was sent beside it.
    assert_eq!(slow.calls().last().map(String::as_str), Some("freeze"));
    // When it returns, it is undone: the writer does not stay frozen.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5)
        && (slow.frozen.load(Ordering::SeqCst) || !slow.calls().contains(&"abort".into()))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let calls = slow.calls();
    assert!(
        !slow.frozen.load(Ordering::SeqCst),
        "left frozen: {calls:?}"
    );
    let f = calls.iter().position(|c| c == "freeze").unwrap();
    assert_eq!(calls[f + 1], "abort", "{calls:?}");
    // Once it has returned, the writer takes part again.
    backup(&c, Context::AppRollback, &["a.img"]).unwrap_err();
}

#[test]
fn a_timeout_names_the_writer_whose_own_limit_ran_out() {
    // "patient" freezes first with a long limit of its own; "strict" uses
    // the coordinator's short one. A slow commit overruns only strict's.
    let vol = volume();
    let mut patient = TestWriter::new("patient");
    patient.own_timeout = Some(Duration::from_secs(30));
    let patient = Arc::new(patient);
    let strict = Arc::new(TestWriter::new("strict"));
    let cow = Arc::new(CowProvider::new());
    cow.add_volume("a.img", vol.clone());
    let mut c = Coordinator::new();
    c.add_provider(Arc::new(Delayed::new(cow, Duration::from_millis(600))));
    c.add_writer(patient.clone());
    c.add_writer(strict.clone());
    c.timeouts.freeze = Duration::from_millis(200);
    let c = Arc::new(c);
    let err = backup(&c, Context::AppRollback, &["a.img"]).unwrap_err();
    match err {
        VssError::WriterFailed {
            writer,
            phase,
            failure,
        } => {
            assert_eq!(writer, "strict");
            assert_eq!(phase, Phase::Freeze);
            assert_eq!(failure.kind, FailureKind::Timeout);
        }
        e => panic!("{e}"),
    }
    assert!(vol.snapshots().is_empty());
    let st = c.writer_status();
    let p = st.iter().find(|s| s.name == "patient").unwrap();
    assert_eq!(p.state, WriterState::Stable);
}

#[test]
fn abort_is_bounded_by_the_event_limit() {
    // The coordinator's event limit is 1 s here (common::coordinator).
    let vol = volume();
    let mut stuck = TestWriter::new("stuck");
    stuck.sleep_at = Some((Phase::Abort, Duration::from_secs(4)));
    let stuck = Arc::new(stuck);
    let mut bad = TestWriter::new("bad");
    bad.fail_at = Some(Phase::Freeze);
    let c = coordinator(vec![stuck.clone(), Arc::new(bad)], &[("a.img", &vol)]);
    let t = Instant::now();
    let err = backup(&c, Context::AppRollback, &["a.img"]).unwrap_err();
    assert!(
        matches!(err, VssError::WriterFailed { ref writer, .. } if writer == "bad"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the backup waited for an abort past its limit"
    );
    assert!(vol.snapshots().is_empty());
}

#[test]
fn an_empty_snapshot_set_is_allowed() {
    let w = Arc::new(TestWriter::new("app"));
    let c = coordinator(vec![w.clone()], &[]);
    let doc = backup(&c, Context::AppRollback, &[]).unwrap();
    assert!(doc.snapshots.is_empty());
    assert!(w.calls().contains(&"freeze".into()) && w.calls().contains(&"thaw".into()));
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

#[test]
fn only_writers_with_components_in_the_backup_take_part() {
    let vol = volume();
    let chosen = Arc::new(TestWriter::new("chosen"));
    let idle = Arc::new(TestWriter::new("idle"));
    let excluded = Arc::new(TestWriter::new("excluded"));
    let c = coordinator(
        vec![chosen.clone(), idle.clone(), excluded.clone()],
        &[("a.img", &vol)],
    );
    let mut s = c.backup();
    s.initialize_for_backup().unwrap();
    s.set_context(Context::AppRollback).unwrap();
    s.exclude_writer(excluded.id).unwrap();
    let meta = s.gather_writer_metadata().unwrap();
    assert_eq!(meta.len(), 2, "an excluded writer is not even identified");
    assert!(s.add_component(excluded.id, "app\\db").is_err());
    s.add_component(chosen.id, "app\\db").unwrap();
    s.start_snapshot_set().unwrap();
    s.add_to_snapshot_set(Path::new("a.img")).unwrap();
    s.prepare_for_backup().unwrap();
    s.do_snapshot_set().unwrap();
    s.backup_component_succeeded("app\\db").unwrap();
    let doc = s.backup_complete().unwrap();
    drop(s);
    assert!(chosen.calls().contains(&"freeze".into()));
    assert_eq!(
        idle.calls(),
        ["identify", "identify"],
        "no component, no events"
    );
    assert_eq!(excluded.calls(), ["identify"], "only at registration");
    assert_eq!(doc.components.len(), 1);
    assert_eq!(doc.writers.len(), 2);
}

#[test]
fn component_sets_and_selectability_as_vss_documents() {
    // "data" (selectable) defines a component set: "data\set1" and
    // "data\set1\jan" come with it. "exe" (not selectable, no selectable
    // ancestor) comes whenever the writer takes part. "logs" is
    // selectable and not selected.
    let vol = volume();
    let mut w = TestWriter::new("app");
    w.components = vec![
        component("", "exe", &["a.img"], false),
        component("", "data", &["a.img"], true),
        component("data", "set1", &["a.img"], false),
        component("data\\set1", "jan", &["a.img"], false),
        component("", "logs", &["a.img"], true),
    ];
    let w = Arc::new(w);
    let c = coordinator(vec![w.clone()], &[("a.img", &vol)]);
    let mut s = c.backup();
    s.initialize_for_backup().unwrap();
    s.set_context(Context::AppRollback).unwrap();
    s.gather_writer_metadata().unwrap();
    let e = s.add_component(w.id, "data\\set1").unwrap_err();
    assert!(e.to_string().contains("select data"), "{e}");
    s.add_component(w.id, "data").unwrap();
    s.start_snapshot_set().unwrap();
    s.add_to_snapshot_set(Path::new("a.img")).unwrap();
    s.prepare_for_backup().unwrap();
    s.do_snapshot_set().unwrap();
    drop(s);
    let seen = w.seen.lock().unwrap().clone();
    let (_, freeze) = seen.iter().find(|(p, _)| *p == Phase::Freeze).unwrap();
    let mut got = freeze.components.clone();
    got.sort();
    assert_eq!(got, ["data", "data\\set1", "data\\set1\\jan", "exe"]);
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
