//! Writers shipped with volshadow.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::writer::{
    Component, EventContext, FailureKind, FreezeLevel, RestoreMethod, UsageType, Writer,
    WriterFailure, WriterMetadata, WriterResult,
};

/// Events a `CommandWriter` can run a command for.
pub const EVENTS: [&str; 10] = [
    "prepare-backup",
    "prepare-snapshot",
    "freeze",
    "thaw",
    "post-snapshot",
    "backup-complete",
    "backup-shutdown",
    "abort",
    "pre-restore",
    "post-restore",
];

/// Runs configured commands at protocol events, like an application's
/// pre/post scripts. A non-zero exit is a failure carrying the command's
/// stderr; a command still running at `timeout` is killed and reported as
/// a timeout. `timeout` is also this writer's freeze-to-thaw limit. The
/// event's details are in the environment: `VOLSHADOW_EVENT`,
/// `VOLSHADOW_WRITER`, `VOLSHADOW_COMPONENTS` and `VOLSHADOW_VOLUMES` (one
/// a line), `VOLSHADOW_SET_ID` (empty outside a set),
/// `VOLSHADOW_BACKUP_TYPE`, `VOLSHADOW_CONTEXT`. On abort it runs the
/// `abort` command, or without one the `thaw` command if it froze.
#[derive(Debug)]
pub struct CommandWriter {
    name: String,
    writer_id: Uuid,
    instance_id: Uuid,
    components: Vec<Component>,
    commands: HashMap<String, Vec<String>>,
    timeout: Duration,
    /// Froze and not yet thawed: what an abort without its own command undoes.
    frozen: AtomicBool,
}

impl CommandWriter {
    /// `commands` maps events (see [`EVENTS`]) to argv.
    pub fn new(
        name: impl Into<String>,
        components: Vec<Component>,
        commands: HashMap<String, Vec<String>>,
        timeout: Duration,
    ) -> Result<Self, String> {
        for (event, argv) in &commands {
            if !EVENTS.contains(&event.as_str()) {
                return Err(format!(
                    "unknown writer event {event:?}; known: {}",
                    EVENTS.join(", ")
                ));
            }
            if argv.is_empty() {
                return Err(format!("the command for {event} is empty"));
            }
        }
        let name = name.into();
        Ok(CommandWriter {
            writer_id: Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes()),
            instance_id: Uuid::new_v4(),
            name,
            components,
            commands,
            timeout,
            frozen: AtomicBool::new(false),
        })
    }

    fn run(&self, event: &str, ctx: &EventContext) -> WriterResult {
        let Some(argv) = self.commands.get(event) else {
            return Ok(());
        };
        let volumes: Vec<String> = ctx
            .volumes
            .iter()
            .map(|v| v.display().to_string())
            .collect();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("VOLSHADOW_EVENT", event)
            .env("VOLSHADOW_WRITER", &self.name)
            .env("VOLSHADOW_COMPONENTS", ctx.components.join("\n"))
            .env("VOLSHADOW_VOLUMES", volumes.join("\n"))
            .env(
                "VOLSHADOW_SET_ID",
                ctx.set_id.map(|s| s.to_string()).unwrap_or_default(),
            )
            .env("VOLSHADOW_BACKUP_TYPE", ctx.backup_type.as_str())
            .env("VOLSHADOW_CONTEXT", ctx.context.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                WriterFailure::new(
                    FailureKind::NonRetryable,
                    format!("cannot run {}: {e}", argv[0]),
                )
            })?;
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(WriterFailure::new(
                        FailureKind::Timeout,
                        format!("{event} command {argv:?} killed after {:?}", self.timeout),
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    return Err(WriterFailure::new(FailureKind::Retryable, e.to_string()));
                }
            }
        };
        if status.success() {
            return Ok(());
        }
        let mut err = String::new();
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        let err = err.trim();
        let tail = &err[err.len().saturating_sub(500)..];
        Err(WriterFailure::new(
            FailureKind::NonRetryable,
            format!("{event} command {argv:?} exited with {status}: {tail}"),
        ))
    }
}

impl Writer for CommandWriter {
    fn identify(&self) -> Result<WriterMetadata, WriterFailure> {
        Ok(WriterMetadata {
            name: self.name.clone(),
            writer_id: self.writer_id,
            instance_id: self.instance_id,
            usage: UsageType::UserData,
            restore_method: RestoreMethod::RestoreIfCanReplace,
            components: self.components.clone(),
        })
    }
    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
    fn prepare_for_backup(&self, ctx: &EventContext) -> WriterResult {
        self.run("prepare-backup", ctx)
    }
    fn prepare_for_snapshot(&self, ctx: &EventContext) -> WriterResult {
        self.run("prepare-snapshot", ctx)
    }
    fn freeze(&self, ctx: &EventContext) -> WriterResult {
        self.run("freeze", ctx)?;
        self.frozen.store(true, Ordering::Release);
        Ok(())
    }
    fn thaw(&self, ctx: &EventContext) -> WriterResult {
        self.frozen.store(false, Ordering::Release);
        self.run("thaw", ctx)
    }
    fn post_snapshot(&self, ctx: &EventContext) -> WriterResult {
        self.run("post-snapshot", ctx)
    }
    fn backup_complete(&self, ctx: &EventContext) -> WriterResult {
        self.run("backup-complete", ctx)
    }
    fn backup_shutdown(&self, ctx: &EventContext) -> WriterResult {
        self.run("backup-shutdown", ctx)
    }
    fn abort(&self, ctx: &EventContext) -> WriterResult {
        let was_frozen = self.frozen.swap(false, Ordering::AcqRel);
        if self.commands.contains_key("abort") {
            self.run("abort", ctx)
        } else if was_frozen {
            self.run("thaw", ctx)
        } else {
            Ok(())
        }
    }
    fn pre_restore(&self, ctx: &EventContext) -> WriterResult {
        self.run("pre-restore", ctx)
    }
    fn post_restore(&self, ctx: &EventContext) -> WriterResult {
        self.run("post-restore", ctx)
    }
}

/// Freezes a mounted Linux file system (`FIFREEZE`) for the snapshot and
/// thaws it after. Always thaws on abort and when dropped.
#[derive(Debug)]
pub struct FsFreezeWriter {
    mount: PathBuf,
    instance_id: Uuid,
    frozen: AtomicBool,
    volumes: Vec<PathBuf>,
    timeout: Option<Duration>,
}

impl FsFreezeWriter {
    /// `volumes`: the volumes the file system lives on (for restore).
    pub fn new(mount: impl Into<PathBuf>, volumes: Vec<PathBuf>) -> Self {
        FsFreezeWriter {
            mount: mount.into(),
            instance_id: Uuid::new_v4(),
            frozen: AtomicBool::new(false),
            volumes,
            timeout: None,
        }
    }

    /// Gives the writer its own limit (see [`Writer::timeout`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn do_thaw(&self) -> WriterResult {
        if self.frozen.swap(false, Ordering::AcqRel) {
            volshadow_block::thaw_filesystem(&self.mount)
                .map_err(|e| WriterFailure::new(FailureKind::Retryable, e.to_string()))?;
        }
        Ok(())
    }
}

impl Writer for FsFreezeWriter {
    fn identify(&self) -> Result<WriterMetadata, WriterFailure> {
        let name = format!("fsfreeze {}", self.mount.display());
        Ok(WriterMetadata {
            writer_id: Uuid::new_v5(&Uuid::NAMESPACE_OID, b"volshadow-fsfreeze"),
            instance_id: self.instance_id,
            usage: UsageType::UserData,
            restore_method: RestoreMethod::StopRestoreStart,
            components: vec![Component {
                logical_path: String::new(),
                name: self.mount.display().to_string(),
                paths: vec![self.mount.clone()],
                volumes: self.volumes.clone(),
                selectable: true,
            }],
            name,
        })
    }
    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
    fn freeze_level(&self) -> FreezeLevel {
        // After applications have flushed their own data.
        FreezeLevel::System
    }
    fn freeze(&self, _event: &EventContext) -> WriterResult {
        volshadow_block::freeze_filesystem(&self.mount)
            .map_err(|e| WriterFailure::new(FailureKind::NonRetryable, e.to_string()))?;
        self.frozen.store(true, Ordering::Release);
        Ok(())
    }
    fn thaw(&self, _event: &EventContext) -> WriterResult {
        self.do_thaw()
    }
    fn abort(&self, _event: &EventContext) -> WriterResult {
        self.do_thaw()
    }
}

impl Drop for FsFreezeWriter {
    fn drop(&mut self) {
        let _ = self.do_thaw();
    }
}
