//! Snapshot sets across volumes and providers: one instant, all or
//! nothing, one bounded hold, the engine's set id, query, delete and
//! reading snapshots through the coordinator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use uuid::Uuid;
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_vss::*;

/// A provider that fails at commit, for all-or-nothing sets.
struct FailingProvider;

impl Provider for FailingProvider {
    fn name(&self) -> &str {
        "failing"
    }
    fn id(&self) -> Uuid {
        Uuid::from_u128(0xfa11)
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
    fn commit(
        &self,
        _: Uuid,
        _: &CommitOptions,
        _: &mut dyn FnMut() -> ProviderResult,
    ) -> ProviderResult<Vec<SnapshotRef>> {
        Err(ProviderError("the array is offline".into()))
    }
    fn post_commit(&self, _: Uuid) -> ProviderResult {
        Ok(())
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
    fn open(&self, _: &SnapshotRef) -> ProviderResult<Box<dyn BlockDevice>> {
        Err(ProviderError("nothing to open".into()))
    }
    fn query(&self) -> Vec<SnapshotRef> {
        Vec::new()
    }
}

#[test]
fn multi_volume_sets_are_all_or_nothing() {
    let a = volume();
    let b = volume();
    let c = coordinator(vec![], &[("a.img", &a), ("b.img", &b)]);
    let doc = backup(&c, Context::NasRollback, &["a.img", "b.img"]).unwrap();
    assert_eq!(doc.snapshots.len(), 2);
    assert_eq!(a.snapshots()[0].set_id, b.snapshots()[0].set_id);

    // b on a provider that fails at commit: a's snapshot must not remain,
    // whichever order the providers commit in.
    for failing_first in [false, true] {
        let a = volume();
        let cow = Arc::new(CowProvider::new());
        cow.add_volume("a.img", a.clone());
        let mut coord = Coordinator::new();
        if failing_first {
            coord.add_provider(Arc::new(FailingProvider));
            coord.add_provider(cow);
        } else {
            coord.add_provider(cow);
            coord.add_provider(Arc::new(FailingProvider));
        }
        let coord = Arc::new(coord);
        let err = backup(&coord, Context::NasRollback, &["a.img", "b.img"]).unwrap_err();
        assert!(
            matches!(err, VssError::ProviderFailed { ref provider, phase: "commit", .. } if provider == "failing"),
            "{err}"
        );
        assert!(a.snapshots().is_empty(), "partial set left behind");
    }
}

#[test]
fn the_document_names_the_set_the_engine_records() {
    let a = volume();
    let b = volume();
    let c = coordinator(vec![], &[("a.img", &a), ("b.img", &b)]);
    let doc = backup(&c, Context::NasRollback, &["a.img", "b.img"]).unwrap();
    assert_eq!(a.snapshots()[0].set_id, Some(doc.set_id));
    assert_eq!(b.snapshots()[0].set_id, Some(doc.set_id));
    assert!(doc.snapshots.iter().all(|s| s.set_id == doc.set_id));
}

/// A thread writes sequence numbers to two volumes on two providers, each
/// number to `a` and then to `b`. At one instant, b's number is a's or one
/// less; never more (b's write came after a's).
#[test]
fn a_set_across_two_providers_is_one_instant() {
    let a = volume();
    let b = volume();
    let pa = Arc::new(CowProvider::new());
    pa.add_volume("a.img", a.clone());
    let pb = Arc::new(CowProvider::new());
    pb.add_volume("b.img", b.clone());
    let mut coord = Coordinator::new();
    coord.add_provider(pa);
    // Storage slow to snapshot: the writer has time to run on between
    // two providers' holds unless both hold until both have committed.
    coord.add_provider(Arc::new(Delayed::new(pb, Duration::from_millis(150))));
    coord.timeouts.hold = Duration::from_secs(5);
    let coord = Arc::new(coord);
    let stop = Arc::new(AtomicBool::new(false));
    let (wa, wb, st) = (a.clone(), b.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut n = 0u64;
        while !st.load(Ordering::SeqCst) {
            n += 1;
            wa.write_at(&n.to_le_bytes(), 0).unwrap();
            wb.write_at(&n.to_le_bytes(), 0).unwrap();
        }
        n
    });
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..3 {
        let doc = backup(&coord, Context::NasRollback, &["a.img", "b.img"]).unwrap();
        let read = |v: &volshadow_cow::Volume, s: &SnapshotRef| {
            let mut buf = [0u8; 8];
            v.snapshot(s.snapshot_id)
                .unwrap()
                .read_at(&mut buf, 0)
                .unwrap();
            u64::from_le_bytes(buf)
        };
        let na = read(&a, doc.snapshot_of("a.img"));
        let nb = read(&b, doc.snapshot_of("b.img"));
        assert!(na > 0, "the writer had not started");
        assert!(
            nb <= na && na <= nb + 1,
            "not one instant: a has {na}, b has {nb}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    assert!(writer.join().unwrap() > 0);
}

trait SnapshotOf {
    fn snapshot_of(&self, volume: &str) -> &SnapshotRef;
}

impl SnapshotOf for BackupDocument {
    fn snapshot_of(&self, volume: &str) -> &SnapshotRef {
        self.snapshots
            .iter()
            .find(|s| s.volume == Path::new(volume))
            .unwrap()
    }
}

#[test]
fn the_whole_write_hold_is_bounded() {
    // The persistent snapshot's flush runs while writes are held; a slow
    // one must not hold writes past the limit.
    let origin = Arc::new(SlowFlush {
        inner: MemDevice::new(1 << 20),
        delay: Duration::from_millis(400),
        slow: AtomicBool::new(false),
    });
    let vol = volume_on(origin.clone());
    let cow = Arc::new(CowProvider::new());
    cow.add_volume("a.img", vol.clone());
    let mut c = Coordinator::new();
    c.add_provider(cow);
    c.timeouts.hold = Duration::from_millis(150);
    let c = Arc::new(c);
    origin.slow.store(true, Ordering::SeqCst);
    let err = backup(&c, Context::NasRollback, &["a.img"]).unwrap_err();
    assert!(matches!(err, VssError::HoldTimedOut(_)), "{err}");
    assert!(
        vol.snapshots().is_empty(),
        "a snapshot of the failed set remains"
    );
    origin.slow.store(false, Ordering::SeqCst);
    backup(&c, Context::NasRollback, &["a.img"]).unwrap();
    assert_eq!(vol.snapshots().len(), 1);
}

#[test]
fn query_delete_and_read_through_the_coordinator() {
    let a = volume();
    let b = volume();
    a.write_at(&[7u8; 4096], 0).unwrap();
    let c = coordinator(vec![], &[("a.img", &a), ("b.img", &b)]);
    let first = backup(&c, Context::NasRollback, &["a.img", "b.img"]).unwrap();
    let second = backup(&c, Context::NasRollback, &["a.img"]).unwrap();
    assert_eq!(c.query().len(), 3);
    assert_eq!(c.query_set(first.set_id).len(), 2);
    a.write_at(&[9u8; 4096], 0).unwrap();
    let snap = &first.snapshots[0];
    let dev = c.open(snap).unwrap();
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 0).unwrap();
    assert_eq!(
        buf,
        vec![7u8; 4096],
        "the snapshot's bytes, not the live volume's"
    );
    assert!(dev.write_at(&buf, 0).is_err(), "read-only");
    drop(dev);
    let gone = c.delete_set(first.set_id).unwrap();
    assert_eq!(gone.len(), 2);
    assert!(b.snapshots().is_empty());
    assert_eq!(a.snapshots().len(), 1);
    assert!(matches!(
        c.delete_set(first.set_id),
        Err(VssError::ObjectNotFound(_))
    ));
    c.delete_snapshot(second.snapshots[0].snapshot_id).unwrap();
    assert!(c.query().is_empty());
}

#[test]
fn providers_are_matched_by_id_not_by_name() {
    let vol = volume();
    vol.write_at(&[1u8; 4096], 0).unwrap();
    let cow = Arc::new(CowProvider::new());
    cow.add_volume("a.img", vol.clone());
    let mut c = Coordinator::new();
    c.add_provider(cow.clone());
    let c = Arc::new(c);
    let doc = backup(&c, Context::AppRollback, &["a.img"]).unwrap();
    assert_eq!(doc.snapshots[0].provider_id, cow.id());
    // Another coordinator where a different provider carries the same
    // name: it must not be handed the snapshot.
    let mut impostor = Delayed::new(cow.clone(), Duration::ZERO);
    impostor.id = Some(Uuid::from_u128(0xbad));
    let mut other = Coordinator::new();
    other.add_provider(Arc::new(impostor));
    let other = Arc::new(other);
    assert!(other.provider_of(&doc.snapshots[0]).is_none());
    assert!(other.open(&doc.snapshots[0]).is_err());
    assert!(other.restore(doc.clone()).is_err());
    assert!(c.provider_of(&doc.snapshots[0]).is_some());
}
