//! `image create` and the shadow storage verbs: `add`, `resize` and
//! `list shadowstorage`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use std::sync::Arc;

use volshadow_block::{BlockDevice, FileImage, open_device};
use volshadow_cow::{Volume, VolumeOptions};

use crate::args::PolicyArgs;
use crate::ops::{self, Reply, Request};
use crate::output::{print_reply, progress};
use crate::session::Session;
use crate::session::on_volume;
use crate::{guard, storage};

/// `image create`: a sparse raw image, never over a volume's own files.
pub(crate) fn create_image(img: &Path, size: u64) -> Result<()> {
    if storage::binding_path(img).exists() {
        bail!(
            "refusing to create {}: it is a volume with shadow storage ({}); nothing was changed",
            img.display(),
            storage::binding_path(img).display()
        );
    }
    guard::refuse_volume_file(img, &[], "a new image")?;
    FileImage::create(img, size)?;
    println!("Created {} ({}).", img.display(), ops::human_size(size));
    Ok(())
}

/// `resize shadowstorage`: a new limit and, optionally, policy.
pub(crate) fn resize(img: &Path, maxsize: u64, policy: &PolicyArgs) -> Result<()> {
    let (reply, _) = on_volume(
        img,
        &Request::Resize {
            max_bytes: maxsize,
            policy: policy.policy(maxsize.max(policy.grow_max.unwrap_or(0))),
        },
        &[],
    )?;
    print_reply(&reply, false)
}

/// The shape of a new diff area.
pub(crate) struct StorageSpec {
    pub(crate) maxsize: u64,
    pub(crate) chunk_size: u64,
    pub(crate) preallocate: bool,
    /// Copies may be extent clones where the file system can share them.
    pub(crate) extent_clones: bool,
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

pub(crate) fn add(img: &Path, diff: &Path, spec: StorageSpec, policy: &PolicyArgs) -> Result<()> {
    let maxsize = spec.maxsize;
    let vol = create_storage(img, diff, spec, policy)?;
    println!(
        "Added shadow storage for {} on {} (maximum {}).",
        img.display(),
        diff.display(),
        ops::human_size(maxsize)
    );
    print!("{}", ops::render_usage(&vol.usage()));
    let (binding, _) = storage::read_binding(img)?;
    println!("{}", copies_line(&binding));
    Ok(())
}

/// How the diff area takes its copies, for `add` and `list`.
fn copies_line(binding: &storage::Binding) -> &'static str {
    if binding.no_extent_clones {
        return "   Copies: written (no extent clones: --no-extent-clones)";
    }
    match binding.extent_clones {
        Some(true) => {
            "   Copies: extent clones (the file system shares extents between the image and the shadow storage)"
        }
        Some(false) => {
            "   Copies: written (no extent clones: the file system cannot share extents between the image and the shadow storage)"
        }
        None => "   Copies: not probed (shadow storage added by an older version)",
    }
}

/// A new diff area for `img` and the binding that pairs them; every check
/// comes before any file is made.
pub(crate) fn create_storage(
    img: &Path,
    diff: &Path,
    spec: StorageSpec,
    policy: &PolicyArgs,
) -> Result<Volume> {
    let StorageSpec {
        maxsize,
        chunk_size,
        preallocate,
        extent_clones,
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
        && !crate::identity::same_file(
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
    if crate::identity::same_file(img, diff) {
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
    // Where the binding goes must take it before the diff area is made (a
    // device's goes to the state directory, which may be missing or
    // unwritable).
    storage::binding_dir(img)?;
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
    let clones = extent_clones && storage::probe_clones(&*origin, diff);
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
    if let Err(e) = storage::write_binding(img, diff, vol.id(), clones, !extent_clones) {
        drop(vol);
        let _ = std::fs::remove_file(diff);
        return Err(e);
    }
    Ok(vol)
}

pub(crate) fn list(volume: Option<PathBuf>, json: bool) -> Result<()> {
    // Listing all that is found, one that cannot be read (a device
    // detached, a binding damaged) is reported after the others.
    let one = volume.is_some();
    let images: Vec<PathBuf> = match volume {
        Some(v) => vec![v],
        None => guard::volumes_from(Path::new("."))?,
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
        /// Whether copies are extent clones (probed at `add shadowstorage`;
        /// absent for storage added before the probe existed).
        #[serde(skip_serializing_if = "Option::is_none")]
        extent_clones: Option<bool>,
        /// Whether clones were refused with `--no-extent-clones`.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        no_extent_clones: bool,
        #[serde(skip)]
        copies: &'static str,
    }
    let row = |img: PathBuf| -> Result<Option<Row>> {
        let (binding, diff) = storage::read_binding(&img)?;
        let mut session = Session::new(&img);
        let (reply, _) = session.call(&Request::Usage, &[])?;
        let Reply::Usage {
            usage,
            auto_deleted,
        } = reply
        else {
            return Ok(None);
        };
        Ok(Some(Row {
            volume: img,
            shadow_storage: diff,
            usage,
            auto_deleted,
            served: session.served(),
            extent_clones: binding.extent_clones,
            no_extent_clones: binding.no_extent_clones,
            copies: copies_line(&binding),
        }))
    };
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for img in images {
        match row(img.clone()) {
            Ok(r) => rows.extend(r),
            Err(e) if one => return Err(e),
            Err(e) => failed.push(format!("{}: {}", img.display(), crate::one_line(&e))),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() && failed.is_empty() {
        println!("No shadow storage here.");
    } else {
        for r in rows {
            println!(
                "Shadow Storage association\n   For volume: {}\n   Shadow Storage volume: {}",
                r.volume.display(),
                r.shadow_storage.display()
            );
            print!("{}", ops::render_usage(&r.usage));
            println!("{}", r.copies);
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
    if !failed.is_empty() {
        bail!(
            "{} shadow-storage association(s) could not be read: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}
