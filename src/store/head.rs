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
}

impl Head {
    /// The version a missing HEAD stands for.
    pub const NONE: u64 = 0;
}

/// Seconds since the epoch, 0 if the clock is before it.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}
