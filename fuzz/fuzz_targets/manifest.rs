//! Manifests from a registry → `RemoteVersion::from_manifest`. Never panics; what it accepts
//! names only valid layer ids and sha256 digests, each layer once, and survives the round trip
//! through the manifest we would write for it.
#![no_main]

use jobcachefs::registry::manifest::is_sha256_digest;
use jobcachefs::registry::RemoteVersion;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(version) = RemoteVersion::from_manifest(data) else { return };
    assert!(version.version > 0);
    let mut ids = std::collections::HashSet::new();
    for layer in &version.layers {
        assert!(jobcachefs::store::LayerId::new(layer.id.as_str()).is_ok(), "{:?}", layer.id);
        assert!(is_sha256_digest(&layer.blob.digest), "{}", layer.blob.digest);
        assert!(ids.insert(layer.id.clone()), "layer {} twice", layer.id);
    }
    let again = serde_json::to_vec(&version.to_manifest()).expect("serialise");
    assert_eq!(RemoteVersion::from_manifest(&again).expect("our own manifest parses"), version);
});
