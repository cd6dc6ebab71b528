//! A cache version as an OCI image manifest: our artifact type, a minimal image config, the
//! cache's layers bottom to top, and annotations carrying version, lineage and layer ids.
//!
//! The config is an image config (os, architecture, `rootfs.diff_ids`) rather than the OCI
//! empty descriptor: skopeo 1.9 refuses "image-specific operations" on an empty config and
//! umoci refuses to unpack one, while `artifactType` still tells our versions from images.

use std::collections::BTreeMap;

use oci_client::manifest::{OciDescriptor, OciImageManifest};
use serde::{Deserialize, Serialize};

use crate::store::layout::LayerId;

/// The manifest's `artifactType`: what tells our versions from container images.
pub const ARTIFACT_TYPE: &str = "application/vnd.jobcachefs.cache.v1";
/// Every layer blob's media type.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The image config's media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The OCI empty descriptor's media type (its blob is `{}`).
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The OCI empty blob's digest (`{}`).
pub const EMPTY_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// The OCI empty blob.
pub const EMPTY_BLOB: &[u8] = b"{}";
/// Manifest annotation: the version number.
pub const ANN_VERSION: &str = "dev.jobcachefs.version";
/// Manifest annotation: the lineage id (one lifetime of the cache).
pub const ANN_LINEAGE: &str = "dev.jobcachefs.lineage";
/// Layer descriptor annotation: our layer id.
pub const ANN_LAYER: &str = "dev.jobcachefs.layer";
/// Layer descriptor annotation: the uncompressed tar's digest (OCI's diff id).
pub const ANN_DIFF_ID: &str = "dev.jobcachefs.diff-id";
/// The most layers a manifest may name (squash keeps stacks far shallower).
pub const MAX_LAYERS: usize = 128;
/// The largest manifest we read.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;

/// A layer's blob in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// `sha256:<64 hex>` of the compressed blob.
    pub digest: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// `sha256:<64 hex>` of the uncompressed tar.
    #[serde(default)]
    pub diff_id: String,
}

/// One layer of a remote version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// Our layer id.
    pub id: LayerId,
    /// Its blob.
    pub blob: Blob,
}

/// A cache version as a registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteVersion {
    /// The version number.
    pub version: u64,
    /// The lineage id.
    pub lineage: String,
    /// Bottom to top.
    pub layers: Vec<RemoteLayer>,
}

/// A manifest that is not one of our versions, or breaks a limit.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Over [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {size} bytes, over the limit of {MAX_MANIFEST_BYTES}")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Not JSON of an image manifest.
    #[error("manifest is not an OCI image manifest: {0}")]
    Parse(#[from] serde_json::Error),
    /// A field breaks a rule.
    #[error("manifest field {field}: {rule}")]
    Invalid {
        /// Which field.
        field: String,
        /// The rule it breaks.
        rule: String,
    },
}

fn invalid(field: impl Into<String>, rule: impl Into<String>) -> ManifestError {
    ManifestError::Invalid { field: field.into(), rule: rule.into() }
}

/// Whether `s` is `sha256:` and 64 lower-case hex digits.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// `GOARCH` of this machine, as image configs name architectures.
fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl RemoteVersion {
    /// The config blob: what tools that unpack images need (os, architecture, diff ids).
    pub fn config_blob(&self) -> Vec<u8> {
        let diff_ids: Vec<&str> = self.layers.iter().map(|l| l.blob.diff_id.as_str()).collect();
        let config = serde_json::json!({
            "architecture": goarch(),
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        // A json! value of strings only cannot fail to serialise.
        serde_json::to_vec(&config).unwrap_or_default()
    }

    /// The config blob's digest.
    pub fn config_digest(&self) -> String {
        use sha2::Digest;
        format!("sha256:{:x}", sha2::Sha256::digest(self.config_blob()))
    }

    /// The manifest that stores this version.
    pub fn to_manifest(&self) -> OciImageManifest {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut ann = BTreeMap::new();
                ann.insert(ANN_LAYER.to_string(), l.id.to_string());
                if !l.blob.diff_id.is_empty() {
                    ann.insert(ANN_DIFF_ID.to_string(), l.blob.diff_id.clone());
                }
                OciDescriptor {
                    media_type: LAYER_MEDIA_TYPE.to_string(),
                    digest: l.blob.digest.clone(),
                    size: l.blob.size as i64,
                    annotations: Some(ann),
                    ..Default::default()
                }
            })
            .collect();
        let mut annotations = BTreeMap::new();
        annotations.insert(ANN_VERSION.to_string(), self.version.to_string());
        annotations.insert(ANN_LINEAGE.to_string(), self.lineage.clone());
        OciImageManifest {
            schema_version: 2,
            media_type: Some(oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: OciDescriptor {
                media_type: CONFIG_MEDIA_TYPE.to_string(),
                digest: self.config_digest(),
                size: self.config_blob().len() as i64,
                ..Default::default()
            },
            layers,
            subject: None,
            artifact_type: Some(ARTIFACT_TYPE.to_string()),
            annotations: Some(annotations),
        }
    }

    /// Reads and validates an untrusted manifest.
    pub fn from_manifest(raw: &[u8]) -> Result<Self, ManifestError> {
        if raw.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: raw.len() });
        }
        let m: OciImageManifest = serde_json::from_slice(raw)?;
        if m.schema_version != 2 {
            return Err(invalid("schemaVersion", "must be 2"));
        }
        if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(invalid("artifactType", format!("must be {ARTIFACT_TYPE}")));
        }
        if m.layers.len() > MAX_LAYERS {
            return Err(invalid("layers", format!("at most {MAX_LAYERS}")));
        }
        let ann = m.annotations.unwrap_or_default();
        let version = ann
            .get(ANN_VERSION)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v > 0)
            .ok_or_else(|| invalid(format!("annotations.{ANN_VERSION}"), "must be a positive integer"))?;
        let lineage = ann.get(ANN_LINEAGE).cloned().unwrap_or_default();
        if lineage.is_empty() || lineage.len() > 64 || !lineage.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(invalid(format!("annotations.{ANN_LINEAGE}"), "must be 1 to 64 ASCII letters or digits"));
        }
        let mut layers: Vec<RemoteLayer> = Vec::with_capacity(m.layers.len());
        for (i, d) in m.layers.into_iter().enumerate() {
            let field = |f: &str| format!("layers[{i}].{f}");
            if d.media_type != LAYER_MEDIA_TYPE {
                return Err(invalid(field("mediaType"), format!("must be {LAYER_MEDIA_TYPE}")));
            }
            if !is_sha256_digest(&d.digest) {
                return Err(invalid(field("digest"), "must be sha256: and 64 lower-case hex digits"));
            }
            if d.size < 0 {
                return Err(invalid(field("size"), "must not be negative"));
            }
            let ann = d.annotations.unwrap_or_default();
            let id = ann
                .get(ANN_LAYER)
                .ok_or_else(|| invalid(field(&format!("annotations.{ANN_LAYER}")), "is required"))
                .and_then(|s| {
                    LayerId::new(s.as_str()).map_err(|e| invalid(field(&format!("annotations.{ANN_LAYER}")), e.rule))
                })?;
            let diff_id = ann.get(ANN_DIFF_ID).cloned().unwrap_or_default();
            if !is_sha256_digest(&diff_id) {
                return Err(invalid(field(&format!("annotations.{ANN_DIFF_ID}")), "must be a sha256 digest"));
            }
            if layers.iter().any(|l| l.id == id) {
                return Err(invalid(field(&format!("annotations.{ANN_LAYER}")), "names a layer twice"));
            }
            layers.push(RemoteLayer { id, blob: Blob { digest: d.digest, size: d.size as u64, diff_id } });
        }
        Ok(RemoteVersion { version, lineage, layers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RemoteVersion {
        RemoteVersion {
            version: 7,
            lineage: "abc123".into(),
            layers: vec![RemoteLayer {
                id: LayerId::new("k3v9q2ma").unwrap(),
                blob: Blob {
                    digest: format!("sha256:{}", "a".repeat(64)),
                    size: 10,
                    diff_id: format!("sha256:{}", "b".repeat(64)),
                },
            }],
        }
    }

    #[test]
    fn a_version_survives_its_manifest() {
        let v = sample();
        let raw = serde_json::to_vec(&v.to_manifest()).unwrap();
        assert_eq!(RemoteVersion::from_manifest(&raw).unwrap(), v);
        let text = String::from_utf8(raw).unwrap();
        assert!(text.contains(r#""artifactType":"application/vnd.jobcachefs.cache.v1""#), "{text}");
        assert!(text.contains(&v.config_digest()), "{text}");
        let config: serde_json::Value = serde_json::from_slice(&v.config_blob()).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], v.layers[0].blob.diff_id);
        assert_eq!(config["os"], "linux");
    }

    #[test]
    fn hostile_manifests_are_refused_naming_the_field() {
        let good = serde_json::to_value(sample().to_manifest()).unwrap();
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("artifactType", Box::new(|m| m["artifactType"] = "application/x".into())),
            ("layers[0].digest", Box::new(|m| m["layers"][0]["digest"] = "sha256:../../etc".into())),
            ("layers[0].annotations", Box::new(|m| m["layers"][0]["annotations"][ANN_LAYER] = "../x".into())),
            ("annotations.dev.jobcachefs.version", Box::new(|m| m["annotations"][ANN_VERSION] = "0".into())),
            ("annotations.dev.jobcachefs.lineage", Box::new(|m| m["annotations"][ANN_LINEAGE] = "a/b".into())),
            ("layers[0].mediaType", Box::new(|m| m["layers"][0]["mediaType"] = "text/plain".into())),
        ];
        for (field, edit) in cases {
            let mut m = good.clone();
            edit(&mut m);
            let err = RemoteVersion::from_manifest(&serde_json::to_vec(&m).unwrap()).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        let mut dup = good.clone();
        let layer = dup["layers"][0].clone();
        dup["layers"].as_array_mut().unwrap().push(layer);
        assert!(RemoteVersion::from_manifest(&serde_json::to_vec(&dup).unwrap())
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(RemoteVersion::from_manifest(&big), Err(ManifestError::TooLarge { .. })));
    }
}
