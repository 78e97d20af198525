//! Backup documents, backup types and restore as VSS documents them:
//! bases that must exist, restore methods honoured or refused before
//! anything changes, alternate locations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use volshadow_block::BlockDevice;
use volshadow_vss::*;

fn restore_all(
    c: &Arc<Coordinator>,
    doc: BackupDocument,
    components: &[&str],
) -> VssResult<BackupDocument> {
    let mut r = c.restore(doc)?;
    r.gather_writer_metadata()?;
    for comp in components {
        r.select_for_restore(comp)?;
    }
    r.pre_restore()?;
    r.restore()?;
    r.post_restore()
}

fn first_byte(v: &volshadow_cow::Volume) -> u8 {
    let mut b = [0u8; 1];
    v.read_at(&mut b, 0).unwrap();
    b[0]
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
fn a_restore_from_released_snapshots_is_refused_up_front() {
    let vol = volume();
    let w = Arc::new(TestWriter::new("app"));
    let c = coordinator(vec![w.clone()], &[("a.img", &vol)]);
    let doc = backup(&c, Context::Backup, &["a.img"]).unwrap();
    let e = c.restore(doc).unwrap_err();
    assert!(e.to_string().contains("released"), "{e}");
    // A persistent backup whose shadow copy was deleted since.
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    c.delete_set(doc.set_id).unwrap();
    let e = c.restore(doc).unwrap_err();
    assert!(matches!(e, VssError::ObjectNotFound(_)), "{e}");
    assert!(!w.calls().contains(&"pre-restore".into()));
}

#[test]
fn incremental_and_differential_bases_as_vss_documents() {
    let vol = volume();
    let c = coordinator(vec![], &[("a.img", &vol)]);
    let typed = |t: BackupType, prev: Option<&BackupDocument>| -> VssResult<BackupDocument> {
        let mut s = c.backup();
        s.initialize_for_backup()?;
        s.set_context(Context::NasRollback)?;
        s.set_backup_state(t, prev)?;
        s.gather_writer_metadata()?;
        s.start_snapshot_set()?;
        s.add_to_snapshot_set(Path::new("a.img"))?;
        s.prepare_for_backup()?;
        s.do_snapshot_set()?;
        s.backup_complete()
    };
    let full = typed(BackupType::Full, None).unwrap();
    assert!(typed(BackupType::Incremental, None).is_err());
    let inc = typed(BackupType::Incremental, Some(&full)).unwrap();
    assert_eq!(inc.cbt_base[0].snapshot_id, full.snapshots[0].snapshot_id);
    // A differential builds on the last full, not on an incremental; an
    // earlier differential passes its full base on.
    let e = typed(BackupType::Differential, Some(&inc)).unwrap_err();
    assert!(e.to_string().contains("full"), "{e}");
    let diff = typed(BackupType::Differential, Some(&full)).unwrap();
    let diff2 = typed(BackupType::Differential, Some(&diff)).unwrap();
    assert_eq!(diff2.cbt_base[0].snapshot_id, full.snapshots[0].snapshot_id);
    // A copy backup is outside the history.
    let copy = typed(BackupType::Copy, None).unwrap();
    let e = typed(BackupType::Incremental, Some(&copy)).unwrap_err();
    assert!(e.to_string().contains("copy"), "{e}");
    // A base that no longer exists.
    c.delete_set(inc.set_id).unwrap();
    let e = typed(BackupType::Incremental, Some(&inc)).unwrap_err();
    assert!(e.to_string().contains("no longer exists"), "{e}");
    // A base whose snapshots were released at backup complete.
    let mut s = c.backup();
    s.initialize_for_backup().unwrap();
    s.set_context(Context::Backup).unwrap();
    let mut released = full.clone();
    released.context = Context::Backup;
    let e = s
        .set_backup_state(BackupType::Incremental, Some(&released))
        .unwrap_err();
    assert!(e.to_string().contains("released"), "{e}");
}

/// Two writers with a component each on one volume.
fn shared_volume() -> (volshadow_cow::Volume, Arc<Coordinator>, BackupDocument) {
    let vol = volume();
    vol.write_at(&[0x11; 4096], 0).unwrap();
    let a = TestWriter::new("a");
    let mut b = TestWriter::new("b");
    b.components = vec![component("", "mail", &["a.img"], true)];
    let c = coordinator(vec![Arc::new(a), Arc::new(b)], &[("a.img", &vol)]);
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    vol.write_at(&[0x22; 4096], 0).unwrap();
    (vol, c, doc)
}

#[test]
fn a_volume_is_rolled_back_only_when_the_restore_owns_it() {
    let (vol, c, doc) = shared_volume();
    let e = restore_all(&c, doc.clone(), &["app\\db"]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("mail") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert_eq!(first_byte(&vol), 0x22, "refused, yet changed");
    let done = restore_all(&c, doc, &["app\\db", "mail"]).unwrap();
    assert!(
        done.components
            .iter()
            .all(|c| c.restore_succeeded == Some(true))
    );
    assert_eq!(first_byte(&vol), 0x11);
}

#[test]
fn restore_methods_are_honoured_or_refused_with_nothing_changed() {
    for (method, expect) in [
        (RestoreMethod::RestoreIfNotThere, "not there"),
        (RestoreMethod::Custom, "cannot carry out"),
        (RestoreMethod::RestoreAtReboot, "cannot carry out"),
        (
            RestoreMethod::RestoreToAlternateLocation,
            "alternate location",
        ),
    ] {
        let vol = volume();
        vol.write_at(&[0x11; 4096], 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("db");
        std::fs::write(&present, b"live").unwrap();
        let mut w = TestWriter::new("app");
        w.restore_method = method;
        w.components[0].paths = vec![present];
        let w = Arc::new(w);
        let c = coordinator(vec![w.clone()], &[("a.img", &vol)]);
        let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
        vol.write_at(&[0x22; 4096], 0).unwrap();
        let e = restore_all(&c, doc, &["app\\db"]).unwrap_err();
        assert!(e.to_string().contains(expect), "{method:?}: {e}");
        assert_eq!(first_byte(&vol), 0x22, "{method:?}: refused, yet changed");
        assert!(!w.calls().contains(&"pre-restore".into()), "{method:?}");
    }
    // RestoreIfNotThere with the files gone: restored.
    let vol = volume();
    vol.write_at(&[0x11; 4096], 0).unwrap();
    let mut w = TestWriter::new("app");
    w.restore_method = RestoreMethod::RestoreIfNotThere;
    w.components[0].paths = vec!["/nonexistent/volshadow/db".into()];
    let c = coordinator(vec![Arc::new(w)], &[("a.img", &vol)]);
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    vol.write_at(&[0x22; 4096], 0).unwrap();
    restore_all(&c, doc, &["app\\db"]).unwrap();
    assert_eq!(first_byte(&vol), 0x11);
}

#[test]
fn restore_to_an_alternate_location_leaves_the_volume_alone() {
    let (vol, c, doc) = shared_volume();
    let dir = tempfile::tempdir().unwrap();
    let mut r = c.restore(doc).unwrap();
    r.gather_writer_metadata().unwrap();
    r.select_for_restore("app\\db").unwrap();
    r.set_alternate_location("app\\db", dir.path()).unwrap();
    r.pre_restore().unwrap();
    r.restore().unwrap();
    let done = r.post_restore().unwrap();
    assert_eq!(done.components[0].restore_succeeded, Some(true));
    let copy = std::fs::read(dir.path().join("a.img")).unwrap();
    assert_eq!(copy.len(), 1 << 20);
    assert!(copy[..4096].iter().all(|&b| b == 0x11));
    assert_eq!(first_byte(&vol), 0x22, "the volume itself was not touched");
}
