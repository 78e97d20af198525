//! `receive`: a send stream applied to a replica. A full stream creates
//! the replica (image, shadow storage, binding); an incremental one
//! applies only on the shadow copy it was made from. A refused or cut
//! stream leaves the replica as it was, and a crash leaves it at its
//! previous shadow copy (`volshadow_replica::apply`: a marker file
//! `IMG.vshadow.receiving`, settled by whoever opens the replica next).
//!
//! The replica's files are opened here, not through a server: a replica
//! being served is refused ("in use by another process").

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use volshadow_block::BlockDevice;
use volshadow_cow::Volume;
use volshadow_replica::apply;
use volshadow_replica::{Apply, Header, Kind, Pending, Record, StreamReader};

use crate::args::PolicyArgs;
use crate::ops;
use crate::output::progress;
use crate::verbs::shadowstorage::{self, StorageSpec};
use crate::{guard, storage};

/// Where a new replica's storage goes and how large it may grow.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewReplica {
    pub(crate) on: Option<PathBuf>,
    pub(crate) maxsize: Option<u64>,
}

/// `receive` from a file or standard input.
pub(crate) fn receive(
    img: &Path,
    input: Option<&Path>,
    new: &NewReplica,
    json: bool,
) -> Result<()> {
    let from_stdin = input.is_none_or(|p| p == Path::new("-"));
    let reader: Box<dyn Read> = match input.filter(|_| !from_stdin) {
        Some(p) => {
            Box::new(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?)
        }
        None => {
            if std::io::stdin().is_terminal() {
                bail!("standard input is a terminal; pipe a stream in or give --input FILE");
            }
            Box::new(std::io::stdin().lock())
        }
    };
    let reader = std::io::BufReader::with_capacity(256 << 10, reader);
    let mut stream = StreamReader::new(reader).context("reading the stream's header")?;
    let header = stream.header().clone();
    if header.kind != Kind::Stream {
        bail!("this is an object store manifest, not a stream to receive");
    }
    let total = header.volume_len;
    let bar = progress(total, "receiving");
    let result = apply_stream(img, &header, new, |apply| {
        while let Some(rec) = stream.next_record()? {
            let (off, len) = match rec {
                Record::Data { offset, data } => (offset, data.len() as u64),
                Record::Zero { offset, len } | Record::Ref { offset, len, .. } => (offset, len),
            };
            apply.record(&rec)?;
            bar.set_position(off + len);
        }
        Ok(())
    });
    bar.finish_and_clear();
    let (info, written) = result?;
    if json {
        println!(
            "{}",
            serde_json::json!({"kind": "received", "shadow": ops::ShadowRow::from(&info),
                "base": header.base_id, "bytes_written": written})
        );
    } else {
        println!(
            "Received shadow copy {} ({}, {} written) into {}.",
            info.id,
            if header.base_id.is_some() {
                "incremental"
            } else {
                "full"
            },
            ops::human_size(written),
            img.display()
        );
    }
    Ok(())
}

/// Opens (incremental) or creates (full) the replica, runs `feed` on an
/// [`Apply`] and commits it; on any error rolls back (or removes the
/// replica a full stream was creating) and says so.
pub(crate) fn apply_stream(
    img: &Path,
    header: &Header,
    new: &NewReplica,
    feed: impl FnOnce(&mut Apply<'_>) -> volshadow_replica::Result<()>,
) -> Result<(volshadow_cow::SnapshotInfo, u64)> {
    let marker = storage::marker_path(img);
    let target = header.shadow_id;
    let vol = match header.base_id {
        Some(_) => {
            let vol = storage::open_volume(img)?;
            if vol.len() != header.volume_len {
                bail!(
                    "the stream is of a volume of {} bytes, {} has {}; nothing was changed",
                    header.volume_len,
                    img.display(),
                    vol.len()
                );
            }
            vol
        }
        None => create_replica(img, header, new)?,
    };
    let mut apply = Apply::begin(&vol, &marker, target, header.base_id)?;
    match feed(&mut apply) {
        Ok(()) => {
            let written = apply.written();
            let info = apply.commit()?;
            Ok((info, written))
        }
        Err(e) => match header.base_id {
            Some(base) => {
                let settled = apply.abort();
                match settled {
                    Ok(_) => Err(anyhow::Error::new(e).context(format!(
                        "receive refused; the replica {} is back at shadow copy {base}",
                        img.display()
                    ))),
                    Err(r) => Err(anyhow::Error::new(e).context(format!(
                        "receive refused, and rolling back failed ({r}); the next open of {} rolls back to {base}",
                        img.display()
                    ))),
                }
            }
            None => {
                drop(apply);
                drop(vol);
                remove_replica(img);
                Err(anyhow::Error::new(e).context(format!(
                    "receive refused; no replica was made ({} removed)",
                    img.display()
                )))
            }
        },
    }
}

/// A full stream's new replica: the marker first (so a crash at any
/// point is recognised), then the image and its shadow storage.
fn create_replica(img: &Path, header: &Header, new: &NewReplica) -> Result<Volume> {
    let marker = storage::marker_path(img);
    match apply::read_marker(&marker)? {
        Some(p) if p.base.is_none() => {
            eprintln!(
                "volshadow: {}: removing what a cut first receive (of shadow copy {}) left",
                img.display(),
                p.target
            );
            remove_replica(img);
        }
        Some(p) => bail!(
            "{} has an unsettled receive of shadow copy {}; open it (e.g. `list shadows`) to roll it back",
            img.display(),
            p.target
        ),
        None => {}
    }
    if img.exists() || storage::binding_path(img).exists() {
        bail!(
            "{} exists; a full stream creates a new replica (send with --since to update one); nothing was changed",
            img.display()
        );
    }
    guard::refuse_volume_file(img, &[], "a new replica")?;
    let diff = new.on.clone().unwrap_or_else(|| {
        let mut s = img.as_os_str().to_owned();
        s.push(".diff");
        PathBuf::from(s)
    });
    if diff.exists() {
        bail!(
            "{} exists; give the replica's shadow storage another place with --on; nothing was changed",
            diff.display()
        );
    }
    apply::write_marker(
        &marker,
        &Pending {
            version: 1,
            target: header.shadow_id,
            base: None,
            policy: None,
        },
    )?;
    let made = (|| -> Result<Volume> {
        volshadow_block::FileImage::create(img, header.volume_len)
            .with_context(|| format!("creating {}", img.display()))?;
        shadowstorage::create_storage(
            img,
            &diff,
            StorageSpec {
                maxsize: new.maxsize.unwrap_or(header.volume_len),
                chunk_size: u64::from(header.chunk_size),
                preallocate: false,
                extent_clones: true,
            },
            &PolicyArgs {
                on_full: None,
                grow_max: None,
            },
        )
    })();
    match made {
        Ok(v) => Ok(v),
        Err(e) => {
            remove_replica(img);
            Err(e)
        }
    }
}

/// Removes a replica a first receive made (best effort: every file that
/// is there), the marker last.
fn remove_replica(img: &Path) {
    if let Ok((_, diff)) = storage::read_binding(img) {
        let _ = std::fs::remove_file(diff);
    }
    let _ = std::fs::remove_file(storage::binding_path(img));
    let _ = std::fs::remove_file(img);
    let _ = apply::remove_marker(&storage::marker_path(img));
}
