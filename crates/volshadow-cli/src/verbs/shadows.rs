//! `create shadow`, `delete shadows`, `list shadows` and `diff`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use volshadow_cow::{SnapshotOptions, SnapshotSet, Volume};

use crate::dispatch::{on_volume, print_reply, print_reply_with};
use crate::ops::{Request, ShadowRow, Which};
use crate::session::Session;
use crate::{control, storage};

pub(crate) fn create(volumes: &[PathBuf], persistent: bool, json: bool) -> Result<()> {
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
/// `list shadows`.
pub(crate) fn list(volume: &Path, json: bool) -> Result<()> {
    let (reply, _) = on_volume(volume, &Request::ListShadows, &[])?;
    print_reply(&reply, json)
}

/// `delete shadows`: one by id, the oldest, or all.
pub(crate) fn delete(volume: &Path, which: Which) -> Result<()> {
    let (reply, _) = on_volume(volume, &Request::DeleteShadows { which }, &[])?;
    print_reply(&reply, false)
}

/// `diff`: changed extents between two shadow copies, or one and the
/// live volume.
pub(crate) fn diff(volume: &Path, from: String, to: Option<String>, json: bool) -> Result<()> {
    let (reply, _) = on_volume(volume, &Request::Diff { from, to }, &[])?;
    print_reply(&reply, json)
}
