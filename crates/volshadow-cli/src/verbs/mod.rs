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
pub(crate) mod objects;
pub(crate) mod receive;
pub(crate) mod send;
pub(crate) mod serve;
pub(crate) mod shadows;
pub(crate) mod shadowstorage;
