//! `rebind`, `revert` and `verify`: keeping a volume and its shadow
//! storage whole.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use volshadow_block::{BlockDevice, FileImage, OpenOptions as BlockOpenOptions, open_device};
use volshadow_cow::{OpenMode, Volume};

use crate::ops::{Reply, Request};
use crate::output::{print_reply, print_reply_with, progress};
use crate::session::Session;
use crate::{control, storage};

/// `rebind`: pairs an image with its shadow storage again after both
/// were copied or moved.
pub(crate) fn rebind(volume: &Path, on: Option<&Path>, no_extent_clones: bool) -> Result<()> {
    let vol = match on {
        Some(diff) => {
            if crate::identity::same_file(diff, volume) {
                bail!(
                    "{} is the image itself, not its shadow storage; nothing was changed",
                    diff.display()
                );
            }
            let origin: Arc<dyn BlockDevice> =
                Arc::from(open_device(volume, &BlockOpenOptions::new())?);
            let d: Arc<dyn BlockDevice> = Arc::new(
                FileImage::open(diff).with_context(|| format!("opening {}", diff.display()))?,
            );
            // A refusal of clones outlives the pairing it was made for.
            let refused = no_extent_clones
                || storage::read_binding(volume).is_ok_and(|(b, _)| b.no_extent_clones);
            let clones = !refused && storage::probe_clones(&*origin, diff);
            let vol = Volume::open_with(origin, d, OpenMode::Rebind)?;
            storage::write_binding(volume, diff, vol.id(), clones, refused)?;
            vol
        }
        None => storage::open_volume_with(volume, OpenMode::Rebind)?,
    };
    drop(vol);
    // A normal open now records the generation and checks the pair.
    let vol = storage::open_volume(volume)?;
    println!(
        "{} and its shadow storage are paired again (volume {}, {} shadow copies).",
        volume.display(),
        vol.id(),
        vol.snapshots().len()
    );
    Ok(())
}

/// `revert`: rolls the live volume back to a persistent shadow copy.
pub(crate) fn revert(volume: &Path, shadow: &str, json: bool) -> Result<()> {
    let mut session = Session::new(volume);
    let (reply, _) = session.call(
        &Request::Revert {
            shadow: shadow.to_string(),
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

/// `verify`: through the server when one holds the volume; `--salvage`
/// always opens the files read-only.
pub(crate) fn verify(volume: &Path, salvage: bool, json: bool) -> Result<()> {
    let served = if salvage {
        None
    } else {
        control::call(volume, &Request::Verify, &[])?
    };
    let reply = match served {
        Some(answer) => answer.result?.0,
        None => {
            let mode = if salvage {
                OpenMode::Salvage
            } else {
                OpenMode::Normal
            };
            let vol = storage::open_volume_with(volume, mode)?;
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
