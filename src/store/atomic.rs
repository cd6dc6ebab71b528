//! Durable writes: temp file, fsync, rename, fsync the directory.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;
use crate::failpoint;

/// Replaces `path` with `value` as JSON so readers see the old or the new file, never a torn one.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let dir = path.parent().ok_or_else(|| StoreError::io("write", path, no_parent()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| StoreError::io("create temp file in", dir, e))?;
    let body = serde_json::to_vec_pretty(value).map_err(|e| StoreError::io("encode", path, e.into()))?;
    // Through the plain file: tempfile's own Write adds the path to errors, which we add too.
    let path_of_tmp = tmp.path().to_path_buf();
    let file = tmp.as_file_mut();
    file.write_all(&body)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| StoreError::io("write", &path_of_tmp, e))?;
    failpoint::hit("atomic.before-rename");
    tmp.persist(path).map_err(|e| StoreError::io("rename into", path, e.error))?;
    sync_dir(dir)
}

/// Reads a JSON file; `Ok(None)` when it does not exist, a `Corrupt` error when it does not parse.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read", path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| StoreError::Corrupt { path: path.to_path_buf(), source })
}

/// Makes a rename or unlink inside `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Flushes the whole filesystem holding `path` (one `syncfs`): makes a tree just written
/// there durable in O(1) calls, before anything names it.
pub fn sync_filesystem(path: &Path) -> Result<(), StoreError> {
    let file = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
    nix::unistd::syncfs(&file).map_err(|e| StoreError::io("syncfs", path, e.into()))
}

/// Creates a directory and its missing parents, making each new entry durable in its parent:
/// a cache's first HEAD must not vanish with a `caches/<namespace>` entry that never reached
/// the disk.
pub fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.exists() {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
    // Syncing the parent of every directory made here, and of `dir` itself even when it was
    // there already (another process may have made it without syncing).
    let mut parents: Vec<&Path> = missing.iter().filter_map(|d| d.parent()).collect();
    parents.extend(dir.parent());
    parents.dedup();
    for parent in parents {
        sync_dir(parent)?;
    }
    Ok(())
}

fn no_parent() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no parent directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.json");
        write_json(&path, &vec![1, 2, 3]).unwrap();
        write_json(&path, &vec![4]).unwrap();
        let back: Option<Vec<u32>> = read_json(&path).unwrap();
        assert_eq!(back, Some(vec![4]));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("head.json")], "no temp files left behind");
    }

    #[test]
    fn missing_is_none_and_garbage_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        assert_eq!(read_json::<u32>(&path).unwrap(), None);
        std::fs::write(&path, b"{not json").unwrap();
        let err = read_json::<u32>(&path).unwrap_err();
        assert!(err.to_string().contains("is corrupt"), "{err}");
        assert!(path.exists(), "a corrupt file is reported, never deleted");
    }
}
