//! The registry client: oci-client with our timeouts, auth, CA and limits.
//!
//! Every request runs under the configured timeout; an upload under a watchdog that fires
//! when no byte has moved for that long, a download under a timeout on each wait for data,
//! so a large blob on a slow link is not cut off while a stalled one is. Errors carry the
//! repository and say whether trying again may help ([`ClientError::is_transient`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, Bytes};
use futures_util::stream::{BoxStream, StreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use reqwest::header::{HeaderValue, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::auth;
use super::manifest::{self, Blob, ManifestError, RemoteVersion};
use crate::store::layout::CacheKey;

/// Bytes read from a blob file at a time for an upload.
const UPLOAD_READ: usize = 1 << 20;
/// Bytes handed to the HTTP body at a time: the grain at which the watchdog sees progress.
const UPLOAD_SLICE: usize = 64 << 10;
/// Tags asked for per page of a tag list.
const TAGS_PAGE: usize = 1000;
/// The most pages of tags we follow (a million tags), against a registry that loops.
const MAX_TAG_PAGES: usize = 1000;
/// After an upload's last byte, how many timeouts its answer may take.
const COMMIT_WAIT_FACTOR: u32 = 6;
/// How much of a server's own words goes into an error.
const MAX_SERVER_TEXT: usize = 300;

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
        let bad = |rule: &str| ClientError::Config(format!("registry {spec:?}: {rule}"));
        if spec.contains("://") {
            return Err(bad("must be host[:port][/prefix] without a scheme (plain HTTP is a separate setting)"));
        }
        let (host, prefix) = spec.split_once('/').unwrap_or((spec, ""));
        if host.is_empty() {
            return Err(bad("must start with a host: host[:port][/prefix]"));
        }
        if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)) {
            return Err(bad("the host may hold only letters, digits, '.', '-', and ':' before a port"));
        }
        if let Some((_, port)) = host.rsplit_once(':').filter(|_| !host.ends_with(']')) {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad("the port must be a number from 1 to 65535"));
            }
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() && !prefix.split('/').all(is_path_component) {
            return Err(bad(
                "each part of the prefix must be lower-case letters and digits, separated by one '.', '_', '__' or '-'",
            ));
        }
        Ok(RegistryConfig {
            host: host.to_string(),
            prefix: prefix.to_string(),
            auth_file: None,
            ca_file: None,
            insecure: false,
            timeout: Duration::from_secs(10),
        })
    }
}

/// A repository path component as the distribution spec has it:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// Whether `t` is a valid tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn is_tag(t: &str) -> bool {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    t.len() <= 128 && t.bytes().next().is_some_and(ok) && t.bytes().all(|b| ok(b) || b == b'.' || b == b'-')
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

/// Why a registry call failed. `repo` is `host/repository`, `op` what was being done.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad configuration.
    #[error("registry configuration: {0}")]
    Config(String),
    /// No connection (refused, reset, DNS); may work later.
    #[error("registry {repo}: {op}: unreachable: {message}")]
    Unreachable {
        /// The repository.
        repo: String,
        /// What was being done.
        op: String,
        /// Why, as the network stack says.
        message: String,
    },
    /// No answer in time; may work later.
    #[error("registry {repo}: {op}: no answer within {}", humantime::format_duration(*after))]
    Timeout {
        /// The repository.
        repo: String,
        /// What was being done.
        op: String,
        /// The bound.
        after: Duration,
    },
    /// The registry failed (5xx) or asked us to slow down (429); may work later.
    #[error("registry {repo}: {op}: the registry answered {status}: {message}")]
    Server {
        /// The repository.
        repo: String,
        /// What was being done.
        op: String,
        /// The HTTP status.
        status: u16,
        /// What the registry said.
        message: String,
    },
    /// Authentication or authorization refused (401, 403).
    #[error("registry {repo}: {op}: access denied ({message}); check --registry-auth")]
    Denied {
        /// The repository.
        repo: String,
        /// What was being done.
        op: String,
        /// What the registry said.
        message: String,
    },
    /// The TLS connection failed: most often a certificate no configured CA vouches for.
    #[error("registry {repo}: {op}: TLS failed: {message}; check --registry-ca (or plain HTTP)")]
    Tls {
        /// The repository.
        repo: String,
        /// What was being done.
        op: String,
        /// Why, as rustls says.
        message: String,
    },
    /// The manifest, blob or repository does not exist.
    #[error("registry {repo}: {op}: not found")]
    NotFound {
        /// The repository.
        repo: String,
        /// What was being done.
        op: String,
    },
    /// The registry does not do this (e.g. deleting manifests without storage delete enabled).
    #[error("registry {repo}: {op}: the registry does not support it ({message})")]
    Unsupported {
        /// The repository.
        repo: String,
        /// What was being done.
        op: String,
        /// What the registry said, and what to change.
        message: String,
    },
    /// Content that does not hash to the digest that names it.
    #[error("registry {repo}: {what}: digest mismatch: expected {expected}, got {actual}")]
    Digest {
        /// The repository.
        repo: String,
        /// Which content.
        what: String,
        /// The digest that names it.
        expected: String,
        /// What it hashes to (or what the registry says it is).
        actual: String,
    },
    /// A local blob file could not be read.
    #[error("{op} {path}: {source}")]
    BlobFile {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A local blob file is not the size its descriptor says.
    #[error("blob file {path} is {actual} bytes, but blob {digest} is {expected} bytes")]
    BlobSize {
        /// The file.
        path: PathBuf,
        /// The blob's digest.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// Any other failure.
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
        /// The repository and tag.
        repo: String,
        /// What was wrong.
        source: ManifestError,
    },
}

impl ClientError {
    /// Whether trying again later may succeed (unreachable, timeout, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. } | ClientError::Timeout { .. } | ClientError::Server { .. })
    }
}

/// What one call is about, for its errors.
struct Op<'a> {
    repo: &'a str,
    what: String,
}

impl Op<'_> {
    fn err(&self, e: OciDistributionError) -> ClientError {
        use OciDistributionError as E;
        let (repo, op) = (self.repo.to_string(), self.what.clone());
        match e {
            E::RequestError(e) => self.reqwest_error(&e),
            E::UnauthorizedError { .. } => ClientError::Denied { repo, op, message: "401 unauthorized".into() },
            E::AuthenticationFailure(m) => {
                ClientError::Denied { repo, op, message: format!("the token service refused: {}", excerpt(&m)) }
            }
            E::RegistryError { envelope, .. } => self.envelope_error(None, &envelope),
            E::ServerError { code, message, .. } => self.status_error(code, &message),
            E::DigestError(DigestError::VerificationError { expected, actual }) => {
                ClientError::Digest { repo, what: op, expected, actual }
            }
            E::IoError(e) => self.io_error(&e),
            other => ClientError::Other { repo, message: format!("{op}: {}", chain(&other)) },
        }
    }

    fn reqwest_error(&self, e: &reqwest::Error) -> ClientError {
        let (repo, op) = (self.repo.to_string(), self.what.clone());
        if let Some(message) = tls_problem(e) {
            return ClientError::Tls { repo, op, message };
        }
        if let Some(status) = e.status() {
            return self.status_error(status.as_u16(), "");
        }
        if e.is_timeout() {
            return ClientError::Timeout { repo, op, after: Duration::ZERO };
        }
        if e.is_connect() || e.is_request() || e.is_body() {
            return ClientError::Unreachable { repo, op, message: chain(e) };
        }
        ClientError::Other { repo, message: format!("{op}: {}", chain(e)) }
    }

    fn io_error(&self, e: &io::Error) -> ClientError {
        let (repo, op) = (self.repo.to_string(), self.what.clone());
        match e.kind() {
            io::ErrorKind::TimedOut => ClientError::Timeout { repo, op, after: Duration::ZERO },
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => ClientError::Unreachable { repo, op, message: chain(e) },
            _ => ClientError::Other { repo, message: format!("{op}: {}", chain(e)) },
        }
    }

    fn status_error(&self, status: u16, body: &str) -> ClientError {
        if let Ok(envelope) = serde_json::from_str::<OciEnvelope>(body) {
            if !envelope.errors.is_empty() {
                return self.envelope_error(Some(status), &envelope);
            }
        }
        let (repo, op) = (self.repo.to_string(), self.what.clone());
        let message = if body.trim().is_empty() {
            StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no reason given")
                .to_string()
        } else {
            excerpt(body)
        };
        match status {
            401 | 403 => ClientError::Denied { repo, op, message: format!("{status} {message}") },
            404 => ClientError::NotFound { repo, op },
            405 => ClientError::Unsupported { repo, op, message: format!("405 {message}") },
            429 | 500..=599 => ClientError::Server { repo, op, status, message },
            _ => ClientError::Other { repo, message: format!("{op}: the registry answered {status}: {message}") },
        }
    }

    fn envelope_error(&self, status: Option<u16>, envelope: &OciEnvelope) -> ClientError {
        let (repo, op) = (self.repo.to_string(), self.what.clone());
        let message = excerpt(
            &envelope
                .errors
                .iter()
                .map(|e| format!("{}: {}", code_name(&e.code), e.message))
                .collect::<Vec<_>>()
                .join("; "),
        );
        let Some(first) = envelope.errors.first() else {
            return ClientError::Other { repo, message: format!("{op}: {message}") };
        };
        match &first.code {
            OciErrorCode::Denied | OciErrorCode::Unauthorized => ClientError::Denied { repo, op, message },
            OciErrorCode::ManifestUnknown
            | OciErrorCode::NameUnknown
            | OciErrorCode::BlobUnknown
            | OciErrorCode::NotFound => ClientError::NotFound { repo, op },
            OciErrorCode::Toomanyrequests => ClientError::Server { repo, op, status: 429, message },
            OciErrorCode::Unsupported => ClientError::Unsupported { repo, op, message },
            _ => match status {
                Some(s @ (429 | 500..=599)) => ClientError::Server { repo, op, status: s, message },
                _ => ClientError::Other { repo, message: format!("{op}: {message}") },
            },
        }
    }
}

/// An error code as the registry spelled it.
fn code_name(code: &OciErrorCode) -> String {
    match code {
        OciErrorCode::Other(s) => s.clone(),
        known => serde_json::to_value(known)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{known:?}")),
    }
}

/// `e` and its sources joined by ": ", each once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// What a TLS failure somewhere in `e`'s sources says, if it is one.
fn tls_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        // io::Error hides its inner error from `source()` (and may nest another io::Error);
        // look inside explicitly.
        let mut level = err;
        loop {
            if let Some(r) = level.downcast_ref::<rustls::Error>() {
                return Some(r.to_string());
            }
            match level.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
                Some(inner) => level = inner,
                None => break,
            }
        }
        cur = err.source();
    }
    let text = chain(e);
    text.to_ascii_lowercase().contains("certificate").then_some(text)
}

/// The first `MAX_SERVER_TEXT` characters of what a server said, on one line.
fn excerpt(s: &str) -> String {
    let one_line: String = s.trim().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match one_line.char_indices().nth(MAX_SERVER_TEXT) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A registry holding caches under a prefix.
#[derive(Clone)]
pub struct Registry {
    config: RegistryConfig,
    oci: oci_client::Client,
    /// For the calls oci-client lacks (deleting a manifest); same TLS and timeouts.
    http: reqwest::Client,
    auth: RegistryAuth,
    /// The registry as oci-client keys its credentials (docker.io is index.docker.io).
    registry_key: String,
}

impl Registry {
    /// A client for `config`.
    pub fn new(config: RegistryConfig) -> Result<Self, ClientError> {
        // reqwest is built without a crypto provider of its own; ring is the one kube uses.
        // Installing fails only when one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let auth = match &config.auth_file {
            Some(path) => auth::load(path, &config.host)?,
            None => RegistryAuth::Anonymous,
        };
        let mut certs = Vec::new();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                ClientError::Config(format!("registry CA file {}: cannot read it: {e}", path.display()))
            })?;
            let parsed = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ClientError::Config(format!(
                    "registry CA file {}: not a PEM certificate bundle: {}",
                    path.display(),
                    chain(&e)
                ))
            })?;
            if parsed.is_empty() {
                return Err(ClientError::Config(format!(
                    "registry CA file {}: holds no PEM certificate",
                    path.display()
                )));
            }
            certs.push((pem, parsed));
        }
        let protocol = if config.insecure { ClientProtocol::Http } else { ClientProtocol::Https };
        let oci_config = ClientConfig {
            protocol,
            // A whole blob goes in one streamed PUT: one request, whose progress our watchdog
            // can see, and which every registry takes (chunked PATCHes are where registries
            // differ).
            use_monolithic_push: true,
            extra_root_certificates: certs
                .iter()
                .map(|(pem, _)| Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() })
                .collect(),
            // Manifests are read one at a time, each a single-platform image manifest.
            platform_resolver: None,
            // No read_timeout: reqwest counts it from the start of a request to its answer,
            // which would cut off any upload longer than it; our own bounds apply instead.
            connect_timeout: Some(config.timeout),
            ..ClientConfig::default()
        };
        // try_from, not new: new() falls back to a default client, losing the CA silently.
        let oci = oci_client::Client::try_from(oci_config)
            .map_err(|e| ClientError::Config(format!("registry {}: {}", config.host, chain(&e))))?;
        let mut http =
            reqwest::Client::builder().connect_timeout(config.timeout).redirect(reqwest::redirect::Policy::none());
        for (_, parsed) in certs {
            http = http.tls_certs_merge(parsed);
        }
        let http = http.build().map_err(|e| ClientError::Config(format!("registry {}: {}", config.host, chain(&e))))?;
        let registry_key =
            Reference::with_tag(config.host.clone(), "x".into(), "latest".into()).resolve_registry().to_string();
        Ok(Registry { config, oci, http, auth, registry_key })
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

    /// `host/<prefix>/<namespace>/<name>`, as errors name it.
    fn location(&self, key: &CacheKey) -> String {
        format!("{}/{}", self.config.host, self.repository(key))
    }

    fn tagged(&self, key: &CacheKey, tag: &str) -> Result<Reference, ClientError> {
        if !is_tag(tag) {
            return Err(ClientError::Other {
                repo: self.location(key),
                message: format!("tag {tag:?} is not a valid tag (letters, digits, '_', '.', '-', at most 128)"),
            });
        }
        Ok(Reference::with_tag(self.config.host.clone(), self.repository(key), tag.to_string()))
    }

    fn untagged(&self, key: &CacheKey) -> Reference {
        // oci-client only takes references; the tag is unused by blob and tag-list calls.
        Reference::with_tag(self.config.host.clone(), self.repository(key), "latest".to_string())
    }

    /// Runs one request under the timeout, with our credentials in oci-client's store.
    async fn call<T>(
        &self,
        op: &Op<'_>,
        fut: impl std::future::Future<Output = Result<T, OciDistributionError>>,
    ) -> Result<T, ClientError> {
        self.oci.store_auth_if_needed(&self.registry_key, &self.auth).await;
        match tokio::time::timeout(self.config.timeout, fut).await {
            Ok(r) => r.map_err(|e| self.timed(op.err(e))),
            Err(_) => Err(self.timeout(op)),
        }
    }

    fn timeout(&self, op: &Op<'_>) -> ClientError {
        ClientError::Timeout { repo: op.repo.to_string(), op: op.what.clone(), after: self.config.timeout }
    }

    /// A timeout reported by reqwest itself is ours.
    fn timed(&self, e: ClientError) -> ClientError {
        match e {
            ClientError::Timeout { repo, op, .. } => ClientError::Timeout { repo, op, after: self.config.timeout },
            other => other,
        }
    }

    /// The manifest digest a tag names, `None` when the tag (or repository) does not exist.
    pub async fn tag_digest(&self, key: &CacheKey, tag: &str) -> Result<Option<String>, ClientError> {
        let repo = self.location(key);
        let op = Op { repo: &repo, what: format!("looking up tag {tag}") };
        let reference = self.tagged(key, tag)?;
        match self.call(&op, self.oci.fetch_manifest_digest(&reference, &self.auth)).await {
            Ok(d) => Ok(Some(d)),
            Err(ClientError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The version a tag names and its manifest digest, `None` when there is none.
    pub async fn read_version(
        &self,
        key: &CacheKey,
        tag: &str,
    ) -> Result<Option<(RemoteVersion, String)>, ClientError> {
        let repo = self.location(key);
        let op = Op { repo: &repo, what: format!("reading manifest {tag}") };
        let reference = self.tagged(key, tag)?;
        // oci-client checks the body against the registry's Docker-Content-Digest when it
        // sends one, and otherwise returns the body's own sha256.
        let fetched = self.call(&op, self.oci.pull_manifest_raw(&reference, &self.auth, &[OCI_IMAGE_MEDIA_TYPE])).await;
        let (raw, digest) = match fetched {
            Ok(r) => r,
            Err(ClientError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let at = format!("{repo}:{tag}");
        if raw.len() > manifest::MAX_MANIFEST_BYTES {
            return Err(ClientError::Manifest { repo: at, source: ManifestError::TooLarge { size: raw.len() } });
        }
        // Our versions are always sha256; a registry that names them otherwise is not one we
        // wrote to, and a digest we return must be one we can check.
        let own = sha256_digest(&raw);
        if digest != own {
            return Err(ClientError::Digest { repo, what: format!("manifest {tag}"), expected: digest, actual: own });
        }
        let version =
            RemoteVersion::from_manifest(&raw).map_err(|source| ClientError::Manifest { repo: at, source })?;
        Ok(Some((version, digest)))
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
        let meta = tokio::fs::metadata(path).await.map_err(|source| ClientError::BlobFile {
            op: "stat",
            path: path.to_path_buf(),
            source,
        })?;
        if meta.len() != blob.size {
            return Err(ClientError::BlobSize {
                path: path.to_path_buf(),
                digest: blob.digest.clone(),
                expected: blob.size,
                actual: meta.len(),
            });
        }
        if let Some(placed) = self.place_blob(key, blob, also_in).await? {
            return Ok(placed);
        }
        let (repo, target) = (self.location(key), self.untagged(key));
        self.upload(&repo, &target, path, blob).await?;
        Ok(BlobPush::Uploaded)
    }

    /// Makes the blob present in the cache's repository without uploading it: `Present` when
    /// it is there, `Mounted` from a repository of `also_in` that has it, `None` when neither.
    pub async fn place_blob(
        &self,
        key: &CacheKey,
        blob: &Blob,
        also_in: &[CacheKey],
    ) -> Result<Option<BlobPush>, ClientError> {
        let repo = self.location(key);
        let target = self.untagged(key);
        let check = Op { repo: &repo, what: format!("checking blob {}", blob.digest) };
        if self.call(&check, self.oci.blob_exists(&target, &blob.digest)).await? {
            return Ok(Some(BlobPush::Present));
        }
        for other in also_in.iter().filter(|o| *o != key) {
            let source = self.untagged(other);
            let mount = Op { repo: &repo, what: format!("mounting blob {} from {}", blob.digest, source.repository()) };
            match self.call(&mount, self.oci.mount_blob(&target, &source, &blob.digest)).await {
                // A registry may answer a mount it cannot do by opening an upload instead;
                // only the blob being there counts.
                Ok(()) => {
                    if self.call(&check, self.oci.blob_exists(&target, &blob.digest)).await? {
                        return Ok(Some(BlobPush::Mounted));
                    }
                }
                // A registry that is down fails the upload too, with a better message.
                Err(e) if e.is_transient() => break,
                Err(e) => tracing::debug!(error = %e, "cross-repository mount refused; trying the next"),
            }
        }
        Ok(None)
    }

    /// Streams the file into one PUT, aborting when the uploader has taken no byte for the
    /// timeout.
    ///
    /// Once the last byte is handed over the answer may take [`COMMIT_WAIT_FACTOR`] timeouts:
    /// the socket buffers (megabytes, so all of a small blob) may still be draining on a slow
    /// link, and the registry may be moving a large upload into place, neither of which we
    /// can watch.
    async fn upload(&self, repo: &str, target: &Reference, path: &Path, blob: &Blob) -> Result<(), ClientError> {
        let op = Op { repo, what: format!("uploading blob {}", blob.digest) };
        let file = std::fs::File::open(path).map_err(|source| ClientError::BlobFile {
            op: "open",
            path: path.to_path_buf(),
            source,
        })?;
        let progress = Arc::new(Progress::new());
        let stream = file_stream(file, path.to_path_buf(), blob.size, progress.clone());
        self.oci.store_auth_if_needed(&self.registry_key, &self.auth).await;
        let upload = self.oci.push_blob_stream(target, stream, &blob.digest, Some(blob.size));
        tokio::pin!(upload);
        loop {
            let (seen, ended) = progress.get();
            let idle = if ended { self.config.timeout * COMMIT_WAIT_FACTOR } else { self.config.timeout };
            tokio::select! {
                r = &mut upload => {
                    return r.map(|_| ()).map_err(|e| match file_error(&e) {
                        Some(source) => ClientError::BlobFile { op: "read", path: path.to_path_buf(), source },
                        None => self.timed(op.err(e)),
                    });
                }
                _ = tokio::time::sleep_until(progress.start + seen + idle) => {
                    if progress.get() == (seen, ended) {
                        return Err(ClientError::Timeout { repo: repo.to_string(), op: op.what, after: idle });
                    }
                }
            }
        }
    }

    /// Puts a version's manifest (and its config blob) under each of `tags`, in order;
    /// returns the manifest digest. The layer blobs must be in the repository already.
    pub async fn put_version(
        &self,
        key: &CacheKey,
        version: &RemoteVersion,
        tags: &[String],
    ) -> Result<String, ClientError> {
        let repo = self.location(key);
        let body = serde_json::to_vec(&version.to_manifest())
            .map_err(|e| ClientError::Other { repo: repo.clone(), message: format!("encoding the manifest: {e}") })?;
        if body.len() > manifest::MAX_MANIFEST_BYTES {
            return Err(ClientError::Manifest { repo, source: ManifestError::TooLarge { size: body.len() } });
        }
        let references = tags.iter().map(|t| self.tagged(key, t)).collect::<Result<Vec<_>, _>>()?;
        let target = self.untagged(key);
        let (config, config_digest) = (version.config_blob(), version.config_digest());
        let check = Op { repo: &repo, what: format!("checking config blob {config_digest}") };
        if !self.call(&check, self.oci.blob_exists(&target, &config_digest)).await? {
            let push = Op { repo: &repo, what: format!("uploading config blob {config_digest}") };
            self.call(&push, self.oci.push_blob(&target, config, &config_digest)).await?;
        }
        let digest = sha256_digest(&body);
        let body = Bytes::from(body);
        for (tag, reference) in tags.iter().zip(references) {
            let op = Op { repo: &repo, what: format!("putting manifest {digest} as {tag}") };
            let put =
                self.oci.push_manifest_raw(&reference, body.clone(), HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE));
            self.call(&op, put).await?;
        }
        Ok(digest)
    }

    /// Opens a blob for reading from a blocking thread; the reader checks size and digest.
    pub async fn open_blob(&self, key: &CacheKey, blob: &Blob) -> Result<BlobReader, ClientError> {
        let repo = self.location(key);
        let op = Op { repo: &repo, what: format!("reading blob {}", blob.digest) };
        let descriptor = OciDescriptor { digest: blob.digest.clone(), size: blob.size as i64, ..Default::default() };
        let target = self.untagged(key);
        let stream = self.call(&op, self.oci.pull_blob_stream(&target, &descriptor)).await?;
        if let Some(len) = stream.content_length.filter(|l| *l != blob.size) {
            return Err(ClientError::Other {
                repo,
                message: format!(
                    "reading blob {}: the registry sends {len} bytes, the blob is {}",
                    blob.digest, blob.size
                ),
            });
        }
        Ok(BlobReader {
            handle: tokio::runtime::Handle::current(),
            stream: stream.stream,
            chunk: Bytes::new(),
            hasher: Sha256::new(),
            read: 0,
            blob: blob.clone(),
            repo,
            timeout: self.config.timeout,
            state: ReaderState::Reading,
        })
    }

    /// The repository's tags (none when the repository does not exist).
    pub async fn tags(&self, key: &CacheKey) -> Result<Vec<String>, ClientError> {
        let repo = self.location(key);
        let op = Op { repo: &repo, what: "listing tags".into() };
        let target = self.untagged(key);
        let mut all: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..MAX_TAG_PAGES {
            let last = all.last().cloned();
            let page =
                match self.call(&op, self.oci.list_tags(&target, &self.auth, Some(TAGS_PAGE), last.as_deref())).await {
                    Ok(p) => p.tags,
                    Err(ClientError::NotFound { .. }) => Vec::new(),
                    Err(e) => return Err(e),
                };
            let full = page.len() >= TAGS_PAGE;
            let before = all.len();
            // A registry that ignores `last` sends the same page again: keep only what is new.
            for t in page {
                if seen.insert(t.clone()) {
                    all.push(t);
                }
            }
            if !full || all.len() == before {
                return Ok(all);
            }
        }
        Err(ClientError::Other { repo, message: format!("listing tags: more than {} pages", MAX_TAG_PAGES) })
    }

    /// Removes a tag by deleting the manifest it names — and with it every other tag naming
    /// the same manifest, so callers delete only tags no other tag shares. A tag already gone
    /// is not an error.
    pub async fn delete_tag(&self, key: &CacheKey, tag: &str) -> Result<(), ClientError> {
        let Some(digest) = self.tag_digest(key, tag).await? else {
            return Ok(());
        };
        let repo = self.location(key);
        let op = Op { repo: &repo, what: format!("deleting manifest {digest} (tag {tag})") };
        match tokio::time::timeout(self.config.timeout, self.delete_manifest(key, &digest, &op)).await {
            Ok(r) => r.map_err(|e| self.timed(e)),
            Err(_) => Err(self.timeout(&op)),
        }
    }

    async fn delete_manifest(&self, key: &CacheKey, digest: &str, op: &Op<'_>) -> Result<(), ClientError> {
        let scheme = if self.config.insecure { "http" } else { "https" };
        let url = format!("{scheme}://{}/v2/{}/manifests/{digest}", self.config.host, self.repository(key));
        let send = |authorization: Option<HeaderValue>| {
            let mut req = self.http.delete(&url);
            if let Some(h) = authorization {
                req = req.header(reqwest::header::AUTHORIZATION, h);
            }
            async move { req.send().await.map_err(|e| op.reqwest_error(&e)) }
        };
        // A registry token goes with the first request; anything else answers a challenge,
        // so a password is only sent where the registry asks for it.
        let first = match &self.auth {
            RegistryAuth::Bearer(t) => Some(sensitive(&format!("Bearer {t}"), op)?),
            _ => None,
        };
        let mut res = send(first).await?;
        if res.status() == StatusCode::UNAUTHORIZED {
            if let Some(h) = self.answer_challenge(res.headers().get(WWW_AUTHENTICATE), op).await? {
                res = send(Some(h)).await?;
            }
        }
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        let body = res.text().await.unwrap_or_default();
        match op.status_error(status.as_u16(), &body) {
            // Deleted meanwhile by someone else: what was asked holds.
            ClientError::NotFound { .. } => Ok(()),
            ClientError::Unsupported { repo, op, message } => Err(ClientError::Unsupported {
                repo,
                op,
                message: format!(
                    "{message}; the registry must allow deletes, e.g. storage.delete.enabled for distribution"
                ),
            }),
            e => Err(e),
        }
    }

    /// The Authorization header that answers a 401's challenge, `None` when we have no
    /// credentials that could.
    async fn answer_challenge(
        &self,
        header: Option<&HeaderValue>,
        op: &Op<'_>,
    ) -> Result<Option<HeaderValue>, ClientError> {
        let Some(challenge) = header.and_then(|h| h.to_str().ok()).and_then(Challenge::parse) else {
            return Ok(None);
        };
        let basic = match &self.auth {
            RegistryAuth::Basic(u, p) => Some((u.as_str(), p.as_str())),
            _ => None,
        };
        if challenge.scheme.eq_ignore_ascii_case("basic") {
            let Some((u, p)) = basic else { return Ok(None) };
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            return Ok(Some(sensitive(&format!("Basic {encoded}"), op)?));
        }
        if !challenge.scheme.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        let Some(realm) = challenge.param("realm") else { return Ok(None) };
        let repository = op.repo.split_once('/').map_or(op.repo, |(_, r)| r);
        let scope = challenge.param("scope").map_or_else(|| format!("repository:{repository}:delete"), str::to_string);
        let mut query = vec![("scope", scope)];
        if let Some(service) = challenge.param("service") {
            query.push(("service", service.to_string()));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some((u, p)) = basic {
            req = req.basic_auth(u, Some(p));
        }
        let res = req.send().await.map_err(|e| op.reqwest_error(&e))?;
        let status = res.status();
        let body = res.text().await.map_err(|e| op.reqwest_error(&e))?;
        if !status.is_success() {
            return Err(ClientError::Denied {
                repo: op.repo.to_string(),
                op: op.what.clone(),
                message: format!("the token service answered {status}: {}", excerpt(&body)),
            });
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token = serde_json::from_str(&body).map_err(|_| ClientError::Denied {
            repo: op.repo.to_string(),
            op: op.what.clone(),
            message: "the token service answered without a token".into(),
        })?;
        match token.token.or(token.access_token) {
            Some(t) => Ok(Some(sensitive(&format!("Bearer {t}"), op)?)),
            None => Err(ClientError::Denied {
                repo: op.repo.to_string(),
                op: op.what.clone(),
                message: "the token service answered without a token".into(),
            }),
        }
    }
}

/// An Authorization header value, kept out of reqwest's debug output.
fn sensitive(value: &str, op: &Op<'_>) -> Result<HeaderValue, ClientError> {
    let mut h = HeaderValue::from_str(value).map_err(|_| ClientError::Denied {
        repo: op.repo.to_string(),
        op: op.what.clone(),
        message: "the credentials are not a valid header value".into(),
    })?;
    h.set_sensitive(true);
    Ok(h)
}

/// A `WWW-Authenticate` challenge: a scheme and its parameters.
#[derive(Debug, PartialEq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses the first challenge of `Scheme k="v", k2=v2`; quoted values may hold commas.
    fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, mut rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.is_empty() {
            return None;
        }
        let mut params = Vec::new();
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            let Some((name, after)) = rest.split_once('=') else { break };
            let name = name.trim().to_ascii_lowercase();
            let after = after.trim_start();
            let (value, tail) = if let Some(q) = after.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = q.char_indices();
                let mut end = q.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, e)) = chars.next() {
                                value.push(e);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &q[end.min(q.len())..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            };
            params.push((name, value));
            rest = tail;
        }
        Some(Challenge { scheme: scheme.to_string(), params })
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A read error of the blob file, told apart from network errors once oci-client wraps it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct FileError(io::Error);

/// The blob file's read error inside a failed upload (which reqwest wraps in its own).
fn file_error(e: &(dyn std::error::Error + 'static)) -> Option<io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let io = match err.downcast_ref::<OciDistributionError>() {
            Some(OciDistributionError::IoError(io)) => Some(io),
            _ => err.downcast_ref::<io::Error>(),
        };
        if let Some(FileError(f)) = io.and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref::<FileError>()) {
            return Some(io::Error::new(f.kind(), f.to_string()));
        }
        cur = err.source();
    }
    None
}

/// When an upload's body last moved, and whether it has all been handed over.
struct Progress {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
    ended: AtomicBool,
}

impl Progress {
    fn new() -> Self {
        Progress { start: Instant::now(), last_ms: AtomicU64::new(0), ended: AtomicBool::new(false) }
    }

    fn touch(&self, ended: bool) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.ended.store(ended, Ordering::Relaxed);
    }

    /// Time from start to the last movement, and whether the body has ended.
    fn get(&self) -> (Duration, bool) {
        (Duration::from_millis(self.last_ms.load(Ordering::Relaxed)), self.ended.load(Ordering::Relaxed))
    }
}

/// The file as a stream of pieces for a PUT body, each read on a blocking thread; each
/// piece handed to the uploader is recorded in `progress`, the last one as the end (hyper
/// stops asking once it has the Content-Length).
fn file_stream(
    file: std::fs::File,
    path: PathBuf,
    size: u64,
    progress: Arc<Progress>,
) -> impl futures_util::Stream<Item = Result<Bytes, OciDistributionError>> + Send + 'static {
    let wrap = |e: io::Error| OciDistributionError::IoError(io::Error::other(FileError(e)));
    futures_util::stream::unfold(Some((file, 0u64, Bytes::new())), move |state| {
        let (path, progress) = (path.clone(), progress.clone());
        async move {
            let (mut file, sent, mut pending) = state?;
            // Handed over in small slices, so progress shows even on a slow link.
            if !pending.is_empty() {
                let piece = pending.split_to(pending.len().min(UPLOAD_SLICE));
                progress.touch(sent == size && pending.is_empty());
                return Some((Ok(piece), Some((file, sent, pending))));
            }
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; UPLOAD_READ];
                let mut n = 0;
                while n < buf.len() {
                    match io::Read::read(&mut file, &mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(n);
                Ok((file, buf))
            })
            .await;
            let (file, buf) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Some((Err(wrap(e)), None)),
                Err(e) => return Some((Err(wrap(io::Error::other(e))), None)),
            };
            if buf.is_empty() {
                if sent != size {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} shrank to {sent} bytes while being uploaded", path.display()),
                    );
                    return Some((Err(wrap(e)), None));
                }
                progress.touch(true);
                return None;
            }
            let sent = sent + buf.len() as u64;
            if sent > size {
                let e = io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} grew past {size} bytes while being uploaded", path.display()),
                );
                return Some((Err(wrap(e)), None));
            }
            let mut pending = Bytes::from(buf);
            let piece = pending.split_to(pending.len().min(UPLOAD_SLICE));
            progress.touch(sent == size && pending.is_empty());
            Some((Ok(piece), Some((file, sent, pending))))
        }
    })
}

enum ReaderState {
    Reading,
    Done,
    /// A failure, repeated on every later read so it never turns into a clean end.
    Failed(io::ErrorKind, String),
}

/// A blob being downloaded, read from a blocking thread; an error at the end if its size or
/// digest is not the descriptor's.
pub struct BlobReader {
    handle: tokio::runtime::Handle,
    stream: BoxStream<'static, Result<Bytes, io::Error>>,
    chunk: Bytes,
    hasher: Sha256,
    read: u64,
    blob: Blob,
    repo: String,
    timeout: Duration,
    state: ReaderState,
}

impl BlobReader {
    fn fail(&mut self, kind: io::ErrorKind, e: ClientError) -> io::Error {
        self.state = ReaderState::Failed(kind, e.to_string());
        io::Error::new(kind, e)
    }

    /// At the end of the stream: the size and the digest must be the descriptor's.
    fn finish(&mut self) -> io::Result<()> {
        let actual = format!("sha256:{:x}", std::mem::take(&mut self.hasher).finalize());
        if self.read != self.blob.size || actual != self.blob.digest {
            let what = if self.read == self.blob.size {
                format!("blob {}", self.blob.digest)
            } else {
                format!("blob {} ({} of {} bytes)", self.blob.digest, self.read, self.blob.size)
            };
            let e = ClientError::Digest { repo: self.repo.clone(), what, expected: self.blob.digest.clone(), actual };
            return Err(self.fail(io::ErrorKind::InvalidData, e));
        }
        self.state = ReaderState::Done;
        Ok(())
    }
}

impl io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.chunk.is_empty() {
                let n = buf.len().min(self.chunk.len());
                buf[..n].copy_from_slice(&self.chunk[..n]);
                self.chunk.advance(n);
                return Ok(n);
            }
            match &self.state {
                ReaderState::Reading => {}
                ReaderState::Done => return Ok(0),
                ReaderState::Failed(kind, message) => return Err(io::Error::new(*kind, message.clone())),
            }
            if buf.is_empty() {
                return Ok(0);
            }
            // The timer is made inside block_on: outside the runtime there is no reactor to
            // register it with (a reader used from a plain thread).
            let (timeout, stream) = (self.timeout, &mut self.stream);
            let next = self.handle.block_on(async move { tokio::time::timeout(timeout, stream.next()).await });
            match next {
                Err(_) => {
                    let e = ClientError::Timeout {
                        repo: self.repo.clone(),
                        op: format!("reading blob {}", self.blob.digest),
                        after: self.timeout,
                    };
                    return Err(self.fail(io::ErrorKind::TimedOut, e));
                }
                Ok(None) => {
                    self.finish()?;
                    return Ok(0);
                }
                // oci-client checks the digest at the end too; ours says which blob and repo.
                Ok(Some(Err(e))) if e.get_ref().is_some_and(|i| i.is::<DigestError>()) => {
                    self.finish()?;
                    return Ok(0);
                }
                Ok(Some(Err(e))) => {
                    let op = Op { repo: &self.repo, what: format!("reading blob {}", self.blob.digest) };
                    // oci-client passes reqwest's errors (its read timeout among them) as the
                    // inner error of an io::Error of kind Other.
                    let classified = match e.get_ref().and_then(|i| i.downcast_ref::<reqwest::Error>()) {
                        Some(r) => op.reqwest_error(r),
                        None => op.io_error(&e),
                    };
                    let (kind, e) = match classified {
                        ClientError::Timeout { repo, op, .. } => {
                            (io::ErrorKind::TimedOut, ClientError::Timeout { repo, op, after: self.timeout })
                        }
                        ClientError::Other { repo, .. } => {
                            (e.kind(), ClientError::Unreachable { repo, op: op.what, message: chain(&e) })
                        }
                        other => (e.kind(), other),
                    };
                    return Err(self.fail(kind, e));
                }
                Ok(Some(Ok(bytes))) => {
                    self.read += bytes.len() as u64;
                    if self.read > self.blob.size {
                        let e = ClientError::Other {
                            repo: self.repo.clone(),
                            message: format!(
                                "reading blob {}: more than its {} bytes arrived",
                                self.blob.digest, self.blob.size
                            ),
                        };
                        return Err(self.fail(io::ErrorKind::InvalidData, e));
                    }
                    self.hasher.update(&bytes);
                    self.chunk = bytes;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_spec_is_host_port_and_a_lower_case_prefix() {
        let c = RegistryConfig::parse("reg.example:5000/ci/caches/").unwrap();
        assert_eq!((c.host.as_str(), c.prefix.as_str()), ("reg.example:5000", "ci/caches"));
        let c = RegistryConfig::parse("reg.example").unwrap();
        assert_eq!((c.host.as_str(), c.prefix.as_str()), ("reg.example", ""));
        assert!(RegistryConfig::parse("a.b/x__y/p-q/r.s").is_ok());
        for (spec, rule) in [
            ("https://reg.example/x", "without a scheme"),
            ("", "must start with a host"),
            ("/x", "must start with a host"),
            ("reg.example:0/x", "port"),
            ("reg.example:http", "port"),
            ("reg example", "the host may hold only"),
            ("reg.example/Caches", "lower-case"),
            ("reg.example/a//b", "lower-case"),
            ("reg.example/a..b", "lower-case"),
            ("reg.example/-a", "lower-case"),
        ] {
            let err = RegistryConfig::parse(spec).unwrap_err();
            assert!(matches!(err, ClientError::Config(_)), "{spec}");
            assert!(err.to_string().contains(rule), "{spec}: {err}");
        }
    }

    #[test]
    fn tags_follow_the_distribution_rule() {
        for t in ["head", "v1", "_x", "A.b-c_d", &"a".repeat(128)] {
            assert!(is_tag(t), "{t}");
        }
        for t in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(!is_tag(t), "{t}");
        }
    }

    #[test]
    fn challenges_parse_with_quoted_commas_and_escapes() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="reg,example",scope="repository:a/b:pull,delete", error="x\"y""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "Bearer");
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("service"), Some("reg,example"));
        assert_eq!(c.param("scope"), Some("repository:a/b:pull,delete"));
        assert_eq!(c.param("error"), Some("x\"y"));
        let c = Challenge::parse("Basic realm=registry").unwrap();
        assert_eq!((c.scheme.as_str(), c.param("realm")), ("Basic", Some("registry")));
        assert_eq!(Challenge::parse(""), None);
    }

    /// A registry that wants a bearer token from its token service for every DELETE, served
    /// from one blocking thread; records each request's line and Authorization header.
    fn token_registry() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (log, realm) = (seen.clone(), format!("http://{host}/token"));
        std::thread::spawn(move || {
            for conn in listener.incoming().take(3) {
                let mut s = conn.unwrap();
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                    req.push(byte[0]);
                }
                let req = String::from_utf8(req).unwrap();
                let line = req.lines().next().unwrap().to_string();
                let authz = req
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: ").or_else(|| l.strip_prefix("Authorization: ")))
                    .unwrap_or("-")
                    .to_string();
                log.lock().unwrap().push(format!("{line} | {authz}"));
                let (status, header, body) = if line.starts_with("GET /token") {
                    ("200 OK", String::new(), r#"{"access_token":"T1"}"#)
                } else if authz == "Bearer T1" {
                    ("202 Accepted", String::new(), "")
                } else {
                    let challenge = format!(
                        "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"fake\",scope=\"repository:p/ci/m:delete\"\r\n"
                    );
                    ("401 Unauthorized", challenge, "")
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\n{header}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        (host, seen)
    }

    #[tokio::test]
    async fn a_delete_answers_a_bearer_challenge_with_a_token_for_the_scope_asked() {
        let (host, seen) = token_registry();
        let mut config = RegistryConfig::parse(&format!("{host}/p")).unwrap();
        config.insecure = true;
        let mut registry = Registry::new(config).unwrap();
        registry.auth = RegistryAuth::Basic("bot".into(), "pw".into());
        let key = CacheKey::new("ci", "m").unwrap();
        let repo = registry.location(&key);
        let op = Op { repo: &repo, what: "deleting".into() };
        let digest = format!("sha256:{}", "a".repeat(64));
        registry.delete_manifest(&key, &digest, &op).await.unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode("bot:pw");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                format!("DELETE /v2/p/ci/m/manifests/{digest} HTTP/1.1 | -"),
                format!("GET /token?scope=repository%3Ap%2Fci%2Fm%3Adelete&service=fake HTTP/1.1 | Basic {basic}"),
                format!("DELETE /v2/p/ci/m/manifests/{digest} HTTP/1.1 | Bearer T1"),
            ]
        );
    }

    #[test]
    fn only_network_timeouts_and_server_trouble_are_transient() {
        let op = Op { repo: "r/x", what: "doing".into() };
        let transient = [op.status_error(500, ""), op.status_error(503, "busy"), op.status_error(429, "")];
        for e in transient {
            assert!(e.is_transient(), "{e}");
        }
        let denied = op.status_error(401, "");
        assert!(denied.to_string().contains("check --registry-auth"), "{denied}");
        for e in [denied, op.status_error(404, ""), op.status_error(400, "bad"), op.status_error(405, "")] {
            assert!(!e.is_transient(), "{e}");
        }
        let e = op.status_error(
            400,
            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"},{"code":"X","message":"y"}]}"#,
        );
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("TOOMANYREQUESTS: slow down; X: y"), "{e}");
        let e =
            op.status_error(405, r#"{"errors":[{"code":"UNSUPPORTED","message":"The operation is unsupported."}]}"#);
        assert!(matches!(e, ClientError::Unsupported { .. }), "{e}");
        let long = "x".repeat(5000);
        assert!(op.status_error(502, &long).to_string().len() < 500);
    }
}
