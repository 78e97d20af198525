//! The `volshadow` command line: verbs shaped like `vssadmin` and
//! `diskshadow`, over the copy-on-write engine and the NBD server.
#![forbid(unsafe_code)]

mod bench;
mod control;
mod exports;
mod guard;
mod ops;
mod quickstart;
mod report;
mod session;
mod storage;
mod vss;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use volshadow_block::{BlockDevice, FileImage, OpenOptions as BlockOpenOptions, open_device};
use volshadow_cow::{FullPolicy, OpenMode, SnapshotOptions, SnapshotSet, Volume, VolumeOptions};

pub use ops::{Reply, Request, ShadowRow, Which};
use session::Session;
pub use storage::{parse_positive_size, parse_size};

#[derive(Debug, Parser)]
#[command(
    name = "volshadow",
    version,
    about = "Point-in-time snapshots of block volumes (VSS-style)"
)]
struct Cli {
    /// Log what the engine does (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Disk images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Add shadow storage (a diff area) for a volume.
    Add {
        #[command(subcommand)]
        what: AddWhat,
    },
    /// Change the shadow storage limit or policy.
    Resize {
        #[command(subcommand)]
        what: ResizeWhat,
    },
    /// List shadow copies, shadow storage, writers or providers.
    List {
        #[command(subcommand)]
        what: ListWhat,
    },
    /// Create shadow copies.
    Create {
        #[command(subcommand)]
        what: CreateWhat,
    },
    /// Delete shadow copies.
    Delete {
        #[command(subcommand)]
        what: DeleteWhat,
    },
    /// Write a file (or stdin) into the live volume through the COW layer.
    Write {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// Where in the volume to write (bytes; K, M, G, T suffixes).
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// The data to write (default: standard input).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Print the result as JSON (with shadow copies deleted to make room).
        #[arg(long)]
        json: bool,
    },
    /// Read bytes of the live volume or of a shadow copy.
    Read {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// Read this shadow copy (id or unique prefix) instead of the live volume.
        #[arg(long)]
        shadow: Option<String>,
        /// Where to start (bytes; K, M, G, T suffixes).
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// How many bytes to read (streamed, whatever the length).
        #[arg(long, value_parser = parse_size)]
        length: u64,
        /// Write the bytes to this file (default: standard output). Never
        /// one of a volume's own files.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Changed extents between two shadow copies (or one and the live volume).
    Diff {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// The older shadow copy (id or unique prefix).
        #[arg(long)]
        from: String,
        /// The newer shadow copy (default: the live volume).
        #[arg(long)]
        to: Option<String>,
        /// Print the extents as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a shadow copy to a raw image; with --since, only changed chunks.
    Export {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// The shadow copy to export (id or unique prefix).
        #[arg(long)]
        shadow: String,
        /// The raw image to write. Never one of a volume's own files.
        #[arg(long)]
        output: PathBuf,
        /// Only the chunks changed since this older shadow copy, into an
        /// existing export of it.
        #[arg(long)]
        since: Option<String>,
        /// Rescue what is intact from damaged shadow storage: open it
        /// read-only in salvage mode, write every chunk it can vouch for,
        /// leave the rest as zeros and list them (exit status 1).
        #[arg(long, conflicts_with = "since")]
        salvage: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Roll the volume back to a (persistent) shadow copy.
    Revert {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// The shadow copy to roll back to (id or unique prefix).
        #[arg(long)]
        shadow: String,
        /// Print the result as JSON (with shadow copies deleted to make room).
        #[arg(long)]
        json: bool,
    },
    /// Reread every preserved chunk and check its hash.
    Verify {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// Check damaged shadow storage read-only (salvage mode) instead
        /// of refusing to open it: reports what salvage can and cannot
        /// vouch for.
        #[arg(long)]
        salvage: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pair an image with its shadow storage again after both were copied
    /// (or moved to another file system): the shadow storage records which
    /// file its image is and refuses any other, so that two images of one
    /// size are never mixed up. Only do this for a pair that belongs
    /// together.
    Rebind {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// The shadow storage, when it moved away from where the image's
        /// binding says it is.
        #[arg(long, value_name = "DIFF")]
        on: Option<PathBuf>,
    },
    /// Serve the live volume and its shadow copies over NBD.
    Serve {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// Unix socket to listen on.
        #[arg(long, conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// TCP address to listen on (default 127.0.0.1:10809).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run a VSS backup: writers, providers and volumes from a TOML config.
    Backup {
        /// The backup configuration (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Restore from a backup components document.
    Restore {
        /// The backup configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The backup components document `backup` wrote.
        #[arg(long)]
        document: PathBuf,
        /// Only these components (`logical_path\name`); default all.
        #[arg(long)]
        component: Vec<String>,
    },
    /// Time an I/O loop on the volume (or the bare file), like `qemu-img bench`.
    Bench {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// Sequential or random offsets.
        #[arg(long, value_enum, default_value = "seq")]
        pattern: bench::Pattern,
        /// Write or read.
        #[arg(long, value_enum, default_value = "write")]
        mode: bench::Mode,
        /// Bytes per I/O (at most 64M).
        #[arg(long, value_parser = parse_positive_size, default_value = "4K")]
        block_size: u64,
        /// Threads issuing I/O at once (at most 1024).
        #[arg(long, default_value_t = 1)]
        depth: usize,
        /// I/Os in all.
        #[arg(long, default_value_t = 10000)]
        count: u64,
        /// Take a snapshot first (so writes are first writes).
        #[arg(long)]
        snapshot_first: bool,
        /// Take this many snapshots first.
        #[arg(long, default_value_t = 0)]
        snapshots: usize,
        /// Make the snapshots taken first persistent.
        #[arg(long)]
        persistent: bool,
        /// The same loop on the bare image file, without the COW layer.
        #[arg(long)]
        raw: bool,
        /// Read the newest snapshot instead of the live volume.
        #[arg(long)]
        from_snapshot: bool,
        /// Seed of the random offsets.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the whole idea on a small image in under a minute.
    Quickstart {
        /// Where to put the files (default: a new directory under the
        /// system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Create a sparse raw image.
    Create {
        /// The new image file (must not exist).
        img: PathBuf,
        /// Its size (bytes; K, M, G, T suffixes).
        #[arg(long, value_parser = parse_positive_size)]
        size: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnFull {
    /// Delete the oldest shadow copies to make room (each is told).
    DeleteOldest,
    /// Refuse the write; nothing changes.
    FailWrites,
    /// Raise the limit, up to --grow-max.
    Grow,
}

#[derive(Debug, Args)]
struct PolicyArgs {
    /// What to do when the shadow storage is full.
    #[arg(long, value_enum)]
    on_full: Option<OnFull>,
    /// With --on-full grow: the most it may grow to (default: the capacity).
    #[arg(long, value_parser = parse_size)]
    grow_max: Option<u64>,
}

impl PolicyArgs {
    fn policy(&self, capacity: u64) -> Option<FullPolicy> {
        self.on_full.map(|p| match p {
            OnFull::DeleteOldest => FullPolicy::DeleteOldest,
            OnFull::FailWrites => FullPolicy::FailWrites,
            OnFull::Grow => FullPolicy::Grow {
                max: self.grow_max.unwrap_or(capacity),
            },
        })
    }
}

#[derive(Debug, Subcommand)]
enum AddWhat {
    /// Pair a volume with a new diff-area file (recorded in IMG.vshadow).
    Shadowstorage {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// The new diff-area file (must not exist).
        #[arg(long = "on", value_name = "DIFF")]
        diff: PathBuf,
        /// Most shadow storage to use (at least one chunk).
        #[arg(long, value_parser = parse_size)]
        maxsize: u64,
        /// Copy-on-write granularity: a power of two, 4K to 1M.
        #[arg(long, value_parser = parse_size, default_value = "16K")]
        chunk_size: u64,
        /// Write the whole diff area once now (like qemu-img's
        /// preallocation=full), so no copy waits for the file system to
        /// allocate blocks. Pays off for persistent shadow copies.
        #[arg(long)]
        preallocate: bool,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ResizeWhat {
    /// Change the limit (and optionally the policy) of a volume's shadow storage.
    Shadowstorage {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// The new limit (at least one chunk, at most the capacity).
        #[arg(long, value_parser = parse_size)]
        maxsize: u64,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ListWhat {
    /// Shadow copies of a volume, oldest first.
    Shadows {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shadow storage use, limit and policy, and how many shadow copies
    /// the delete-oldest policy removed (since `serve` started, or during
    /// this command without a server).
    Shadowstorage {
        /// The volume's image (default: every IMG.vshadow in this directory).
        #[arg(long = "for", value_name = "IMG")]
        volume: Option<PathBuf>,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Writers of a backup configuration and their state.
    Writers {
        /// The backup configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The snapshot providers this build offers.
    Providers {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CreateWhat {
    /// Take a shadow copy of one volume, or one atomic set of several.
    Shadow {
        /// A volume; several make one atomic shadow copy set.
        #[arg(long = "for", value_name = "IMG", required = true)]
        volumes: Vec<PathBuf>,
        /// Persistent (the default for the command line: a shadow copy
        /// that outlives this command). Kept for vssadmin habits.
        #[arg(long, conflicts_with = "non_persistent")]
        persistent: bool,
        /// Auto-release: lives only while a `serve` holds the volume.
        #[arg(long)]
        non_persistent: bool,
        /// Print the new shadow copy as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeleteWhat {
    /// Delete one shadow copy, the oldest, or all.
    Shadows {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// This shadow copy (id or unique prefix).
        #[arg(long, group = "which")]
        shadow: Option<String>,
        /// The oldest shadow copy.
        #[arg(long, group = "which")]
        oldest: bool,
        /// Every shadow copy.
        #[arg(long, group = "which")]
        all: bool,
    },
}

/// An error and its causes on one line, each clause once. Errors shaped
/// `"{context}: {source}"` (thiserror's, the block layer wrapping the
/// engine) repeat their source's text, and the chain then prints it again;
/// so each message is cut to its own part (without the source's text at
/// its end), and a part is left out when the text so far already says it
/// or the next part starts with it (`"snapshot X: snapshot X: chunk ..."`).
pub fn one_line(e: &anyhow::Error) -> String {
    let texts: Vec<String> = e
        .chain()
        .map(|c| c.to_string().replace('\n', " ").trim().to_string())
        .collect();
    let own: Vec<&str> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| match texts.get(i + 1) {
            Some(next)
                if !next.is_empty() && t.len() > next.len() && t.ends_with(next.as_str()) =>
            {
                t[..t.len() - next.len()]
                    .trim_end()
                    .trim_end_matches(':')
                    .trim_end()
            }
            _ => t.as_str(),
        })
        .collect();
    let mut out = String::new();
    for (i, part) in own.iter().enumerate() {
        if part.is_empty() || out.contains(part) {
            continue;
        }
        if own[i + 1..]
            .iter()
            .find(|n| !n.is_empty())
            .is_some_and(|next| next.starts_with(part))
        {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(part);
    }
    out
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version: printed as clap formats them.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("volshadow: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    // A server has no one to tell but its log: warnings (such as shadow
    // copies deleted to make room) are shown without -v.
    let quiet_level = matches!(cli.command, Command::Serve { .. }).then_some("warn");
    init_logging(cli.verbose, quiet_level);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volshadow: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8, quiet_level: Option<&str>) {
    let level = match (verbose, quiet_level) {
        (0, None) => return,
        (0, Some(level)) => level,
        (1, _) => "info",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Runs one operation on the volume: through its server if one holds it,
/// otherwise in-process. Shadow copies deleted to make room are told on
/// stderr.
pub fn on_volume(img: &Path, req: &Request, payload: &[u8]) -> Result<(Reply, Vec<u8>)> {
    Session::new(img).call(req, payload)
}

fn print_reply(reply: &Reply, json: bool) -> Result<()> {
    print_reply_with(reply, json, None)
}

/// With `auto_deleted` (verbs that write), `--json` gains an
/// `"auto_deleted": [ids]` field: the shadow copies deleted to make room.
fn print_reply_with(
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

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let template = if what == "exporting" || what == "preallocating" {
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

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Image {
            command: ImageCommand::Create { img, size },
        } => {
            if storage::binding_path(&img).exists() {
                bail!(
                    "refusing to create {}: it is a volume with shadow storage ({}); nothing was changed",
                    img.display(),
                    storage::binding_path(&img).display()
                );
            }
            guard::refuse_volume_file(&img, &[], "a new image")?;
            FileImage::create(&img, size)?;
            println!("Created {} ({}).", img.display(), ops::human_size(size));
            Ok(())
        }
        Command::Add {
            what:
                AddWhat::Shadowstorage {
                    volume,
                    diff,
                    maxsize,
                    chunk_size,
                    preallocate,
                    policy,
                },
        } => add_shadowstorage(
            &volume,
            &diff,
            StorageSpec {
                maxsize,
                chunk_size,
                preallocate,
            },
            &policy,
        ),
        Command::Resize {
            what:
                ResizeWhat::Shadowstorage {
                    volume,
                    maxsize,
                    policy,
                },
        } => {
            let (reply, _) = on_volume(
                &volume,
                &Request::Resize {
                    max_bytes: maxsize,
                    policy: policy.policy(maxsize.max(policy.grow_max.unwrap_or(0))),
                },
                &[],
            )?;
            print_reply(&reply, false)
        }
        Command::List { what } => match what {
            ListWhat::Shadows { volume, json } => {
                let (reply, _) = on_volume(&volume, &Request::ListShadows, &[])?;
                print_reply(&reply, json)
            }
            ListWhat::Shadowstorage { volume, json } => list_shadowstorage(volume, json),
            ListWhat::Writers { config, json } => vss::list_writers(&config, json),
            ListWhat::Providers { json } => vss::list_providers(json),
        },
        Command::Create {
            what:
                CreateWhat::Shadow {
                    volumes,
                    persistent: _,
                    non_persistent,
                    json,
                },
        } => create_shadows(&volumes, !non_persistent, json),
        Command::Delete {
            what:
                DeleteWhat::Shadows {
                    volume,
                    shadow,
                    oldest,
                    all,
                },
        } => {
            let which = match (shadow, oldest, all) {
                (Some(id), _, _) => Which::Id(id),
                (None, true, _) => Which::Oldest,
                (None, _, true) => Which::All,
                _ => bail!("say which: --shadow ID, --oldest or --all"),
            };
            let (reply, _) = on_volume(&volume, &Request::DeleteShadows { which }, &[])?;
            print_reply(&reply, false)
        }
        Command::Write {
            volume,
            offset,
            input,
            json,
        } => {
            let mut session = Session::new(&volume);
            let written = match &input {
                Some(p) => {
                    let mut f = std::fs::File::open(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    session.write_from(offset, &mut f)?
                }
                None => session.write_from(offset, &mut std::io::stdin().lock())?,
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "kind": "written",
                        "offset": offset,
                        "bytes": written,
                        "auto_deleted": session.auto_deleted_ids(),
                    }))?
                );
            } else {
                eprintln!("Wrote {written} bytes at offset {offset}.");
            }
            Ok(())
        }
        Command::Read {
            volume,
            shadow,
            offset,
            length,
            output,
        } => read(
            &volume,
            shadow.as_deref(),
            offset,
            length,
            output.as_deref(),
        ),
        Command::Diff {
            volume,
            from,
            to,
            json,
        } => {
            let (reply, _) = on_volume(&volume, &Request::Diff { from, to }, &[])?;
            print_reply(&reply, json)
        }
        Command::Export {
            volume,
            shadow,
            output,
            since,
            salvage,
            json,
        } => {
            if salvage {
                export_salvage(&volume, &shadow, &output, json)
            } else {
                export(&volume, &shadow, &output, since.as_deref(), json)
            }
        }
        Command::Rebind { volume, on } => {
            let vol = match &on {
                Some(diff) => {
                    if guard::same_file(diff, &volume) {
                        bail!(
                            "{} is the image itself, not its shadow storage; nothing was changed",
                            diff.display()
                        );
                    }
                    let origin: Arc<dyn BlockDevice> =
                        Arc::from(open_device(&volume, &BlockOpenOptions::new())?);
                    let d: Arc<dyn BlockDevice> = Arc::new(
                        FileImage::open(diff)
                            .with_context(|| format!("opening {}", diff.display()))?,
                    );
                    let vol = Volume::open_with(origin, d, OpenMode::Rebind)?;
                    storage::write_binding(&volume, diff, vol.id())?;
                    vol
                }
                None => storage::open_volume_with(&volume, OpenMode::Rebind)?,
            };
            drop(vol);
            // A normal open now records the generation and checks the pair.
            let vol = storage::open_volume(&volume)?;
            println!(
                "{} and its shadow storage are paired again (volume {}, {} shadow copies).",
                volume.display(),
                vol.id(),
                vol.snapshots().len()
            );
            Ok(())
        }
        Command::Revert {
            volume,
            shadow,
            json,
        } => {
            let mut session = Session::new(&volume);
            let (reply, _) = session.call(
                &Request::Revert {
                    shadow: shadow.clone(),
                },
                &[],
            )?;
            if json {
                print_reply_with(&reply, true, Some(session.auto_deleted_ids()))
            } else {
                println!("Reverted {} to shadow copy {shadow}.", volume.display());
                Ok(())
            }
        }
        Command::Verify {
            volume,
            salvage,
            json,
        } => {
            let served = if salvage {
                None
            } else {
                control::call(&storage::control_path(&volume), &Request::Verify, &[])?
            };
            let reply = match served {
                Some(answer) => answer.result?.0,
                None => {
                    let mode = if salvage {
                        OpenMode::Salvage
                    } else {
                        OpenMode::Normal
                    };
                    let vol = storage::open_volume_with(&volume, mode)?;
                    let bar = progress(0, "verifying");
                    let report = vol.verify_with_progress(|done, total| {
                        bar.set_length(total);
                        bar.set_position(done);
                    })?;
                    bar.finish_and_clear();
                    Reply::Verify { report }
                }
            };
            print_reply(&reply, json)?;
            if let Reply::Verify { report } = &reply
                && !report.is_clean()
            {
                bail!(
                    "{} damaged chunk(s), {} other problem(s)",
                    report.mismatches.len(),
                    report.problems.len()
                );
            }
            Ok(())
        }
        Command::Serve {
            volume,
            socket,
            listen,
        } => serve(&volume, socket, listen),
        Command::Quickstart { dir } => quickstart::run(dir),
        Command::Bench {
            volume,
            pattern,
            mode,
            block_size,
            depth,
            count,
            snapshot_first,
            snapshots,
            persistent,
            raw,
            from_snapshot,
            seed,
            json,
        } => {
            let r = bench::run(
                &volume,
                &bench::BenchArgs {
                    pattern,
                    mode,
                    block_size,
                    depth,
                    count,
                    snapshots_first: snapshots.max(usize::from(snapshot_first)),
                    persistent,
                    raw,
                    from_snapshot,
                    seed,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}
  {} ops of {} in {:.3} s: {:.1} MB/s, {:.0} IOPS
  latency us: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
                    r.target,
                    r.ops,
                    ops::human_size(block_size),
                    r.seconds,
                    r.mb_per_s,
                    r.iops,
                    r.latency_us.p50,
                    r.latency_us.p90,
                    r.latency_us.p99,
                    r.latency_us.max
                );
            }
            Ok(())
        }
        Command::Backup { config } => vss::backup(&config).map(|_| ()),
        Command::Restore {
            config,
            document,
            component,
        } => vss::restore(&config, &document, &component),
    }
}

/// The shape of a new diff area.
struct StorageSpec {
    maxsize: u64,
    chunk_size: u64,
    preallocate: bool,
}

/// Writes zeros over a whole new file so its blocks are allocated.
fn fill_zeros(dev: &FileImage) -> Result<()> {
    const PIECE: u64 = 8 << 20;
    let len = dev.len();
    let bar = progress(len, "preallocating");
    let mut off = 0;
    while off < len {
        let n = PIECE.min(len - off);
        dev.write_zeroes(off, n)?;
        off += n;
        bar.set_position(off);
    }
    dev.flush()?;
    bar.finish_and_clear();
    Ok(())
}

fn add_shadowstorage(
    img: &Path,
    diff: &Path,
    spec: StorageSpec,
    policy: &PolicyArgs,
) -> Result<()> {
    let StorageSpec {
        maxsize,
        chunk_size,
        preallocate,
    } = spec;
    let chunk = u32::try_from(chunk_size).context("chunk size too large")?;
    // The same bounds `resize` enforces, checked before any file is made.
    if maxsize < chunk_size {
        bail!(
            "maximum {maxsize} must lie between one chunk ({chunk_size}) and the capacity; nothing was changed"
        );
    }
    if let Some(grow) = policy.grow_max
        && grow < maxsize
    {
        bail!("grow limit {grow} must be at least the maximum {maxsize}; nothing was changed");
    }
    // The image must not be a file of another volume (its diff area, its
    // binding, or a link to its image): pairing it would let writes to one
    // corrupt the other. The new diff area must not land on any volume's
    // file either.
    if let Some(o) = guard::owner(img, &[])
        && !guard::same_file(
            &storage::binding_path(&o.volume),
            &storage::binding_path(img),
        )
    {
        bail!(
            "refusing to add shadow storage for {}: it is the {} of volume {}; nothing was changed",
            img.display(),
            o.kind,
            o.volume.display()
        );
    }
    if guard::same_file(img, diff) {
        bail!(
            "refusing to put shadow storage for {} on the image itself; nothing was changed",
            img.display()
        );
    }
    guard::refuse_volume_file(diff, &[img.to_path_buf()], "new shadow storage")?;
    if storage::binding_path(img).exists() {
        bail!(
            "{} already has shadow storage ({}); delete that file to start over",
            img.display(),
            storage::binding_path(img).display()
        );
    }
    let origin: Arc<dyn BlockDevice> = Arc::from(open_device(img, &Default::default())?);
    // Room for max(maxsize, origin) of copies, so the limit can later be
    // raised that far. The file is sparse: unused room costs nothing.
    let size = Volume::diff_area_len_for(maxsize.max(origin.len()), chunk);
    let created = FileImage::create(diff, size)
        .with_context(|| format!("creating shadow storage {}", diff.display()))?;
    if preallocate && let Err(e) = fill_zeros(&created) {
        let _ = std::fs::remove_file(diff);
        return Err(e.context(format!("preallocating {}", diff.display())));
    }
    let diff_dev: Arc<dyn BlockDevice> = Arc::new(created);
    let options = VolumeOptions {
        chunk_size: chunk,
        max_bytes: Some(maxsize),
        policy: policy.policy(maxsize.max(origin.len())).unwrap_or_default(),
        overwrite: false,
        journal_half: None,
    };
    let vol = match Volume::create(origin, diff_dev, options) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(diff);
            return Err(e.into());
        }
    };
    storage::write_binding(img, diff, vol.id())?;
    println!(
        "Added shadow storage for {} on {} (maximum {}).",
        img.display(),
        diff.display(),
        ops::human_size(maxsize)
    );
    print!("{}", ops::render_usage(&vol.usage()));
    Ok(())
}

fn list_shadowstorage(volume: Option<PathBuf>, json: bool) -> Result<()> {
    let images: Vec<PathBuf> = match volume {
        Some(v) => vec![v],
        None => guard::volumes_in(Path::new("."))?,
    };
    #[derive(serde::Serialize)]
    struct Row {
        volume: PathBuf,
        shadow_storage: PathBuf,
        usage: volshadow_cow::Usage,
        /// Shadow copies the delete-oldest policy removed since `serve`
        /// opened the volume (0 without a server: nothing is counted
        /// across commands).
        auto_deleted: u64,
        /// Whether a running `serve` answered (and `auto_deleted` counts).
        served: bool,
    }
    let mut rows = Vec::new();
    for img in images {
        let (_, diff) = storage::read_binding(&img)?;
        let mut session = Session::new(&img);
        let (reply, _) = session.call(&Request::Usage, &[])?;
        if let Reply::Usage {
            usage,
            auto_deleted,
        } = reply
        {
            rows.push(Row {
                volume: img,
                shadow_storage: diff,
                usage,
                auto_deleted,
                served: session.served(),
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("No shadow storage here.");
    } else {
        for r in rows {
            println!(
                "Shadow Storage association\n   For volume: {}\n   Shadow Storage volume: {}",
                r.volume.display(),
                r.shadow_storage.display()
            );
            print!("{}", ops::render_usage(&r.usage));
            if r.served {
                println!(
                    "   Deleted to make room: {} (since `volshadow serve` started)",
                    r.auto_deleted
                );
            } else {
                println!(
                    "   Deleted to make room: counted only while `volshadow serve` runs (none is)"
                );
            }
        }
    }
    Ok(())
}

fn create_shadows(volumes: &[PathBuf], persistent: bool, json: bool) -> Result<()> {
    if volumes.len() == 1 {
        let req = Request::CreateShadow { persistent };
        if !persistent
            && control::call(
                &storage::control_path(&volumes[0]),
                &Request::ListShadows,
                &[],
            )?
            .is_none()
        {
            bail!(
                "a non-persistent shadow copy lives only while `volshadow serve` holds the volume, and none does; use --persistent"
            );
        }
        let mut session = Session::new(&volumes[0]);
        let (reply, _) = session.call(&req, &[])?;
        return print_reply_with(&reply, json, Some(session.auto_deleted_ids()));
    }
    if !persistent {
        bail!("shadow copy sets of several volumes are persistent");
    }
    // A set across volumes: every volume opened here, written all at once.
    let vols: Vec<Volume> = volumes
        .iter()
        .map(|v| storage::open_volume(v).with_context(|| format!("opening {}", v.display())))
        .collect::<Result<_>>()?;
    let refs: Vec<&Volume> = vols.iter().collect();
    // Each member records where the others are, so one reopened after a
    // crash can ask the first whether the set committed.
    let locators: Vec<String> = volumes
        .iter()
        .map(|v| {
            std::fs::canonicalize(v)
                .unwrap_or_else(|_| v.clone())
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let set = SnapshotSet::create_located(
        &refs,
        &locators,
        SnapshotOptions {
            persistent: true,
            attributes: volshadow_cow::attributes::CLIENT_ACCESSIBLE,
            set_id: None,
        },
        volshadow_cow::DEFAULT_HOLD_TIMEOUT,
    )?;
    let shadows: Vec<ShadowRow> = set.snapshots.iter().map(ShadowRow::from).collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "set_id": set.id,
                "shadows": shadows,
            }))?
        );
    } else {
        println!("Created shadow copy set {}.", set.id);
        for (v, s) in volumes.iter().zip(&shadows) {
            println!("  {}: {}", v.display(), s.id);
        }
    }
    Ok(())
}

/// `read`: streams the range to stdout or a file, piece by piece.
fn read(
    img: &Path,
    shadow: Option<&str>,
    offset: u64,
    length: u64,
    output: Option<&Path>,
) -> Result<()> {
    let mut session = Session::new(img);
    match output {
        Some(p) => {
            guard::refuse_volume_file(p, &[img.to_path_buf()], "the read's output")?;
            // Checked before the output is created or truncated, so a bad
            // range leaves an existing file as it was.
            let size = session.size()?;
            if offset.checked_add(length).is_none_or(|end| end > size) {
                bail!(
                    "read of {length} bytes at offset {offset} is outside {} ({size} bytes)",
                    img.display()
                );
            }
            let f = std::fs::File::create(p).with_context(|| format!("writing {}", p.display()))?;
            let mut w = std::io::BufWriter::new(f);
            let done = session
                .read_to(shadow, offset, length, &mut w)
                .and_then(|()| {
                    Ok(w.into_inner()
                        .map_err(std::io::IntoInnerError::into_error)?
                        .sync_all()?)
                });
            if let Err(e) = done {
                // A cut-short file could pass for the data (a damaged chunk
                // fails a read part way): leave none.
                let _ = std::fs::remove_file(p);
                return Err(e.context(format!("reading into {} (removed)", p.display())));
            }
        }
        None => session.read_to(shadow, offset, length, &mut std::io::stdout().lock())?,
    }
    Ok(())
}

/// `export`: through the volume's server when one holds it (so clients
/// keep writing meanwhile), else opening the files; streamed piece by piece.
fn export(img: &Path, shadow: &str, output: &Path, since: Option<&str>, json: bool) -> Result<()> {
    guard::refuse_volume_file(output, &[img.to_path_buf()], "the export")?;
    let mut session = Session::new(img);
    let id = match session.call(&Request::ListShadows, &[])?.0 {
        Reply::Shadows { shadows } => ops::resolve_among(&shadows, shadow)?,
        other => bail!("unexpected answer {other:?} to a listing"),
    };
    let len = session.size()?;
    let extents: Vec<(u64, u64)> = match since {
        Some(base) => {
            if !output.exists() {
                bail!(
                    "incremental export writes into an existing image; {} does not exist",
                    output.display()
                );
            }
            let req = Request::Diff {
                from: base.to_string(),
                to: Some(id.to_string()),
            };
            match session.call(&req, &[])?.0 {
                Reply::Extents { extents, .. } => {
                    extents.into_iter().map(|e| (e.offset, e.len)).collect()
                }
                other => bail!("unexpected answer {other:?} to a diff"),
            }
        }
        None => vec![(0, len)],
    };
    let out = match since {
        Some(_) => std::fs::OpenOptions::new().write(true).open(output),
        None => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(output),
    }
    .with_context(|| format!("opening {}", output.display()))?;
    if out.metadata()?.len() != len {
        if since.is_some() {
            bail!(
                "{} has {} bytes, the volume {}",
                output.display(),
                out.metadata()?.len(),
                len
            );
        }
        out.set_len(len)?;
    }
    let total: u64 = extents.iter().map(|e| e.1).sum();
    let bar = progress(total, "exporting");
    let mut written = 0u64;
    let shadow_id = id.to_string();
    let copied = (|| -> Result<()> {
        for &(off, elen) in &extents {
            let mut at = off;
            while at < off + elen {
                let n = (off + elen - at).min(ops::PIECE);
                let req = Request::Read {
                    shadow: Some(shadow_id.clone()),
                    offset: at,
                    length: n,
                };
                let (_, buf) = session.call(&req, &[])?;
                if buf.len() as u64 != n {
                    bail!("asked for {n} bytes at offset {at}, got {}", buf.len());
                }
                let n = n as usize;
                // A full export skips zero runs: the output stays sparse.
                if since.is_some() || buf[..n].iter().any(|&b| b != 0) {
                    write_at(&out, &buf[..n], at)?;
                    written += n as u64;
                }
                at += n as u64;
                bar.inc(n as u64);
            }
        }
        Ok(out.sync_all()?)
    })();
    if let Err(e) = copied {
        bar.finish_and_clear();
        if since.is_none() {
            // A full export cut short (a damaged chunk, a full disk) could
            // pass for the shadow copy: leave none.
            let _ = std::fs::remove_file(output);
            return Err(e.context(format!("exporting to {} (removed)", output.display())));
        }
        return Err(e.context(format!(
            "exporting to {}: the incremental export stopped part way; the file is not a consistent image",
            output.display()
        )));
    }
    bar.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({"shadow": id, "output": output, "bytes_written": written, "incremental": since.is_some()})
        );
    } else {
        println!(
            "Exported shadow copy {id} to {} ({} written{}).",
            output.display(),
            ops::human_size(written),
            if since.is_some() { ", incremental" } else { "" }
        );
    }
    Ok(())
}

/// `export --salvage`: every chunk salvage can vouch for, the rest zeros
/// and listed. Reads go a megabyte at a time, chunk by chunk where one
/// fails, so one damaged chunk costs only itself.
fn export_salvage(img: &Path, shadow: &str, output: &Path, json: bool) -> Result<()> {
    guard::refuse_volume_file(output, &[img.to_path_buf()], "the export")?;
    let vol = storage::open_volume_with(img, OpenMode::Salvage)?;
    for n in vol.recovery_notes() {
        eprintln!("volshadow: salvage: {n}");
    }
    let id = ops::resolve(&vol, shadow)?;
    let view = vol.snapshot(id)?;
    let len = view.len();
    let chunk = u64::from(vol.chunk_size());
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(output)
        .with_context(|| format!("opening {}", output.display()))?;
    out.set_len(len)?;
    let bar = progress(len, "salvaging");
    let mut buf = vec![0u8; 1 << 20];
    let mut lost: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        let pieces: Vec<(u64, usize)> = if view.read_at(&mut buf[..n], at).is_ok() {
            vec![(at, n)]
        } else {
            let mut ok = Vec::new();
            let mut c = at;
            while c < at + n as u64 {
                let m = (at + n as u64 - c).min(chunk) as usize;
                let k = (c - at) as usize;
                if view.read_at(&mut buf[k..k + m], c).is_ok() {
                    ok.push((c, m));
                } else {
                    match lost.last_mut() {
                        Some(l) if l.0 + l.1 == c => l.1 += m as u64,
                        _ => lost.push((c, m as u64)),
                    }
                }
                c += m as u64;
            }
            ok
        };
        for (off, m) in pieces {
            let k = (off - at) as usize;
            if buf[k..k + m].iter().any(|&b| b != 0) {
                write_at(&out, &buf[k..k + m], off)?;
            }
        }
        at += n as u64;
        bar.inc(n as u64);
    }
    out.sync_all()?;
    bar.finish_and_clear();
    let lost_bytes: u64 = lost.iter().map(|l| l.1).sum();
    if json {
        println!(
            "{}",
            serde_json::json!({"shadow": id, "output": output, "salvage": true,
                "lost": lost.iter().map(|l| serde_json::json!({"offset": l.0, "len": l.1})).collect::<Vec<_>>(),
                "lost_bytes": lost_bytes})
        );
    } else {
        println!(
            "Salvaged shadow copy {id} to {}: {} could not be vouched for.",
            output.display(),
            ops::human_size(lost_bytes)
        );
        for (off, l) in lost.iter().take(20) {
            println!("  lost: offset {off}, {l} bytes (zeros in the output)");
        }
        if lost.len() > 20 {
            println!("  … and {} more ranges", lost.len() - 20);
        }
    }
    if !lost.is_empty() {
        bail!(
            "{} range(s), {} bytes, of shadow copy {id} could not be vouched for; they are zeros in {}",
            lost.len(),
            lost_bytes,
            output.display()
        );
    }
    Ok(())
}

#[cfg(unix)]
fn write_at(f: &std::fs::File, buf: &[u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(buf, off)
}

#[cfg(windows)]
fn write_at(f: &std::fs::File, mut buf: &[u8], mut off: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = f.seek_write(buf, off)?;
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// Deletions by NBD writes are logged within this long.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

fn serve(img: &Path, socket: Option<PathBuf>, listen: Option<String>) -> Result<()> {
    #[cfg(unix)]
    if let Some(path) = &socket {
        // The stale socket is removed before binding: never remove
        // anything else.
        guard::refuse_volume_file(path, &[img.to_path_buf()], "the NBD socket")?;
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path)
            && !m.file_type().is_socket()
        {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
    }
    let vol = storage::open_volume(img)?;
    let reporter = Arc::new(report::Reporter::new(vol.clone()));
    control::serve(&storage::control_path(img), reporter.clone())?;
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(REPORT_EVERY);
            reporter.drain();
        }
    });
    stop_on_signal(img, vol.clone(), socket.clone())?;
    let exports: Arc<dyn volshadow_nbd::Exports> = Arc::new(exports::VolumeExports::new(vol));
    let stop = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    if let Some(path) = socket {
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        eprintln!(
            "Serving {} on nbd+unix:///live?socket={} (shadow copies: export name = id).",
            img.display(),
            path.display()
        );
        volshadow_nbd::serve_unix(listener, exports, stop);
        return Ok(());
    }
    #[cfg(not(unix))]
    if socket.is_some() {
        bail!("--socket needs a Unix system; use --listen");
    }
    let addr = listen.unwrap_or_else(|| "127.0.0.1:10809".to_string());
    let listener =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!(
        "Serving {} on nbd://{}/live (shadow copies: export name = id).",
        img.display(),
        listener.local_addr()?
    );
    volshadow_nbd::serve_tcp(listener, exports, stop);
    Ok(())
}

/// On SIGINT, SIGTERM or SIGHUP (Ctrl+C or console close on Windows):
/// writes still in flight finish, the volume is closed cleanly (flushed,
/// journal marked), the sockets are removed, and the process exits 0.
/// Non-persistent shadow copies end with the process, as they would at a
/// crash, and recovery releases them at the next open.
fn stop_on_signal(img: &Path, vol: Volume, socket: Option<PathBuf>) -> Result<()> {
    let control = storage::control_path(img);
    ctrlc::set_handler(move || {
        eprintln!("volshadow: stopping: closing the volume");
        let code = match vol.close() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("volshadow: {}", one_line(&anyhow::Error::from(e)));
                1
            }
        };
        let _ = std::fs::remove_file(&control);
        if let Some(s) = &socket {
            let _ = std::fs::remove_file(s);
        }
        std::process::exit(code);
    })
    .context("cannot install the stop handler")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option, positional and subcommand of the tree says what it is.
    #[test]
    fn every_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "volshadow", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }

    #[test]
    fn causes_are_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let block = volshadow_block::Error::Path {
            path: "x.img".into(),
            op: volshadow_block::Op::Open,
            source: io,
        };
        let e = anyhow::Error::from(block).context("opening x.img");
        let line = one_line(&e);
        assert_eq!(line.matches(&text).count(), 1, "{line}");
        assert!(
            line.starts_with("opening x.img: cannot open x.img"),
            "{line}"
        );
    }

    #[test]
    fn a_prefix_the_source_repeats_is_printed_once() {
        #[derive(Debug)]
        struct Damaged;
        impl std::fmt::Display for Damaged {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("snapshot 3f2a: chunk 3 at offset 49152 is damaged")
            }
        }
        impl std::error::Error for Damaged {}
        let layer = volshadow_block::Error::Layer {
            device: "snapshot 3f2a".into(),
            kind: std::io::ErrorKind::InvalidData,
            source: Box::new(Damaged),
        };
        let e = anyhow::Error::from(layer).context("reading into out.raw");
        assert_eq!(
            one_line(&e),
            "reading into out.raw: snapshot 3f2a: chunk 3 at offset 49152 is damaged"
        );
    }
}
