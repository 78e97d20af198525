//! `volshadow quickstart`: the whole idea on a small image, in-process,
//! printing what a user would type for each step.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use volshadow_block::{BlockDevice, FileImage};
use volshadow_cow::{SnapshotOptions, Target, Volume, VolumeOptions, attributes};

use crate::ops::{self, Reply, ShadowRow};

const SIZE: u64 = 64 << 20;
const CHUNK: usize = 16 << 10;

fn step(what: &str, cmd: &str) {
    println!("\n== {what}\n   $ {cmd}");
}

pub fn run(dir: Option<PathBuf>) -> Result<()> {
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            let base =
                std::env::temp_dir().join(format!("volshadow-quickstart-{}", std::process::id()));
            std::fs::create_dir_all(&base)?;
            base
        }
    };
    let img = dir.join("disk.img");
    let diff = dir.join("disk.diff");
    for p in [&img, &diff] {
        if p.exists() {
            bail!("{} exists; give an empty --dir", p.display());
        }
    }
    println!("volshadow quickstart in {}", dir.display());

    step(
        "Create a 64 MiB sparse disk image",
        "volshadow image create disk.img --size 64M",
    );
    let origin = Arc::new(FileImage::create(&img, SIZE)?);

    step(
        "Add 32 MiB of shadow storage (the diff area)",
        "volshadow add shadowstorage --for disk.img --on disk.diff --maxsize 32M",
    );
    let diff_dev = Arc::new(FileImage::create(&diff, 40 << 20)?);
    let clones = crate::storage::probe_clones(&*origin, &diff);
    let vol = Volume::create(
        origin,
        diff_dev,
        VolumeOptions {
            max_bytes: Some(32 << 20),
            ..Default::default()
        },
    )?;
    crate::storage::write_binding(&img, &diff, vol.id(), clones, false)?;

    step(
        "Write 8 MiB of data",
        "volshadow write --for disk.img --offset 0 --input data.bin",
    );
    let original: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    vol.write_at(&original, 0)?;
    vol.flush()?;

    step(
        "Take a persistent shadow copy",
        "volshadow create shadow --for disk.img --persistent",
    );
    let snap = vol.create_snapshot(SnapshotOptions {
        persistent: true,
        attributes: attributes::CLIENT_ACCESSIBLE,
        set_id: None,
    })?;
    print!(
        "{}",
        ops::render(&Reply::Created {
            shadow: (&snap).into()
        })
    );

    step(
        "Overwrite 1 MiB in the middle",
        "volshadow write --for disk.img --offset 3M --input new.bin",
    );
    vol.write_at(&vec![0xEE; 1 << 20], 3 << 20)?;
    vol.flush()?;

    step(
        "A second shadow copy",
        "volshadow create shadow --for disk.img --persistent",
    );
    let snap2 = vol.create_snapshot(SnapshotOptions {
        persistent: true,
        ..Default::default()
    })?;
    vol.write_at(&[0x11; 4096], 10 << 20)?;
    vol.flush()?;

    step(
        "List the shadow copies",
        "volshadow list shadows --for disk.img",
    );
    let rows: Vec<ShadowRow> = vol.snapshots().iter().map(ShadowRow::from).collect();
    print!("{}", ops::render(&Reply::Shadows { shadows: rows }));

    step(
        "What changed between the two shadow copies",
        &format!(
            "volshadow diff --for disk.img --from {} --to {}",
            short(snap.id),
            short(snap2.id)
        ),
    );
    let ext = vol.changed_extents(snap.id, Target::Snapshot(snap2.id))?;
    let bytes = ext.iter().map(|e| e.len).sum();
    print!(
        "{}",
        ops::render(&Reply::Extents {
            extents: ext,
            bytes
        })
    );

    step(
        "The first shadow copy still reads the old bytes",
        &format!(
            "volshadow read --for disk.img --shadow {} --offset 3M --length 16",
            short(snap.id)
        ),
    );
    let view = vol.snapshot(snap.id)?;
    let mut old = vec![0u8; CHUNK];
    view.read_at(&mut old, 3 << 20)?;
    let mut live = vec![0u8; CHUNK];
    vol.read_at(&mut live, 3 << 20)?;
    println!("   shadow copy: {}", hex(&old[..16]));
    println!("   live volume: {}", hex(&live[..16]));
    let mut whole = vec![0u8; 8 << 20];
    view.read_at(&mut whole, 0)?;
    if whole != original {
        bail!("the shadow copy does not read its point-in-time bytes");
    }
    println!("   all 8 MiB of the shadow copy match what was written before it: OK");

    step(
        "Verify every preserved chunk",
        "volshadow verify --for disk.img",
    );
    let report = vol.verify()?;
    print!("{}", ops::render(&Reply::Verify { report }));
    print!("{}", ops::render_usage(&vol.usage()));
    drop(view);
    drop(vol);

    println!("\n== Serve it over NBD (live read-write, shadow copies read-only):");
    println!(
        "   $ cd {} && volshadow serve --for disk.img --listen 127.0.0.1:10809",
        dir.display()
    );
    println!("   $ nbdinfo --list nbd://127.0.0.1:10809");
    println!(
        "   $ qemu-img convert -O raw nbd://127.0.0.1:10809/{} old.raw",
        snap.id
    );
    println!("\nFiles: {} and {}", img.display(), diff.display());
    crate::storage::read_binding(&img).context("binding written")?;
    Ok(())
}

fn short(id: uuid::Uuid) -> String {
    id.to_string()[..8].to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
