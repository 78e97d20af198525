//! What the protocol tests share: a scriptable writer, volumes, devices
//! and providers with injected delays, a whole backup in VSS order.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;
use volshadow_block::{BlockDevice, MemDevice};
use volshadow_cow::{Volume, VolumeOptions};
use volshadow_vss::*;

/// A writer that records its calls and the context each saw, and can
/// fail or stall at one phase, write a marker to a volume when it freezes
/// and thaws, and tell whether it is frozen.
pub struct TestWriter {
    pub name: String,
    pub id: Uuid,
    pub instance: Uuid,
    pub fail_at: Option<Phase>,
    pub sleep_at: Option<(Phase, Duration)>,
    pub own_timeout: Option<Duration>,
    pub log: Mutex<Vec<String>>,
    pub seen: Mutex<Vec<(Phase, EventContext)>>,
    pub marker: Option<Volume>,
    pub components: Vec<Component>,
    pub restore_method: RestoreMethod,
    pub frozen: AtomicBool,
}

pub fn component(logical_path: &str, name: &str, volumes: &[&str], selectable: bool) -> Component {
    Component {
        logical_path: logical_path.into(),
        name: name.into(),
        paths: vec![PathBuf::from(format!("/data/{name}"))],
        volumes: volumes.iter().map(PathBuf::from).collect(),
        selectable,
    }
}

impl TestWriter {
    pub fn new(name: &str) -> Self {
        TestWriter {
            name: name.into(),
            id: Uuid::new_v4(),
            instance: Uuid::new_v4(),
            fail_at: None,
            sleep_at: None,
            own_timeout: None,
            log: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            marker: None,
            components: vec![component("app", "db", &["a.img"], true)],
            restore_method: RestoreMethod::RestoreIfCanReplace,
            frozen: AtomicBool::new(false),
        }
    }

    fn step(&self, phase: Phase, ctx: &EventContext) -> WriterResult {
        self.log.lock().unwrap().push(phase.to_string());
        self.seen.lock().unwrap().push((phase, ctx.clone()));
        if let Some((p, d)) = self.sleep_at
            && p == phase
        {
            std::thread::sleep(d);
        }
        if let Some(v) = &self.marker {
            match phase {
                Phase::Freeze => v.write_at(b"FROZEN", 0).unwrap(),
                Phase::Thaw => v.write_at(b"THAWED", 4096).unwrap(),
                _ => {}
            }
        }
        if self.fail_at == Some(phase) {
            return Err(WriterFailure::new(
                FailureKind::Retryable,
                format!("{} says no", self.name),
            ));
        }
        match phase {
            Phase::Freeze => self.frozen.store(true, Ordering::SeqCst),
            Phase::Thaw | Phase::Abort => self.frozen.store(false, Ordering::SeqCst),
            _ => {}
        }
        Ok(())
    }

    pub fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Writer for TestWriter {
    fn identify(&self) -> Result<WriterMetadata, WriterFailure> {
        self.log.lock().unwrap().push("identify".into());
        if self.fail_at == Some(Phase::Identify) {
            return Err(WriterFailure::new(
                FailureKind::NonRetryable,
                "cannot identify",
            ));
        }
        Ok(WriterMetadata {
            name: self.name.clone(),
            writer_id: self.id,
            instance_id: self.instance,
            usage: UsageType::UserData,
            restore_method: self.restore_method,
            components: self.components.clone(),
        })
    }
    fn timeout(&self) -> Option<Duration> {
        self.own_timeout
    }
    fn prepare_for_backup(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::PrepareBackup, c)
    }
    fn prepare_for_snapshot(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::PrepareSnapshot, c)
    }
    fn freeze(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::Freeze, c)
    }
    fn thaw(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::Thaw, c)
    }
    fn post_snapshot(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::PostSnapshot, c)
    }
    fn backup_complete(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::BackupComplete, c)
    }
    fn backup_shutdown(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::BackupShutdown, c)
    }
    fn abort(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::Abort, c)
    }
    fn pre_restore(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::PreRestore, c)
    }
    fn post_restore(&self, c: &EventContext) -> WriterResult {
        self.step(Phase::PostRestore, c)
    }
}

pub fn volume() -> Volume {
    volume_on(Arc::new(MemDevice::new(1 << 20)))
}

pub fn volume_on(origin: Arc<dyn BlockDevice>) -> Volume {
    Volume::create(
        origin,
        Arc::new(MemDevice::new(8 << 20)),
        VolumeOptions::default(),
    )
    .unwrap()
}

pub fn coordinator(writers: Vec<Arc<dyn Writer>>, vols: &[(&str, &Volume)]) -> Arc<Coordinator> {
    let cow = Arc::new(CowProvider::new());
    for (p, v) in vols {
        cow.add_volume(*p, (*v).clone());
    }
    let mut c = Coordinator::new();
    c.add_provider(cow);
    for w in writers {
        c.add_writer(w);
    }
    c.timeouts.freeze = Duration::from_millis(500);
    c.timeouts.event = Duration::from_secs(1);
    Arc::new(c)
}

/// Runs a whole backup of the given volumes, selecting every selectable
/// component; returns the document.
pub fn backup(c: &Arc<Coordinator>, ctx: Context, vols: &[&str]) -> VssResult<BackupDocument> {
    let mut s = c.backup();
    s.initialize_for_backup()?;
    s.set_context(ctx)?;
    s.set_backup_state(BackupType::Full, None)?;
    let meta = s.gather_writer_metadata()?;
    for m in &meta {
        for comp in m.components.iter().filter(|c| c.selectable) {
            s.add_component(m.writer_id, &comp.full_path())?;
        }
    }
    s.start_snapshot_set()?;
    for v in vols {
        s.add_to_snapshot_set(Path::new(v))?;
    }
    s.prepare_for_backup()?;
    s.do_snapshot_set()?;
    let vetoed: Vec<String> = s.vetoes().into_iter().map(|(n, _, _)| n).collect();
    for m in meta.iter().filter(|m| !vetoed.contains(&m.name)) {
        for comp in m.components.iter().filter(|c| c.selectable) {
            s.backup_component_succeeded(&comp.full_path())?;
        }
    }
    s.backup_complete()
}

/// A device whose flushes take `delay` while `slow` is set.
#[derive(Debug)]
pub struct SlowFlush {
    pub inner: MemDevice,
    pub delay: Duration,
    pub slow: AtomicBool,
}

impl BlockDevice for SlowFlush {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> volshadow_block::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> volshadow_block::Result<()> {
        if self.slow.load(Ordering::SeqCst) {
            std::thread::sleep(self.delay);
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> volshadow_block::Result<()> {
        self.inner.discard(offset, len)
    }
    fn name(&self) -> String {
        "slow-flush".into()
    }
}

/// A real provider whose commit first takes `delay` (storage that is slow
/// to snapshot), and that may call itself by another id.
pub struct Delayed {
    pub inner: Arc<dyn Provider>,
    pub delay: Duration,
    pub id: Option<Uuid>,
    pub commits: AtomicU64,
}

impl Delayed {
    pub fn new(inner: Arc<dyn Provider>, delay: Duration) -> Self {
        Delayed {
            inner,
            delay,
            id: None,
            commits: AtomicU64::new(0),
        }
    }
}

impl Provider for Delayed {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn id(&self) -> Uuid {
        self.id.unwrap_or_else(|| self.inner.id())
    }
    fn kind(&self) -> &str {
        self.inner.kind()
    }
    fn is_volume_supported(&self, v: &Path) -> bool {
        self.inner.is_volume_supported(v)
    }
    fn begin_prepare_snapshot(&self, s: Uuid, v: &Path) -> ProviderResult {
        self.inner.begin_prepare_snapshot(s, v)
    }
    fn end_prepare_snapshot(&self, s: Uuid) -> ProviderResult {
        self.inner.end_prepare_snapshot(s)
    }
    fn pre_commit(&self, s: Uuid) -> ProviderResult {
        self.inner.pre_commit(s)
    }
    fn commit(
        &self,
        s: Uuid,
        o: &CommitOptions,
        while_held: &mut dyn FnMut() -> ProviderResult,
    ) -> ProviderResult<Vec<SnapshotRef>> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let mut refs = self.inner.commit(s, o, while_held)?;
        for r in &mut refs {
            r.provider_id = self.id();
        }
        Ok(refs)
    }
    fn post_commit(&self, s: Uuid) -> ProviderResult {
        self.inner.post_commit(s)
    }
    fn abort(&self, s: Uuid) -> ProviderResult {
        self.inner.abort(s)
    }
    fn delete(&self, s: &SnapshotRef) -> ProviderResult {
        self.inner.delete(s)
    }
    fn revert(&self, s: &SnapshotRef) -> ProviderResult {
        self.inner.revert(s)
    }
    fn open(&self, s: &SnapshotRef) -> ProviderResult<Box<dyn BlockDevice>> {
        self.inner.open(s)
    }
    fn query(&self) -> Vec<SnapshotRef> {
        let mut q = self.inner.query();
        for r in &mut q {
            r.provider_id = self.id();
        }
        q
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// True when root and every tool is installed; prints why not otherwise.
pub fn root_with(tools: &[&str]) -> bool {
    if !is_root() {
        eprintln!("SKIP: needs root (loop devices, mount)");
        return false;
    }
    for t in tools {
        if !sh(&format!("command -v {t} >/dev/null")) {
            eprintln!("SKIP: {t} is not installed");
            return false;
        }
    }
    true
}

pub fn sh(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A loop-mounted file system in `dir/mnt`; torn down on drop.
pub struct LoopFs {
    pub mnt: PathBuf,
    pub dev: String,
}

impl LoopFs {
    pub fn new(dir: &Path, mkfs: &str, size_mb: u32) -> Option<LoopFs> {
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).ok()?;
        if !sh(&format!(
            "truncate -s {size_mb}M {0} && {mkfs} {0} >/dev/null 2>&1",
            img.display()
        )) {
            eprintln!("SKIP: {mkfs} failed");
            return None;
        }
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() || !sh(&format!("mount {dev} {}", mnt.display())) {
            eprintln!("SKIP: cannot mount a loop device here");
            if !dev.is_empty() {
                let _ = sh(&format!("losetup -d {dev}"));
            }
            return None;
        }
        Some(LoopFs { mnt, dev })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Never leave a test's file system frozen behind.
        let _ = sh(&format!("fsfreeze -u {} 2>/dev/null", self.mnt.display()));
        let _ = sh(&format!("umount {}", self.mnt.display()));
        let _ = sh(&format!("losetup -d {}", self.dev));
    }
}
