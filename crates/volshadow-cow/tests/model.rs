//! Model-based test: random operations on a volume and on a model that
//! keeps full copies of the live volume and of every snapshot; after each
//! step the bytes of the live volume and every snapshot are compared.
//!
//! Cases: `VOLSHADOW_PROPTEST_CASES` (default 1000).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::Config;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use uuid::Uuid;
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_cow::{Extent, SnapshotOptions, Target, Volume, VolumeOptions};

const LEN: usize = 64 << 10;
const CHUNK: usize = 4096;
const MAX_SNAPS: usize = 10;

#[derive(Clone, Debug)]
struct Snap {
    persistent: bool,
    data: Vec<u8>,
    /// Logical time of creation, for changed-extent expectations.
    born: u64,
}

#[derive(Clone, Debug)]
struct Model {
    live: Vec<u8>,
    snaps: Vec<Snap>,
    clock: u64,
    /// (time, chunk) of every chunk write, for changed extents.
    writes: Vec<(u64, usize)>,
}

impl Model {
    fn touch(&mut self, off: usize, len: usize) {
        self.clock += 1;
        for c in off / CHUNK..=(off + len - 1) / CHUNK {
            self.writes.push((self.clock, c));
        }
    }

    fn changed(&self, from: u64, to: u64) -> Vec<Extent> {
        common::model_changed(&self.writes, from, to, CHUNK)
    }
}

#[derive(Clone, Debug)]
enum Step {
    Write { off: usize, len: usize, byte: u8 },
    Discard { off: usize, len: usize },
    Snapshot { persistent: bool },
    Delete(usize),
    DeleteOldest,
    Revert(usize),
    Changed { from: usize, to: Option<usize> },
    Reopen,
    Verify,
}

fn range() -> impl Strategy<Value = (usize, usize)> {
    (0..LEN).prop_flat_map(|off| (Just(off), 1..=(LEN - off).min(3 * CHUNK + 100)))
}

struct Ref;

impl ReferenceStateMachine for Ref {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            live: vec![0u8; LEN],
            snaps: Vec::new(),
            clock: 0,
            writes: Vec::new(),
        })
        .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let n = state.snaps.len().max(1);
        prop_oneof![
            6 => (range(), any::<u8>()).prop_map(|((off, len), byte)| Step::Write { off, len, byte }),
            1 => range().prop_map(|(off, len)| Step::Discard { off, len }),
            3 => any::<bool>().prop_map(|persistent| Step::Snapshot { persistent }),
            1 => (0..n).prop_map(Step::Delete),
            1 => Just(Step::DeleteOldest),
            1 => (0..n).prop_map(Step::Revert),
            2 => (0..n, proptest::option::of(0..n)).prop_map(|(from, to)| Step::Changed { from, to }),
            1 => Just(Step::Reopen),
            1 => Just(Step::Verify),
        ]
        .boxed()
    }

    fn preconditions(state: &Model, step: &Step) -> bool {
        let n = state.snaps.len();
        match step {
            Step::Snapshot { .. } => n < MAX_SNAPS,
            Step::Delete(i) => *i < n,
            Step::Revert(i) => *i < n && state.snaps[*i].persistent,
            Step::Changed { from, to } => *from < n && to.is_none_or(|t| t < n && t >= *from),
            _ => true,
        }
    }

    fn apply(mut m: Model, step: &Step) -> Model {
        match *step {
            Step::Write { off, len, byte } => {
                m.live[off..off + len].fill(byte);
                m.touch(off, len);
            }
            Step::Discard { off, len } => {
                m.live[off..off + len].fill(0);
                m.touch(off, len);
            }
            Step::Snapshot { persistent } => {
                m.clock += 1;
                let snap = Snap {
                    persistent,
                    data: m.live.clone(),
                    born: m.clock,
                };
                m.snaps.push(snap);
            }
            Step::Delete(i) => {
                m.snaps.remove(i);
            }
            Step::DeleteOldest => {
                if !m.snaps.is_empty() {
                    m.snaps.remove(0);
                }
            }
            Step::Revert(i) => {
                // The engine rewrites exactly the chunks changed since the
                // snapshot whose bytes differ from it; they count as writes.
                let born = m.snaps[i].born;
                let cs = CHUNK;
                let target = &m.snaps[i].data;
                let chunks: BTreeSet<usize> = m
                    .writes
                    .iter()
                    .filter(|(t, _)| *t > born)
                    .map(|&(_, c)| c)
                    .filter(|&c| m.live[c * cs..(c + 1) * cs] != target[c * cs..(c + 1) * cs])
                    .collect();
                m.live = m.snaps[i].data.clone();
                m.clock += 1;
                for c in chunks {
                    m.writes.push((m.clock, c));
                }
            }
            Step::Reopen => m.snaps.retain(|s| s.persistent),
            Step::Changed { .. } | Step::Verify => {}
        }
        m
    }
}

struct Sut {
    origin: Arc<MemDevice>,
    diff: Arc<MemDevice>,
    vol: Volume,
    /// Ids parallel to the model's snapshots.
    ids: Vec<Uuid>,
    persistent: Vec<bool>,
    /// Model snapshots' logical birth times, parallel to `ids`.
    born: Vec<u64>,
}

struct EngineTest;

impl StateMachineTest for EngineTest {
    type SystemUnderTest = Sut;
    type Reference = Ref;

    fn init_test(_: &Model) -> Sut {
        let origin = Arc::new(MemDevice::new(LEN as u64));
        let diff = Arc::new(MemDevice::new(8 << 20));
        let vol = Volume::create(
            origin.clone(),
            diff.clone(),
            VolumeOptions {
                chunk_size: CHUNK as u32,
                // Small halves: checkpoints happen every few hundred records.
                journal_half: Some(8192),
                ..Default::default()
            },
        )
        .unwrap();
        Sut {
            origin,
            diff,
            vol,
            ids: Vec::new(),
            persistent: Vec::new(),
            born: Vec::new(),
        }
    }

    fn apply(mut s: Sut, m: &Model, step: Step) -> Sut {
        match step {
            Step::Write { off, len, byte } => {
                s.vol.write_at(&vec![byte; len], off as u64).unwrap();
            }
            Step::Discard { off, len } => s.vol.discard(off as u64, len as u64).unwrap(),
            Step::Snapshot { persistent } => {
                let info = s
                    .vol
                    .create_snapshot(SnapshotOptions {
                        persistent,
                        ..Default::default()
                    })
                    .unwrap();
                assert_eq!(info.persistent, persistent);
                s.ids.push(info.id);
                s.persistent.push(persistent);
                s.born.push(m.snaps.last().unwrap().born);
            }
            Step::Delete(i) => {
                s.vol.delete_snapshot(s.ids.remove(i)).unwrap();
                s.persistent.remove(i);
                s.born.remove(i);
            }
            Step::DeleteOldest => {
                let gone = s.vol.delete_oldest().unwrap();
                assert_eq!(gone.map(|g| g.id), s.ids.first().copied());
                if !s.ids.is_empty() {
                    s.ids.remove(0);
                    s.persistent.remove(0);
                    s.born.remove(0);
                }
            }
            Step::Revert(i) => s.vol.revert(s.ids[i]).unwrap(),
            Step::Changed { from, to } => {
                let target = to.map_or(Target::Live, |t| Target::Snapshot(s.ids[t]));
                let got = s.vol.changed_extents(s.ids[from], target).unwrap();
                let end = to.map_or(u64::MAX, |t| m.snaps[t].born);
                assert_eq!(got, m.changed(m.snaps[from].born, end), "changed extents");
            }
            Step::Reopen => {
                // Closed before the next open, as a process ends before
                // another starts: one handle on a diff area at a time.
                s.vol.close().unwrap();
                s.vol = Volume::open(s.origin.clone(), s.diff.clone()).unwrap();
                let keep: Vec<bool> = s.persistent.clone();
                let mut k = keep.iter();
                s.ids.retain(|_| *k.next().unwrap());
                let mut k = keep.iter();
                s.born.retain(|_| *k.next().unwrap());
                s.persistent.retain(|p| *p);
            }
            Step::Verify => {
                let r = s.vol.verify().unwrap();
                assert!(r.mismatches.is_empty(), "{r:?}");
            }
        }
        s
    }

    fn check_invariants(s: &Sut, m: &Model) {
        let mut live = vec![0u8; LEN];
        s.vol.read_at(&mut live, 0).unwrap();
        assert!(live == m.live, "live volume differs from the model");
        let listed: Vec<Uuid> = s.vol.snapshots().into_iter().map(|i| i.id).collect();
        assert_eq!(listed, s.ids, "snapshot list");
        for (i, id) in s.ids.iter().enumerate() {
            let mut buf = vec![0u8; LEN];
            s.vol.snapshot(*id).unwrap().read_at(&mut buf, 0).unwrap();
            assert!(
                buf == m.snaps[i].data,
                "snapshot {i} differs from the model"
            );
            // Reads that start and end inside chunks, across chunk runs
            // that live in different places.
            for (off, len) in [
                (1, 2 * CHUNK + 5),
                (CHUNK - 1, 2),
                (LEN - CHUNK - 7, CHUNK + 7),
            ] {
                let mut part = vec![0u8; len];
                s.vol
                    .snapshot(*id)
                    .unwrap()
                    .read_at(&mut part, off as u64)
                    .unwrap();
                assert!(
                    part[..] == m.snaps[i].data[off..off + len],
                    "snapshot {i} differs from the model at {off}+{len}"
                );
            }
        }
        let u = s.vol.usage();
        assert!(u.used_bytes <= u.max_bytes);
        // One copy per chunk per interval: never more copies than
        // chunks times live snapshots.
        assert!(u.preserved_chunks <= (LEN / CHUNK * s.ids.len()) as u64);
        if s.ids.is_empty() {
            assert_eq!(u.used_bytes, 0, "slots leaked with no snapshot left");
        }
    }
}

fn cases() -> u32 {
    std::env::var("VOLSHADOW_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

prop_state_machine! {
    #![proptest_config(Config {
        cases: cases(),
        failure_persistence: None,
        .. Config::default()
    })]

    #[test]
    fn engine_matches_model(sequential 1..40 => EngineTest);
}
