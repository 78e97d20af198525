//! Shadow copies in object storage (`s3://bucket/prefix`): `send --to`,
//! `receive --from`, and `list shadows`, `verify` and `delete shadows`
//! with `--from`. The bucket side is `volshadow_replica::replicate`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use volshadow_replica::Kind;
use volshadow_replica::replicate::{self, ShadowMeta};
use volshadow_replica::store::Bucket;

use crate::ops;
use crate::output::progress;
use crate::verbs::receive::{self, NewReplica};
use crate::verbs::send::Source;

fn open(url: &str) -> Result<Bucket> {
    Ok(Bucket::open(url)?)
}

/// `send --to s3://…`.
pub(crate) fn send_to(
    img: &Path,
    shadow: &str,
    since: Option<&str>,
    url: &str,
    json: bool,
) -> Result<()> {
    let bucket = open(url)?;
    let src = Source::open(img, shadow, since)?;
    if let Some(b) = src.base {
        replicate::manifest_header(&bucket, b)
            .with_context(|| format!("--since {b}: it must be in {url} already"))?;
    }
    let meta = ShadowMeta {
        volume_id: src.volume_id,
        volume_len: src.len,
        chunk_size: src.chunk_size,
        shadow_id: src.shadow.id,
        created_ns: src.created_ns(),
    };
    let since = src.base;
    let bar = progress(src.len, "uploading");
    // Both callbacks read through the one session.
    let src = std::cell::RefCell::new(src);
    let report = replicate::upload(
        &bucket,
        &meta,
        since,
        |off, len| src.borrow_mut().extents_in(off, len),
        |off, len| src.borrow_mut().read(off, len),
        |n| bar.inc(n),
    );
    bar.finish_and_clear();
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "Stored shadow copy {} in {url}: {} chunks uploaded ({}), {} already there.",
            report.shadow,
            report.uploaded,
            ops::human_size(report.uploaded_bytes),
            report.already_stored
        );
    }
    Ok(())
}

/// `receive --from s3://… --shadow ID`: creates the replica, or brings
/// it from its newest shadow copy (which must be in the bucket) to `ID`.
pub(crate) fn receive_from(
    img: &Path,
    url: &str,
    shadow: &str,
    new: &NewReplica,
    json: bool,
) -> Result<()> {
    let bucket = open(url)?;
    let target = replicate::resolve(&bucket, shadow)?;
    let mut header = replicate::manifest_header(&bucket, target)?;
    if header.kind != Kind::Manifest {
        bail!("{url}: shadow copy {target} has no manifest");
    }
    // An existing replica moves on from its newest shadow copy.
    if storage_exists(img) {
        let vol = crate::storage::open_volume(img)?;
        let newest = vol.snapshots().last().map(|s| s.id);
        drop(vol);
        match newest {
            Some(b) => header.base_id = Some(b),
            None => bail!(
                "{} has no shadow copy to start from; receive into a new replica",
                img.display()
            ),
        }
    }
    header.kind = Kind::Stream;
    let base = header.base_id;
    if let Some(b) = base {
        replicate::manifest_header(&bucket, b).with_context(|| {
            format!("the replica's newest shadow copy {b} is not in {url}, so what changed since cannot be told")
        })?;
    }
    let bar = progress(header.volume_len, "receiving");
    let result = receive::apply_stream(img, &header, new, |apply| {
        replicate::restore(&bucket, target, base, apply, |n| bar.inc(n))
    });
    bar.finish_and_clear();
    let (info, written) = result?;
    if json {
        println!(
            "{}",
            serde_json::json!({"kind": "received", "shadow": ops::ShadowRow::from(&info),
                "base": base, "bytes_written": written, "from": url})
        );
    } else {
        println!(
            "Received shadow copy {} from {url} into {} ({} written).",
            info.id,
            img.display(),
            ops::human_size(written)
        );
    }
    Ok(())
}

fn storage_exists(img: &Path) -> bool {
    crate::storage::binding_path(img).exists()
}

/// `list shadows --from s3://…`.
pub(crate) fn list(url: &str, json: bool) -> Result<()> {
    let bucket = open(url)?;
    let rows = replicate::list(&bucket)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"kind": "shadows", "from": url, "shadows": rows})
            )?
        );
    } else if rows.is_empty() {
        println!("No shadow copies in {url}.");
    } else {
        for r in rows {
            println!(
                "Shadow copy ID: {}\n   Volume: {} ({})\n   Created: {}",
                r.id,
                r.volume_id,
                ops::human_size(r.volume_len),
                ops::time(r.created)
            );
        }
    }
    Ok(())
}

/// `verify --from s3://…`: every manifest read whole, every chunk rehashed.
pub(crate) fn verify(url: &str, json: bool) -> Result<()> {
    let bucket = open(url)?;
    let bar = progress(0, "verifying");
    let report = replicate::verify(&bucket, |_| bar.inc(1));
    bar.finish_and_clear();
    let report = report?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"kind": "verify", "from": url, "report": report})
            )?
        );
    } else {
        println!(
            "{} manifests, {} chunks checked, {} unreferenced.",
            report.manifests, report.chunks_checked, report.unreferenced
        );
        for d in &report.damaged {
            println!("  damaged chunk {d}");
        }
        for (m, c) in &report.missing {
            println!("  missing chunk {c} (named by shadow copy {m})");
        }
        for p in &report.problems {
            println!("  {p}");
        }
    }
    if !report.is_clean() {
        bail!(
            "{url}: {} damaged, {} missing chunks, {} unreadable manifests",
            report.damaged.len(),
            report.missing.len(),
            report.problems.len()
        );
    }
    Ok(())
}

/// `delete shadows --from s3://… --shadow ID`.
pub(crate) fn delete(url: &str, shadow: &str) -> Result<()> {
    let bucket = open(url)?;
    let id = replicate::resolve(&bucket, shadow)?;
    let gone = replicate::delete(&bucket, id)?;
    println!("Deleted shadow copy {id} from {url} ({gone} chunks no other shadow copy uses).");
    Ok(())
}
