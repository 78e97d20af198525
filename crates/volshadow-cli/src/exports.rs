//! What `volshadow serve` offers over NBD: `live` (read-write, the default
//! export) and every live shadow copy by id (read-only). Shadow copies made
//! while serving appear at once, unless `serve --export` named the exports
//! to offer: then only those are listed and opened.

use std::sync::Arc;

use volshadow_cow::{Extent, Target, Volume};
use volshadow_nbd::{ChangedFn, Export, Exports};

use crate::ops::resolve;

#[derive(Debug)]
pub struct VolumeExports {
    vol: Volume,
    /// Export names offered (`live`, full shadow copy ids), the default
    /// first; `None`: all.
    only: Option<Vec<String>>,
}

impl VolumeExports {
    pub fn new(vol: Volume, only: Option<Vec<String>>) -> Self {
        VolumeExports { vol, only }
    }

    fn offered(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|n| n == name))
    }
}

fn extents(vol: &Volume, from: uuid::Uuid, to: Target, off: u64, len: u64) -> Vec<Extent> {
    vol.changed_extents_in(from, to, off, len)
        .unwrap_or_default()
}

impl Exports for VolumeExports {
    fn names(&self) -> Vec<String> {
        let mut names = vec!["live".to_string()];
        names.extend(self.vol.snapshots().iter().map(|s| s.id.to_string()));
        match &self.only {
            // In the order given; a deleted shadow copy is not listed.
            Some(only) => only.iter().filter(|n| names.contains(n)).cloned().collect(),
            None => names,
        }
    }

    fn open(&self, name: &str) -> Option<Export> {
        let default = match &self.only {
            Some(only) => only.first()?.as_str(),
            None => "live",
        };
        let export = self.open_any(if name.is_empty() { default } else { name })?;
        self.offered(&export.name).then_some(export)
    }
}

impl VolumeExports {
    /// The export `name` (`live`, or a shadow copy id or its prefix),
    /// offered or not.
    fn open_any(&self, name: &str) -> Option<Export> {
        let snaps = self.vol.snapshots();
        if name == "live" {
            // Changed since the newest shadow copy.
            let changed = snaps.last().map(|newest| {
                let (vol, id) = (self.vol.clone(), newest.id);
                Arc::new(move |off, len| extents(&vol, id, Target::Live, off, len)) as ChangedFn
            });
            return Some(Export {
                name: "live".into(),
                description: "live volume".into(),
                device: Arc::new(self.vol.clone()),
                changed,
            });
        }
        let id = resolve(&self.vol, name).ok()?;
        let view = self.vol.snapshot(id).ok()?;
        let pos = snaps.iter().position(|s| s.id == id)?;
        // Changed between the previous shadow copy and this one.
        let changed = pos.checked_sub(1).map(|p| {
            let (vol, prev) = (self.vol.clone(), snaps[p].id);
            Arc::new(move |off, len| extents(&vol, prev, Target::Snapshot(id), off, len))
                as ChangedFn
        });
        Some(Export {
            name: id.to_string(),
            description: format!("shadow copy {id} (read-only)"),
            device: Arc::new(view),
            changed,
        })
    }
}
