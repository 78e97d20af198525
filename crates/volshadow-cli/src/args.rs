//! The command line's clap tree: every verb, subcommand and option, each
//! with its help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use volshadow_cow::FullPolicy;

use crate::bench;
use crate::storage::{parse_positive_size, parse_size};

#[derive(Debug, Parser)]
#[command(
    name = "volshadow",
    version,
    about = "Point-in-time snapshots of block volumes (VSS-style)"
)]
pub(crate) struct Cli {
    /// Log what the engine does (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
    /// Send a shadow copy (or what changed since an older one) as a
    /// checksummed stream, to a file, standard output or object storage.
    Send {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// The shadow copy to send (id or unique prefix).
        #[arg(long)]
        shadow: String,
        /// Only what changed since this older shadow copy (an incremental
        /// stream; the replica must have it as its newest).
        #[arg(long)]
        since: Option<String>,
        /// Write the stream to this file (`-` or none: standard output).
        /// Never one of a volume's own files.
        #[arg(long, conflicts_with = "to")]
        output: Option<PathBuf>,
        /// Upload to object storage instead: `s3://bucket/prefix`
        /// (endpoint and credentials from the AWS_* environment variables).
        #[arg(long, value_name = "URL")]
        to: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply a stream from `send` to a replica: a full stream creates it,
    /// an incremental one applies on the shadow copy it was made from.
    Receive {
        /// The replica's image (created by a full stream).
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// Read the stream from this file (`-` or none: standard input).
        #[arg(long, conflicts_with = "from")]
        input: Option<PathBuf>,
        /// Restore from object storage instead: `s3://bucket/prefix`.
        #[arg(long, value_name = "URL", requires = "shadow")]
        from: Option<String>,
        /// With --from: the shadow copy to restore (id or unique prefix).
        #[arg(long)]
        shadow: Option<String>,
        /// A new replica's shadow storage (default: IMG.diff).
        #[arg(long = "on", value_name = "DIFF")]
        diff: Option<PathBuf>,
        /// A new replica's most shadow storage (default: the volume's size).
        #[arg(long, value_parser = parse_size)]
        maxsize: Option<u64>,
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
        #[arg(long = "for", value_name = "IMG", required_unless_present = "from")]
        volume: Option<PathBuf>,
        /// Check object storage instead (`s3://bucket/prefix`): read every
        /// manifest whole and rehash every stored chunk.
        #[arg(long, value_name = "URL", conflicts_with_all = ["volume", "salvage"])]
        from: Option<String>,
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
        /// With --on: never take copies as extent clones (as at `add
        /// shadowstorage`). A refusal recorded in the old binding is kept
        /// without it.
        #[arg(long, requires = "on")]
        no_extent_clones: bool,
    },
    /// Serve the live volume and its shadow copies over NBD.
    Serve(ServeArgs),
    /// Mount the volume as files with FUSE, in the foreground like `serve`:
    /// DIR/live (read-write) and DIR/shadows/<id> (read-only), each the
    /// size of the volume. Shadow copies made meanwhile appear.
    #[cfg(target_os = "linux")]
    Mount {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// An empty directory to mount on.
        dir: PathBuf,
    },
    /// Stop a `mount`: unmounts DIR, and its process ends cleanly.
    #[cfg(target_os = "linux")]
    Unmount {
        /// The directory a `volshadow mount` is mounted on.
        dir: PathBuf,
    },
    /// Expose a shadow copy read-only (root): a loop device, and its file
    /// system mounted read-only at DIR.
    #[cfg(target_os = "linux")]
    Expose {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG")]
        volume: PathBuf,
        /// The shadow copy (id or unique prefix).
        #[arg(long)]
        shadow: String,
        /// An empty directory to mount the shadow copy's file system on.
        #[arg(required_unless_present = "no_mount")]
        dir: Option<PathBuf>,
        /// Stop at the read-only loop device.
        #[arg(long, conflicts_with = "dir")]
        no_mount: bool,
    },
    /// Undo an `expose`: unmount, detach the loop device, stop its mount.
    #[cfg(target_os = "linux")]
    Unexpose {
        /// The directory (or, with --no-mount, the loop device) `expose` printed.
        place: PathBuf,
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
        /// Restore a component into a directory instead of over its
        /// volumes (one image file per volume), as `COMPONENT=DIR`.
        #[arg(long, value_name = "COMPONENT=DIR")]
        alternate: Vec<String>,
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
pub(crate) enum ImageCommand {
    /// Create a sparse raw image.
    Create {
        /// The new image file (must not exist).
        img: PathBuf,
        /// Its size (bytes; K, M, G, T suffixes).
        #[arg(long, value_parser = parse_positive_size)]
        size: u64,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The volume's image.
    #[arg(long = "for", value_name = "IMG")]
    pub(crate) volume: PathBuf,
    /// Unix socket to listen on.
    #[arg(long, conflicts_with = "listen")]
    pub(crate) socket: Option<PathBuf>,
    /// TCP address to listen on (default 127.0.0.1:10809). An address
    /// other than loopback needs TLS required, or --insecure.
    #[arg(long)]
    pub(crate) listen: Option<String>,
    /// TLS credentials: a directory with server-cert.pem and
    /// server-key.pem (and ca-cert.pem for --tls-verify-peer), the layout
    /// qemu-nbd and libnbd use. TLS is then required unless --tls allow.
    #[arg(long, value_name = "DIR")]
    pub(crate) tls_creds: Option<PathBuf>,
    /// Whether plaintext clients are served too (needs --tls-creds).
    #[arg(long, value_enum, requires = "tls_creds")]
    pub(crate) tls: Option<TlsPolicy>,
    /// Clients must present a certificate that chains to DIR/ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    pub(crate) tls_verify_peer: bool,
    /// Listen on a non-loopback address without TLS required: anyone who
    /// can reach the port may read (and write) the served volume.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Serve every export read-only (writes get EPERM).
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Offer only this export (`live` or a shadow copy id); repeatable.
    /// Default: the live volume and every shadow copy.
    #[arg(long = "export", value_name = "live|ID")]
    pub(crate) exports: Vec<String>,
    /// NBD clients served at once; one more waits up to 2 s for a slot,
    /// then is closed.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) max_connections: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TlsPolicy {
    /// Plaintext clients get NBD_REP_ERR_TLS_REQD (the default).
    Require,
    /// Clients choose: TLS or plaintext.
    Allow,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum OnFull {
    /// Delete the oldest shadow copies to make room (each is told).
    DeleteOldest,
    /// Refuse the write; nothing changes.
    FailWrites,
    /// Raise the limit, up to --grow-max.
    Grow,
}

#[derive(Debug, Args)]
pub(crate) struct PolicyArgs {
    /// What to do when the shadow storage is full.
    #[arg(long, value_enum)]
    pub(crate) on_full: Option<OnFull>,
    /// With --on-full grow: the most it may grow to (default: the capacity).
    #[arg(long, value_parser = parse_size)]
    pub(crate) grow_max: Option<u64>,
}

impl PolicyArgs {
    pub(crate) fn policy(&self, capacity: u64) -> Option<FullPolicy> {
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
pub(crate) enum AddWhat {
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
        /// Never take copies as extent clones, even where the file system
        /// could share extents (XFS, btrfs): a cloned chunk's next
        /// overwrite allocates new blocks for the image, which can fail
        /// on a full file system; without clones it is overwritten in place.
        #[arg(long)]
        no_extent_clones: bool,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ResizeWhat {
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
pub(crate) enum ListWhat {
    /// Shadow copies of a volume, oldest first.
    Shadows {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG", required_unless_present = "from")]
        volume: Option<PathBuf>,
        /// The shadow copies stored in object storage (`s3://bucket/prefix`).
        #[arg(long, value_name = "URL", conflicts_with = "volume")]
        from: Option<String>,
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
pub(crate) enum CreateWhat {
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
pub(crate) enum DeleteWhat {
    /// Delete one shadow copy, the oldest, or all.
    Shadows {
        /// The volume's image.
        #[arg(long = "for", value_name = "IMG", required_unless_present = "from")]
        volume: Option<PathBuf>,
        /// Delete from object storage (`s3://bucket/prefix`) instead, with
        /// --shadow: its manifest, and the chunks no other shadow copy uses.
        #[arg(long, value_name = "URL", conflicts_with_all = ["volume", "oldest", "all"])]
        from: Option<String>,
        /// This shadow copy (id or unique prefix).
        #[arg(long, group = "which")]
        shadow: Option<String>,
        /// The oldest shadow copy.
        #[arg(long, group = "which")]
        oldest: bool,
        /// Every shadow copy.
        #[arg(long, group = "which")]
        all: bool,
        /// Every shadow copy of this snapshot set (id or unique prefix).
        #[arg(long, group = "which")]
        set: Option<String>,
    },
}

/// Why a verb this build lacks is Linux only, for a clear refusal rather
/// than clap's "unrecognized subcommand".
#[cfg(not(target_os = "linux"))]
pub fn linux_only(verb: &str) -> Option<&'static str> {
    Some(match verb {
        "mount" | "unmount" => {
            "mount and unmount are Linux only (FUSE); serve the volume over NBD instead (`volshadow serve --listen 127.0.0.1:10809`)"
        }
        "expose" | "unexpose" => {
            "expose and unexpose are Linux only (loop devices); read a shadow copy with `volshadow export` or over NBD (`volshadow serve`, export name = its id)"
        }
        _ => return None,
    })
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
}
