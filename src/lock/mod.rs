//! The publish lock: serialises the few small writes that advance a cache's HEAD.
//! A file lock on one node; a Kubernetes Lease across a cluster, behind one trait.

mod file;
pub mod lease;

use std::path::PathBuf;
use std::time::Duration;

pub use file::FileLock;
pub use lease::{LeaseLock, LeaseTiming};

use crate::store::CacheKey;

/// Lock errors, naming the cache.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else held the lock for the whole wait; the caller should retry.
    #[error("cache {cache}: publish lock still held by another publisher after {waited:?}")]
    Timeout { cache: CacheKey, waited: Duration },
    /// The lock was lost while held (an expired Lease); HEAD must not be written.
    #[error("cache {cache}: publish lock was lost while held")]
    Lost { cache: CacheKey },
    /// The Kubernetes API kept failing or not answering until the lock's timeout, or refused a
    /// request for a reason that is neither passing nor the cluster's setup (a bad request).
    #[error("cache {cache}: {op}: {message}")]
    Api { cache: CacheKey, op: &'static str, message: String },
    /// The cluster is not set up for the driver: RBAC forbids a verb, the credentials are refused,
    /// the cache's namespace does not exist, or the server rejects the Lease as invalid. Not
    /// retried: only an administrator can fix it, and the message says what to change.
    #[error("cache {cache}: {op}: {message}")]
    Config { cache: CacheKey, op: &'static str, message: String },
    /// The lock file could not be opened or locked.
    #[error("cache {cache}: {op} {path}: {source}")]
    Io { cache: CacheKey, op: &'static str, path: PathBuf, source: std::io::Error },
}

/// A lock that one publisher of a cache holds at a time.
#[async_trait::async_trait]
pub trait PublishLock: Send + Sync {
    /// Waits up to `timeout` for the cache's lock.
    async fn acquire(&self, cache: &CacheKey, timeout: Duration) -> Result<Box<dyn LockGuard>, LockError>;
}

/// A held publish lock; released explicitly so a failed release is seen.
#[async_trait::async_trait]
pub trait LockGuard: Send + Sync {
    /// Errors if the lock was lost since it was taken (never for a file lock).
    fn ensure_held(&self) -> Result<(), LockError>;
    /// Gives the lock up.
    async fn release(self: Box<Self>) -> Result<(), LockError>;
}

/// Backoff between attempts: grows from 5 ms to 100 ms, with jitter so waiters spread out.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 5u64.saturating_mul(1 << attempt.min(5)).min(100);
    with_jitter(base)
}

/// Backoff after a failed API call: grows from 100 ms to 1.6 s, so a struggling API server is
/// not hammered by every waiting node, with jitter so the nodes do not retry in step.
pub(crate) fn api_backoff(failures: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << failures.min(4));
    with_jitter(base)
}

/// `base` milliseconds plus up to half as much again, at random.
fn with_jitter(base: u64) -> Duration {
    let mut jitter = [0u8; 2];
    let _ = getrandom::fill(&mut jitter);
    Duration::from_millis(base + u64::from(u16::from_le_bytes(jitter)) % (base / 2 + 1))
}
