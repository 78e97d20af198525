//! `SnapshotView`: a snapshot as a read-only block device.

use std::sync::Arc;

use uuid::Uuid;
use volshadow_block::{BlockDevice, Op, check_range};

use crate::error::Error;
use crate::volume::Inner;

/// A read-only device showing one snapshot. Reads of a snapshot deleted
/// meanwhile fail with "no snapshot" rather than return other bytes.
#[derive(Debug, Clone)]
pub struct SnapshotView {
    inner: Arc<Inner>,
    id: Uuid,
    seq: u64,
}

impl SnapshotView {
    pub(crate) fn new(inner: Arc<Inner>, id: Uuid, seq: u64) -> Self {
        SnapshotView { inner, id, seq }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl BlockDevice for SnapshotView {
    fn len(&self) -> u64 {
        self.inner.geo.origin_len
    }

    fn block_size(&self) -> u32 {
        self.inner.origin.block_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        check_range(self, Op::Read, offset, buf.len() as u64)?;
        self.inner
            .read_snapshot(self.id, self.seq, offset, buf)
            .map_err(|e| e.into_block(self.name()))?;
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> volshadow_block::Result<()> {
        Err(Error::ReadOnly(self.id).into_block(self.name()))
    }

    fn flush(&self) -> volshadow_block::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> volshadow_block::Result<()> {
        Err(Error::ReadOnly(self.id).into_block(self.name()))
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> volshadow_block::Result<Option<Vec<volshadow_block::Extent>>> {
        check_range(self, Op::Query, offset, len)?;
        self.inner
            .snapshot_allocation(self.seq, offset, len)
            .map_err(|e| e.into_block(self.name()))
    }

    fn name(&self) -> String {
        format!("snapshot {}", self.id)
    }
}
