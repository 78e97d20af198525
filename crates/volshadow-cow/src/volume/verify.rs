//! Verify: every preserved copy against its slot entry and blake3, and
//! the structures around them.

use tracing::warn;
use volshadow_block::BlockDevice;

use crate::error::Result;
use crate::format::{SlotEntry, VersionRecord};
use crate::journal::Journal;
use crate::recovery::{entry_holds, read_entry};
use crate::types::{Mismatch, VerifyReport};

use super::{Inner, Volume};

impl Volume {
    /// Rereads every preserved chunk and checks it against its hash.
    ///
    /// # Example
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use volshadow_block::{BlockDevice, MemDevice};
    /// # use volshadow_cow::{SnapshotOptions, Target, Volume, VolumeOptions};
    /// # let vol = Volume::create(
    /// #     Arc::new(MemDevice::new(1 << 20)),
    /// #     Arc::new(MemDevice::new(8 << 20)),
    /// #     VolumeOptions::default(),
    /// # )?;
    /// vol.create_snapshot(SnapshotOptions { persistent: true, ..Default::default() })?;
    /// vol.write_at(&[1; 8192], 0)?; // preserves one chunk
    /// let report = vol.verify()?;
    /// assert_eq!(report.checked, 1);
    /// assert!(report.is_clean());
    /// # Ok::<(), volshadow_cow::Error>(())
    /// ```
    pub fn verify(&self) -> Result<VerifyReport> {
        self.verify_with_progress(|_, _| {})
    }

    /// `verify`, calling `progress(done, total)` as it goes. Checks every
    /// preserved copy against its slot entry (chunk, crc32c, and blake3
    /// where recorded), both superblock copies, and that the journal's
    /// active half replays every record written to it.
    pub fn verify_with_progress(&self, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport> {
        let inner = &self.inner;
        let versions: Vec<VersionRecord> = inner.state_read().index.iter().collect();
        let total = versions.len() as u64;
        let mut mismatches = Vec::new();
        let mut buf = vec![0u8; inner.geo.chunk as usize];
        let (mut checked, mut unhashed) = (0, 0);
        for (i, v) in versions.into_iter().enumerate() {
            let _stripe = inner.stripe(v.chunk as u64);
            let st = inner.state_read();
            // Skip versions freed since the list was taken.
            if st.index.lookup(v.chunk, v.tag) != Some((v.tag, v.slot)) {
                continue;
            }
            let (offset, len) = inner.geo.chunk_range(v.chunk as u64);
            inner
                .diff
                .read_at(&mut buf[..len], inner.geo.slot_offset(v.slot))?;
            let entry = read_entry(&*inner.diff, &inner.geo, v.slot)?;
            let bytes = &buf[..len];
            let good = if inner.format == 1 {
                entry_holds(1, &entry, v.chunk, bytes)
            } else {
                match SlotEntry::decode(&entry) {
                    Some(e) if e.hash.is_none() => {
                        unhashed += 1;
                        e.holds(v.chunk, bytes)
                    }
                    Some(e) => {
                        e.holds(v.chunk, bytes) && e.hash_matches(blake3::hash(bytes).as_bytes())
                    }
                    None => false,
                }
            };
            checked += 1;
            let damaged = inner
                .doubts
                .as_ref()
                .is_some_and(|d| d.versions.contains(&(v.chunk, v.slot)));
            if !good || damaged {
                let snapshots = st.readers(v);
                warn!(
                    chunk = v.chunk,
                    slot = v.slot,
                    "preserved chunk fails its checksum"
                );
                mismatches.push(Mismatch {
                    chunk: v.chunk as u64,
                    offset,
                    slot: v.slot,
                    snapshots,
                });
            }
            progress(i as u64 + 1, total);
        }
        let problems = inner.check_structure()?;
        Ok(VerifyReport {
            checked,
            unhashed,
            mismatches,
            problems,
        })
    }
}

impl Inner {
    /// Damage outside the copies: superblock copies, the journal's active
    /// half, and what a salvage open could not vouch for.
    pub(super) fn check_structure(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for copy in 0..2 {
            if let Err(e) = Journal::read_superblock_copy(&*self.diff, copy)? {
                problems.push(format!("superblock copy {copy} is damaged ({e})"));
            }
        }
        let st = self.state_read();
        if self.doubts.is_none() {
            let replay = st.journal.replay()?;
            let written = st.journal.next_seq();
            if (replay.records.len() as u64) < written {
                let at = replay.cut.as_ref().map_or(0, |c| c.offset);
                problems.push(format!(
                    "journal record {} at offset {at} is damaged: {} of {written} records replay",
                    replay.records.len(),
                    replay.records.len()
                ));
            }
        }
        drop(st);
        if let Some(d) = &self.doubts {
            problems.extend(self.notes.iter().cloned());
            if d.all_origin_reads {
                problems.push(
                    "salvage: the journal is damaged; snapshot reads of chunks not in the diff area fail".into(),
                );
            }
        }
        Ok(problems)
    }
}
