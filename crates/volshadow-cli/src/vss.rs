//! `backup`, `restore`, `list writers`, `list providers`: the VSS protocol
//! from a TOML configuration.
//!
//! ```toml
//! [backup]
//! context = "app-rollback"    # backup | file-share | app-rollback | nas-rollback | client-accessible
//! type = "full"               # full | incremental | differential | copy | log
//! freeze_timeout = "60s"
//! hold_timeout = "10s"
//! document = "backup.json"
//! previous = "last.json"      # incremental / differential: the base backup's document
//! [[volume]]
//! path = "disk.img"
//! [[writer]]
//! name = "app"
//! kind = "command"            # command | fsfreeze
//! freeze = ["sh", "-c", "..."]
//! thaw = ["sh", "-c", "..."]
//! timeout = "30s"
//! [[writer.component]]
//! name = "db"
//! paths = ["/srv/db"]
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use volshadow_vss::{
    BackupDocument, BackupType, CommandWriter, Component, Context, Coordinator, CowProvider,
    EVENTS, FsFreezeWriter, Provider, ReflinkProvider, Writer,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    backup: BackupSection,
    #[serde(default)]
    volume: Vec<VolumeSection>,
    #[serde(default)]
    writer: Vec<WriterSection>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BackupSection {
    #[serde(default)]
    context: Context,
    #[serde(default, rename = "type")]
    backup_type: BackupType,
    freeze_timeout: Option<String>,
    hold_timeout: Option<String>,
    document: Option<PathBuf>,
    previous: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeSection {
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentSection {
    name: String,
    #[serde(default)]
    logical_path: String,
    #[serde(default)]
    paths: Vec<PathBuf>,
    /// Volumes the component lives on; default: every configured volume.
    volumes: Option<Vec<PathBuf>>,
}

/// Command events are the other keys of a writer table, so unknown keys
/// are caught by `CommandWriter::new` rather than by serde.
#[derive(Debug, Deserialize)]
struct WriterSection {
    name: String,
    kind: String,
    timeout: Option<String>,
    /// fsfreeze: the mount point.
    mount: Option<PathBuf>,
    #[serde(default)]
    component: Vec<ComponentSection>,
    #[serde(flatten)]
    commands: HashMap<String, Vec<String>>,
}

/// Longest timeout a configuration may give: longer is a typo, and
/// deadlines computed from it must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses `500ms`, `60s`, `2m`, `1h` (a bare number is seconds), at most
/// a day. Never panics: overflow and nonsense are errors.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .with_context(|| format!("{s:?} is not a duration (e.g. 60s)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("unknown duration unit {unit:?} in {s:?} (use ms, s, m, h)"),
    };
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => bail!("duration {s:?} is too long (at most 24h)"),
    }
}

/// The configuration, with paths resolved against its directory.
pub struct Loaded {
    pub config: Config,
    pub dir: PathBuf,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: Config = toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok(Loaded { config, dir })
}

impl Loaded {
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.dir.join(p)
        }
    }

    fn volumes(&self) -> Vec<PathBuf> {
        self.config
            .volume
            .iter()
            .map(|v| self.resolve(&v.path))
            .collect()
    }

    fn writers(&self) -> Result<Vec<Arc<dyn Writer>>> {
        let vols = self.volumes();
        let mut out: Vec<Arc<dyn Writer>> = Vec::new();
        for w in &self.config.writer {
            let timeout = w
                .timeout
                .as_deref()
                .map(parse_duration)
                .transpose()
                .with_context(|| format!("writer {}: timeout", w.name))?
                .unwrap_or(Duration::from_secs(60));
            let components = w
                .component
                .iter()
                .map(|c| Component {
                    logical_path: c.logical_path.clone(),
                    name: c.name.clone(),
                    paths: c.paths.clone(),
                    volumes: c
                        .volumes
                        .as_ref()
                        .map(|v| v.iter().map(|p| self.resolve(p)).collect())
                        .unwrap_or_else(|| vols.clone()),
                    selectable: true,
                })
                .collect();
            match w.kind.as_str() {
                "command" => {
                    let cw = CommandWriter::new(&w.name, components, w.commands.clone(), timeout)
                        .map_err(|e| anyhow::anyhow!("writer {}: {e}", w.name))?;
                    out.push(Arc::new(cw));
                }
                "fsfreeze" => {
                    let Some(mount) = &w.mount else {
                        bail!("writer {}: kind fsfreeze needs `mount`", w.name);
                    };
                    if let Some(k) = w.commands.keys().next() {
                        bail!("writer {}: fsfreeze takes no command {k:?}", w.name);
                    }
                    out.push(Arc::new(FsFreezeWriter::new(mount, vols.clone())));
                }
                other => bail!(
                    "writer {}: unknown kind {other:?} (command or fsfreeze; command events: {})",
                    w.name,
                    EVENTS.join(", ")
                ),
            }
        }
        Ok(out)
    }

    /// Coordinator with the COW provider (volumes opened here) preferred
    /// over the reflink provider.
    pub fn coordinator(&self, open_volumes: bool) -> Result<Arc<Coordinator>> {
        let mut c = Coordinator::new();
        let cow = Arc::new(CowProvider::new());
        if open_volumes {
            for v in self.volumes() {
                if crate::storage::binding_path(&v).exists() {
                    let vol = crate::storage::open_volume(&v)
                        .with_context(|| format!("opening {}", v.display()))?;
                    cow.add_volume(v, vol);
                }
            }
        }
        c.add_provider(cow);
        c.add_provider(Arc::new(ReflinkProvider::new()));
        for w in self.writers()? {
            c.add_writer(w);
        }
        if let Some(t) = &self.config.backup.freeze_timeout {
            c.timeouts.freeze = parse_duration(t).context("[backup] freeze_timeout")?;
        }
        if let Some(t) = &self.config.backup.hold_timeout {
            c.timeouts.hold = parse_duration(t).context("[backup] hold_timeout")?;
        }
        Ok(Arc::new(c))
    }
}

/// Runs a backup; writes and returns the document.
pub fn backup(config: &Path) -> Result<BackupDocument> {
    let l = load(config)?;
    if l.config.volume.is_empty() {
        bail!("{}: no [[volume]] to back up", config.display());
    }
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
    let c = l.coordinator(true)?;
    let previous = match &l.config.backup.previous {
        Some(p) => {
            let p = l.resolve(p);
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Some(BackupDocument::from_json(&text).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let mut s = c.backup();
    s.initialize_for_backup()?;
    s.set_context(l.config.backup.context)?;
    s.set_backup_state(l.config.backup.backup_type, previous.as_ref())?;
    let meta = s.gather_writer_metadata()?;
    for m in &meta {
        for comp in m.components.iter().filter(|c| c.selectable) {
            s.add_component(m.writer_id, &comp.full_path())?;
        }
    }
    let set = s.start_snapshot_set()?;
    for v in l.volumes() {
        let provider = s.add_to_snapshot_set(&v)?;
        eprintln!("  {} -> {provider}", v.display());
    }
    s.prepare_for_backup()?;
    let snaps = s.do_snapshot_set()?;
    for m in &meta {
        for comp in &m.components {
            s.backup_component_succeeded(&comp.full_path())?;
        }
    }
    let doc = s.backup_complete()?;
    std::fs::write(&out, doc.to_json() + "\n")
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
    Ok(doc)
}

/// Restores every component of the document (or the named ones).
pub fn restore(config: &Path, document: &Path, components: &[String]) -> Result<()> {
    let l = load(config)?;
    let text = std::fs::read_to_string(document)
        .with_context(|| format!("reading {}", document.display()))?;
    let doc = BackupDocument::from_json(&text).map_err(anyhow::Error::msg)?;
    let c = l.coordinator(true)?;
    let selected: Vec<String> = if components.is_empty() {
        doc.components.iter().map(|c| c.full_path.clone()).collect()
    } else {
        components.to_vec()
    };
    if selected.is_empty() {
        bail!("the backup has no components to restore");
    }
    let mut r = c.restore(doc)?;
    r.gather_writer_metadata()?;
    for comp in &selected {
        r.select_for_restore(comp)?;
    }
    r.pre_restore()?;
    r.restore()?;
    let done = r.post_restore()?;
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

pub fn list_writers(config: &Path, json: bool) -> Result<()> {
    let l = load(config)?;
    let c = l.coordinator(false)?;
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
            s.last_error
                .map_or_else(|| "No error".to_string(), |e| e.to_string())
        );
    }
    Ok(())
}

pub fn list_providers(json: bool) -> Result<()> {
    let providers: Vec<Arc<dyn Provider>> = vec![
        Arc::new(CowProvider::new()),
        Arc::new(ReflinkProvider::new()),
    ];
    let rows: Vec<serde_json::Value> = providers
        .iter()
        .map(|p| serde_json::json!({"name": p.name(), "id": p.id(), "kind": p.kind()}))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for p in &providers {
            println!(
                "Provider name: '{}'\n   Provider type: {}\n   Provider Id: {{{}}}\n",
                p.name(),
                p.kind(),
                p.id()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").ok(), Some(Duration::from_secs(60)));
        assert_eq!(
            parse_duration("500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration("2m").ok(), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s").ok(), Some(Duration::ZERO));
        for bad in [
            "99999999999999999999999s",
            "25h",
            "1e400s",
            "",
            "s",
            "1x",
            "-1s",
            "NaNs",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
