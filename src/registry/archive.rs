//! A layer directory in overlay form <-> an OCI layer tar (zstd-compressed).
//! (Interface stub: the implementation replaces the bodies.)

use std::io::Read;
use std::path::{Path, PathBuf};

use super::manifest::Blob;

/// What an untrusted layer tar may hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most entries in one layer.
    pub max_entries: u64,
    /// Most bytes of file content in one layer, uncompressed.
    pub max_total_bytes: u64,
    /// Longest path inside the layer, in bytes.
    pub max_path_bytes: usize,
    /// Whether device nodes (other than whiteouts) may be created.
    pub devices: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_entries: 4_000_000, max_total_bytes: 256 << 30, max_path_bytes: 4096, devices: false }
    }
}

/// A layer written as a blob.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The blob's digest and size, and the tar's diff id.
    pub blob: Blob,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries written.
    pub files: u64,
}

/// A layer read back from a blob.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries created.
    pub files: u64,
}

/// Why a layer could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or writing a file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An entry of an untrusted tar breaks a rule; nothing is left behind.
    #[error("layer tar entry {entry:?}: {rule}")]
    Refused {
        /// The entry's path as the tar names it.
        entry: String,
        /// The rule it breaks.
        rule: String,
    },
}

/// Writes `layer` (overlay form) as a zstd-compressed OCI layer tar at `out`.
pub fn export_layer(layer: &Path, out: &Path) -> Result<Exported, ArchiveError> {
    let _ = (layer, out);
    Err(ArchiveError::Refused { entry: String::new(), rule: "not implemented".into() })
}

/// Unpacks an untrusted zstd-compressed OCI layer tar into `dest` (which must not exist) in
/// overlay form, reading `blob` to its end. On error `dest` is removed.
pub fn import_layer(blob: impl Read, dest: &Path, limits: &Limits) -> Result<Imported, ArchiveError> {
    let _ = (blob, dest, limits);
    Err(ArchiveError::Refused { entry: String::new(), rule: "not implemented".into() })
}
