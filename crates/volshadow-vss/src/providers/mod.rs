//! The providers shipped with volshadow.

mod cow;
mod reflink;

pub use cow::CowProvider;
pub use reflink::ReflinkProvider;
