//! Shared oracles of the fuzz targets: the naming rules written out independently of
//! `jobcachefs::store::layout`, so a target compares the library against the spec, not itself.

use std::path::{Component, Path};

use jobcachefs::store::layout::ImageTag;
use jobcachefs::store::{CacheKey, LayerId, Layout, NameError, VolumeId};

/// `[a-z0-9][a-z0-9._-]{0,62}` without `..` (cache names, namespaces, layer ids).
pub fn is_valid_name(s: &str) -> bool {
    rule(s, 63, false)
}

/// `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` without `..` (volume ids).
pub fn is_valid_volume_id(s: &str) -> bool {
    rule(s, 128, true)
}

fn rule(s: &str, max: usize, upper: bool) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || (upper && c.is_ascii_uppercase());
    !b.is_empty()
        && b.len() <= max
        && alnum(b[0])
        && b.iter().all(|&c| alnum(c) || matches!(c, b'.' | b'_' | b'-'))
        && !s.contains("..")
}

/// An error must name the field it is about, first, and keep the rule in the message.
pub fn check_error(err: &NameError, field: &str) {
    assert_eq!(err.field, field, "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with(&format!("{field} ")), "error does not lead with the field {field:?}: {text}");
    assert!(text.contains(err.rule), "{text}");
    assert!(err.value.chars().count() <= 80, "{err:?}");
}

pub fn check_key(key: &CacheKey) {
    assert!(is_valid_name(key.namespace.as_str()), "invalid namespace accepted: {key:?}");
    assert!(is_valid_name(key.name.as_str()), "invalid cache name accepted: {key:?}");
}

pub fn check_layer(id: &LayerId) {
    assert!(is_valid_name(id.as_str()), "invalid layer id accepted: {id:?}");
}

pub fn check_volume(id: &VolumeId) {
    assert!(is_valid_volume_id(id.as_str()), "invalid volume id accepted: {id:?}");
}

/// `path` is `root` followed by exactly `tail`, every part a plain name: no `..`, no `.`,
/// no second root, nothing that `Path::components` would fold away.
pub fn assert_path(path: &Path, root: &Path, tail: &[&str]) {
    assert!(path.starts_with(root), "{path:?} escapes {root:?}");
    let rest = path.strip_prefix(root).unwrap();
    let parts: Vec<Component<'_>> = rest.components().collect();
    assert_eq!(parts.len(), tail.len(), "{path:?}: expected {root:?} + {tail:?}");
    for (got, want) in parts.iter().zip(tail) {
        match got {
            Component::Normal(n) => assert_eq!(n.to_str(), Some(*want), "{path:?}"),
            other => panic!("{path:?}: component {other:?} is not a plain name"),
        }
    }
    // Components fold `a//b` and `a/./b`; the raw text must not hold them either.
    let text = path.to_str().unwrap();
    let expected = std::iter::once(root.to_str().unwrap().to_string()).chain(tail.iter().map(|s| s.to_string()));
    assert_eq!(text, expected.collect::<Vec<_>>().join("/"), "path text is not root + tail");
}

/// Every path the layout builds from `key` stays in its directory with the expected depth.
pub fn check_cache_paths(layout: &Layout, store_root: &Path, key: &CacheKey) {
    let (ns, name) = (key.namespace.as_str(), key.name.as_str());
    assert_path(&layout.namespace_dir(&key.namespace), store_root, &["caches", ns]);
    assert_path(&layout.cache_dir(key), store_root, &["caches", ns, name]);
    assert_path(&layout.head_path(key), store_root, &["caches", ns, name, "head.json"]);
    assert_path(&layout.lock_path(key), store_root, &["caches", ns, name, "lock"]);
    assert_path(&layout.used_path(key), store_root, &["caches", ns, name, "used"]);
    // The cache's image: its tag is derived from the name, never the name itself.
    let tag = ImageTag::of(key);
    let t = tag.as_str();
    assert!(t.len() == 12 && t.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)), "{t:?}");
    let root = layout.root();
    assert_path(&layout.image_file(&tag), root, &["images", &format!("{t}.img")]);
    assert_path(&layout.image_mount(&tag), root, &["i", t]);
}

pub fn check_layer_paths(layout: &Layout, store_root: &Path, id: &LayerId) {
    let s = id.as_str();
    assert_path(&layout.layer_dir(id), store_root, &["layers", s]);
    assert_path(&layout.layer_record(id), store_root, &["layers", &format!("{s}.json")]);
}

pub fn check_volume_paths(layout: &Layout, store_root: &Path, id: &VolumeId) {
    let s = id.as_str();
    let root = layout.root();
    assert_path(&layout.volume_dir(id), root, &["volumes", s]);
    assert_path(&layout.volume_record(id), root, &["volumes", s, "volume.json"]);
    assert_path(&layout.upper_dir(id, None), root, &["volumes", s, "upper"]);
    assert_path(&layout.work_dir(id, None), root, &["volumes", s, "work"]);
    // Inside a cache's image the volume's directories are named by its id the same way.
    let tag = ImageTag::of(&CacheKey::new("fuzz", "image").unwrap());
    let t = tag.as_str();
    assert_path(&layout.upper_dir(id, Some(&tag)), root, &["i", t, "volumes", s, "upper"]);
    assert_path(&layout.work_dir(id, Some(&tag)), root, &["i", t, "volumes", s, "work"]);
    assert_path(&layout.mount_dir(id), root, &["mnt", s]);
    assert_path(&layout.pin_path(id), store_root, &["pins", &format!("{s}.json")]);
}
