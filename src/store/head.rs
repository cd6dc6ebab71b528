//! A cache's version pointer (HEAD): a number and the layers that make its content.

use serde::{Deserialize, Serialize};

use super::layout::LayerId;

/// One version of a cache: layers bottom to top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Advances by one on every publish; squash keeps it.
    pub version: u64,
    /// Bottom to top.
    pub layers: Vec<LayerId>,
    /// Seconds since the epoch of the last change to this file.
    #[serde(default)]
    pub updated_unix: u64,
    /// Which lifetime of the cache this is: made at its first version, kept by every later one,
    /// new again after `cache rm`, so a v1 of one lifetime is never taken for a v1 of another.
    #[serde(default)]
    pub lineage: String,
}

impl Head {
    /// The version a missing HEAD stands for.
    pub const NONE: u64 = 0;

    /// A fresh lineage id for a cache's first version.
    pub fn new_lineage() -> String {
        super::layout::LayerId::generate().to_string()
    }
}

/// Seconds since the epoch, 0 if the clock is before it.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}
