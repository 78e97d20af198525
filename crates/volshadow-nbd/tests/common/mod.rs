//! What the NBD tests serve.

use std::sync::Arc;

use volshadow_block::BlockDevice;
use volshadow_nbd::{Export, Exports};

/// One device as the export `live` (also the default export, "").
pub struct One(pub Arc<dyn BlockDevice>);

impl Exports for One {
    fn names(&self) -> Vec<String> {
        vec!["live".into()]
    }
    fn open(&self, name: &str) -> Option<Export> {
        matches!(name, "" | "live").then(|| Export {
            name: "live".into(),
            description: String::new(),
            device: self.0.clone(),
            changed: None,
        })
    }
}
