//! The verbs' bodies, one module per group; `dispatch` maps the clap tree
//! onto them. Each reaches a volume through [`crate::session::Session`]
//! (its server when one runs, else the files), except where a verb says
//! why it opens the files itself.

pub(crate) mod data;
pub(crate) mod export;
#[cfg(target_os = "linux")]
pub(crate) mod expose;
pub(crate) mod maintain;
#[cfg(target_os = "linux")]
pub(crate) mod mount;
#[cfg(feature = "s3")]
pub(crate) mod objects;
/// A build without the `s3` feature says so for every object-store verb.
#[cfg(not(feature = "s3"))]
pub(crate) mod objects {
    use std::path::Path;

    use anyhow::{Result, bail};

    use crate::verbs::receive::NewReplica;

    fn unsupported<T>(url: &str) -> Result<T> {
        bail!("{url}: this build of volshadow has no object storage (cargo feature `s3`)")
    }

    pub(crate) fn send_to(_: &Path, _: &str, _: Option<&str>, url: &str, _: bool) -> Result<()> {
        unsupported(url)
    }

    pub(crate) fn receive_from(
        _: &Path,
        url: &str,
        _: &str,
        _: &NewReplica,
        _: bool,
    ) -> Result<()> {
        unsupported(url)
    }

    pub(crate) fn list(url: &str, _: bool) -> Result<()> {
        unsupported(url)
    }

    pub(crate) fn verify(url: &str, _: bool) -> Result<()> {
        unsupported(url)
    }

    pub(crate) fn delete(url: &str, _: &str) -> Result<()> {
        unsupported(url)
    }
}
pub(crate) mod receive;
pub(crate) mod send;
pub(crate) mod serve;
pub(crate) mod shadows;
pub(crate) mod shadowstorage;
