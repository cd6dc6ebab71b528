//! Layer records: what a layer holds and where it came from.

use serde::{Deserialize, Serialize};

use super::layout::{CacheKey, LayerId, VolumeId};

/// How a layer was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// A volume's upper directory, renamed in place.
    Commit,
    /// A flattened prefix of a cache's stack.
    Squash,
    /// A copy of a mounted-nowhere volume's upper, taken for a snapshot.
    Snapshot,
    /// Unpacked from a registry's blob.
    Pull,
}

/// `layers/<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer's id.
    pub id: LayerId,
    /// The cache it was made for.
    pub cache: CacheKey,
    /// How it was made.
    pub kind: LayerKind,
    /// Bytes in regular files.
    pub bytes: u64,
    /// Entries (files, directories, links, whiteouts).
    pub files: u64,
    /// Seconds since the epoch.
    pub created_unix: u64,
    /// The volume whose upper it was.
    #[serde(default)]
    pub from_volume: Option<VolumeId>,
    /// The blob it is (or was pushed as) in a registry: what a remote layer of the same id
    /// must match before the local one stands in for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<crate::registry::Blob>,
}
