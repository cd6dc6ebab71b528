//! A layer directory in overlay form <-> an OCI layer tar (zstd-compressed).
//!
//! Overlay form and OCI form differ only in how deletions are written: overlay's whiteout
//! (a character device 0/0) is OCI's empty file `.wh.<name>`, and overlay's opaque directory
//! (`trusted.overlay.opaque=y`) is OCI's `<dir>/.wh..wh..opq`. Everything else keeps its
//! owner, mode, mtime (whole seconds), xattrs (as PAX `SCHILY.xattr.*` records, without
//! overlay's own and SELinux labels) and hard links inside the layer. Sockets are not written.
//!
//! Export is deterministic: the same tree gives the same bytes, so the same digest.
//! Import trusts nothing in the tar; see [`import_layer`].

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::Blob;

mod export;
mod import;
mod names;
mod xattrs;

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
///
/// The tar starts with `./` (the layer root's owner, mode and mtime); each directory's
/// entries follow it, its opaque marker first, then its whiteouts, then the rest, each group
/// sorted by name. A file named `.wh.*` cannot be written (OCI reads it as a whiteout).
pub fn export_layer(layer: &Path, out: &Path) -> Result<Exported, ArchiveError> {
    export::export(layer, out)
}

/// Unpacks an untrusted zstd-compressed OCI layer tar into `dest` (which must not exist) in
/// overlay form, reading `blob` to its end. On error `dest` is removed.
///
/// Every entry is created below `dest` by this import, never through a symlink or over an
/// entry already made; paths, entries, content bytes and header sizes are held to `limits`
/// before anything is written. Creating whiteouts and owners needs root.
pub fn import_layer(blob: impl Read, dest: &Path, limits: &Limits) -> Result<Imported, ArchiveError> {
    import::import(blob, dest, limits)
}

/// Attaches an operation and a path to an I/O (or errno) error.
fn io_error<'a, E: Into<io::Error>>(op: &'static str, path: &'a Path) -> impl FnOnce(E) -> ArchiveError + 'a {
    move |e| ArchiveError::Io { op, path: path.to_path_buf(), source: e.into() }
}

/// `sha256:<hex>`, the form of OCI digests and diff ids.
fn sha256_digest(hash: Sha256) -> String {
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash.finalize() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_lower_case_hex_sha256() {
        let mut hash = Sha256::new();
        hash.update(b"{}");
        assert_eq!(sha256_digest(hash), crate::registry::manifest::EMPTY_DIGEST);
    }
}
