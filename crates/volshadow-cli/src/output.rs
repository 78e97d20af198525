//! How verbs print: a reply as text or JSON, and a progress bar on a
//! terminal.

use std::io::{IsTerminal, Write};

use anyhow::Result;

use crate::ops::{self, Reply};

pub(crate) fn print_reply(reply: &Reply, json: bool) -> Result<()> {
    print_reply_with(reply, json, None)
}

/// With `auto_deleted` (verbs that write), `--json` gains an
/// `"auto_deleted": [ids]` field: the shadow copies deleted to make room.
pub(crate) fn print_reply_with(
    reply: &Reply,
    json: bool,
    auto_deleted: Option<Vec<uuid::Uuid>>,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let mut doc = serde_json::to_value(reply)?;
        if let (Some(ids), Some(map)) = (auto_deleted, doc.as_object_mut()) {
            map.insert("auto_deleted".into(), serde_json::to_value(ids)?);
        }
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", ops::render(reply))?;
    }
    Ok(())
}

pub(crate) fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let template = if matches!(
        what,
        "exporting" | "preallocating" | "sending" | "receiving" | "uploading"
    ) {
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})"
    } else {
        "{msg} [{bar:40}] {pos}/{len} ({eta})"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Removes an output a command left cut short, if it is a regular file:
/// never a device, a pipe or anything else named as the output
/// (`/dev/null` included). Says whether it did.
pub(crate) fn remove_partial(p: &std::path::Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()) && std::fs::remove_file(p).is_ok()
}

/// Syncs an output; devices and pipes that cannot be synced are fine.
pub(crate) fn sync_output(f: &std::fs::File) -> std::io::Result<()> {
    match f.sync_all() {
        Err(e) if f.metadata().is_ok_and(|m| !m.is_file()) => {
            tracing::debug!(error = %e, "output cannot be synced");
            Ok(())
        }
        other => other,
    }
}
