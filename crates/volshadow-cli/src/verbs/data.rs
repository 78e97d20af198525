//! `write` and `read`: bytes in and out of a volume, streamed.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::guard;
use crate::session::Session;

/// `write`: streams a file (or stdin) into the live volume.
pub(crate) fn write(volume: &Path, offset: u64, input: Option<&Path>, json: bool) -> Result<()> {
    let mut session = Session::new(volume);
    let size = session.size()?;
    // An input of known length (a regular file, a block device) is checked
    // whole before anything is written; a pipe's end is only found at the
    // piece that crosses the volume's (and that error says how much went
    // in). An offset past the end is refused for any input, empty too.
    let (mut file, known) = match input {
        Some(p) => {
            let mut f =
                std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
            let n = known_length(&mut f).with_context(|| format!("reading {}", p.display()))?;
            (Some(f), n)
        }
        None => (None, None),
    };
    let end = offset.checked_add(known.unwrap_or(0));
    if end.is_none_or(|end| end > size) {
        bail!(
            "write of {} at offset {offset} is outside volume {} ({size} bytes); nothing was written",
            known.map_or("data".to_string(), |n| format!("{n} bytes")),
            volume.display()
        );
    }
    let written = match &mut file {
        Some(f) => session.write_from(offset, f)?,
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

/// The length of a regular file or a block device (read from its end, and
/// the position put back); `None` for a pipe, a terminal or a character
/// device, whose length is unknown.
fn known_length(f: &mut std::fs::File) -> std::io::Result<Option<u64>> {
    use std::io::{Seek, SeekFrom};
    let meta = f.metadata()?;
    if meta.is_file() {
        return Ok(Some(meta.len()));
    }
    if !crate::identity::is_block_device(&meta) {
        return Ok(None);
    }
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(Some(len))
}

/// `read`: streams the range to stdout or a file, piece by piece.
pub(crate) fn read(
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
                    Ok(crate::output::sync_output(
                        &w.into_inner()
                            .map_err(std::io::IntoInnerError::into_error)?,
                    )?)
                });
            if let Err(e) = done {
                // A cut-short file could pass for the data (a damaged chunk
                // fails a read part way): leave none.
                let removed = crate::output::remove_partial(p);
                return Err(e.context(format!(
                    "reading into {}{}",
                    p.display(),
                    if removed { " (removed)" } else { "" }
                )));
            }
        }
        None => session.read_to(shadow, offset, length, &mut std::io::stdout().lock())?,
    }
    Ok(())
}
