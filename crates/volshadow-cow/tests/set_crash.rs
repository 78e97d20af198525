//! Crash harness for snapshot sets: two volumes (four devices) on one
//! power rail; the power fails at every operation of a persistent set
//! create in turn, the unflushed writes are cut (dropped, an in-order
//! prefix with a torn last write, or a random subset), both volumes are
//! reopened and in-doubt members resolved. Every outcome must be the whole
//! set on both volumes or none of it, a set whose create returned must be
//! whole, and a member that survives must read its point-in-time bytes.
//!
//! `VOLSHADOW_SET_CRASH_ROUNDS` multiplies the workloads (default 6).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::power::{PowerRig, Rail};
use uuid::Uuid;
use volshadow_block::BlockDevice;
use volshadow_block::conformance::Rng;
use volshadow_cow::{DEFAULT_HOLD_TIMEOUT, SnapshotOptions, SnapshotSet, Volume, VolumeOptions};

const LEN: usize = 256 << 10;
const DIFF: u64 = 2 << 20;

/// Two volumes whose four devices share one power rail.
struct Bench {
    members: [PowerRig; 2],
    rail: Arc<Rail>,
}

impl Bench {
    fn new() -> Self {
        let rail = Arc::new(Rail::default());
        let member = || {
            let rig = PowerRig::new(LEN as u64, DIFF);
            PowerRig {
                rail: rail.clone(),
                ..rig
            }
        };
        Bench {
            members: [member(), member()],
            rail,
        }
    }

    fn cut(&self, rng: &mut Rng, variant: u64) {
        for m in &self.members {
            m.cut(rng, variant);
        }
    }
}

fn persistent() -> SnapshotOptions {
    SnapshotOptions {
        persistent: true,
        ..Default::default()
    }
}

/// Before the set: a persistent snapshot and some writes on each volume,
/// all flushed. Returns the bytes each volume holds at the set's instant.
fn prepare(vols: &[Volume; 2], rng: &mut Rng) -> [Vec<u8>; 2] {
    let mut out = [vec![0u8; LEN], vec![0u8; LEN]];
    for (v, model) in vols.iter().zip(&mut out) {
        v.create_snapshot(persistent()).unwrap();
        for _ in 0..4 {
            let off = rng.below(LEN as u64 - 20_000) as usize;
            let len = 1 + rng.below(20_000) as usize;
            let b = rng.below(256) as u8;
            v.write_at(&vec![b; len], off as u64).unwrap();
            model[off..off + len].fill(b);
        }
        v.flush().unwrap();
    }
    out
}

/// One crash point; `Err` is a violation. `None`: the workload finished
/// before the power failed (`k` is past its end).
fn crash_point(seed: u64, k: u64, variant: u64) -> Option<Result<(), String>> {
    let bench = Bench::new();
    let mut rng = Rng::new(seed);
    bench.rail.arm(u64::MAX);
    let open = |i: usize| bench.members[i].open();
    for m in &bench.members {
        m.create(VolumeOptions {
            chunk_size: 4096,
            journal_half: Some(8192),
            ..Default::default()
        });
    }
    let vols = [open(0).unwrap(), open(1).unwrap()];
    let want = prepare(&vols, &mut rng);
    let set_id = Uuid::new_v4();
    bench.rail.arm(k);
    let created = SnapshotSet::create_located(
        &[&vols[0], &vols[1]],
        &["a".into(), "b".into()],
        SnapshotOptions {
            set_id: Some(set_id),
            ..persistent()
        },
        DEFAULT_HOLD_TIMEOUT,
    );
    // Writes after the set (they must not show in it).
    let after = created.is_ok()
        && vols
            .iter()
            .all(|v| v.write_at(&[0xEE; 8192], 4096).is_ok() && v.flush().is_ok());
    if after && !bench.rail.is_off() {
        return None;
    }
    drop(vols);
    bench.cut(&mut rng, variant);
    // A second power failure during recovery.
    bench.rail.arm(rng.below(8));
    let _ = (open(0), open(1));
    bench.cut(&mut rng, variant);
    bench.rail.arm(u64::MAX);
    let vols = match (open(0), open(1)) {
        (Ok(a), Ok(b)) => [a, b],
        (a, b) => {
            return Some(Err(format!(
                "recovery failed: {:?} / {:?}",
                a.err().map(|e| e.to_string()),
                b.err().map(|e| e.to_string())
            )));
        }
    };
    if let Err(e) = SnapshotSet::resolve(&[&vols[0], &vols[1]]) {
        return Some(Err(format!("resolve: {e}")));
    }
    let has: Vec<Option<Uuid>> = vols
        .iter()
        .map(|v| {
            v.snapshots()
                .iter()
                .find(|s| s.set_id == Some(set_id))
                .map(|s| s.id)
        })
        .collect();
    let check = || -> Result<(), String> {
        if vols.iter().any(|v| !v.in_doubt_sets().is_empty()) {
            return Err("a member is still in doubt".into());
        }
        match (has[0], has[1]) {
            (Some(_), Some(_)) => {}
            (None, None) if created.is_err() => {}
            (None, None) => return Err("a set whose create returned is gone".into()),
            _ => return Err(format!("half a set survived: {has:?}")),
        }
        for ((v, id), want) in vols.iter().zip(&has).zip(&want) {
            if let Some(id) = id {
                let mut got = vec![0u8; LEN];
                v.snapshot(*id)
                    .map_err(|e| e.to_string())?
                    .read_at(&mut got, 0)
                    .map_err(|e| e.to_string())?;
                if got != *want {
                    return Err(format!("member {id} reads wrong bytes"));
                }
            }
        }
        Ok(())
    };
    Some(check())
}

#[test]
fn snapshot_sets_are_whole_or_absent_across_crashes() {
    let rounds: u64 = std::env::var("VOLSHADOW_SET_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let (mut points, mut violations) = (0u64, Vec::new());
    for seed in 1..=rounds {
        for variant in 0..3 {
            let mut k = 0;
            while let Some(r) = crash_point(seed, k, variant) {
                points += 1;
                if let Err(e) = r {
                    violations.push(format!("seed {seed} op {k} variant {variant}: {e}"));
                }
                k += 1;
            }
        }
    }
    for v in violations.iter().take(10) {
        eprintln!("violation: {v}");
    }
    println!(
        "set crash points: {points}, violations: {}",
        violations.len()
    );
    assert!(points > 50, "the set create must take many operations");
    assert!(violations.is_empty(), "{} violations", violations.len());
}
