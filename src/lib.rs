//! volshadow: a portable point-in-time snapshot engine for block volumes.
//!
//! This facade re-exports the workspace crates so an embedder depends on one
//! package: [`block`] (devices), [`cow`] (the copy-on-write engine), [`vss`]
//! (the requester / writer / provider protocol) and [`nbd`] (network export).
#![forbid(unsafe_code)]

pub use volshadow_block as block;
pub use volshadow_cow as cow;
pub use volshadow_nbd as nbd;
pub use volshadow_vss as vss;
