//! A cache's recent versions: one small record per version beside `head.json`
//! (`versions/<N>.json`), written before HEAD names the version. They keep the last K
//! versions' layers alive for garbage collection, let `cache show` say who published what,
//! and let `cache rollback` make an older version's content the next version.

use serde::{Deserialize, Serialize};

use super::head::{now_unix, Head};
use super::layout::{CacheKey, LayerId};
use super::{atomic, read_dir, Store, StoreError};

/// Versions a cache keeps by default (HEAD included).
pub const DEFAULT_KEEP_VERSIONS: usize = 5;

/// Where a version came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Origin {
    /// Not recorded (a version made before history was kept).
    #[default]
    Unknown,
    /// A volume's change was published.
    Publish {
        /// The volume.
        volume: String,
        /// The pod that used it, as namespace/name, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
    },
    /// `cache rollback` (or a volume restored from a snapshot) brought back older content.
    Rollback {
        /// The version whose content this is.
        to: u64,
    },
    /// Pulled from a registry: another node published it.
    Pull {
        /// The manifest's digest.
        manifest: String,
    },
}

/// `caches/<ns>/<name>/versions/<N>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The version number.
    pub version: u64,
    /// Its layers, bottom to top (rewritten when a squash replaces a run of them).
    pub layers: Vec<LayerId>,
    /// The cache lifetime it belongs to.
    pub lineage: String,
    /// Seconds since the epoch when it became HEAD.
    pub created_unix: u64,
    /// Who made it.
    #[serde(default)]
    pub origin: Origin,
}

impl Store {
    /// Records `head` as a version (before HEAD is written), then forgets versions older than
    /// the last `keep`.
    pub(crate) fn record_version(
        &self,
        key: &CacheKey,
        head: &Head,
        origin: Origin,
        keep: usize,
    ) -> Result<(), StoreError> {
        let dir = self.layout.versions_dir(key);
        atomic::create_dir_durable(&dir)?;
        let record = VersionRecord {
            version: head.version,
            layers: head.layers.clone(),
            lineage: head.lineage.clone(),
            created_unix: now_unix(),
            origin,
        };
        atomic::write_json(&self.layout.version_path(key, head.version), &record)?;
        self.prune_versions(key, head.version, keep.max(1))
    }

    /// Removes version records older than the last `keep`, by their names alone: this runs
    /// under the publish lock on every commit. Records of another lifetime within the window
    /// are ignored by [`Store::versions`] and overwritten as the numbers come round again;
    /// no fsync either: a removal undone by a crash only keeps a version a little longer.
    fn prune_versions(&self, key: &CacheKey, newest: u64, keep: usize) -> Result<(), StoreError> {
        let dir = self.layout.versions_dir(key);
        for name in read_dir(&dir)? {
            let text = name.to_string_lossy();
            let Some(n) = text.strip_suffix(".json").and_then(|n| n.parse::<u64>().ok()) else { continue };
            if n + keep as u64 <= newest {
                let path = dir.join(&name);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io("remove", &path, e)),
                }
            }
        }
        Ok(())
    }

    /// Every readable version record of `key`, whatever its lifetime, oldest first.
    fn version_records(&self, key: &CacheKey) -> Result<Vec<VersionRecord>, StoreError> {
        let mut out = Vec::new();
        for name in read_dir(&self.layout.versions_dir(key))? {
            let text = name.to_string_lossy();
            let Some(n) = text.strip_suffix(".json").and_then(|n| n.parse::<u64>().ok()) else { continue };
            if let Some(record) = atomic::read_json::<VersionRecord>(&self.layout.version_path(key, n))? {
                out.push(record);
            }
        }
        out.sort_by_key(|r| r.version);
        Ok(out)
    }

    /// The kept versions of the cache's current lifetime, newest first (none without a HEAD).
    pub fn versions(&self, key: &CacheKey) -> Result<Vec<VersionRecord>, StoreError> {
        let Some(head) = self.head(key)? else { return Ok(Vec::new()) };
        let mut out: Vec<VersionRecord> = self
            .version_records(key)?
            .into_iter()
            .filter(|r| r.lineage == head.lineage && r.version <= head.version)
            .collect();
        out.reverse();
        Ok(out)
    }

    /// Removes every version record of a cache that has no HEAD (removed or evicted).
    pub(crate) fn forget_versions(&self, key: &CacheKey) -> Result<(), StoreError> {
        let dir = self.layout.versions_dir(key);
        for name in read_dir(&dir)? {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &path, e)),
            }
        }
        Ok(())
    }

    /// After a squash replaced `run`, at position `at` of HEAD's layers, with `layer`, every
    /// kept version that holds the same run at the same position shares the layer too (the
    /// content is the same).
    pub(crate) fn squash_history(
        &self,
        key: &CacheKey,
        at: usize,
        run: &[LayerId],
        layer: &LayerId,
    ) -> Result<(), StoreError> {
        let end = at + run.len();
        for mut record in self.versions(key)? {
            if !run.is_empty() && record.layers.get(at..end) == Some(run) {
                let mut layers = record.layers[..at].to_vec();
                layers.push(layer.clone());
                layers.extend_from_slice(&record.layers[end..]);
                record.layers = layers;
                atomic::write_json(&self.layout.version_path(key, record.version), &record)?;
            }
        }
        Ok(())
    }
}
