//! Validated names and the state-dir layout: the only place names become paths.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest cache or namespace name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest volume id (kubelet's inline ids are `csi-` plus 64 hex digits).
pub const MAX_VOLUME_ID_LEN: usize = 128;
/// Length of a generated layer id; short ids keep overlay options under one page.
pub const LAYER_ID_LEN: usize = 8;

/// A name that breaks a rule; the message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?} is invalid: {rule}")]
pub struct NameError {
    /// Which field (cache name, namespace, volume id, layer id).
    pub field: &'static str,
    /// The offending value, truncated for display.
    pub value: String,
    /// The rule it breaks.
    pub rule: &'static str,
}

fn check(field: &'static str, value: &str, max: usize, upper_ok: bool) -> Result<(), NameError> {
    let err = |rule| NameError { field, value: value.chars().take(80).collect(), rule };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > max {
        return Err(err(if max == MAX_NAME_LEN {
            "must be at most 63 characters"
        } else {
            "must be at most 128 characters"
        }));
    }
    let ok_char = |c: char| {
        c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(c, '.' | '_' | '-')
            || (upper_ok && c.is_ascii_uppercase())
    };
    let rule = if upper_ok {
        "must match [A-Za-z0-9][A-Za-z0-9._-]* (no '/', NUL, spaces or control characters)"
    } else {
        "must match [a-z0-9][a-z0-9._-]* (lower case; no '/', NUL, spaces or control characters)"
    };
    if !value.chars().all(ok_char) {
        return Err(err(rule));
    }
    let first = value.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(err(rule));
    }
    if value.contains("..") {
        return Err(err("must not contain '..'"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $field:literal, $max:expr, $upper:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `value` against the naming rule.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check($field, &value, $max, $upper)?;
                Ok(Self(value))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
    };
}

name_type!(
    /// A cache or namespace name: `[a-z0-9][a-z0-9._-]{0,62}`, no `..`.
    Name, "name", MAX_NAME_LEN, false
);
name_type!(
    /// A volume id: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, no `..`.
    VolumeId, "volume id", MAX_VOLUME_ID_LEN, true
);
name_type!(
    /// A layer id: generated from `[a-z0-9]`, read back under the cache-name rule.
    LayerId, "layer id", MAX_NAME_LEN, false
);

impl LayerId {
    /// A fresh random id of [`LAYER_ID_LEN`] characters from `[a-z0-9]`.
    pub fn generate() -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut bytes = [0u8; LAYER_ID_LEN];
        // Collisions are checked on rename; a failing RNG is a broken system.
        if getrandom::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (nanos >> (i * 5)) as u8 ^ (std::process::id() as u8);
            }
        }
        Self(bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect())
    }
}

/// Length of an image tag: the mount point's name, short for the same reason as layer ids.
pub const IMAGE_TAG_LEN: usize = 12;

/// Names a cache's image file and its mount point: derived from the cache's key (names of
/// up to 127 bytes would not fit in mount options), read back from layer links as `[a-z2-7]{12}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageTag(String);

impl ImageTag {
    /// The tag of `key`'s image: base32 of the first bytes of SHA-256 over `namespace/name`.
    pub fn of(key: &CacheKey) -> Self {
        use sha2::Digest;
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
        let digest = sha2::Sha256::digest(format!("{}/{}", key.namespace, key.name).as_bytes());
        let mut bits: u64 = 0;
        for b in &digest[..8] {
            bits = (bits << 8) | u64::from(*b);
        }
        Self((0..IMAGE_TAG_LEN).map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char).collect())
    }

    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ImageTag {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, NameError> {
        let ok =
            value.len() == IMAGE_TAG_LEN && value.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
        if ok {
            Ok(Self(value))
        } else {
            Err(NameError {
                field: "image tag",
                value: value.chars().take(80).collect(),
                rule: "must be 12 characters of [a-z2-7]",
            })
        }
    }
}

impl From<ImageTag> for String {
    fn from(value: ImageTag) -> String {
        value.0
    }
}

impl fmt::Display for ImageTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cache's identity: (namespace, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CacheKey {
    /// The tenant namespace.
    pub namespace: Name,
    /// The cache's name within the namespace.
    pub name: Name,
}

impl CacheKey {
    /// Validates both parts, naming which one is wrong.
    pub fn new(namespace: &str, name: &str) -> Result<Self, NameError> {
        let namespace = Name::new(namespace).map_err(|e| NameError { field: "namespace", ..e })?;
        let name = Name::new(name).map_err(|e| NameError { field: "cache name", ..e })?;
        Ok(Self { namespace, name })
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A state dir that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state dir {path}: {rule}")]
pub struct StateDirError {
    /// The rejected path.
    pub path: PathBuf,
    /// The rule it breaks.
    pub rule: &'static str,
}

/// Paths inside a state dir, built only from validated names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
    shared: Option<PathBuf>,
}
fn check_dir(root: &Path) -> Result<(), StateDirError> {
    let text = root.as_os_str().as_encoded_bytes();
    if !root.is_absolute() {
        return Err(StateDirError { path: root.to_path_buf(), rule: "must be an absolute path" });
    }
    if text.iter().any(|b| matches!(b, b',' | b':' | b'\\' | 0) || b.is_ascii_control()) {
        return Err(StateDirError {
            path: root.to_path_buf(),
            rule: "must not contain ',', ':', '\\' or control characters (they break overlay mount options)",
        });
    }
    // Every layer path is the root plus 16 bytes; keep 32 of them inside one page.
    if text.len() > 96 {
        return Err(StateDirError {
            path: root.to_path_buf(),
            rule: "must be at most 96 bytes long so deep layer stacks fit in one page of mount options",
        });
    }
    Ok(())
}

impl Layout {
    /// Accepts an absolute path whose text is safe inside overlay mount options.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StateDirError> {
        let root = root.into();
        check_dir(&root)?;
        Ok(Self { root, shared: None })
    }

    /// Puts `caches/` and `layers/` (and the state-wide lock) under `shared`, a filesystem every
    /// node mounts; volumes, scratch and mount points stay on this node's state dir.
    pub fn with_shared(mut self, shared: impl Into<PathBuf>) -> Result<Self, StateDirError> {
        let shared = shared.into();
        check_dir(&shared)?;
        self.shared = Some(shared);
        Ok(self)
    }

    /// Whether layers live on another filesystem than volumes (a commit copies, not renames).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The shared dir, when there is one.
    pub fn shared_root(&self) -> Option<&Path> {
        self.shared.as_deref()
    }

    /// Where HEADs and layers live: the shared dir, or the state dir.
    fn store_root(&self) -> &Path {
        self.shared.as_deref().unwrap_or(&self.root)
    }
    /// Pins of volumes on every node (shared stores only): one file per volume naming its layers.
    pub fn pins_dir(&self) -> PathBuf {
        self.store_root().join("pins")
    }
    /// One volume's pin file.
    pub fn pin_path(&self, id: &VolumeId) -> PathBuf {
        self.pins_dir().join(format!("{id}.json"))
    }

    /// The state dir itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Parent of every cache's directory.
    pub fn caches_dir(&self) -> PathBuf {
        self.store_root().join("caches")
    }
    /// Parent of one namespace's caches.
    pub fn namespace_dir(&self, namespace: &Name) -> PathBuf {
        self.caches_dir().join(namespace.as_str())
    }
    /// One cache's directory.
    pub fn cache_dir(&self, key: &CacheKey) -> PathBuf {
        self.namespace_dir(&key.namespace).join(key.name.as_str())
    }
    /// The cache's version pointer.
    pub fn head_path(&self, key: &CacheKey) -> PathBuf {
        self.cache_dir(key).join("head.json")
    }
    /// Target of the cache's file lock.
    pub fn lock_path(&self, key: &CacheKey) -> PathBuf {
        self.cache_dir(key).join("lock")
    }
    /// Serialises this node's HEAD writes of the cache: a commit's and a pulled version's.
    pub fn head_lock_path(&self, key: &CacheKey) -> PathBuf {
        self.cache_dir(key).join("head.lock")
    }
    /// Touched on every restore and commit; its mtime is the cache's last use.
    pub fn used_path(&self, key: &CacheKey) -> PathBuf {
        self.cache_dir(key).join("used")
    }
    /// The cache's kept versions.
    pub fn versions_dir(&self, key: &CacheKey) -> PathBuf {
        self.cache_dir(key).join("versions")
    }
    /// One kept version's record.
    pub fn version_path(&self, key: &CacheKey, version: u64) -> PathBuf {
        self.versions_dir(key).join(format!("{version}.json"))
    }
    /// Snapshots: what each pins, on the store every node sees.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.store_root().join("snapshots")
    }
    /// One snapshot's record.
    pub fn snapshot_record(&self, id: &VolumeId) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.json"))
    }
    /// Parent of every layer.
    pub fn layers_dir(&self) -> PathBuf {
        self.store_root().join("layers")
    }
    /// One layer's tree.
    pub fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.layers_dir().join(id.as_str())
    }
    /// One layer's record.
    pub fn layer_record(&self, id: &LayerId) -> PathBuf {
        self.layers_dir().join(format!("{id}.json"))
    }
    /// The shared empty lower layer of a cache with no version.
    pub fn empty_layer(&self) -> PathBuf {
        self.root.join("empty")
    }
    /// Parent of every volume.
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }
    /// One volume's directory.
    pub fn volume_dir(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir().join(id.as_str())
    }
    /// One volume's record.
    pub fn volume_record(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir(id).join("volume.json")
    }
    /// Where a volume's upper and work directories live: beside its record, or inside its
    /// cache's image (`image`), so a commit stays a rename within that filesystem.
    pub fn volume_data_dir(&self, id: &VolumeId, image: Option<&ImageTag>) -> PathBuf {
        match image {
            None => self.volume_dir(id),
            Some(tag) => self.image_mount(tag).join("volumes").join(id.as_str()),
        }
    }
    /// Where a volume's changes land.
    pub fn upper_dir(&self, id: &VolumeId, image: Option<&ImageTag>) -> PathBuf {
        self.volume_data_dir(id, image).join("upper")
    }
    /// Where a volume's upper is prepared before it is renamed into place.
    pub fn new_upper_dir(&self, id: &VolumeId, image: Option<&ImageTag>) -> PathBuf {
        self.volume_data_dir(id, image).join("upper.new")
    }
    /// Overlay's work directory for a volume.
    pub fn work_dir(&self, id: &VolumeId, image: Option<&ImageTag>) -> PathBuf {
        self.volume_data_dir(id, image).join("work")
    }
    /// The directory overlay makes in a work directory mounted `volatile`; while it is there
    /// the kernel refuses to mount that work directory again.
    pub fn volatile_marker(&self, id: &VolumeId, image: Option<&ImageTag>) -> PathBuf {
        self.work_dir(id, image).join("work/incompat/volatile")
    }
    /// Image files of caches with a size, and their records.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    /// One cache's image file.
    pub fn image_file(&self, tag: &ImageTag) -> PathBuf {
        self.images_dir().join(format!("{tag}.img"))
    }
    /// One image's record (which cache, what size).
    pub fn image_record(&self, tag: &ImageTag) -> PathBuf {
        self.images_dir().join(format!("{tag}.json"))
    }
    /// The file lock that serialises mounting, growing and unmounting one image.
    pub fn image_lock(&self, tag: &ImageTag) -> PathBuf {
        self.images_dir().join(format!("{tag}.lock"))
    }
    /// Parent of the images' mount points.
    pub fn image_mounts_dir(&self) -> PathBuf {
        self.root.join("i")
    }
    /// Where an image is mounted while in use.
    pub fn image_mount(&self, tag: &ImageTag) -> PathBuf {
        self.image_mounts_dir().join(tag.as_str())
    }
    /// The layers kept inside an image.
    pub fn image_layers_dir(&self, tag: &ImageTag) -> PathBuf {
        self.image_mount(tag).join("layers")
    }
    /// One layer's tree inside an image; `layers/<id>` is a link to it.
    pub fn image_layer_dir(&self, tag: &ImageTag, id: &LayerId) -> PathBuf {
        self.image_layers_dir(tag).join(id.as_str())
    }
    /// What the `layers/<id>` link of a layer inside an image holds: relative, so the state
    /// dir can move.
    pub fn image_layer_link(&self, tag: &ImageTag, id: &LayerId) -> PathBuf {
        Path::new("../i").join(tag.as_str()).join("layers").join(id.as_str())
    }
    /// The image a `layers/<id>` link points into, if its text has the shape this module writes.
    pub fn image_of_link(&self, link: &Path) -> Option<ImageTag> {
        let mut parts = link.components().map(|c| c.as_os_str().to_str());
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Some("..")), Some(Some("i")), Some(Some(tag)), Some(Some("layers")), Some(Some(_)), None) => {
                ImageTag::try_from(tag.to_string()).ok()
            }
            _ => None,
        }
    }
    /// Parent of the mount points `jobcachefs run` creates.
    pub fn mounts_dir(&self) -> PathBuf {
        self.root.join("mnt")
    }
    /// Where `jobcachefs run` mounts a volume.
    pub fn mount_dir(&self, id: &VolumeId) -> PathBuf {
        self.mounts_dir().join(id.as_str())
    }
    /// Scratch space on the state dir's filesystem (squash builds, trash).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    /// The state-wide lock that keeps pinning and garbage collection apart.
    pub fn gc_lock_path(&self) -> PathBuf {
        self.store_root().join("gc.lock")
    }
    /// Where the start-up probe remembers that this filesystem can hold uppers.
    pub fn probe_record(&self) -> PathBuf {
        self.root.join("probe.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        let long = "a".repeat(64);
        let ok63 = "a".repeat(63);
        let cases: &[(&str, Option<&str>)] = &[
            ("maven", None),
            ("a", None),
            ("0cache", None),
            ("my.cache_1-x", None),
            (&ok63, None),
            ("", Some("must not be empty")),
            (&long, Some("at most 63")),
            ("..", Some("must match")),
            ("a..b", Some("'..'")),
            ("a/b", Some("must match")),
            ("/abs", Some("must match")),
            ("a\0b", Some("must match")),
            ("Maven", Some("lower case")),
            ("-x", Some("must match")),
            (".hidden", Some("must match")),
            ("a b", Some("must match")),
            ("a\nb", Some("must match")),
            ("caché", Some("must match")),
        ];
        for (input, want) in cases {
            let got = Name::new(*input);
            match want {
                None => assert!(got.is_ok(), "{input:?} should be valid: {got:?}"),
                Some(rule) => {
                    let err = got.expect_err(input);
                    assert!(err.to_string().contains(rule), "{input:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn cache_key_names_the_field() {
        let err = CacheKey::new("default", "../etc").unwrap_err();
        assert_eq!(err.field, "cache name");
        let err = CacheKey::new("Team", "maven").unwrap_err();
        assert!(err.to_string().starts_with("namespace \"Team\" is invalid"));
    }

    #[test]
    fn volume_ids_allow_kubelet_ids() {
        let kubelet = format!("csi-{}", "ab12".repeat(16));
        assert!(VolumeId::new(kubelet).is_ok());
        assert!(VolumeId::new("pvc-ABC").is_ok());
        assert!(VolumeId::new("a".repeat(129)).is_err());
        assert!(VolumeId::new("x/../y").is_err());
    }

    #[test]
    fn generated_layer_ids_are_valid_and_distinct() {
        let a = LayerId::generate();
        let b = LayerId::generate();
        assert_eq!(a.as_str().len(), LAYER_ID_LEN);
        assert!(LayerId::new(a.as_str()).is_ok());
        assert_ne!(a, b);
    }

    #[test]
    fn names_deserialize_only_when_valid() {
        let ok: Name = serde_json::from_str("\"maven\"").unwrap();
        assert_eq!(ok.as_str(), "maven");
        let err = serde_json::from_str::<Name>("\"../x\"").unwrap_err();
        assert!(err.to_string().contains("invalid"), "{err}");
    }

    #[test]
    fn state_dir_rules() {
        assert!(Layout::new("/var/lib/jobcachefs").is_ok());
        assert!(Layout::new("relative").is_err());
        assert!(Layout::new("/a,b").is_err());
        assert!(Layout::new("/a:b").is_err());
        assert!(Layout::new(format!("/{}", "x".repeat(100))).is_err());
        let l = Layout::new("/s").unwrap();
        let key = CacheKey::new("ns", "c").unwrap();
        assert_eq!(l.head_path(&key), Path::new("/s/caches/ns/c/head.json"));
        let id = LayerId::new("k3v9q2ma").unwrap();
        assert_eq!(l.layer_dir(&id), Path::new("/s/layers/k3v9q2ma"));
        let tag = ImageTag::of(&key);
        assert_eq!(tag.as_str().len(), IMAGE_TAG_LEN);
        assert_eq!(tag, ImageTag::of(&CacheKey::new("ns", "c").unwrap()), "stable");
        assert_ne!(tag, ImageTag::of(&CacheKey::new("ns", "d").unwrap()));
        assert_eq!(l.image_of_link(&l.image_layer_link(&tag, &id)), Some(tag.clone()));
        assert_eq!(l.image_of_link(Path::new("../i/../layers/x")), None);
        assert_eq!(l.image_of_link(Path::new("/etc/passwd")), None);
        let vol = VolumeId::new("v1").unwrap();
        assert_eq!(l.upper_dir(&vol, None), Path::new("/s/volumes/v1/upper"));
        assert_eq!(l.upper_dir(&vol, Some(&tag)), l.image_mount(&tag).join("volumes/v1/upper"));
    }
}
