//! The registry client: oci-client with our timeouts, auth, CA and limits.
//! (Interface stub: the implementation replaces the bodies.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::manifest::{Blob, ManifestError, RemoteVersion};
use crate::store::layout::CacheKey;

/// Where and how to reach the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `host[:port]`.
    pub host: String,
    /// Repository prefix (no leading or trailing `/`); may be empty.
    pub prefix: String,
    /// A Docker config file with credentials.
    pub auth_file: Option<PathBuf>,
    /// A PEM bundle of CAs to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Plain HTTP.
    pub insecure: bool,
    /// Bound on each request (a blob read: on each wait for data).
    pub timeout: Duration,
}

impl RegistryConfig {
    /// Parses `REGISTRY/PREFIX` (`host[:port][/prefix...]`).
    pub fn parse(spec: &str) -> Result<Self, ClientError> {
        let (host, prefix) = spec.split_once('/').unwrap_or((spec, ""));
        Ok(RegistryConfig {
            host: host.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            auth_file: None,
            ca_file: None,
            insecure: false,
            timeout: Duration::from_secs(10),
        })
    }
}

/// How a blob got into a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPush {
    /// It was there already.
    Present,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad configuration.
    #[error("registry configuration: {0}")]
    Config(String),
    /// Any other failure (stub).
    #[error("registry {repo}: {message}")]
    Other {
        /// The repository.
        repo: String,
        /// What happened.
        message: String,
    },
    /// An untrusted manifest.
    #[error("registry {repo}: {source}")]
    Manifest {
        /// The repository.
        repo: String,
        /// What was wrong.
        source: ManifestError,
    },
}

impl ClientError {
    /// Whether trying again later may succeed (unreachable, timeout, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// A registry holding caches under a prefix.
#[derive(Clone)]
pub struct Registry {
    config: RegistryConfig,
}

impl Registry {
    /// A client for `config`.
    pub fn new(config: RegistryConfig) -> Result<Self, ClientError> {
        Ok(Registry { config })
    }

    /// The configuration.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// `<prefix>/<namespace>/<name>`.
    pub fn repository(&self, key: &CacheKey) -> String {
        if self.config.prefix.is_empty() {
            format!("{}/{}", key.namespace, key.name)
        } else {
            format!("{}/{}/{}", self.config.prefix, key.namespace, key.name)
        }
    }

    /// The manifest digest a tag names, `None` when the tag (or repository) does not exist.
    pub async fn tag_digest(&self, key: &CacheKey, tag: &str) -> Result<Option<String>, ClientError> {
        let _ = (key, tag);
        Err(self.stub(key))
    }

    /// The version a tag names and its manifest digest, `None` when there is none.
    pub async fn read_version(&self, key: &CacheKey, tag: &str) -> Result<Option<(RemoteVersion, String)>, ClientError> {
        let _ = tag;
        Err(self.stub(key))
    }

    /// Puts the blob at `path` (already digested) into the cache's repository: skipped when
    /// present, mounted from a repository of `also_in` when one has it, else uploaded.
    pub async fn push_blob(
        &self,
        key: &CacheKey,
        path: &Path,
        blob: &Blob,
        also_in: &[CacheKey],
    ) -> Result<BlobPush, ClientError> {
        let _ = (path, blob, also_in);
        Err(self.stub(key))
    }

    /// Puts a version's manifest (and the empty config blob) under each of `tags`, in order;
    /// returns the manifest digest.
    pub async fn put_version(&self, key: &CacheKey, version: &RemoteVersion, tags: &[String]) -> Result<String, ClientError> {
        let _ = (version, tags);
        Err(self.stub(key))
    }

    /// Opens a blob for reading from a blocking thread; the reader checks size and digest.
    pub async fn open_blob(&self, key: &CacheKey, blob: &Blob) -> Result<BlobReader, ClientError> {
        let _ = blob;
        Err(self.stub(key))
    }

    /// The repository's tags.
    pub async fn tags(&self, key: &CacheKey) -> Result<Vec<String>, ClientError> {
        Err(self.stub(key))
    }

    /// Removes a tag (deletes the manifest it names, which only that tag names).
    pub async fn delete_tag(&self, key: &CacheKey, tag: &str) -> Result<(), ClientError> {
        let _ = tag;
        Err(self.stub(key))
    }

    fn stub(&self, key: &CacheKey) -> ClientError {
        ClientError::Other { repo: self.repository(key), message: "not implemented".into() }
    }
}

/// A blob being downloaded, read from a blocking thread; an error at the end if its size or
/// digest is not the descriptor's.
pub struct BlobReader {}

impl std::io::Read for BlobReader {
    fn read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("not implemented"))
    }
}
