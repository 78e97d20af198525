//! `export`: a shadow copy (or what changed since an older one) written
//! to a raw image; `export --salvage` rescues what damaged storage can
//! still vouch for.

use std::path::Path;

use anyhow::{Context, Result, bail};
use volshadow_block::{BlockDevice, push_extent};
use volshadow_cow::{Extent, OpenMode};

use crate::ops::{self, Reply, Request};
use crate::output::progress;
use crate::session::Session;
use crate::{guard, storage};

/// `export`: through the volume's server when one holds it (so clients
/// keep writing meanwhile), else opening the files; streamed piece by piece.
pub(crate) fn export(
    img: &Path,
    shadow: &str,
    output: &Path,
    since: Option<&str>,
    json: bool,
) -> Result<()> {
    guard::refuse_volume_file(output, &[img.to_path_buf()], "the export")?;
    let mut session = Session::new(img);
    let id = match session.call(&Request::ListShadows, &[])?.0 {
        Reply::Shadows { shadows } => ops::resolve_among(&shadows, shadow)?,
        other => bail!("unexpected answer {other:?} to a listing"),
    };
    let len = session.size()?;
    let extents: Vec<Extent> = match since {
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
                Reply::Extents { extents, .. } => extents,
                other => bail!("unexpected answer {other:?} to a diff"),
            }
        }
        None => vec![Extent { offset: 0, len }],
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
    let total: u64 = extents.iter().map(|e| e.len).sum();
    let bar = progress(total, "exporting");
    let mut written = 0u64;
    let shadow_id = id.to_string();
    let copied = (|| -> Result<()> {
        for e in &extents {
            let mut at = e.offset;
            while at < e.end() {
                let n = (e.end() - at).min(ops::PIECE);
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
        Ok(crate::output::sync_output(&out)?)
    })();
    if let Err(e) = copied {
        bar.finish_and_clear();
        if since.is_none() {
            // A full export cut short (a damaged chunk, a full disk) could
            // pass for the shadow copy: leave none.
            let removed = crate::output::remove_partial(output);
            return Err(e.context(format!(
                "exporting to {}{}",
                output.display(),
                if removed { " (removed)" } else { "" }
            )));
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
pub(crate) fn export_salvage(img: &Path, shadow: &str, output: &Path, json: bool) -> Result<()> {
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
    let mut lost: Vec<Extent> = Vec::new();
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
                    push_extent(
                        &mut lost,
                        Extent {
                            offset: c,
                            len: m as u64,
                        },
                    );
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
    let lost_bytes: u64 = lost.iter().map(|l| l.len).sum();
    if json {
        println!(
            "{}",
            serde_json::json!({"shadow": id, "output": output, "salvage": true,
                "lost": lost,
                "lost_bytes": lost_bytes})
        );
    } else {
        println!(
            "Salvaged shadow copy {id} to {}: {} could not be vouched for.",
            output.display(),
            ops::human_size(lost_bytes)
        );
        for l in lost.iter().take(20) {
            println!(
                "  lost: offset {}, {} bytes (zeros in the output)",
                l.offset, l.len
            );
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
