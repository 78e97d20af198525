//! The backup configuration (TOML) and the coordinator it describes.
//!
//! ```toml
//! [backup]
//! context = "app-rollback"    # backup | file-share | app-rollback | nas-rollback | client-accessible
//! type = "full"               # full | incremental | differential | copy | log
//! freeze_timeout = "60s"      # writers without their own `timeout`
//! hold_timeout = "10s"
//! document = "backup.json"
//! previous = "last.json"      # incremental / differential: the base backup's document
//! select = ["app/db"]         # writer/logical/path/component; default: every selectable one
//! [[volume]]
//! path = "disk.img"
//! [[writer]]
//! name = "app"
//! kind = "command"            # command | fsfreeze
//! freeze = ["sh", "-c", "..."]
//! thaw = ["sh", "-c", "..."]
//! timeout = "30s"             # this writer's own limit: each command, and freeze to thaw
//! [[writer.component]]
//! name = "db"
//! paths = ["/srv/db"]
//! selectable = true
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use volshadow_vss::{
    BackupType, CommandWriter, Component, Context, Coordinator, CowProvider, EVENTS,
    FsFreezeWriter, ReflinkProvider, Writer,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub backup: BackupSection,
    #[serde(default)]
    pub volume: Vec<VolumeSection>,
    #[serde(default)]
    writer: Vec<WriterSection>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    #[serde(default)]
    pub context: Context,
    #[serde(default, rename = "type")]
    pub backup_type: BackupType,
    freeze_timeout: Option<String>,
    hold_timeout: Option<String>,
    pub document: Option<PathBuf>,
    pub previous: Option<PathBuf>,
    /// Components to back up, `writer/logical/path/component`; default:
    /// every selectable one.
    pub select: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSection {
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
    /// Selectable for backup (VSS); default true.
    selectable: Option<bool>,
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

/// A coordinator with the providers, in order of preference: the COW
/// provider (with whatever volumes `cow` was given), then reflink.
pub fn with_providers(cow: Arc<CowProvider>) -> Coordinator {
    let mut c = Coordinator::new();
    c.add_provider(cow);
    c.add_provider(Arc::new(ReflinkProvider::new()));
    c
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
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.dir.join(p)
        }
    }

    pub fn volumes(&self) -> Vec<PathBuf> {
        self.config
            .volume
            .iter()
            .map(|v| self.resolve(&v.path))
            .collect()
    }

    /// The limit of writers without a `timeout` of their own.
    fn freeze_timeout(&self) -> Result<Duration> {
        Ok(match &self.config.backup.freeze_timeout {
            Some(t) => parse_duration(t).context("[backup] freeze_timeout")?,
            None => Duration::from_secs(60),
        })
    }

    fn writers(&self) -> Result<Vec<Arc<dyn Writer>>> {
        let vols = self.volumes();
        let mut out: Vec<Arc<dyn Writer>> = Vec::new();
        for w in &self.config.writer {
            let own = w
                .timeout
                .as_deref()
                .map(parse_duration)
                .transpose()
                .with_context(|| format!("writer {}: timeout", w.name))?;
            let timeout = match own {
                Some(t) => t,
                None => self.freeze_timeout()?,
            };
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
                    selectable: c.selectable.unwrap_or(true),
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
                    let mut fw = FsFreezeWriter::new(mount, vols.clone());
                    if let Some(t) = own {
                        fw = fw.with_timeout(t);
                    }
                    out.push(Arc::new(fw));
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
        let cow = Arc::new(CowProvider::new());
        if open_volumes {
            for v in self.volumes() {
                if crate::storage::binding_path(&v).exists() {
                    // A volume `serve` or `mount` holds is backed up through
                    // its server, its clients writing on.
                    if let Some(served) = super::served::ServedVolume::find(&v)? {
                        cow.add(v, Arc::new(served));
                        continue;
                    }
                    let vol = crate::storage::open_volume(&v)
                        .with_context(|| format!("opening {}", v.display()))?;
                    cow.add_volume(v, vol);
                }
            }
        }
        let mut c = with_providers(cow);
        for w in self.writers()? {
            // Events outside the freeze window wait as long as the most
            // patient writer's commands may run (a command is killed at
            // its writer's timeout).
            if let Some(t) = w.timeout() {
                c.timeouts.event = c.timeouts.event.max(t);
            }
            c.add_writer(w);
        }
        c.timeouts.freeze = self.freeze_timeout()?;
        if let Some(t) = &self.config.backup.hold_timeout {
            c.timeouts.hold = parse_duration(t).context("[backup] hold_timeout")?;
        }
        Ok(Arc::new(c))
    }
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
