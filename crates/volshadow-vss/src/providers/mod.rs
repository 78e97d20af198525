//! The providers shipped with volshadow.

mod cow;
mod reflink;

pub use cow::{CowProvider, CowVolume};
pub use reflink::ReflinkProvider;
