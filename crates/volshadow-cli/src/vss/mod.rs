//! `backup`, `restore`, `list writers`, `list providers`, `delete shadows
//! --set`: the VSS protocol from a TOML configuration (`config.rs`).
//!
//! The CLI is the requester. A writer's veto (a failure at prepare-backup,
//! prepare-snapshot or post-snapshot) does not undo the set: the backup
//! goes on, the writer's components are recorded as not backed up, the
//! shadow copies are kept and the command exits non-zero saying so. The
//! writers' states and last errors are kept beside the configuration
//! (`NAME.writers.json`), so `list writers` shows the last backup's outcome.

mod config;
mod served;
mod status;

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use volshadow_vss::{BackupDocument, BackupSession, Coordinator, WriterMetadata};

use config::{Loaded, load};

/// Runs a backup; writes and returns the document.
pub fn backup(config: &Path) -> Result<BackupDocument> {
    let l = load(config)?;
    // Refused before any writer freezes: the document must not land on a
    // volume's own files.
    let out = l.resolve(
        l.config
            .backup
            .document
            .as_deref()
            .unwrap_or(Path::new("backup.json")),
    );
    crate::guard::refuse_volume_file(&out, &l.volumes(), "the backup document")?;
    let status_file = status::path(config);
    crate::guard::refuse_volume_file(&status_file, &l.volumes(), "the writers' status")?;
    let c = l.coordinator(true)?;
    status::recall(&c, &status_file);
    let previous = match &l.config.backup.previous {
        Some(p) => {
            let p = l.resolve(p);
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Some(BackupDocument::from_json(&text).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let result = run_backup(&l, &c, previous.as_ref(), &out);
    finish_late_calls(&c);
    status::save(&c, &status_file);
    result
}

/// A writer call that overran its limit (a freeze) is undone when it
/// returns; this process must still be there then.
fn finish_late_calls(c: &Coordinator) {
    let late = c.finish_late_calls(std::time::Duration::ZERO);
    if late.is_empty() {
        return;
    }
    eprintln!(
        "waiting for {} to return from a call that overran its limit, to undo it",
        late.join(", ")
    );
    let left = c.finish_late_calls(LATE_CALL_WAIT);
    if !left.is_empty() {
        eprintln!(
            "warning: {} did not return within {LATE_CALL_WAIT:?}; check that nothing is left frozen",
            left.join(", ")
        );
    }
}

/// How long the CLI waits for late writer calls before exiting.
const LATE_CALL_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

fn run_backup(
    l: &Loaded,
    c: &std::sync::Arc<Coordinator>,
    previous: Option<&BackupDocument>,
    out: &Path,
) -> Result<BackupDocument> {
    let mut s = c.backup();
    s.initialize_for_backup()?;
    s.set_context(l.config.backup.context)?;
    s.set_backup_state(l.config.backup.backup_type, previous)?;
    let meta = s.gather_writer_metadata()?;
    select(&mut s, &meta, l.config.backup.select.as_deref())?;
    let set = s.start_snapshot_set()?;
    for v in l.volumes() {
        let provider = s.add_to_snapshot_set(&v)?;
        eprintln!("  {} -> {provider}", v.display());
    }
    s.prepare_for_backup()?;
    let snaps = s.do_snapshot_set()?;
    let vetoes = s.vetoes();
    let vetoed: Vec<&str> = vetoes.iter().map(|(n, _, _)| n.as_str()).collect();
    for m in meta.iter().filter(|m| !vetoed.contains(&m.name.as_str())) {
        for comp in &m.components {
            // Only the components this backup selected can succeed.
            let _ = s.backup_component_succeeded(&comp.full_path());
        }
    }
    let doc = s.backup_complete()?;
    std::fs::write(out, doc.to_json() + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "Backup complete: snapshot set {set}, {} snapshot(s); document {}.",
        snaps.len(),
        out.display()
    );
    for sn in &snaps {
        println!(
            "  {}: {} ({})",
            sn.volume.display(),
            sn.snapshot_id,
            sn.provider
        );
    }
    if !vetoes.is_empty() {
        let list: Vec<String> = vetoes
            .iter()
            .map(|(n, p, f)| format!("writer {n} failed at {p}: {f}"))
            .collect();
        bail!(
            "{}; its components are recorded as not backed up in {}, and the shadow copies are kept",
            list.join("; "),
            out.display()
        );
    }
    Ok(doc)
}

/// Adds the configured components (`writer/logical/path/component`), or
/// every selectable component of every writer.
fn select(s: &mut BackupSession, meta: &[WriterMetadata], chosen: Option<&[String]>) -> Result<()> {
    let Some(chosen) = chosen else {
        for m in meta {
            for comp in m.components.iter().filter(|c| c.selectable) {
                s.add_component(m.writer_id, &comp.full_path())?;
            }
        }
        return Ok(());
    };
    for entry in chosen {
        let found = meta.iter().find_map(|m| {
            let rest = entry.strip_prefix(&m.name)?.strip_prefix('/')?;
            m.components
                .iter()
                .find(|c| c.full_path().replace('\\', "/") == rest)
                .map(|c| (m.writer_id, c.full_path()))
        });
        let Some((writer, path)) = found else {
            let known: Vec<String> = meta
                .iter()
                .flat_map(|m| {
                    m.components
                        .iter()
                        .map(move |c| format!("{}/{}", m.name, c.full_path().replace('\\', "/")))
                })
                .collect();
            bail!(
                "[backup] select: no component {entry:?} (known: {})",
                known.join(", ")
            );
        };
        s.add_component(writer, &path)?;
    }
    Ok(())
}

/// Restores every component of the document (or the named ones), each
/// over its volumes or into its alternate location (`COMPONENT=DIR`).
pub fn restore(
    config: &Path,
    document: &Path,
    components: &[String],
    alternate: &[String],
) -> Result<()> {
    let l = load(config)?;
    let text = std::fs::read_to_string(document)
        .with_context(|| format!("reading {}", document.display()))?;
    let doc = BackupDocument::from_json(&text).map_err(anyhow::Error::msg)?;
    let c = l.coordinator(true)?;
    let status_file = status::path(config);
    status::recall(&c, &status_file);
    let selected: Vec<String> = if components.is_empty() {
        doc.components.iter().map(|c| c.full_path.clone()).collect()
    } else {
        components.to_vec()
    };
    if selected.is_empty() {
        bail!("the backup has no components to restore");
    }
    let mut alternates = Vec::new();
    for a in alternate {
        let Some((comp, dir)) = a.split_once('=') else {
            bail!("--alternate {a:?}: give COMPONENT=DIR");
        };
        let dir = Path::new(dir);
        if !dir.is_dir() {
            bail!("--alternate {a:?}: {} is not a directory", dir.display());
        }
        alternates.push((comp.to_string(), dir.to_path_buf()));
    }
    let result = (|| -> Result<BackupDocument> {
        let mut r = c.restore(doc)?;
        r.gather_writer_metadata()?;
        for comp in &selected {
            r.select_for_restore(comp)?;
        }
        for (comp, dir) in &alternates {
            r.set_alternate_location(comp, dir)?;
        }
        r.pre_restore()?;
        r.restore()?;
        Ok(r.post_restore()?)
    })();
    finish_late_calls(&c);
    status::save(&c, &status_file);
    let done = result?;
    let mut failed = 0;
    for comp in done
        .components
        .iter()
        .filter(|c| selected.contains(&c.full_path))
    {
        let ok = comp.restore_succeeded == Some(true);
        failed += usize::from(!ok);
        println!(
            "  {}: {}",
            comp.full_path,
            if ok { "restored" } else { "FAILED" }
        );
    }
    if failed > 0 {
        bail!("{failed} component(s) failed to restore");
    }
    println!("Restore complete.");
    Ok(())
}

/// `vssadmin list writers`: each writer's state and last error, as the
/// last backup or restore with this configuration left them.
pub fn list_writers(config: &Path, json: bool) -> Result<()> {
    let l = load(config)?;
    let c = l.coordinator(false)?;
    status::recall(&c, &status::path(config));
    let status = c.writer_status();
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    for s in status {
        println!(
            "Writer name: '{}'\n   Writer Id: {{{}}}\n   Writer Instance Id: {{{}}}\n   State: {}\n   Last error: {}\n",
            s.name,
            s.writer_id,
            s.instance_id,
            s.state,
            s.last_error_text()
        );
    }
    Ok(())
}

pub fn list_providers(json: bool) -> Result<()> {
    let rows = config::with_providers(Default::default()).provider_info();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for p in &rows {
            println!(
                "Provider name: '{}'\n   Provider type: {}\n   Provider Id: {{{}}}\n",
                p.name, p.kind, p.id
            );
        }
    }
    Ok(())
}

/// `delete shadows --for IMG --set ID`: every shadow copy of set `set`
/// (id or unique prefix) on the volume.
pub fn delete_set(volume: &Path, set: &str) -> Result<()> {
    use crate::ops::{Reply, Request, Which};
    let (reply, _) = crate::session::on_volume(volume, &Request::ListShadows, &[])?;
    let Reply::Shadows { shadows } = reply else {
        bail!("unexpected reply listing shadow copies");
    };
    let want = set.trim().to_ascii_lowercase();
    if want.is_empty() {
        bail!("empty snapshot set id");
    }
    let mut sets: Vec<uuid::Uuid> = shadows
        .iter()
        .filter_map(|s| s.set_id)
        .filter(|u| u.to_string().starts_with(&want) || u.simple().to_string().starts_with(&want))
        .collect();
    sets.sort_unstable();
    sets.dedup();
    let set_id = match sets.as_slice() {
        [one] => *one,
        [] => bail!("no shadow copy of {} is in a set {want}", volume.display()),
        _ => bail!(
            "{want} matches {} snapshot sets; give more of the id",
            sets.len()
        ),
    };
    let mut ids = Vec::new();
    for s in shadows.iter().filter(|s| s.set_id == Some(set_id)) {
        let (reply, _) = crate::session::on_volume(
            volume,
            &Request::DeleteShadows {
                which: Which::Id(s.id.to_string()),
            },
            &[],
        )?;
        if let Reply::Deleted { ids: gone } = reply {
            ids.extend(gone);
        }
    }
    print!("{}", crate::ops::render(&Reply::Deleted { ids }));
    Ok(())
}
