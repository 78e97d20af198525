//! `create shadow`, `delete shadows`, `list shadows` and `diff`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use volshadow_cow::{LocalMember, SetMember, SnapshotOptions, SnapshotSet, Volume};

use crate::ops::{Request, ShadowRow, Which};
use crate::output::{print_reply, print_reply_with};
use crate::session::Session;
use crate::session::on_volume;
use crate::{control, storage};

pub(crate) fn create(volumes: &[PathBuf], persistent: bool, json: bool) -> Result<()> {
    if volumes.len() == 1 {
        let req = Request::CreateShadow { persistent };
        if !persistent && control::call(&volumes[0], &Request::ListShadows, &[])?.is_none() {
            bail!(
                "a non-persistent shadow copy lives only while `volshadow serve` holds the volume, and none does; use --persistent"
            );
        }
        let mut session = Session::new(&volumes[0]);
        let (reply, _) = session.call(&req, &[])?;
        return print_reply_with(&reply, json, Some(session.auto_deleted_ids()));
    }
    // Each member records where the others are, so one reopened after a
    // crash can ask the first whether the set committed. Absolute, links
    // kept: a volume's binding and control socket sit beside the path the
    // user names.
    let locators: Vec<String> = volumes
        .iter()
        .map(|v| {
            std::path::absolute(v)
                .unwrap_or_else(|_| v.clone())
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for (i, l) in locators.iter().enumerate() {
        if locators[..i].contains(l) {
            bail!("{} is in the set twice", volumes[i].display());
        }
    }
    // A served volume takes part through its server (its clients keep
    // going until the hold); the others are opened here.
    let mut parts = Vec::with_capacity(volumes.len());
    for v in volumes {
        parts.push(Part::reach(v).with_context(|| format!("reaching {}", v.display()))?);
    }
    if !persistent
        && let Some((v, _)) = volumes
            .iter()
            .zip(&parts)
            .find(|(_, p)| matches!(p, Part::Opened(_)))
    {
        bail!(
            "a non-persistent shadow copy lives only while `volshadow serve` holds the volume, and none holds {}; use --persistent",
            v.display()
        );
    }
    let mut members: Vec<Member<'_>> = parts.iter_mut().map(Part::member).collect();
    let mut refs: Vec<&mut dyn SetMember> = members.iter_mut().map(Member::as_dyn).collect();
    let set = SnapshotSet::create_across(
        &mut refs,
        &locators,
        SnapshotOptions {
            persistent,
            attributes: if persistent {
                volshadow_cow::attributes::CLIENT_ACCESSIBLE
            } else {
                0
            },
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
/// `list shadows`, each with where it is exposed on this machine.
pub(crate) fn list(volume: &Path, json: bool) -> Result<()> {
    let (reply, _) = on_volume(volume, &Request::ListShadows, &[])?;
    #[cfg(target_os = "linux")]
    let reply = crate::verbs::expose::with_exposures(volume, reply)?;
    print_reply(&reply, json)
}

/// `delete shadows`: one by id, the oldest, or all.
pub(crate) fn delete(volume: &Path, which: Which) -> Result<()> {
    #[cfg(target_os = "linux")]
    crate::verbs::expose::refuse_if_exposed(volume, &which)?;
    let (reply, _) = on_volume(volume, &Request::DeleteShadows { which }, &[])?;
    print_reply(&reply, false)
}

/// `diff`: changed extents between two shadow copies, or one and the
/// live volume.
pub(crate) fn diff(volume: &Path, from: String, to: Option<String>, json: bool) -> Result<()> {
    let (reply, _) = on_volume(volume, &Request::Diff { from, to }, &[])?;
    print_reply(&reply, json)
}

/// How this command reaches one member of a set.
enum Part {
    Served(crate::member::RemoteMember),
    Opened(Volume),
}

impl Part {
    fn reach(img: &Path) -> Result<Self> {
        if let Some(m) = crate::member::RemoteMember::join(img)? {
            return Ok(Part::Served(m));
        }
        Ok(Part::Opened(storage::open_volume(img)?))
    }

    fn member(&mut self) -> Member<'_> {
        match self {
            Part::Served(m) => Member::Served(m),
            Part::Opened(v) => Member::Opened(v.set_member()),
        }
    }
}

/// A set member, whichever way it is reached.
enum Member<'a> {
    Served(&'a mut crate::member::RemoteMember),
    Opened(LocalMember<'a>),
}

impl Member<'_> {
    fn as_dyn(&mut self) -> &mut dyn SetMember {
        match self {
            Member::Served(m) => *m,
            Member::Opened(m) => m,
        }
    }
}
