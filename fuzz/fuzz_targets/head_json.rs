//! State files from disk: `head.json`, `volume.json`, `layers/<id>.json`. Whatever parses holds
//! only valid names and survives a write/read round trip; the real reader never panics and
//! reports anything that does not parse as `Corrupt`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use jobcachefs::store::{atomic, Head, LayerRecord, StoreError, VolumeRecord};
use jobcachefs_fuzz::*;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// One scratch file for the whole run (a tmpfs when there is one: this runs per input).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let path = dir.path().join("head.json");
        (dir, path)
    })
    .1
}

/// Parses `data` directly; on success checks the round trip through the writer's encoding.
fn parse<T>(data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let value: T = serde_json::from_slice(data).ok()?;
    for bytes in [serde_json::to_vec(&value).unwrap(), serde_json::to_vec_pretty(&value).unwrap()] {
        let back: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("re-read of {value:?}: {e}"));
        assert_eq!(back, value, "round trip changed the value");
    }
    Some(value)
}

/// The reader agrees with the parser: Some when it parses, Corrupt when it does not.
fn read_back<T: DeserializeOwned + PartialEq + std::fmt::Debug>(parsed: &Option<T>) {
    let path = scratch();
    match (atomic::read_json::<T>(path), parsed) {
        (Ok(Some(got)), Some(want)) => assert_eq!(&got, want),
        (Err(StoreError::Corrupt { path: p, source }), None) => {
            assert_eq!(&p, path);
            let _ = source.to_string();
        }
        (got, want) => panic!("read_json gave {got:?} for a parse of {want:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let head = parse::<Head>(data);
    if let Some(h) = &head {
        h.layers.iter().for_each(check_layer);
    }
    let volume = parse::<VolumeRecord>(data);
    if let Some(v) = &volume {
        check_volume(&v.id);
        check_key(&v.cache);
        check_key(&v.base.from);
        v.base.layers.iter().for_each(check_layer);
        v.pending.iter().for_each(check_layer);
        v.pinned().for_each(check_layer);
    }
    let layer = parse::<LayerRecord>(data);
    if let Some(l) = &layer {
        check_layer(&l.id);
        check_key(&l.cache);
        l.from_volume.iter().for_each(check_volume);
    }

    std::fs::write(scratch(), data).unwrap();
    read_back(&head);
    read_back(&volume);
    read_back(&layer);
});
