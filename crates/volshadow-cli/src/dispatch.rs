//! One dispatch from the clap tree to the verbs.

use anyhow::{Context, Result, bail};

use crate::args::{AddWhat, Command, CreateWhat, DeleteWhat, ImageCommand, ListWhat, ResizeWhat};
use crate::ops::Which;
use crate::verbs::{data, export, maintain, objects, receive, send, serve, shadows, shadowstorage};
use crate::{bench, quickstart, vss};

pub(crate) fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Image {
            command: ImageCommand::Create { img, size },
        } => shadowstorage::create_image(&img, size),
        Command::Add {
            what:
                AddWhat::Shadowstorage {
                    volume,
                    diff,
                    maxsize,
                    chunk_size,
                    preallocate,
                    no_extent_clones,
                    policy,
                },
        } => shadowstorage::add(
            &volume,
            &diff,
            shadowstorage::StorageSpec {
                maxsize,
                chunk_size,
                preallocate,
                extent_clones: !no_extent_clones,
            },
            &policy,
        ),
        Command::Resize {
            what:
                ResizeWhat::Shadowstorage {
                    volume,
                    maxsize,
                    policy,
                },
        } => shadowstorage::resize(&volume, maxsize, &policy),
        Command::List { what } => match what {
            ListWhat::Shadows { volume, from, json } => match (volume, from) {
                (_, Some(url)) => objects::list(&url, json),
                (Some(v), None) => shadows::list(&v, json),
                (None, None) => bail!("say which: --for IMG or --from URL"),
            },
            ListWhat::Shadowstorage { volume, json } => shadowstorage::list(volume, json),
            ListWhat::Writers { config, json } => vss::list_writers(&config, json),
            ListWhat::Providers { json } => vss::list_providers(json),
        },
        Command::Create {
            what:
                CreateWhat::Shadow {
                    volumes,
                    persistent: _,
                    non_persistent,
                    json,
                },
        } => shadows::create(&volumes, !non_persistent, json),
        Command::Delete {
            what:
                DeleteWhat::Shadows {
                    volume,
                    from,
                    shadow,
                    oldest,
                    all,
                    set,
                },
        } => {
            if let Some(url) = from {
                let Some(id) = shadow else {
                    bail!("--from deletes one shadow copy: give --shadow ID");
                };
                return objects::delete(&url, &id);
            }
            let Some(volume) = volume else {
                bail!("say which: --for IMG or --from URL");
            };
            if let Some(set) = set {
                return vss::delete_set(&volume, &set);
            }
            let which = match (shadow, oldest, all) {
                (Some(id), _, _) => Which::Id(id),
                (None, true, _) => Which::Oldest,
                (None, _, true) => Which::All,
                _ => bail!("say which: --shadow ID, --set ID, --oldest or --all"),
            };
            shadows::delete(&volume, which)
        }
        Command::Write {
            volume,
            offset,
            input,
            json,
        } => data::write(&volume, offset, input.as_deref(), json),
        Command::Read {
            volume,
            shadow,
            offset,
            length,
            output,
        } => data::read(
            &volume,
            shadow.as_deref(),
            offset,
            length,
            output.as_deref(),
        ),
        Command::Diff {
            volume,
            from,
            to,
            json,
        } => shadows::diff(&volume, from, to, json),
        Command::Export {
            volume,
            shadow,
            output,
            since,
            salvage,
            json,
        } => {
            if salvage {
                export::export_salvage(&volume, &shadow, &output, json)
            } else {
                export::export(&volume, &shadow, &output, since.as_deref(), json)
            }
        }
        Command::Send {
            volume,
            shadow,
            since,
            output,
            to,
            json,
        } => match to {
            Some(url) => objects::send_to(&volume, &shadow, since.as_deref(), &url, json),
            None => send::send(&volume, &shadow, since.as_deref(), output.as_deref(), json),
        },
        Command::Receive {
            volume,
            input,
            from,
            shadow,
            diff,
            maxsize,
            json,
        } => {
            let new = receive::NewReplica { on: diff, maxsize };
            match from {
                Some(url) => {
                    let shadow = shadow.context("--from needs --shadow ID")?;
                    objects::receive_from(&volume, &url, &shadow, &new, json)
                }
                None => receive::receive(&volume, input.as_deref(), &new, json),
            }
        }
        Command::Rebind {
            volume,
            on,
            no_extent_clones,
        } => maintain::rebind(&volume, on.as_deref(), no_extent_clones),
        Command::Revert {
            volume,
            shadow,
            json,
        } => maintain::revert(&volume, &shadow, json),
        Command::Verify {
            volume,
            from,
            salvage,
            json,
        } => match (volume, from) {
            (_, Some(url)) => objects::verify(&url, json),
            (Some(v), None) => maintain::verify(&v, salvage, json),
            (None, None) => bail!("say which: --for IMG or --from URL"),
        },
        Command::Serve(args) => serve::serve(args),
        Command::Quickstart { dir } => quickstart::run(dir),
        Command::Bench {
            volume,
            pattern,
            mode,
            block_size,
            depth,
            count,
            snapshot_first,
            snapshots,
            persistent,
            raw,
            from_snapshot,
            seed,
            json,
        } => bench::report(
            &volume,
            &bench::BenchArgs {
                pattern,
                mode,
                block_size,
                depth,
                count,
                snapshots_first: snapshots.max(usize::from(snapshot_first)),
                persistent,
                raw,
                from_snapshot,
                seed,
            },
            json,
        ),
        #[cfg(target_os = "linux")]
        Command::Mount { volume, dir } => crate::verbs::mount::mount(&volume, &dir),
        #[cfg(target_os = "linux")]
        Command::Unmount { dir } => crate::verbs::mount::unmount(&dir),
        #[cfg(target_os = "linux")]
        Command::Expose {
            volume,
            shadow,
            dir,
            no_mount: _,
        } => crate::verbs::expose::expose(&volume, &shadow, dir.as_deref()),
        #[cfg(target_os = "linux")]
        Command::Unexpose { place } => crate::verbs::expose::unexpose(&place),
        Command::Backup { config } => vss::backup(&config).map(|_| ()),
        Command::Restore {
            config,
            document,
            component,
            alternate,
        } => vss::restore(&config, &document, &component, &alternate),
    }
}
