//! A VSS-style backup driven from your own program: a requester using the
//! vss crate, with a writer of its own (an application that keeps records
//! in memory and flushes them when asked to freeze), copying the snapshot
//! to backup media and writing the backup components document.
//!
//! `cargo run --release --example backup`

use std::error::Error;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use uuid::Uuid;
use volshadow::block::{BlockDevice, FileImage};
use volshadow::cow::{Volume, VolumeOptions};
use volshadow::vss::{
    BackupDocument, BackupType, Component, Context, Coordinator, CowProvider, EventContext,
    FailureKind, RestoreMethod, UsageType, Writer, WriterFailure, WriterMetadata, WriterResult,
};

/// Bytes per record in the application's log.
const RECORD: usize = 512;

/// An application that appends fixed-size records to a log on the volume,
/// buffering them in memory until it flushes. Frozen, it refuses appends
/// (a real one would make callers wait).
struct RecordLog {
    volume: Volume,
    volume_path: PathBuf,
    /// Records appended but not yet on the volume.
    pending: Mutex<Vec<u8>>,
    /// Where the next flushed record goes.
    end: Mutex<u64>,
    frozen: AtomicBool,
}

impl RecordLog {
    fn append(&self, text: &str) -> Result<(), Box<dyn Error>> {
        if self.frozen.load(Ordering::Acquire) {
            return Err("the log is frozen for a snapshot".into());
        }
        let mut record = [b' '; RECORD];
        let n = text.len().min(RECORD);
        record[..n].copy_from_slice(&text.as_bytes()[..n]);
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(&record);
        Ok(())
    }

    /// Writes the pending records to the volume and makes them durable.
    fn flush(&self) -> volshadow::block::Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let mut end = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        self.volume.write_at(&pending, *end)?;
        self.volume.flush()?;
        *end += pending.len() as u64;
        pending.clear();
        Ok(())
    }
}

impl Writer for RecordLog {
    fn identify(&self) -> Result<WriterMetadata, WriterFailure> {
        // A writer's id is fixed across runs ("RecordLog" in ASCII).
        Ok(WriterMetadata {
            name: "record-log".into(),
            writer_id: Uuid::from_u128(0x0052_6563_6f72_644c_6f67),
            instance_id: Uuid::from_u128(1),
            usage: UsageType::UserData,
            restore_method: RestoreMethod::StopRestoreStart,
            components: vec![Component {
                logical_path: "records".into(),
                name: "log".into(),
                paths: vec![PathBuf::from("/var/lib/records")],
                volumes: vec![self.volume_path.clone()],
                selectable: true,
            }],
        })
    }

    fn freeze(&self, _event: &EventContext) -> WriterResult {
        // Stop taking records, then put every one taken on the volume:
        // the snapshot sees a log with nothing half written.
        self.frozen.store(true, Ordering::Release);
        self.flush()
            .map_err(|e| WriterFailure::new(FailureKind::Retryable, e.to_string()))
    }

    fn thaw(&self, _event: &EventContext) -> WriterResult {
        self.frozen.store(false, Ordering::Release);
        Ok(())
    }

    /// An aborted set gets `abort` alone, no `thaw`: take records again.
    fn abort(&self, _event: &EventContext) -> WriterResult {
        self.frozen.store(false, Ordering::Release);
        Ok(())
    }
}

/// Copies a whole device to `out` in 1 MiB pieces; returns the bytes.
fn copy_device(device: &dyn BlockDevice, out: &Path) -> Result<u64, Box<dyn Error>> {
    let mut file = File::create(out)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < device.len() {
        let n = (device.len() - offset).min(buf.len() as u64) as usize;
        device.read_at(&mut buf[..n], offset)?;
        file.write_all(&buf[..n])?;
        offset += n as u64;
    }
    file.sync_all()?;
    Ok(offset)
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("data.img");
    let volume = Volume::create(
        Arc::new(FileImage::create(&image, 16 << 20)?),
        Arc::new(FileImage::create(dir.path().join("data.diff"), 8 << 20)?),
        VolumeOptions::default(),
    )?;
    let app = Arc::new(RecordLog {
        volume: volume.clone(),
        volume_path: image.clone(),
        pending: Mutex::new(Vec::new()),
        end: Mutex::new(0),
        frozen: AtomicBool::new(false),
    });
    for i in 0..100 {
        app.append(&format!("record {i}: flushed before the backup"))?;
    }
    app.flush()?;
    for i in 100..150 {
        app.append(&format!("record {i}: still in memory at freeze"))?;
    }

    let provider = Arc::new(CowProvider::new());
    provider.add_volume(&image, volume.clone());
    let mut coordinator = Coordinator::new();
    coordinator.add_provider(provider);
    coordinator.add_writer(app.clone());
    let coordinator = Arc::new(coordinator);

    // The requester, in VSS's order. `Context::Backup`: the snapshot is
    // non-persistent and released when the backup completes.
    let mut session = coordinator.backup();
    session.initialize_for_backup()?;
    session.set_context(Context::Backup)?;
    session.set_backup_state(BackupType::Full, None)?;
    let writers = session.gather_writer_metadata()?;
    for w in &writers {
        for c in &w.components {
            session.add_component(w.writer_id, &c.full_path())?;
        }
    }
    session.start_snapshot_set()?;
    let provider_name = session.add_to_snapshot_set(&image)?;
    session.prepare_for_backup()?;
    session.do_snapshot_set()?;

    // The application goes on at once; this record is not in the backup.
    app.append("record 150: after the snapshot")?;
    app.flush()?;

    let snapshot = session
        .snapshot_of(&image)
        .ok_or("the snapshot set has no snapshot of the volume")?
        .snapshot_id;
    let copy = dir.path().join("backup.raw");
    let copied = copy_device(&volume.snapshot(snapshot)?, &copy)?;
    for w in &writers {
        for c in &w.components {
            session.backup_component_succeeded(&c.full_path())?;
        }
    }
    let document = session.backup_complete()?;
    let document_path = dir.path().join("backup.json");
    std::fs::write(&document_path, document.to_json())?;

    // Check the backup as a restore would see it.
    let mut log = Vec::new();
    File::open(&copy)?.read_to_end(&mut log)?;
    let records: Vec<String> = log
        .chunks(RECORD)
        .take_while(|r| r.iter().any(|&b| b != 0))
        .map(|r| String::from_utf8_lossy(r).trim_end().to_string())
        .collect();
    if records.len() != 150 || !records[149].starts_with("record 149: still in memory") {
        return Err(format!("the backup holds {} records, expected 150", records.len()).into());
    }
    let reread = BackupDocument::from_json(&std::fs::read_to_string(&document_path)?)?;
    if reread != document || !reread.components.iter().all(|c| c.backup_succeeded) {
        return Err("the backup document does not read back as written".into());
    }
    if !volume.snapshots().is_empty() {
        return Err("the backup's snapshot was not released".into());
    }

    println!(
        "backup: {} writer(s), snapshot made by {provider_name:?}, {} MiB copied",
        writers.len(),
        copied >> 20
    );
    println!(
        "backup: the copy holds all {} records taken before the freeze (50 flushed by the writer's freeze), not the one after",
        records.len()
    );
    println!(
        "backup: document ({} bytes): set {}, components {:?}; snapshot released at completion",
        document.to_json().len(),
        document.set_id,
        document
            .components
            .iter()
            .map(|c| c.full_path.as_str())
            .collect::<Vec<_>>()
    );
    Ok(())
}
