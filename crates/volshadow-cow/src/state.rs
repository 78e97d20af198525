//! The journaled state: snapshots, versions, slots and limits, with the
//! journal inside, so "append a record and apply it" is one critical
//! section and a checkpoint always matches the records before it.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::format::{
    FullPolicy, InDoubtRecord, Record, RevertState, SnapshotRecord, VersionRecord,
};
use crate::index::{SlotAllocator, VersionIndex};
use crate::journal::Journal;

/// Versions per checkpoint record.
const CHECKPOINT_BATCH: usize = 4096;

/// Mutable engine state, including the journal.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) snapshots: BTreeMap<u64, SnapshotRecord>,
    pub(crate) index: VersionIndex,
    pub(crate) slots: SlotAllocator,
    pub(crate) max_slots: u64,
    pub(crate) policy: FullPolicy,
    pub(crate) next_seq: u64,
    pub(crate) revert: Option<RevertState>,
    pub(crate) journal: Journal,
    pub(crate) chunk: u64,
    /// Copies made without records since the last checkpoint (no
    /// persistent snapshot existed). Replaying the journal would then
    /// rebuild an index without them, and deletes would retag and free
    /// differently than in memory; the next persistent snapshot writes a
    /// checkpoint first so that replay starts from the real index.
    pub(crate) unjournaled: bool,
    /// Snapshots of sets not known to have committed, by seq.
    pub(crate) in_doubt: BTreeMap<u64, InDoubtRecord>,
}

impl State {
    pub(crate) fn newest(&self) -> Option<u64> {
        self.snapshots.keys().next_back().copied()
    }

    pub(crate) fn any_persistent(&self) -> bool {
        self.snapshots.values().any(|s| s.persistent)
    }

    pub(crate) fn checkpoint_records(&self) -> Vec<Record> {
        let mut out = vec![Record::Checkpoint {
            next_seq: self.next_seq,
            max_bytes: self.max_slots * self.chunk,
            policy: self.policy,
            snapshots: self.snapshots.values().cloned().collect(),
            revert: self.revert,
        }];
        if !self.in_doubt.is_empty() {
            out.push(Record::CheckpointInDoubt(
                self.in_doubt.values().cloned().collect(),
            ));
        }
        let all: Vec<VersionRecord> = self.index.iter().collect();
        out.extend(
            all.chunks(CHECKPOINT_BATCH)
                .map(|b| Record::CheckpointVersions(b.to_vec())),
        );
        out.push(Record::CheckpointEnd {
            versions: all.len() as u64,
        });
        out
    }

    /// Compacts the journal into its other half.
    pub(crate) fn compact(&mut self) -> Result<()> {
        let records = self.checkpoint_records();
        let id = self.journal.superblock().origin_id;
        self.journal.checkpoint(records, id)?;
        self.unjournaled = false;
        Ok(())
    }

    /// Journals `records` in as few writes as fit, compacting whenever the
    /// active half is full. `logged` applies each record to the in-memory
    /// state right after it is appended, before any later compaction, so a
    /// checkpoint always holds every record before it: a batch of any size
    /// survives compactions in its middle.
    pub(crate) fn log_batch(
        &mut self,
        records: &[Record],
        mut logged: impl FnMut(&mut Self, &Record),
    ) -> Result<()> {
        let mut done = 0;
        let mut compacted = false;
        while done < records.len() {
            let n = self.journal.append_fitting(&records[done..])?;
            if n == 0 {
                if compacted {
                    return Err(Error::JournalTooSmall {
                        needed: self.journal.superblock().journal_half + 1,
                        capacity: self.journal.superblock().journal_half,
                    });
                }
                self.compact()?;
                compacted = true;
                continue;
            }
            compacted = false;
            for r in &records[done..done + n] {
                logged(self, r);
            }
            done += n;
        }
        Ok(())
    }

    /// Appends a record, compacting first if the active half is full. The
    /// caller applies it to the state.
    pub(crate) fn log(&mut self, rec: Record) -> Result<()> {
        self.log_batch(std::slice::from_ref(&rec), |_, _| {})
    }

    /// Removes snapshot `seq` from memory; returns the slots nobody needs.
    pub(crate) fn forget(&mut self, seq: u64) -> Vec<u32> {
        self.snapshots.remove(&seq);
        self.in_doubt.remove(&seq);
        let pred = self.snapshots.range(..seq).next_back().map(|(&s, _)| s);
        self.index.drop_tag(seq, pred)
    }

    /// The live snapshots that read version `v` (those after the
    /// previous version of its chunk, up to its tag).
    pub(crate) fn readers(&self, v: VersionRecord) -> Vec<Uuid> {
        let low = self.index.prev_tag(v.chunk, v.tag).unwrap_or(0);
        self.snapshots
            .range(low + 1..=v.tag)
            .map(|(_, s)| Uuid::from_bytes(s.id))
            .collect()
    }

    /// A usable snapshot: live and not in doubt.
    pub(crate) fn find(&self, id: Uuid) -> Result<u64> {
        let seq = self.find_any(id)?;
        match self.in_doubt.get(&seq) {
            Some(d) => Err(Error::SetInDoubt {
                snapshot: id,
                set: Uuid::from_bytes(d.set_id),
            }),
            None => Ok(seq),
        }
    }

    /// A live snapshot, in doubt or not.
    pub(crate) fn find_any(&self, id: Uuid) -> Result<u64> {
        self.snapshots
            .values()
            .find(|s| s.id == *id.as_bytes())
            .map(|s| s.seq)
            .ok_or(Error::SnapshotNotFound(id))
    }

    pub(crate) fn usable(&self) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .values()
            .filter(|s| !self.in_doubt.contains_key(&s.seq))
    }
}

impl State {
    /// The state before replay: no snapshots, no versions.
    pub(crate) fn empty(journal: Journal, chunk: u64) -> Self {
        State {
            snapshots: BTreeMap::new(),
            index: VersionIndex::default(),
            slots: SlotAllocator::new(0),
            max_slots: 0,
            policy: FullPolicy::default(),
            next_seq: 1,
            revert: None,
            journal,
            chunk,
            unjournaled: false,
            in_doubt: BTreeMap::new(),
        }
    }
}
