//! Snapshots: create, list, read, delete, and the extents changed since one.

use std::time::UNIX_EPOCH;

use volshadow_block::BlockDevice;
use volshadow_cow::{SnapshotInfo, SnapshotOptions, Target};

use crate::error::{guard, vs_status};
use crate::{VS_ID_LEN, ptr, vs_volume};

/// A snapshot, as listed.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct vs_snapshot_info {
    /// The snapshot's id.
    pub id: [u8; VS_ID_LEN],
    /// Its snapshot set's id, all zeros when it has none.
    pub set_id: [u8; VS_ID_LEN],
    /// Creation order on this volume, from 1.
    pub seq: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
    /// VSS attribute bits (`VSS_VOLSNAP_ATTR_*`).
    pub attributes: u32,
    /// Survives a crash and a reopen.
    pub persistent: bool,
}

impl From<&SnapshotInfo> for vs_snapshot_info {
    fn from(s: &SnapshotInfo) -> Self {
        vs_snapshot_info {
            id: s.id.into_bytes(),
            set_id: s.set_id.map(|u| u.into_bytes()).unwrap_or_default(),
            seq: s.seq,
            created_unix_ns: s
                .created
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            attributes: s.attributes,
            persistent: s.persistent,
        }
    }
}

/// A byte range of the volume.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct vs_extent {
    pub offset: u64,
    pub length: u64,
}

/// Takes a snapshot: every write that completed before the call is in it,
/// none that starts after it returns is. `persistent` snapshots survive a
/// crash and a reopen. `*out` (may be null) describes it.
///
/// # Safety
/// `volume` is null or a live handle; `out` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_snapshot_create(
    volume: *const vs_volume,
    persistent: bool,
    out: *mut vs_snapshot_info,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promise about `volume`.
        let v = unsafe { ptr::volume(volume) }?;
        let info = v.create_snapshot(SnapshotOptions {
            persistent,
            ..Default::default()
        })?;
        // SAFETY: the caller's promise about `out`.
        unsafe { ptr::store_if(out, vs_snapshot_info::from(&info)) };
        Ok(())
    })
}

/// Lists the live snapshots, oldest first, into `out` (room for
/// `capacity`); `*count` gets how many there are. With `capacity` too
/// small nothing is copied and the call fails with
/// `VS_ERR_BUFFER_TOO_SMALL` (call with `capacity` 0 to ask the count).
///
/// # Safety
/// `volume` is null or a live handle; `out` is null with `capacity` 0 or
/// has room for `capacity` items; `count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_snapshot_list(
    volume: *const vs_volume,
    out: *mut vs_snapshot_info,
    capacity: usize,
    count: *mut usize,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promise about `volume`.
        let v = unsafe { ptr::volume(volume) }?;
        let items: Vec<vs_snapshot_info> = v.snapshots().iter().map(Into::into).collect();
        // SAFETY: the caller's promises about `out`, `capacity`, `count`.
        unsafe { ptr::fill(&items, out, capacity, count) }
    })
}

/// Deletes snapshot `id`, freeing the old data only it needed.
///
/// # Safety
/// `volume` is null or a live handle; `id` is null or has 16 readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_snapshot_delete(volume: *const vs_volume, id: *const u8) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about `volume` and `id`.
        let (v, id) = unsafe { (ptr::volume(volume)?, ptr::id(id, "id")?) };
        v.delete_snapshot(id)?;
        Ok(())
    })
}

/// Reads `len` bytes of snapshot `id` at `offset` into `buf`: the volume's
/// contents when the snapshot was taken. Old data is checked against its
/// checksum; damaged data fails the read (`VS_ERR_CORRUPT`) rather than
/// come back wrong.
///
/// # Safety
/// `volume` is null or a live handle; `id` is null or has 16 readable
/// bytes; `buf` is null with `len` 0 or has `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_snapshot_read(
    volume: *const vs_volume,
    id: *const u8,
    offset: u64,
    buf: *mut u8,
    len: usize,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about `volume`, `id` and `buf`.
        let (v, id, buf) = unsafe {
            (
                ptr::volume(volume)?,
                ptr::id(id, "id")?,
                ptr::bytes_mut(buf, len, "buf")?,
            )
        };
        v.snapshot(id)?.read_at(buf, offset)?;
        Ok(())
    })
}

/// The byte ranges changed between snapshot `from` and snapshot `to`, or
/// the live volume when `to` is null: sorted, merged, whole chunks. Copy
/// these ranges of the newer side to bring a copy of `from` up to date.
/// Filled as `vs_snapshot_list` fills (`capacity`, `*count`).
///
/// # Safety
/// `volume` is null or a live handle; `from` is null or has 16 readable
/// bytes; `to` is null or has 16 readable bytes; `out` is null with
/// `capacity` 0 or has room for `capacity` items; `count` is null or valid
/// for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vs_changed_extents(
    volume: *const vs_volume,
    from: *const u8,
    to: *const u8,
    out: *mut vs_extent,
    capacity: usize,
    count: *mut usize,
) -> vs_status {
    guard(|| {
        // SAFETY: the caller's promises about `volume` and `from`.
        let (v, from) = unsafe { (ptr::volume(volume)?, ptr::id(from, "from")?) };
        let to = if to.is_null() {
            Target::Live
        } else {
            // SAFETY: not null, so 16 readable bytes by the caller's promise.
            Target::Snapshot(unsafe { ptr::id(to, "to") }?)
        };
        let items: Vec<vs_extent> = v
            .changed_extents(from, to)?
            .iter()
            .map(|e| vs_extent {
                offset: e.offset,
                length: e.len,
            })
            .collect();
        // SAFETY: the caller's promises about `out`, `capacity`, `count`.
        unsafe { ptr::fill(&items, out, capacity, count) }
    })
}
